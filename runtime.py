"""
Where a run runs: the device ('auto': a CUDA GPU where there is one), whether this CPU computes in
bf16 natively (so CPU autocast pays off), and the lock that keeps a second run out of a live run's
out_dir. train.py sets up its processes with these; the other scripts pick their device here.
"""
import contextlib
import os
import platform

import torch

from configurator import ConfigError


TORCH_MIN = (2, 6)  # requirements.txt's floor: torch.nn.utils.get_total_norm (train.py) is new in 2.6


def check_torch(version=None):
    """An older torch than TORCH_MIN is refused in one line, before it fails somewhere inside a run."""
    version = version or torch.__version__
    have = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    if have < TORCH_MIN:
        raise ConfigError(f"torch {version} is older than this code needs ({'.'.join(map(str, TORCH_MIN))} or newer): "
                          "pip install -r requirements.txt installs a newer one")


def pick_device(device):
    """'auto' -> 'cuda' where torch sees a CUDA GPU, else 'cpu'; any other name as it is (checked by
    configurator.check_device)."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def precision(dev, dtype, cpu_bf16):
    """The arithmetic of a training process on `dev`: on a GPU, TF32 matmuls and convolutions and
    cuDNN's autotuner; dtype 'bfloat16' autocast on a GPU, and on a CPU where cpu_bf16 says so
    ('auto': where the CPU has native bf16). -> (a function giving the autocast context, one line
    saying what the CPU computes in)."""
    cuda = dev.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    cpu_amp, why = cpu_autocast(cpu_bf16)
    use_amp = amp_dtype != torch.float32 and (cuda or cpu_amp)
    line = f"CPU autocast: {'bf16' if use_amp else 'fp32'} ({why if amp_dtype != torch.float32 else 'dtype=float32'})"
    return (lambda: torch.autocast("cuda" if cuda else "cpu", dtype=amp_dtype, enabled=use_amp)), line


# dense bf16 peak FLOP/s by GPU name, for MFU (peak_flops > 0 overrides)
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def peak_flops(dev, override=0.0):
    """The peak FLOP/s MFU divides by: `override` where given, else the table's for this GPU (0 on a
    CPU or an unknown GPU: no MFU)."""
    if override:
        return override
    cuda = dev.startswith("cuda")
    return next((v for k, v in GPU_PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name(dev)), 0.0)


# A run holds out_dir/run.lock (its pid) from its first write to its end, so that a second train.py
# into the same out_dir cannot overwrite the log or the checkpoint of a live one.
LOCK = "run.lock"


def lock_holder(out_dir):
    """The pid of a live process other than this one that holds out_dir's lock, else None (no lock,
    or a stale one: its process is gone)."""
    try:
        pid = int(open(os.path.join(out_dir, LOCK)).read().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid <= 0 or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return None
    except PermissionError:  # it exists, under another user
        pass
    return pid


def check_lock(out_dir):
    """One ConfigError where a live process other than this one holds out_dir's lock."""
    holder = lock_holder(out_dir)
    if holder:
        raise ConfigError(f"out_dir={out_dir!r} is in use by a live run (pid {holder}, "
                          f"{os.path.join(out_dir, LOCK)}): wait for it, stop it, or pick another out_dir")


def take_lock(out_dir):
    """Create out_dir/run.lock holding this pid (atomically: O_EXCL), replacing a stale one; a live
    holder is one ConfigError (check_lock). -> the lock's path."""
    path = os.path.join(out_dir, LOCK)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            check_lock(out_dir)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale: its process is gone (or it is this process's own, from an earlier run)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return path
    raise ConfigError(f"out_dir={out_dir!r}: could not take {path}")


def release_lock(path):
    """Remove the lock if this process holds it."""
    with contextlib.suppress(OSError, ValueError):
        if int(open(path).read().strip()) == os.getpid():
            os.remove(path)


def cpu_native_bf16(cpuinfo="/proc/cpuinfo", machine=None):
    """-> (bool, reason): does this CPU compute in bf16 natively, so CPU autocast pays off?
    x86: avx512_bf16 or amx_bf16 in the flags; Linux aarch64: 'bf16' in Features."""
    machine = (machine or platform.machine()).lower()
    wanted = ("avx512_bf16", "amx_bf16") if machine in ("x86_64", "amd64", "i686") else \
        ("bf16",) if machine in ("aarch64", "arm64") else ()
    if not wanted:
        return False, f"no native bf16 known for a {machine} CPU"
    try:
        lines = open(cpuinfo).read().splitlines()
    except OSError:
        return False, f"no native bf16: cannot read {cpuinfo}"
    flags = {f for line in lines if line.startswith(("flags", "Features")) for f in line.partition(":")[2].split()}
    hit = [f for f in wanted if f in flags]
    if hit:
        return True, f"{hit[0]} in {cpuinfo}"
    return False, f"no native bf16: no {' or '.join(wanted)} in {cpuinfo}"


def cpu_autocast(setting):
    """cpu_bf16 ('auto' | 'true' | 'false') -> (use bf16 autocast on the CPU, reason)."""
    setting = setting.lower()
    if setting == "auto":
        return cpu_native_bf16()
    return setting == "true", f"cpu_bf16={setting!r}"
