# dSprites teaching run for a 2-core laptop CPU, for DCI (paper §4.3.2):
#   python train.py configs/dsprites_cpu.py
#   python probe.py --ckpt=out/dsprites_cpu/ckpt.pt --task=dci --features=z                    # fast variant
#   python probe.py --ckpt=out/dsprites_cpu/ckpt.pt --task=dci --features=z --dci_model=gbt    # the paper's
# Auto-encoding views with no augmentation: a crop or flip would change the very factors (position,
# scale, orientation) that DCI asks z to encode. The z-usage recipe of configs/cifar10_cpu.py (v
# output and weighting, z standardised over the batch and per section; docs/zusage.md) and its
# learning rates; a 32-image batch, since 64x64 images cost 4x the CIFAR ones.
out_dir = "out/dsprites_cpu"
dataset = "dsprites"
data_dir = "../shared/data/dsprites"
image_size = 64
views = "identical"
aug = "none"
n_val = 500
encoder = "tiny"
unet = "tiny"
z_dim = 32
z_norm = True
z_bn = True
coords = True  # x, y channels on the input: global pooling cannot see position (docs/dci.md)
# the plain cosine training schedule, not the inverted one: a sprite's place and shape are only z's job at
# high noise, which the inverted schedule almost never draws (docs/dci.md: z removes 8.1% of the
# x0-MSE at log-SNR -3 and 18.5% at -8 after 1,000 steps, against 1.6% and 0.6% under the inverted one)
schedule = "cosine"
prediction = "v"
weighting = "v"
batch_size = 32
max_iters = 1000
lr = 1e-3
enc_lr_mult = 2.0
warmup_iters = 100
eval_interval = 500
ckpt_interval = 500
