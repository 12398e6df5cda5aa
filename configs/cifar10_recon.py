# The reconstruction model (paper §4.2.1, SPEC §4): auto-encoding views, source = target.
#   python train.py configs/cifar10_recon.py
#   python sample.py --ckpt=out/cifar10_recon/ckpt.pt --mode=recon --n=1000
# A short CPU run with the teaching sizes; p_uncond keeps an unconditional model for the
# masked-z baseline and for guidance.
out_dir = "out/cifar10_recon"
data_dir = "../shared/data/cifar10-subset"
views = "identical"
aug = "cropflip"
encoder = "tiny"
unet = "tiny"
z_dim = 128
batch_size = 64
max_iters = 1000
lr = 1e-3
enc_lr_mult = 2.0
p_mask_layer = 0.1
p_uncond = 0.1
eval_interval = 500
