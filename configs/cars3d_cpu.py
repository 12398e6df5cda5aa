# Cars3D novel view synthesis, the 2-core CPU teaching run (~10 minutes):
#   python train.py configs/cars3d_cpu.py
#   python nvs.py --ckpt=out/cars3d_cpu/ckpt.pt
# 165 real cars x 96 posed views for training, 18 unseen cars for nvs.py. Images at 32x32 (the
# 64x64 files downsampled) so a CPU sees enough of them in 10 minutes; each view's camera rays are
# embedded and concatenated to its pixels (§3.3 "Perspective"); z reaches the UNet through
# cross-attention (§3.3: better than modulation for NVS; set cond='mod' to compare); 1 or 2 source
# views per step, averaged (agg='mean'); the latent and the target pose dropped independently
# (p_uncond, p_uncond_pose) so both can be guided.
out_dir = "out/cars3d_cpu"
dataset = "cars3d"
data_dir = "../shared/data/cars3d"
image_size = 32
k_max = 2
ray_freqs = 4
encoder = "tiny"
unet = "tiny"
z_dim = 128
cond = "xattn"
n_tokens = 8
agg = "mean"
z_norm = True
p_mask_layer = 0.0
p_uncond = 0.1
p_uncond_pose = 0.1
batch_size = 32
max_iters = 1500
lr = 1e-3
enc_lr_mult = 2.0
warmup_iters = 100
eval_interval = 500
ckpt_interval = 500
cpu_bf16 = True
