# CIFAR-10 teaching run for a 2-core laptop CPU, ~10 minutes: python train.py configs/cifar10_cpu.py
out_dir = "out/cifar10_cpu"
data_dir = "../shared/data/cifar10-subset"
encoder = "tiny"
unet = "tiny"
batch_size = 64
max_iters = 1000
eval_interval = 500
