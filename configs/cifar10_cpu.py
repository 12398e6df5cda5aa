# CIFAR-10 teaching run for a 2-core laptop CPU, <= 10 minutes:
#   python train.py configs/cifar10_cpu.py
# Tiny presets, a 5x higher learning rate than configs/cifar10.py, 10x the paper's (twice that for the encoder, §3.4):
# twice 1e-3 won the validation screen of docs/yardstick.md.
# Departs from the paper where the z-usage screens chose (docs/zusage.md): a v output with the v
# loss weighting, z standardised over the batch and per section, and one augmented view as both
# source and target. The paper's setting: --prediction=eps --weighting=eps --z_bn=False --views=augment.
out_dir = "out/cifar10_cpu"
encoder = "tiny"
unet = "tiny"
z_dim = 128
z_norm = True
z_bn = True
prediction = "v"
weighting = "v"
views = "identical"
batch_size = 64
max_iters = 1000
lr = 2e-3
enc_lr_mult = 2.0
warmup_iters = 100
eval_interval = 500
ckpt_interval = 500
