# The paper's single-view NVS setting (§4.2.2, Table 3: 28.71 PSNR / 0.952 SSIM at 64x64): NMR
# ShapeNet renderings, 13 categories x 24 views per object, in the DVR / pixelNeRF layout
# (data/NMR_Dataset/<category>/<object>/{image/*.png, cameras.npz}, softras_<split>.lst).
#   torchrun --nproc_per_node=8 train.py configs/nmr.py
#   python nvs.py --ckpt=out/nmr/ckpt.pt --k=1,2
# The reader keeps the whole split in memory (~9 GB of uint8 at 64x64). Not run here (no copy of
# NMR and no GPU were available): its figures are unmeasured.
out_dir = "out/nmr"
dataset = "nmr"
data_dir = "data/NMR_Dataset"
image_size = 64
k_max = 2
ray_freqs = 6
encoder = "resnet50"
unet = "imagenet"
z_dim = 1024
cond = "mod+xattn"  # Table 3: "cross attention with feature modulation" (§3.3)
n_tokens = 16
agg = "transformer"
z_norm = True
p_mask_layer = 0.1
p_uncond = 0.1
p_uncond_pose = 0.1
p_uncond_src_pose = 0.1  # the absence of source positional information (§3.3; the rate is ours: the target's)
batch_size = 64
max_iters = 100000
lr = 2e-4
enc_lr_mult = 2.0
warmup_iters = 1000
ema_halflife_kimg = 500.0
log_interval = 100
eval_interval = 5000
ckpt_interval = 5000
compile = True
