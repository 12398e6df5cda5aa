# Cars3D novel view synthesis, the 2-core CPU teaching run (~10 minutes):
#   python train.py configs/cars3d_cpu.py
#   python nvs.py --ckpt=out/cars3d_cpu/ckpt.pt
# 165 cars x 96 posed views at 32x32, each view's camera rays beside its pixels (§3.3 "Perspective"),
# 1 or 2 source views per step. Departs from the paper's GPU setting where CPU screens chose
# (docs/nvs.md): layer modulation, not cross-attention; more noise (log-SNR shift -2, v weighting);
# and the z-usage recipe of configs/cifar10_cpu.py (v output, z standardised over the batch).
out_dir = "out/cars3d_cpu"
dataset = "cars3d"
data_dir = "../shared/data/cars3d"
image_size = 32
k_max = 2
ray_freqs = 4
encoder = "tiny"
unet = "tiny"
z_dim = 128
cond = "mod"
logsnr_shift = -2.0
weighting = "v"
prediction = "v"
z_bn = True
agg = "mean"
z_norm = True
p_mask_layer = 0.0
p_uncond = 0.1
p_uncond_pose = 0.1
batch_size = 32
max_iters = 2000
lr = 1e-3
enc_lr_mult = 2.0
warmup_iters = 100
eval_interval = 500
ckpt_interval = 500
