# Throughput benchmark on synthetic data, on top of any config:
#   python train.py configs/cifar10_cpu.py configs/bench.py
#   python train.py configs/cifar10_cpu.py configs/bench.py --compile=False --channels_last=False
# Prints train img/s, data-pipeline img/s, DDIM sampling time, peak memory (and MFU on CUDA); no checkpoint.
bench_iters = 30
bench_warmup = 5
bench_sample_n = 64
sample_steps = 50
eval_at_start = False
out_dir = "out/bench"
