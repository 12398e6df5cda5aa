# CIFAR-10 teaching run for a 2-core laptop CPU, <= 10 minutes in fp32:
#   python train.py configs/cifar10_cpu.py
# Tiny presets (0.32M encoder + 0.32M UNet), a 5x higher learning rate than the GPU configs (the
# tiny decoder learns to denoise in a few hundred steps; the encoder gets twice that, §3.4), z
# normalised per section on its way into the decoder. CIFAR-10 is found by train.py's search order
# (data_dir=''); bf16 autocast on the CPU is automatic (cpu_bf16='auto': ~1.45x faster where the CPU
# has avx512_bf16, bash tools/bench.sh).
# Where this differs from the paper (docs/zusage.md, chosen by the z-usage
# screens on the validation split): the UNet outputs v, not eps, with the v-loss weighting (an eps
# output cannot express a good image at high noise, where only z can help: x0 error = eps error
# x sigma / alpha, x54 at log-SNR -8); z is standardised over the batch on its way into the
# decoder (z_bn: at init most of z is one direction shared by all images); and source and target
# are one augmented view (auto-encoding, the paper's "trivial singular case", §3.3): at this size
# two crops share too little for the decoder to lean on z. The paper's setting:
# --prediction=eps --weighting=eps --z_bn=False --views=augment.
out_dir = "out/cifar10_cpu"
encoder = "tiny"
unet = "tiny"
z_dim = 128
z_norm = True
z_bn = True
prediction = "v"
weighting = "v"
views = "identical"
batch_size = 64
max_iters = 1000
lr = 1e-3
enc_lr_mult = 2.0
warmup_iters = 100
eval_interval = 500
ckpt_interval = 500
