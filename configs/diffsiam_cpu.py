# DiffSiam teaching run on a 2-core CPU (~10 minutes), on top of the SODA teaching config:
#   python train.py configs/cifar10_cpu.py configs/diffsiam_cpu.py
#   python probe.py --ckpt=out/diffsiam_cpu/ckpt.pt --task=fewshot --features=pool
#   python sample.py --ckpt=out/diffsiam_cpu/ckpt.pt --mode=interp --sections=0,1,2,3   # segments 0-3
# The same model and steps as configs/cifar10_cpu.py, with z in 64 hierarchical segments and the
# SimSiam loss (weight 1); its second encoder pass costs about 1/6 of the step on this CPU.
out_dir = "out/diffsiam_cpu"
segments = 64
segment_mode = "hierarchical"
simsiam_weight = 1.0
simsiam_dim = 512
# The setting the DiffSiam figures of docs/diffsiam.md are measured with, the paper's recipe rather than the
# z-usage one: two augmented views (SimSiam needs them), eps output and loss, no z_bn, 1,500 steps.
views = "augment"
prediction = "eps"
weighting = "eps"
z_bn = False
lr = 1e-3  # the teaching config's rate when these figures were measured (it now trains at 2e-3)
max_iters = 1500
eval_interval = 750
ckpt_interval = 750
