# "w/o bottleneck" (Table 1): no compact z; the encoder's whole final feature map reaches the
# decoder, one cross-attention token per position. For the tiny encoder at 32x32 that is 8x8
# positions x 128 features; for resnet18 (configs/cifar10.py) 4x4 x 512: add --n_tokens=16.
bottleneck = False
cond = "xattn"
n_tokens = 64
z_dim = 8192
