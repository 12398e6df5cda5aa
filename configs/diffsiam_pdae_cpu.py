# DiffSiam with the thesis' decoder (§3.2, Fig. 3.1): a frozen pre-trained unconditional denoiser
# eps_theta plus a trainable PDAE gradient estimator G (the UNet's decoder half, modulated by z,
# reading the frozen encoder half's features): eps_hat = eps_theta(x_t) - sqrt(1 - abar) G(x_t, z).
# On top of the SODA and DiffSiam teaching configs, after training the unconditional model:
#   python train.py configs/cifar10_cpu.py configs/ablations/uncond.py --out_dir=out/dm_cpu
#   python train.py configs/cifar10_cpu.py configs/diffsiam_cpu.py configs/diffsiam_pdae_cpu.py
# Only the encoder, G and the SimSiam heads train; a step skips the backward pass of the frozen half.
out_dir = "out/diffsiam_pdae_cpu"
pretrained = "out/dm_cpu/ckpt.pt"
