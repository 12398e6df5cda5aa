# The paper's recipe under every ablation variant (tools/ablations.sh passes it after the
# base config): novel views from two augmentations, eps output and eps loss, z not standardised
# over the batch. The teaching config's z-usage recipe (v, z_bn, one view) is not the paper's, and
# "w/o novel views" would be the teaching config itself. The table of docs/ablations.md (paper recipe): 1,500 steps
# (--max_iters=1500 --eval_interval=750 --ckpt_interval=750 on configs/cifar10_cpu.py).
views = "augment"
prediction = "eps"
weighting = "eps"
z_bn = False
