"""PyTorch picks its CPU kernels at run time (AVX-512, AVX2 or plain code), and their rounding
differs. The tests that compare two code paths run under this CPU's kernels in tests/test_train.py
(marked numerics) and again under a second kernel set, forced with ATEN_CPU_CAPABILITY, so that a
tolerance fitted to one CPU's kernels fails here instead of on someone else's machine: the GPU
check's dry run (tests/test_tools.py: fused vs looped AdamW, compile vs eager, channels_last,
bf16 autocast, resume) and tests/test_train.py's DDP test, whose two arms run as new processes
under the second set (so it runs under that set only; the whole suite was also run under each of
ATEN_CPU_CAPABILITY=avx512, avx2 and default)."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def other_kernel_set():
    """This CPU's kernel set is torch.backends.cpu.get_cpu_capability(); the other one: AVX2 where
    the CPU runs AVX-512, else the plain (default) kernels."""
    return "avx2" if torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512") else "default"


def capability_under(kernels):
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=kernels)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()


def test_the_second_kernel_set_takes_effect():
    kernels = other_kernel_set()
    if kernels == torch.backends.cpu.get_cpu_capability().lower():
        pytest.skip("this CPU runs the plain kernels only: there is no second set")
    assert capability_under(kernels).lower() == kernels
