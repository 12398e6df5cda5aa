# DiffSiam (thesis ch. 3) on CIFAR-10, one GPU: use on top of the SODA GPU config,
#   python train.py configs/cifar10.py configs/diffsiam_cifar10.py
# z in 64 segments; noise position u trains with the first ceil(64 u) of them on (hierarchical:
# more noise, more lost attributes, more segments to compensate, thesis §3.2); the SimSiam loss
# on the two augmented views is added with weight 1 (thesis eq. 3.12). The denoiser trains jointly;
# for the thesis' frozen pre-trained denoiser + PDAE gradient estimator add
# --pretrained=<an unconditional checkpoint of the same UNet> (see configs/diffsiam_pdae_cpu.py).
out_dir = "out/diffsiam_cifar10"
segments = 64
segment_mode = "hierarchical"
simsiam_weight = 1.0
simsiam_dim = 2048
