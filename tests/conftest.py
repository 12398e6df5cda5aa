import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One intra-op thread: these tests use tiny tensors, and with more threads a busy 2-core machine
# (e.g. a training run alongside) makes OpenMP spin and the suite ~10x slower.
torch.set_num_threads(1)
