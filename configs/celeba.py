# CelebA at 64x64 on one GPU (§4.1: linear probe over z of the 40 attributes, 72.7% mean F1 in the
# paper's Supp Table 6), with the paper's "Gaussian data augmentation" (data.augment: a flip and
# N(0, 0.1^2) pixel noise; the paper gives no more). DATA_DIR holds torchvision's layout:
# DATA_DIR/celeba/img_align_celeba/*.jpg, list_attr_celeba.txt, list_eval_partition.txt.
#   python train.py configs/celeba.py --data_dir=DATA_DIR
#   python probe.py --ckpt=out/celeba/ckpt.pt --task=multilabel
# The paper does not name its CelebA encoder: ResNet-18 and the DDPM-size UNet, as configs/cifar10.py.
# 162,770 training images; 40,000 steps at batch 256 are ~63 epochs. Not yet run on a GPU here.
out_dir = "out/celeba"
dataset = "celeba"
data_dir = "data"
image_size = 64
num_workers = 8
encoder = "resnet18"
unet = "cifar"
z_dim = 512
aug = "gaussian"
batch_size = 256
max_iters = 40_000
lr = 2e-4
enc_lr_mult = 2.0
warmup_iters = 1000
ema_halflife_kimg = 500.0
log_interval = 100
eval_interval = 2000
ckpt_interval = 2000
compile = True
channels_last = True
prediction = "v"
weighting = "v"
z_bn = True
