# CIFAR-10 teaching run for a 2-core laptop CPU, ~8-10 minutes:
#   python train.py configs/cifar10_cpu.py
# Tiny presets (0.32M encoder + 0.32M UNet), a 5x higher learning rate than the GPU configs (the
# tiny decoder learns to denoise in a few hundred steps; the encoder gets twice that, §3.4), z
# normalised per section on its way into the decoder. CIFAR-10 is found by train.py's search order
# (data_dir=''); bf16 autocast on the CPU is automatic (cpu_bf16='auto': ~1.45x faster where the CPU
# has avx512_bf16, bash configs/bench.sh).
out_dir = "out/cifar10_cpu"
encoder = "tiny"
unet = "tiny"
z_dim = 128
z_norm = True
batch_size = 64
max_iters = 1500
lr = 1e-3
enc_lr_mult = 2.0
warmup_iters = 100
eval_interval = 750
ckpt_interval = 750
