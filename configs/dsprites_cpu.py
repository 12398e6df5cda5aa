# dSprites teaching run for a 2-core laptop CPU, for DCI (paper §4.3.2): python train.py configs/dsprites_cpu.py
# then: python probe.py --ckpt=out/dsprites_cpu/ckpt.pt --task=dci --features=z
# Auto-encoding views with no augmentation: a crop or flip would change the very factors (position,
# scale, orientation) that DCI asks z to encode. Not yet timed here.
out_dir = "out/dsprites_cpu"
dataset = "dsprites"
data_dir = "../shared/data/dsprites"
image_size = 64
views = "identical"
aug = "none"
n_val = 500
encoder = "tiny"
unet = "tiny"
z_dim = 32
batch_size = 64
max_iters = 1000
eval_interval = 500
