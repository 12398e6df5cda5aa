"""
The config: plain-Python config files and --key=value flags over a script's defaults (configure),
every value checked before any work (check_keys, validate: one ConfigError naming the key, the
value given and what is allowed), the rules of a resume, the CPU's bf16 autocast, and the model a
config describes (build_model). Shared by train.py, probe.py, sample.py and nvs.py.

As nanoGPT's configurator, a config file is Python assignments to the script's globals; unlike it,
a key that does not exist is an error naming the closest one, and a value keeps its key's type.
"""
import ast
import builtins
import contextlib
import difflib
import math
import os
import platform
import re
import tempfile
import traceback
import warnings

import torch

import data
import diffsiam
import diffusion as D
import model as M


class ConfigError(Exception):
    pass


def configure(argv, defaults):
    """[config.py ...] [--key=value ...] -> a dict of `defaults` overridden. Config files are
    executed as Python (only the files the user names); unknown keys raise naming the closest one."""
    cfg = dict(defaults)

    def set_key(k, v, where):
        if k not in cfg:
            close = difflib.get_close_matches(k, cfg, n=1)
            raise ConfigError(f"unknown config key {k!r} in {where}" + (f"; did you mean {close[0]!r}?" if close else ""))
        old = cfg[k]
        if isinstance(v, bool) != isinstance(old, bool) or \
                not isinstance(v, type(old)) and not (isinstance(old, float) and isinstance(v, int)):
            raise ConfigError(f"{k} in {where} must be {type(old).__name__}, got {v!r}")
        cfg[k] = float(v) if isinstance(old, float) else v

    for arg in argv:
        if arg.startswith("--"):
            k, sep, v = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"flags look like --key=value, got {arg!r}")
            if not isinstance(cfg.get(k), str):  # a string key keeps the text as typed (--ws=1,2)
                try:
                    v = ast.literal_eval(v)
                except (ValueError, SyntaxError):
                    pass  # left a string: set_key then names the type it wanted
            set_key(k, v, arg)
        else:
            if os.path.isdir(arg):
                raise ConfigError(f"config file {arg!r} is a directory: name a Python file of key = value lines")
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} not found")
            ns = {}
            try:  # a mistake in the file is one line naming the file and the line
                code = builtins.compile(open(arg).read(), arg, "exec")  # `compile` is a config key here
            except SyntaxError as e:
                raise ConfigError(f"config file {arg!r}, line {e.lineno}: {e.msg}") from None
            except (OSError, ValueError) as e:  # unreadable, not UTF-8, NUL bytes
                raise ConfigError(f"cannot read config file {arg!r}: {e}") from None
            try:
                exec(code, {}, ns)
            except Exception as e:
                line = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == arg][-1:] or ["?"]
                raise ConfigError(f"config file {arg!r}, line {line[0]}: {type(e).__name__}: {e}") from None
            for k, v in ns.items():
                if not k.startswith("_") and not callable(v) and not isinstance(v, type(os)):
                    set_key(k, v, arg)
    return cfg


def check_keys(cfg, choices=None, ranges=()):
    """One ConfigError for the first value not allowed: choices {key: allowed values}, ranges
    [(keys, test, what is allowed)]; floats must also be finite."""
    for k, allowed in (choices or {}).items():
        if cfg[k] not in allowed:
            raise ConfigError(f"{k}={cfg[k]!r} is not allowed: choose from {', '.join(map(repr, allowed))}")
    for keys, ok, what in ranges:
        for k in keys:
            if isinstance(cfg[k], float) and not math.isfinite(cfg[k]) or not ok(cfg[k]):
                raise ConfigError(f"{k}={cfg[k]!r} is out of range: it must be {what}")


def check_schedules(cfg, *keys):
    """Each key must name a schedule diffusion.get_schedule knows."""
    for k in keys:
        try:
            D.get_schedule(cfg[k])
        except ValueError as e:
            raise ConfigError(f"{k}={cfg[k]!r}: {e}") from None


def check_device(dev):
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", dev):
        raise ConfigError(f"device={dev!r} is not allowed: 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={dev!r}, but torch sees no CUDA device here: use device='auto' or 'cpu'")
    if dev.startswith("cuda:") and int(dev[5:]) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"device={dev!r}, but torch sees {n} CUDA device{'s' * (n != 1)} here: use 'cuda:0'"
                          + (f"..'cuda:{n - 1}'" if n > 1 else ""))
    if dev == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={dev!r}, but this torch has no MPS (Apple GPU) device here: use device='auto' or 'cpu'")


# a seed reaches torch.manual_seed scaled (train.py's data.Rng: seed * 1_000_003 + step), which must fit 64 bits
SEED_RANGE = (("seed",), lambda v: abs(v) < 2**32, "an integer with |seed| < 2**32")


def parse_list(text, kind=float):
    try:
        return [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None


def parse_groups(text):
    """'0,1' -> [[0, 1]]; '0-3;8-15' -> [[0, 1, 2, 3], [8, ..., 15]]: groups of section numbers."""
    groups = []
    for part in str(text).split(";"):
        secs = []
        for item in (i.strip() for i in part.split(",")):
            if not item:
                continue
            lo, _, hi = item.partition("-")
            if not (lo.isdigit() and (hi.isdigit() or not hi)):
                raise ConfigError(f"sections: expected numbers and ranges like 0,1 or 0-7;8-15, got {text!r}")
            if hi and int(hi) < int(lo):
                raise ConfigError(f"sections={text!r}: the range {item!r} runs backwards: write it low-high ({hi}-{lo})")
            secs += range(int(lo), int(hi or lo) + 1)
        if secs:
            groups.append(secs)
    return groups


# -----------------------------------------------------------------------------
# train.py's keys: what each allows, what a resume may change

CHOICES = dict(
    init_from=("scratch", "resume"), dataset=("cifar10", "folder", "imagenet", "celeba", "dsprites") + data.MULTIVIEW,
    views=("augment", "identical", "class"), aug=("none", "cropflip", "simclr", "randaugment", "gaussian"),
    cond=("mod", "xattn", "mod+xattn", "emb"), agg=("mean", "transformer"), prediction=("eps", "v", "x0"),
    weighting=("eps", "v"), segment_mode=("hierarchical", "sequential"), dtype=("bfloat16", "float32"),
    encoder=tuple(M.PRESETS["encoder"]), unet=tuple(M.PRESETS["unet"]))

RANGES = [
    (("batch_size", "grad_accum", "max_iters", "log_interval", "ckpt_interval", "sample_steps", "k_max", "z_dim", "n_tokens",
      "simsiam_dim", "bench_sample_n"), lambda v: v >= 1, ">= 1"),
    (("eval_interval", "n_val", "num_workers", "ray_freqs", "segments", "threads", "warmup_iters", "bench_iters",
      "bench_warmup", "weight_decay", "grad_clip", "enc_noise", "z_init", "simsiam_weight", "peak_flops",
      "ema_rampup"), lambda v: v >= 0, ">= 0"),
    (("lr", "enc_lr_mult", "ema_halflife_kimg"), lambda v: v > 0, "> 0"),
    (("p_mask_layer", "p_uncond", "p_uncond_pose", "p_uncond_src_pose", "min_lr_ratio"), lambda v: 0 <= v <= 1,
     "in [0, 1]"),
    (("beta2",), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("crop_min",), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("image_size",), lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8"),
    (("logsnr_shift",), lambda v: True, "finite"),
    SEED_RANGE,
]

# what a resume may change: where and how often to log / evaluate / save, how long to train, how
# fast (device, threads, kernels), and how the global batch is split (batch_size, grad_accum: train.py
# checks that their product with the process count stays). Every other key changes the model, the
# data order or the optimisation, and a resume with another value is refused.
RESUME_MAY_CHANGE = {"out_dir", "init_from", "overwrite", "log_interval", "eval_interval", "ckpt_interval", "ckpt_keep",
                     "batch_size", "grad_accum",
                     "eval_at_start", "max_iters", "data_dir", "download", "num_workers", "sample_steps",
                     "sample_schedule", "device", "dtype", "cpu_bf16", "compile", "compile_backend", "fused_adamw",
                     "channels_last", "threads", "peak_flops", "bench_iters", "bench_warmup", "bench_sample_n"}


def validate(cfg):
    """Every value against what it allows, before anything is read or written: one ConfigError
    naming the key, the value given and what is allowed."""
    check_keys(cfg, CHOICES, RANGES)
    if cfg["cpu_bf16"].lower() not in ("auto", "true", "false"):
        raise ConfigError(f"cpu_bf16={cfg['cpu_bf16']!r} is not allowed: choose from 'auto', 'true', 'false'")
    check_schedules(cfg, "schedule", "sample_schedule")
    check_device(cfg["device"])
    if cfg["dataset"] != "cifar10" and not cfg["data_dir"] and not cfg["bench_iters"]:
        raise ConfigError(f"dataset={cfg['dataset']!r} needs data_dir (only cifar10 is searched for or downloaded)")
    if cfg["dataset"] in data.MULTIVIEW and not cfg["ray_freqs"] and not cfg["bench_iters"]:
        raise ConfigError(f"dataset {cfg['dataset']!r} has camera poses: set ray_freqs > 0 so the model sees them")
    if cfg["ray_freqs"] and cfg["bench_iters"]:
        raise ConfigError(f"ray_freqs={cfg['ray_freqs']} with bench_iters={cfg['bench_iters']}: the benchmark's synthetic "
                          "images have no camera poses; time the model with --ray_freqs=0")
    if cfg["ray_freqs"] and cfg["dataset"] not in data.MULTIVIEW:
        raise ConfigError(f"ray_freqs={cfg['ray_freqs']} feeds the model camera rays, but dataset={cfg['dataset']!r} "
                          f"has no camera poses: set ray_freqs=0, or train on {', '.join(data.MULTIVIEW)}")
    if cfg["p_uncond_src_pose"] > 0 and cfg["dataset"] not in data.MULTIVIEW:
        raise ConfigError(f"p_uncond_src_pose={cfg['p_uncond_src_pose']} drops source poses: only multi-view datasets "
                          f"have them ({', '.join(data.MULTIVIEW)}), not {cfg['dataset']!r}")
    if cfg["views"] == "class" and cfg["dataset"] in ("folder", "imagenet", "celeba"):
        raise ConfigError(f"views='class' pairs images of a class in memory: not for {cfg['dataset']} (decoded from files)")
    if cfg["simsiam_weight"] > 0 and (cfg["segments"] < 1 or cfg["views"] != "augment"):
        raise ConfigError("simsiam_weight > 0 is DiffSiam: it needs segments >= 1 and views='augment' (two augmented views)")
    if cfg["pretrained"] and not os.path.isfile(cfg["pretrained"]):
        raise ConfigError(f"pretrained={cfg['pretrained']!r}: " + ("a directory, not a checkpoint file"
                          if os.path.isdir(cfg["pretrained"]) else "no such checkpoint file"))
    if cfg["compile"]:
        from torch._dynamo import list_backends
        backends = list_backends(exclude_tags=())
        if cfg["compile_backend"] not in backends:
            raise ConfigError(f"compile_backend={cfg['compile_backend']!r} is not a torch.compile backend: choose from "
                              f"{', '.join(map(repr, sorted(set(list_backends()) | {'aot_eager', 'eager'})))} "
                              "(all: torch._dynamo.list_backends(exclude_tags=()))")
    try:  # the model's own checks (bottleneck=False shapes, ...), on the meta device: no memory, no time
        with torch.device("meta"):
            build_model(cfg)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"the model cannot be built: {e}") from None
    out = cfg["out_dir"]
    check_out_dir("out_dir", out)
    holder = lock_holder(out)
    if holder:
        raise ConfigError(f"out_dir={out!r} is in use by a live run (pid {holder}, {os.path.join(out, LOCK)}): "
                          "wait for it, stop it, or pick another out_dir")
    if cfg["init_from"] == "scratch" and not cfg["bench_iters"] and not cfg["overwrite"] and \
            os.path.exists(os.path.join(out, "ckpt.pt")):
        raise ConfigError(f"out_dir={out!r} already holds ckpt.pt: continue it with --init_from=resume, "
                          "pick another out_dir, or pass --overwrite=True to start over")


def check_out_dir(key, path):
    """path must be a directory this process can write into, or create: one ConfigError otherwise.
    Nothing is left behind: a probe directory is made and removed in its nearest existing parent."""
    if not path:
        raise ConfigError(f"{key}='' is empty: name a directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key}={path!r} is a file, not a directory")
    parent = os.path.abspath(path)
    while not os.path.isdir(parent):
        if os.path.lexists(parent):  # a file (or a broken link) on the way
            raise ConfigError(f"{key}={path!r} cannot be created: {parent!r} is not a directory")
        parent = os.path.dirname(parent)
    check_writable(key, path, parent, "its files")


def check_writable(key, value, folder, what):
    """folder, an existing directory, must take new files: one ConfigError naming key=value otherwise.
    what: what the script writes there. Nothing is left behind (a probe directory, made and removed)."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
    except OSError as e:
        raise ConfigError(f"{key}={value!r}: {what} cannot be written in {folder!r} ({e.strerror})") from None


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


def take_lock(out_dir):
    """Create out_dir/run.lock holding this pid (atomically: O_EXCL), replacing a stale one; a live
    holder is one ConfigError. -> the lock's path."""
    path = os.path.join(out_dir, LOCK)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = lock_holder(out_dir)
            if holder:
                raise ConfigError(f"out_dir={out_dir!r} is in use by a live run (pid {holder}, {path}): "
                                  "wait for it, stop it, or pick another out_dir") from None
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


def resume_conflicts(old, new):
    """Keys whose value differs between a checkpoint's config and this run's, and may not."""
    return [f"{k}={old[k]!r} (now {new[k]!r})" for k in new
            if k not in RESUME_MAY_CHANGE and k in old and old[k] != new[k]]


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


# -----------------------------------------------------------------------------
# the model a config describes

def build_model(cfg):
    """model.SODA as a train.py config describes it; diffsiam.DiffSiam where it asks for the
    thesis' variant (segments, SimSiam heads, or a pretrained frozen denoiser)."""
    kw = dict(z_dim=cfg["z_dim"], image_size=cfg["image_size"], cond=cfg["cond"], n_tokens=cfg["n_tokens"],
              agg=cfg["agg"], ray_freqs=cfg["ray_freqs"], p_mask_layer=cfg["p_mask_layer"], p_uncond=cfg["p_uncond"],
              p_uncond_pose=cfg["p_uncond_pose"] if cfg["ray_freqs"] else 0.0, z_norm=cfg.get("z_norm", False),
              z_bn=cfg.get("z_bn", False), bottleneck=cfg.get("bottleneck", True),
              prediction=cfg.get("prediction", "eps"), z_init=cfg.get("z_init", 0.0), coords=cfg.get("coords", False),
              top_skips=cfg.get("top_skips", True))
    if not (cfg.get("segments") or cfg.get("simsiam_weight", 0) > 0 or cfg.get("pretrained")):
        return M.build(cfg["encoder"], cfg["unet"], **kw)
    return diffsiam.build(cfg["encoder"], cfg["unet"], segments=cfg.get("segments", 0),
                          segment_mode=cfg.get("segment_mode", "hierarchical"), schedule=cfg["schedule"],
                          logsnr_shift=cfg.get("logsnr_shift", 0.0),
                          simsiam_dim=cfg["simsiam_dim"] if cfg.get("simsiam_weight", 0) > 0 else 0,
                          pdae=bool(cfg.get("pretrained")), **kw)


def plain_warnings():
    """A warning (a partial data copy, a fallback) as one line `warning: ...`, without the file
    and the source line Python shows by default: a user reads a message, not our code."""
    warnings.formatwarning = lambda message, category, *args, **kw: f"warning: {message}\n"
