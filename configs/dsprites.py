# dSprites on one GPU, for DCI (paper §4.3.2, Table 4): python train.py configs/dsprites.py
# then: python probe.py --ckpt=out/dsprites/ckpt.pt --task=dci --features=z
# Auto-encoding views, no augmentation (a crop or flip changes the factors DCI measures). About 70
# epochs of the 41k-image training split at batch 256. Wall time not yet measured on a GPU here.
out_dir = "out/dsprites"
dataset = "dsprites"
data_dir = "../shared/data/dsprites"
image_size = 64
views = "identical"
aug = "none"
n_val = 1000
encoder = "resnet18"
unet = "small"
z_dim = 64
coords = True  # x, y channels on the input: global pooling cannot see position (docs/dci.md)
# The paper's eps output and inverted schedule. On the 2-core CPU (configs/dsprites_cpu.py) the decoder only
# read z once it was trained on the cosine schedule with a v output: try those here if z-usage stays low.
batch_size = 256
max_iters = 12_000
lr = 2e-4
warmup_iters = 500
ema_halflife_kimg = 200.0
log_interval = 100
eval_interval = 2000
ckpt_interval = 2000
compile = True
channels_last = True
