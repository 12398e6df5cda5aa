"""PyTorch picks its CPU kernels at run time (AVX-512, AVX2 or plain code), and their rounding
differs. The tests that compare two code paths run under this CPU's kernels in tests/test_train.py
(marked numerics) and again under a second kernel set, forced with ATEN_CPU_CAPABILITY, so that a
tolerance fitted to one CPU's kernels fails here instead of on someone else's machine: the GPU
check's dry run (tests/test_gpu_check.py: fused vs looped AdamW, compile vs eager, channels_last,
bf16 autocast, resume) and, here, DDP vs one process."""
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


@pytest.mark.skipif(bool(os.environ.get("ATEN_CPU_CAPABILITY")), reason="the suite already runs under a chosen kernel set")
def test_ddp_under_a_second_kernel_set():
    kernels = other_kernel_set()
    assert capability_under(kernels).lower() == kernels  # the variable took effect
    env = dict(os.environ, ATEN_CPU_CAPABILITY=kernels, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "numerics", "-k", "ddp", "-n", "0",
                        "-p", "no:cacheprovider", "tests/test_train.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"under ATEN_CPU_CAPABILITY={kernels}:\n" + r.stdout[-3000:]
    assert "1 passed" in r.stdout, r.stdout[-500:]  # DDP (2 gloo processes) vs one process
