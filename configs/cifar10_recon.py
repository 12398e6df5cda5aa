# The reconstruction model (paper §4.2.1): auto-encoding views, source = target.
#   python train.py configs/cifar10_recon.py
#   python sample.py --ckpt=out/cifar10_recon/ckpt.pt --mode=recon --n=1000
# A short CPU run with the teaching sizes; p_uncond keeps an unconditional model for the
# masked-z baseline and for guidance. The decoder only learns to read z where the noisy target
# alone cannot tell it the image, so this run trains at more noise than the representation runs:
# log-SNR shifted by -2 and the v-loss weighting (eps-MSE / abar, i.e. x0-MSE (1 + SNR)). In
# 400-step screens (64 test images, DDIM 50) that raised recon PSNR from 8.1 dB (plain, z_norm)
# to 10.2 dB; shift -3 alone gave 9.6, v alone 8.9. With the z-usage recipe of configs/cifar10_cpu.py
# on top (a v output, z standardised over the batch; docs/zusage.md), recon on
# 1,000 test images went from 12.15 to 13.55 dB (DDIM 50).
out_dir = "out/cifar10_recon"
views = "identical"
aug = "cropflip"
encoder = "tiny"
unet = "tiny"
z_dim = 128
z_norm = True
logsnr_shift = -2.0
weighting = "v"
prediction = "v"
z_bn = True
batch_size = 64
max_iters = 1500
lr = 1e-3
enc_lr_mult = 2.0
p_mask_layer = 0.1
p_uncond = 0.1
eval_interval = 500
