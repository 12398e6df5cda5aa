# ImageNet at paper scale on 8 GPUs (§4.1, Table 1): ResNet-50x2 encoder (94M), ~36M UNet,
# 2048-d z, RandAugment views, inverted schedule.
#   torchrun --nproc_per_node=8 train.py configs/imagenet.py
#   sbatch tools/slurm/one_node.sbatch configs/imagenet.py      # SLURM: stops with a checkpoint on its SIGTERM
# data_dir holds train/<wnid>/*.JPEG and val/<wnid>/*.JPEG. Cannot run on a laptop; a test builds
# this model and runs one step at a tiny batch and resolution on the CPU.
out_dir = "out/imagenet"
dataset = "imagenet"
data_dir = "data/imagenet"
image_size = 128
n_val = 0
num_workers = 10
encoder = "resnet50x2"
unet = "imagenet"
z_dim = 2048
aug = "randaugment"
batch_size = 128  # per GPU: global batch 1024
max_iters = 300_000
lr = 2e-4
enc_lr_mult = 2.0
warmup_iters = 5000
ema_halflife_kimg = 2000.0
log_interval = 100
eval_interval = 10_000
ckpt_interval = 5000
compile = True
channels_last = True
