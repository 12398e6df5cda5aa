# Ablations (paper Table 1, §4.1): the full model, i.e. the base config unchanged.
#   bash tools/ablations.sh            # every variant on configs/cifar10_cpu.py, then the table
