# CIFAR-10 on one GPU: ResNet-18 encoder + DDPM-size UNet (~39M), the paper's recipe at CIFAR scale.
#   python train.py configs/cifar10.py
# 100 epochs of the full 50k training set (9,750 steps at batch 512). Downloads CIFAR-10 into
# data_dir on first use (needs internet). Wall time not yet measured on a GPU here: at
# ~40 GFLOP per image and 20-30% of an H100's bf16 peak that is 15-25 minutes.
out_dir = "out/cifar10"
data_dir = "data/cifar10"
download = True
n_val = 1000
encoder = "resnet18"
unet = "cifar"
z_dim = 512
aug = "simclr"
batch_size = 512
max_iters = 9750
lr = 4e-4
enc_lr_mult = 2.0
warmup_iters = 500
weight_decay = 0.0
ema_halflife_kimg = 500.0
log_interval = 100
eval_interval = 1000
ckpt_interval = 1000
sample_steps = 50
compile = True
channels_last = True
# From the CPU z-usage study (docs/zusage.md), the two choices whose reason does
# not depend on scale: a v output with the v-loss weighting (an eps output cannot express a good
# image at high noise, where only z helps) and z standardised over the (global) batch before the
# decoder. Views stay the paper's two augmentations (auto-encoding won at 32 px on a tiny model;
# not measured at this size). Not yet measured on a GPU.
prediction = "v"
weighting = "v"
z_bn = True
