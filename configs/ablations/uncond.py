# "Unconditional diffusion" (Table 1, footnote 2): the UNet never sees z (all of it dropped every
# step), and the probe reads the UNet's pooled middle block over a lightly noised image:
#   python probe.py --ckpt=<out>/ckpt.pt --features=unet
p_uncond = 1.0
