"""
Train SODA. One code path for a laptop CPU, one GPU, and many GPUs:

    python train.py configs/cifar10_cpu.py                      # CPU teaching run
    python train.py configs/cifar10.py --batch_size=256          # one GPU
    torchrun --nproc_per_node=8 train.py configs/imagenet.py     # 8 GPUs (DDP)

Config files are plain Python assignments to the globals below; `--key=value` flags override
them. Only existing keys may be set (a typo raises, naming the closest key), values keep their type.

Reading order: the config (the globals below), then main(), which is the loop: setup() builds a
Run (the config as attributes, plus the processes, data, model, EMA and optimizer), and each step
calls train_step(run, it), with evaluate(run, it) and save_run(run, it) at their intervals.
Importing this file has no side effects: probe.py / sample.py / nvs.py import its config readers
(configure, check_keys, ...) and the helpers in the section marked for them (load_checkpoint,
build_model, extract_features, knn_accuracy, ...).
"""
import ast
import builtins
import contextlib
import copy
import difflib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import threading
import time
import traceback
import types

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import diffusion as D
import model as M

# -----------------------------------------------------------------------------
# default config (a small CPU run); every key can be set by a config file or --key=value
# I/O
out_dir = "out"  # checkpoint, log.jsonl and sample grids go here
init_from = "scratch"  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
overwrite = False  # a scratch run may replace an out_dir that already holds ckpt.pt (and its log)
log_interval = 20  # steps between log lines (the only host syncs in the loop)
eval_interval = 500  # steps between evaluations (kNN, z-gap, sample grid); 0 = only at the end
ckpt_interval = 500  # steps between checkpoints (and one at the end)
ckpt_keep = False  # also keep every checkpoint as ckpt_<step>.pt (learning curves: probe each one)
eval_at_start = True  # evaluate the untrained model too: the baseline every figure is compared with
# data
dataset = "cifar10"  # 'cifar10' | 'imagenet' | 'dsprites' | multi-view: 'cars3d' | 'nmr' | 'srn'
data_dir = ""  # '' (cifar10 only): ./data/cifar10, else ../shared/data/cifar10-subset, else download into ./data/cifar10
download = False  # with a data_dir that holds no CIFAR-10: let torchvision download it there (needs internet)
image_size = 32
views = "augment"  # 'augment' (two augmentations: novel views) | 'identical' (auto-encoding) | 'class'
# (multi-view datasets always give 'multiview' batches: k posed source views + 1 posed target view)
k_max = 2  # multi-view: each step uses k = 1..k_max source views of an object (§3.3 "Cardinality")
aug = "cropflip"  # 'none' | 'cropflip' | 'simclr' | 'randaugment'
crop_min = 0.25  # smallest random crop, as a fraction of the image's area (how much two views share)
n_val = 500  # images held out of the training set for the kNN check and the z-gap
num_workers = 4  # DataLoader workers (image-folder datasets only)
# model
encoder = "tiny"  # model.PRESETS['encoder'] key
unet = "tiny"  # model.PRESETS['unet'] key
z_dim = 128  # size of the bottleneck latent z
cond = "mod"  # 'mod' (layer modulation) | 'xattn' (cross-attention) | 'emb' (z into the noise embedding)
n_tokens = 8  # tokens of z for cond='xattn'
agg = "mean"  # aggregation of k source views: 'mean' | 'transformer'
ray_freqs = 0  # ray positional-encoding frequencies for posed 3D views (0: no poses)
z_norm = False  # layer-normalise z on its way into the decoder (the encoder's z is unchanged)
z_bn = False  # standardise z over the batch on its way into the decoder (running statistics in eval)
coords = False  # two pixel-coordinate channels on the encoder's and the UNet's input (where position is a factor)
z_init = 0.0  # init of the z projections: 0 = zero (the untrained decoder ignores z); > 0 = N(0, z_init^2 / fan_in)
prediction = "eps"  # what the UNet outputs: 'eps' (the paper) | 'v' (Salimans & Ho 2022) | 'x0'; read as eps everywhere
bottleneck = True  # False: no compact z, the encoder's whole feature map goes to the decoder (ablation)
top_skips = True  # False: the UNet's full-resolution up level gets no skip connections (detail must pass where z modulates)
# SODA training (§3.2.1, §3.4)
schedule = "inverted"  # training noise schedule: diffusion.get_schedule name
logsnr_shift = 0.0  # added to the training schedule's log-SNR (negative: more noise)
weighting = "eps"  # 'eps' (the paper's plain eps-MSE) | 'v' (eps-MSE / abar: more weight on high noise)
p_mask_layer = 0.1  # probability of zeroing each section of z (layer masking)
p_uncond = 0.1  # probability of zeroing all of z (classifier-free guidance dropout)
p_uncond_pose = 0.1  # multi-view: probability of zeroing the target's rays, independently (§3.3 "Guidance")
enc_noise = 0.05  # std of the Gaussian noise on the encoder input ([-1, 1] images)
# DiffSiam (thesis §3, SPEC §8): hierarchical latent segments + SimSiam on the two augmented views
segments = 0  # > 0: z in this many segments; noise level u uses the first ceil(u n) (0: plain SODA)
segment_mode = "hierarchical"  # 'hierarchical' (segments 1..k) | 'sequential' (segment k only; the thesis' ablation)
simsiam_weight = 0.0  # weight of the SimSiam loss; > 0 builds its heads (needs segments > 0)
simsiam_dim = 512  # width of the SimSiam projector (the predictor's hidden layer is a quarter of it)
pretrained = ""  # PDAE decoder: a checkpoint whose EMA UNet becomes the frozen denoiser ('': train the UNet jointly)
# optimizer
batch_size = 64  # per process; the global batch is batch_size * world_size
max_iters = 2000
lr = 2e-4  # decoder learning rate (peak)
enc_lr_mult = 1.0  # the encoder's learning rate is lr * enc_lr_mult
weight_decay = 0.0
beta2 = 0.99
warmup_iters = 100
decay_lr = True  # cosine decay to min_lr_ratio * lr after warm-up
min_lr_ratio = 0.1
grad_clip = 1.0  # 0 = off
ema_halflife_kimg = 50.0  # EMA half-life in thousands of images (EDM)
ema_rampup = 0.05  # half-life at most this fraction of the images seen so far (EDM); 0 = off
# sampling for the eval grid
sample_steps = 50
sample_schedule = "cosine"
# system
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' ...
dtype = "bfloat16"  # autocast dtype for the network on CUDA: 'bfloat16' | 'float32'
cpu_bf16 = "auto"  # bf16 autocast on the CPU: 'auto' (where the CPU has native bf16) | 'true' | 'false'
compile = False  # torch.compile the model
compile_backend = "inductor"  # torch.compile backend; 'aot_eager' skips the C++ build (the tests' stand-in)
fused_adamw = True  # AdamW as one fused kernel (CPU and CUDA) instead of a loop over parameters
channels_last = False  # NHWC memory layout for convolutions
threads = 0  # CPU threads for torch (0: torch's default)
seed = 0
peak_flops = 0.0  # device peak FLOP/s for MFU; 0 = look up bf16 peak by GPU name
# benchmark (configs/bench.py): synthetic images, no data directory, no checkpoint
bench_iters = 0  # > 0: time this many training steps after bench_warmup, then DDIM sampling, and exit
bench_warmup = 5
bench_sample_n = 64  # images sampled with DDIM for the sampling figure
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
DEFAULTS = {k: globals()[k] for k in config_keys}  # configure() copies these, then applies files and flags
# -----------------------------------------------------------------------------
# the config: read (configure) and checked (validate); configure, check_keys, check_schedules and
# check_device are shared with probe.py, sample.py, nvs.py

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
    [(keys, test, what is allowed)]; floats must also be finite. Shared with probe/sample/nvs.py."""
    for k, allowed in (choices or {}).items():
        if cfg[k] not in allowed:
            raise ConfigError(f"{k}={cfg[k]!r} is not allowed: choose from {', '.join(map(repr, allowed))}")
    for keys, ok, what in ranges:
        for k in keys:
            if isinstance(cfg[k], float) and not math.isfinite(cfg[k]) or not ok(cfg[k]):
                raise ConfigError(f"{k}={cfg[k]!r} is out of range: it must be {what}")


CHOICES = dict(
    init_from=("scratch", "resume"), dataset=("cifar10", "imagenet", "dsprites") + data.MULTIVIEW,
    views=("augment", "identical", "class"), aug=("none", "cropflip", "simclr", "randaugment"),
    cond=("mod", "xattn", "emb"), agg=("mean", "transformer"), prediction=("eps", "v", "x0"),
    weighting=("eps", "v"), segment_mode=("hierarchical", "sequential"), dtype=("bfloat16", "float32"),
    encoder=tuple(M.PRESETS["encoder"]), unet=tuple(M.PRESETS["unet"]))
RANGES = [
    (("batch_size", "max_iters", "log_interval", "ckpt_interval", "sample_steps", "k_max", "z_dim", "n_tokens",
      "simsiam_dim", "bench_sample_n"), lambda v: v >= 1, ">= 1"),
    (("eval_interval", "n_val", "num_workers", "ray_freqs", "segments", "threads", "warmup_iters", "bench_iters",
      "bench_warmup", "weight_decay", "grad_clip", "enc_noise", "z_init", "simsiam_weight", "peak_flops",
      "ema_rampup"), lambda v: v >= 0, ">= 0"),
    (("lr", "enc_lr_mult", "ema_halflife_kimg"), lambda v: v > 0, "> 0"),
    (("p_mask_layer", "p_uncond", "p_uncond_pose", "min_lr_ratio"), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("beta2",), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("crop_min",), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("image_size",), lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8"),
    (("logsnr_shift",), lambda v: True, "finite"),
]
# what a resume may change: where and how often to log / evaluate / save, how long to train, and
# how fast (device, threads, kernels). Every other key changes the model, the data order or the
# optimisation, and a resume with another value is refused.
RESUME_MAY_CHANGE = {"out_dir", "init_from", "overwrite", "log_interval", "eval_interval", "ckpt_interval", "ckpt_keep",
                     "eval_at_start", "max_iters", "data_dir", "download", "num_workers", "sample_steps",
                     "sample_schedule", "device", "dtype", "cpu_bf16", "compile", "compile_backend", "fused_adamw",
                     "channels_last", "threads", "peak_flops", "bench_iters", "bench_warmup", "bench_sample_n"}


def check_schedules(cfg, *keys):
    """Each key must name a schedule diffusion.get_schedule knows. Shared with sample/nvs.py."""
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
    if cfg["views"] == "class" and cfg["dataset"] == "imagenet":
        raise ConfigError("views='class' pairs images of a class in memory: not for image folders (dataset='imagenet')")
    if cfg["simsiam_weight"] > 0 and (cfg["segments"] < 1 or cfg["views"] != "augment"):
        raise ConfigError("simsiam_weight > 0 is DiffSiam: it needs segments >= 1 and views='augment' (two augmented views)")
    if cfg["pretrained"] and not os.path.isfile(cfg["pretrained"]):
        raise ConfigError(f"pretrained={cfg['pretrained']!r}: no such checkpoint file")
    try:  # the model's own checks (bottleneck=False shapes, ...), on the meta device: no memory, no time
        with torch.device("meta"):
            build_model(cfg)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"the model cannot be built: {e}") from None
    out = cfg["out_dir"]
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"out_dir={out!r} is a file, not a directory")
    if cfg["init_from"] == "scratch" and not cfg["bench_iters"] and not cfg["overwrite"] and \
            os.path.exists(os.path.join(out, "ckpt.pt")):
        raise ConfigError(f"out_dir={out!r} already holds ckpt.pt: continue it with --init_from=resume, "
                          "pick another out_dir, or pass --overwrite=True to start over")


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
# helpers shared with probe.py, sample.py, nvs.py

class CheckpointError(Exception):
    pass


def save_checkpoint(obj, path):
    """Atomic: write a temporary file, flush it to disk, then rename over the old checkpoint, so an
    interrupted write leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """torch.load with weights_only=True (no code runs from the file); one clear error otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path!r}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"could not read checkpoint {path!r} (corrupted or not a SODA checkpoint): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "ema" not in ckpt:
        raise CheckpointError(f"{path!r} is not a SODA checkpoint (no config/ema entries)")
    return ckpt


def build_model(cfg):
    return M.build(cfg["encoder"], cfg["unet"], z_dim=cfg["z_dim"], image_size=cfg["image_size"],
                   cond=cfg["cond"], n_tokens=cfg["n_tokens"], agg=cfg["agg"], ray_freqs=cfg["ray_freqs"],
                   p_mask_layer=cfg["p_mask_layer"], p_uncond=cfg["p_uncond"],
                   p_uncond_pose=cfg["p_uncond_pose"] if cfg["ray_freqs"] else 0.0, z_norm=cfg.get("z_norm", False),
                   z_bn=cfg.get("z_bn", False),
                   bottleneck=cfg.get("bottleneck", True), segments=cfg.get("segments", 0),
                   simsiam_dim=cfg["simsiam_dim"] if cfg.get("simsiam_weight", 0) > 0 else 0,
                   pdae=bool(cfg.get("pretrained")), prediction=cfg.get("prediction", "eps"),
                   z_init=cfg.get("z_init", 0.0), coords=cfg.get("coords", False),
                   top_skips=cfg.get("top_skips", True))


def load_pretrained_denoiser(net, path, cfg):
    """PDAE / DiffSiam: the EMA UNet of a checkpoint `path` becomes net.frozen; it must have the
    UNet shape this config builds."""
    ck = load_checkpoint(path)
    keys = ("unet", "z_dim", "image_size", "cond", "n_tokens", "ray_freqs", "prediction", "coords", "top_skips")
    before = {"prediction": "eps", "coords": False, "top_skips": True}  # what checkpoints written before these keys had
    old = lambda k: ck["config"].get(k, before.get(k))
    diff = [f"{k}={old(k)!r} (here {cfg[k]!r})" for k in keys if old(k) != cfg[k]]
    if diff or ck["config"].get("pretrained"):
        raise ConfigError(f"pretrained={path!r} cannot be the frozen denoiser: " +
                          (f"its {', '.join(diff)}" if diff else "it is itself a PDAE model"))
    net.frozen.load_state_dict({k[5:]: v for k, v in ck["ema"].items() if k.startswith("unet.")})


def model_from_checkpoint(path, device="cpu", which="ema"):
    """-> (SODA in eval mode with the EMA (or 'model') weights, its config). path='random' is not
    handled here: scripts build a fresh model from a config for that."""
    ckpt = load_checkpoint(path, device)
    net = build_model(ckpt["config"])
    net.load_state_dict(ckpt[which])
    return net.to(device).eval(), ckpt["config"]


def segment_schedule(cfg):
    """A DiffSiam config's segment schedule for the samplers (diffusion.segment_schedule), so they
    condition each step on the segments training used at its noise level; None for plain SODA."""
    if not cfg.get("segments"):
        return None
    return D.segment_schedule(cfg["segments"], cfg["segment_mode"],
                              D.get_schedule(cfg["schedule"], cfg.get("logsnr_shift", 0.0)))


@torch.no_grad()
def extract_features(net, x, batch=500, cams=None):
    """uint8 images (N, 3, H, W) -> (pooled (N, F), z (N, z_dim)) on the CPU, from net.encode_features.
    cams: each image's (K (N, 3, 3), c2w (N, 4, 4)), for an encoder that reads camera rays."""
    dev = next(net.parameters()).device
    pooled, zs = [], []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(dev).float() / 127.5 - 1
        rays = None if cams is None else data.camera_rays(cams[0][i:i + batch].to(dev), cams[1][i:i + batch].to(dev),
                                                          *xb.shape[-2:])
        p, z = net.encode_features(xb, rays)
        pooled.append(p.float().cpu())
        zs.append(z.float().cpu())
    return torch.cat(pooled), torch.cat(zs)


def knn_accuracy(train_f, train_y, test_f, test_y, k=20, T=0.07, n_classes=None):
    """Weighted kNN top-1 (%) on cosine similarity, votes weighted by exp(sim / T) (Wu et al. 2018)."""
    n_classes = n_classes or int(max(train_y.max(), test_y.max())) + 1
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    correct = 0
    for i in range(0, len(test_f), 1000):
        sim, idx = (test_f[i:i + 1000] @ train_f.T).topk(min(k, len(train_f)), dim=1)
        votes = torch.zeros(len(idx), n_classes).scatter_add_(1, train_y[idx], (sim / T).exp())
        correct += (votes.argmax(1) == test_y[i:i + 1000]).sum().item()
    return 100.0 * correct / len(test_f)


GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


# -----------------------------------------------------------------------------
# The run: main() sets it up once, then loops over train_step, evaluate and save_run.

def main(argv):
    cfg = configure(argv, DEFAULTS)
    validate(cfg)
    run = setup(cfg, resume_checkpoint(cfg))
    if run.bench_iters > 0:
        return bench(run)
    if run.eval_at_start and run.step == 0:
        evaluate_and_log(run, 0)
    # a bar on a terminal; in a file (nohup, a job log) one plain line per log_interval instead
    run.t_start = time.time()  # the elapsed time of the plain lines counts from here
    bar = tqdm(total=run.max_iters, initial=run.step, disable=not (run.master and sys.stderr.isatty()),
               dynamic_ncols=True, desc="train")
    bad = torch.zeros((), dtype=torch.long, device=run.dev) - 1  # first step with a non-finite loss, or -1
    loss_sum, t0, seen0 = torch.zeros((), device=run.dev), time.time(), run.step  # since the last log line
    run.raw.train()
    with stop_signals() as stop:  # Ctrl-C (SIGINT) or SIGTERM: finish the step, save a resumable checkpoint, stop
        while run.step < run.max_iters:
            it = run.step
            loss = train_step(run, it)
            bad = torch.where((bad < 0) & ~torch.isfinite(loss), it, bad)
            loss_sum += loss
            run.step = step = it + 1
            bar.update(1)
            last = step == run.max_iters
            halt = not last and stop_requested(run, stop, step)
            if step % run.log_interval == 0 or step % run.ckpt_interval == 0 or last or halt:
                if bad.item() >= 0:  # a host sync, only at log and checkpoint steps: never save a NaN model
                    raise FloatingPointError(f"non-finite loss at step {bad.item()}; stopping. The last good "
                                             f"checkpoint is {os.path.join(run.out_dir, 'ckpt.pt')} (if any)")
            if step % run.log_interval == 0 or last:
                log_progress(run, bar, loss_sum, step - seen0, t0, lr_at(run, it))
                t0, seen0 = time.time(), step
                loss_sum.zero_()
            if (run.eval_interval > 0 and step % run.eval_interval == 0) or last:
                t_eval = time.time()
                evaluate_and_log(run, step)
                t0 += time.time() - t_eval  # evaluation time is not training time
            if step % run.ckpt_interval == 0 or last or halt:
                save_run(run, step)
            if halt:
                bar.close()
                run.say(f"stopped by {signal.Signals(stop[0]).name if stop else 'a signal'} after step {step}; "
                        f"checkpoint {os.path.join(run.out_dir, 'ckpt.pt')}; continue with --init_from=resume", flush=True)
                break
    bar.close()
    if run.ddp:
        torch.distributed.destroy_process_group()
    run.say(f"done: {run.step} steps; checkpoint {os.path.join(run.out_dir, 'ckpt.pt')}")


class Run(types.SimpleNamespace):
    """One training run: every config key as an attribute (run.lr, run.seed, ...), the config dict
    itself (run.cfg, saved in each checkpoint), and what setup() builds: the processes and device,
    the data, the model, its EMA, the optimizer and the step."""


def resume_checkpoint(cfg):
    """init_from='resume': out_dir/ckpt.pt, once this config is known to be allowed to continue it
    (asked before any work); scratch: None."""
    if cfg["init_from"] != "resume":
        return None
    path = os.path.join(cfg["out_dir"], "ckpt.pt")
    ckpt = load_checkpoint(path)
    bad = resume_conflicts(ckpt["config"], cfg)
    if bad:
        raise ConfigError(f"cannot resume {path} with {', '.join(bad)}: these keys change the model, the data "
                          "order or the optimisation (start a new out_dir instead)")
    return ckpt


def setup(cfg, ckpt=None):
    """-> Run: processes and precision, the data (and DataLoader), the model, EMA and optimizer
    (continuing `ckpt` where given), the fixed evaluation batch; then out_dir, the run's first
    write; FLOPs per image and the GPU's peak, for MFU."""
    run = Run(**cfg, cfg=cfg, step=0, t_start=time.time())
    setup_processes(run)
    setup_data(run, ckpt)
    setup_model(run, ckpt)
    # image folders: DataLoader workers, built after setup_model so they start at the resumed step
    run.loader_iter = None if run.in_memory or run.multiview else iter(torch.utils.data.DataLoader(
        run.train_set, batch_sampler=StepBatches(run.n_train, run.global_batch, run.rows, run.seed, run.step,
                                                 run.max_iters),
        num_workers=run.num_workers, pin_memory=run.cuda, persistent_workers=run.num_workers > 0,
        prefetch_factor=4 if run.num_workers > 0 else None))  # batches of (seed, step): a resume replays them
    run.fixed = fixed_eval_batch(run)
    if run.master:  # the first write of the run: a bad input above has left nothing behind
        os.makedirs(run.out_dir, exist_ok=True)
        if run.overwrite and run.init_from == "scratch" and os.path.exists(os.path.join(run.out_dir, "log.jsonl")):
            os.remove(os.path.join(run.out_dir, "log.jsonl"))  # a new run, a new log
    run.flops_per_img = count_flops(run.raw, run.image_size, run.dev, run.autocast) if run.cuda and run.master else 0.0
    run.peak = run.peak_flops or next((v for k, v in GPU_PEAK_BF16.items()
                                       if run.cuda and k in torch.cuda.get_device_name(run.dev)), 0.0)
    return run


def setup_processes(run):
    """torchrun sets RANK: DDP, NCCL on GPUs and gloo on the CPU (so a 2-process test runs
    anywhere); the device, threads and autocast; this process's rows of each global batch."""
    run.ddp = int(os.environ.get("RANK", -1)) != -1
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if run.device == "auto" else run.device
    if run.ddp:
        run.rank, run.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if dev.startswith("cuda"):
            dev = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    else:
        run.rank, run.world = 0, 1
    run.dev, run.cuda, run.master = dev, dev.startswith("cuda"), run.rank == 0
    if run.threads > 0:
        torch.set_num_threads(run.threads)
    if run.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[run.dtype]
    cpu_amp, why = cpu_autocast(run.cpu_bf16)
    use_amp = amp_dtype != torch.float32 and (run.cuda or cpu_amp)
    run.autocast = lambda: torch.autocast("cuda" if run.cuda else "cpu", dtype=amp_dtype, enabled=use_amp)
    run.global_batch = run.batch_size * run.world
    run.rows = slice(run.rank * run.batch_size, (run.rank + 1) * run.batch_size)  # this process's rows
    run.say = print if run.master else (lambda *a, **k: None)
    if not run.cuda:
        run.say(f"CPU autocast: {'bf16' if use_amp else 'fp32'} ({why if amp_dtype != torch.float32 else 'dtype=float32'})")


def setup_data(run, ckpt):
    """The training split, and a validation split held out of it for the kNN / z-usage checks;
    multi-view sets: the train objects, and the unseen test objects for the evaluation grid."""
    run.multiview = run.dataset in data.MULTIVIEW and run.bench_iters == 0
    run.train_set = run.x_train = run.y_train = run.x_val = run.y_val = None
    if run.multiview:  # batches come from data.multiview_batch; an "epoch" counts train_images images
        run.mv_train = data.load_multiview(run.dataset, run.data_dir, "train", run.image_size)
        run.mv_val = data.load_multiview(run.dataset, run.data_dir, "test", run.image_size)
        run.n_train = run.mv_train.images.shape[0] * run.mv_train.images.shape[1]
    elif run.bench_iters > 0:  # synthetic uint8 images of the dataset's shape
        n_syn = max(4096, 2 * run.global_batch)
        run.train_set = (torch.randint(0, 256, (n_syn, 3, run.image_size, run.image_size), dtype=torch.uint8),
                         torch.randint(0, 10, (n_syn,)))
    else:
        data_path, dl = run.data_dir, run.download
        if run.dataset == "cifar10":  # data_dir='' searches ./data/cifar10, ../shared/data/cifar10-subset, then downloads
            data_path, why, dl = data.find_cifar10(run.data_dir, run.download)
            run.say(f"data: using {data_path} ({why})")
        run.train_set = data.load(run.dataset, data_path, "train", run.image_size, dl, run.n_val, run.seed)
    run.in_memory = isinstance(run.train_set, tuple)
    if run.in_memory:
        run.x_train, run.y_train = (t.to(run.dev) for t in run.train_set)
        run.n_train = len(run.x_train)
        run.x_val, run.y_val = run.train_set if run.bench_iters else \
            data.load(run.dataset, data_path, "val", run.image_size, dl, run.n_val, run.seed)
    elif not run.multiview:  # ImageNet: the kNN check uses probe.py on the val folder instead
        run.n_train, run.y_train = len(run.train_set), run.train_set.targets
    run.steps_per_epoch = run.n_train // run.global_batch
    run.order_cache = {}  # in memory: the current epoch's order (get_batch)
    if run.steps_per_epoch == 0:
        raise data.DataError(f"the global batch ({run.global_batch}) is larger than the training set ({run.n_train})")
    if ckpt is not None and ckpt.get("data_pos", {}).get("n_train", run.n_train) != run.n_train:
        raise data.DataError(f"cannot resume: the checkpoint was trained on {ckpt['data_pos']['n_train']:,} images, "
                             f"data_dir now gives {run.n_train:,} (another copy of the data changes the data order)")
    run.say(f"data: {run.dataset} {run.n_train:,} train images, global batch {run.global_batch} "
            f"({run.batch_size} x {run.world} processes), {run.steps_per_epoch} steps per epoch")
    if run.multiview:
        run.say(f"multi-view: {run.mv_train.images.shape[0]} train objects x {run.mv_train.images.shape[1]} views, "
                f"1..{run.k_max} source views per step; {run.mv_val.images.shape[0]} unseen objects for the eval grid")


def setup_model(run, ckpt):
    """The model (seeded first, so every rank builds the same one), its EMA, AdamW; with a
    checkpoint its weights, optimizer state, step and RNG states; then compile and DDP, the training
    schedule, and the parameter (and z_bn buffer) pairs the EMA follows."""
    torch.manual_seed(run.seed)
    raw = build_model(run.cfg).to(run.dev)
    if run.pretrained and run.init_from == "scratch":  # on resume the checkpoint holds the frozen denoiser
        load_pretrained_denoiser(raw, run.pretrained, run.cfg)
    if run.ddp and run.cuda:  # DiffSiam's SimSiam heads hold the only BatchNorms: statistics over the global batch
        raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    run.mem = torch.channels_last if run.channels_last else torch.contiguous_format
    run.raw = raw = raw.to(memory_format=run.mem)
    run.ema = copy.deepcopy(raw).eval().requires_grad_(False)
    n_enc = sum(p.numel() for p in raw.encoder.parameters())
    n_all = sum(p.numel() for p in raw.parameters() if p.requires_grad)
    run.say(f"model: encoder {run.encoder} {n_enc / 1e6:.2f}M, unet {run.unet} {(n_all - n_enc) / 1e6:.2f}M trained "
            f"params, z_dim {run.z_dim}, cond {run.cond}, {raw.n_sections} sections" +
            (f"; frozen denoiser from {run.pretrained}" if run.pretrained else ""))
    run.optimizer = torch.optim.AdamW(param_groups(raw, run.enc_lr_mult, run.weight_decay), lr=run.lr,
                                      betas=(0.9, run.beta2), fused=run.fused_adamw)
    if ckpt is not None:  # loaded and compared with this config by resume_checkpoint
        raw.load_state_dict(ckpt["model"])
        run.ema.load_state_dict(ckpt["ema"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.step = ckpt["step"]
        set_rng_states(ckpt["rng"], run.cuda)
        run.say(f"resumed from step {run.step} (epoch {run.step // run.steps_per_epoch}, "
                f"batch {run.step % run.steps_per_epoch})")
    run.net = torch.compile(raw, backend=run.compile_backend) if run.compile else raw
    if run.ddp:
        run.net = torch.nn.parallel.DistributedDataParallel(run.net, device_ids=[run.dev] if run.cuda else None)
    run.schedule_fn = D.get_schedule(run.schedule, run.logsnr_shift)
    trained = [(e, r) for e, r in zip(run.ema.parameters(), raw.parameters()) if r.requires_grad]  # not a frozen denoiser
    run.ema_params, run.raw_params = [e for e, _ in trained], [r for _, r in trained]
    run.ema_buffers = [(e, r) for (n, e), r in zip(run.ema.named_buffers(), raw.buffers()) if n.startswith("z_bn.")]
    if ckpt is not None:
        ckpt.clear()  # its tensors (model, EMA, optimizer) are loaded: free the host copy


def param_groups(raw, enc_lr_mult, weight_decay):
    """AdamW's groups: the encoder at lr * enc_lr_mult (§3.4); no weight decay on gains and biases."""
    enc = {id(p) for p in raw.encoder.parameters()}
    return [{"params": [p for p in raw.parameters() if p.requires_grad and (id(p) in enc) == in_enc and (p.dim() > 1) == decay],
             "lr_mult": enc_lr_mult if in_enc else 1.0, "weight_decay": weight_decay if decay else 0.0}
            for in_enc in (True, False) for decay in (True, False)]


def lr_at(run, it):
    """Linear warm-up over warmup_iters, then cosine decay to min_lr_ratio * lr at max_iters."""
    if it < run.warmup_iters:
        return run.lr * (it + 1) / run.warmup_iters
    if not run.decay_lr:
        return run.lr
    frac = (it - run.warmup_iters) / max(1, run.max_iters - run.warmup_iters)
    return run.lr * (run.min_lr_ratio + (1 - run.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def get_batch(run, it):
    """Step it's images (and labels, and their indices in memory) for this process: a function of
    (seed, it) alone, so a resume replays the same batches."""
    epoch, i = divmod(it, run.steps_per_epoch)
    if run.in_memory:
        if epoch not in run.order_cache:
            run.order_cache.clear()
            run.order_cache[epoch] = data.epoch_order(run.n_train, run.global_batch, run.seed, epoch).to(run.dev)
        idx = run.order_cache[epoch][i][run.rows]
        return run.x_train[idx], run.y_train[idx], idx
    try:
        xb, yb = next(run.loader_iter)
    except data.DataError as e:  # from a worker, the message is its traceback's last line
        raise data.DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
    return xb.to(run.dev, non_blocking=True), yb.to(run.dev, non_blocking=True), None


def views_of(run, xb, idx, rng):
    """(source, target) views of a batch (§3.3): two augmentations, one, or another image of the class."""
    other = None
    if run.views == "class":
        other = run.x_train[data.class_partners(idx.cpu(), run.y_train.cpu(), rng).to(run.dev)]
    return data.make_views(xb, run.views, run.aug, rng, other, run.crop_min)


def train_step(run, it):
    """One optimisation step (§3.2, §3.4): views, noise level and noise, the denoising loss through
    the encoder's z, AdamW, the EMA. Every random number in it comes from (seed, it): the global RNG
    too (dropout), reseeded per step and rank. -> the loss (a device tensor: no host sync)."""
    torch.manual_seed(run.seed * 1_000_003 + it * run.world + run.rank + 1)
    rng = data.Rng(run.seed, it, run.global_batch, run.rows, run.dev)
    cond = {}
    if run.multiview:  # k source views + a target view of one object, with their rays
        k = 1 + rng.shared_randint(run.k_max)
        x_src, rays_src, x_tgt, rays_tgt = data.multiview_batch(run.mv_train, k, rng)
        cond = dict(rays_src=rays_src, rays_tgt=rays_tgt, keep_pose=run.raw.draw_keep_pose(rng.rand))
    else:
        xb, _, idx = get_batch(run, it)
        x_src, x_tgt = views_of(run, xb, idx, rng)
    x_src = x_src + run.enc_noise * rng.randn(*x_src.shape[1:])  # low noise on the encoder input (§3.4)
    keep = run.raw.draw_keep(rng.rand)
    u, eps = rng.rand(), rng.randn(*x_tgt.shape[1:])
    if run.segments:  # DiffSiam: the noise level decides which segments of z are on, on top of the dropout
        keep = run.raw.keep_dims(keep, D.segment_keep(u, run.segments, run.segment_mode))
        if run.simsiam_weight > 0:
            cond["x_pair"] = x_tgt  # the second augmented view
    if run.channels_last and not run.multiview:
        x_src, x_tgt = x_src.contiguous(memory_format=run.mem), x_tgt.contiguous(memory_format=run.mem)
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run, it) * group["lr_mult"]
    with run.autocast():
        loss = D.loss(run.net, x_src, x_tgt, run.schedule_fn, u=u, eps=eps, weighting=run.weighting, keep=keep, **cond)
    if isinstance(loss, tuple):  # DiffSiam: diffusion loss + weighted SimSiam loss (thesis eq. 3.12)
        loss = loss[0] + run.simsiam_weight * loss[1]
    loss.backward()
    if run.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.raw_params, run.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    # EMA with a half-life in images; ramped up early so short runs get a useful EMA (EDM)
    half = run.ema_halflife_kimg * 1000
    if run.ema_rampup > 0:
        half = min(half, (it + 1) * run.global_batch * run.ema_rampup)
    beta = 0.5 ** (run.global_batch / max(half, 1e-8))
    torch._foreach_lerp_(run.ema_params, run.raw_params, 1 - beta)
    for e, r in run.ema_buffers:  # running statistics (z_bn): the EMA model evaluates with the raw model's
        e.copy_(r)
    return loss.detach()


def fixed_eval_batch(run):
    """64 fixed (source, target, u, eps, source rays, target rays) for the z-gap and the sample grid:
    held-out images, or one source view of an unseen object and another view of it. None for
    ImageNet-style folders (probe.py measures those)."""
    if run.multiview:
        frng = data.Rng(run.seed, -1, 64, device=run.dev)
        xs, rs, xt, rt = data.multiview_batch(run.mv_val, 1, frng)
        return xs[:, 0], xt, frng.rand(), frng.randn(3, run.image_size, run.image_size), rs[:, 0], rt
    if run.in_memory:
        fx = run.x_val[:64].to(run.dev)
        frng = data.Rng(run.seed, -1, len(fx), device=run.dev)
        f_src, f_tgt = data.make_views(fx, run.views if run.views != "class" else "identical", run.aug, frng,
                                       crop_min=run.crop_min)
        return f_src, f_tgt, frng.rand(), frng.randn(3, run.image_size, run.image_size), None, None
    return None


# the evaluation's kNN compares held-out images with at most this many training images: a monitor that
# stays cheap on big in-memory sets (dSprites: 41k images at 64 px took 6 minutes at 1 thread); probe.py
# gives the real figure on the whole training set
KNN_REFERENCES = 10_000


@torch.no_grad()
def evaluate(run, it):
    """kNN of z on the held-out split, the z-gap (eps-MSE without z minus with z), z-usage
    (diffusion.z_usage: x0-MSE with z vs z masked on the log-SNR grid, zusage.png), a sample grid."""
    out = {}
    if run.fixed is None:
        return out
    ema, autocast = run.ema, run.autocast
    seg_schedule = segment_schedule(run.cfg)  # DiffSiam: the segments on at each noise level (None: plain SODA)
    if not run.multiview:  # kNN of z on the held-out split (multi-view sets have no labels)
        ref = slice(0, KNN_REFERENCES)
        with autocast():
            ftr = extract_features(ema, run.x_train[ref])[1]
            fva = extract_features(ema, run.x_val)[1]
        out["knn"] = knn_accuracy(ftr, run.y_train[ref].cpu(), fva, run.y_val)
    f_src, f_tgt, u, eps, r_src, r_tgt = run.fixed
    logsnr = run.schedule_fn(u)
    x_t = D.q_sample(f_tgt, logsnr, eps)
    with autocast():
        z = ema.encode(f_src, r_src)
    losses = []
    on = torch.ones(len(f_src), ema.n_sections, device=run.dev)
    if run.segments:  # DiffSiam: "with z" is the segments training switches on at these noise levels
        on = ema.keep_dims(on, D.segment_keep(u, run.segments, run.segment_mode))
    for keep in (on, torch.zeros_like(on)):
        with autocast():
            eps_hat = ema.denoise(x_t, logsnr, z, keep, r_tgt)
        losses.append(F.mse_loss(eps_hat.float(), eps).item())
    out["loss_z"], out["zgap"] = losses[0], losses[1] - losses[0]  # > 0: the decoder uses z
    with autocast():  # x0-MSE with z vs z masked on the log-SNR grid (diffusion.z_usage)
        if run.multiview:  # the source view of an unseen object -> its target view
            zu = D.z_usage(ema, f_tgt, x_src=f_src, seed=run.seed, rays_src=r_src, rays_tgt=r_tgt, segments=seg_schedule)
        else:  # held-out images, z from the image itself
            zu = D.z_usage(ema, run.x_val[:256].to(run.dev).float() / 127.5 - 1, seed=run.seed, segments=seg_schedule)
    out["zusage"] = {k: zu[k] for k in ("logsnr", "mse_z", "mse_masked", "removed", "grey", "mean_colour")}
    out["z_removed_-3"], out["z_removed_mean"] = zu["removed_at_-3"], zu["removed_mean"]
    D.plot_z_usage(zu, os.path.join(run.out_dir, "zusage.png"), title=f"step {it}")
    n = 8
    g = torch.Generator(run.dev).manual_seed(run.seed)
    first = lambda t: None if t is None else t[:n]
    with autocast():
        rec = D.ddim(ema, ema.encode(f_src[:n], first(r_src)), f_tgt[:n].shape, steps=run.sample_steps,
                     schedule=run.sample_schedule, generator=g, rays_tgt=first(r_tgt), segments=seg_schedule)
    path = os.path.join(run.out_dir, f"samples_{it:06d}.png")
    save_grid([f_src[:n], f_tgt[:n], rec], ["source", "target", "sample"], path)
    out["grid"] = path
    return out


def evaluate_and_log(run, it):
    """Rank 0: evaluate, print one line, append it to log.jsonl, redraw curves.png."""
    if not run.master:
        return
    r = evaluate(run, it)
    if r:
        tqdm.write(f"step {it}{' (random init)' if it == 0 else ''}: {eval_line(r)}")
        sys.stdout.flush()
        write_log(run, {"step": it, **r})
        plot_curves(run.out_dir)


def log_progress(run, bar, loss_sum, n, t0, lr):
    """Rank 0: the mean loss and img/s of the n steps since the last log line (at time t0), on the
    bar or as a plain line, and into log.jsonl (with MFU on a GPU)."""
    if not run.master:
        return
    ips = n * run.global_batch / (time.time() - t0)
    loss_avg = (loss_sum / n).item()
    rec = {"step": run.step, "loss": loss_avg, "lr": lr, "img_s": ips}
    if run.flops_per_img and run.peak:
        rec["mfu"] = run.flops_per_img * ips / (run.peak * run.world)
    mfu = {"mfu": f"{rec['mfu']:.1%}"} if "mfu" in rec else {}
    if bar.disable:
        run.say(f"step {run.step}/{run.max_iters} | loss {loss_avg:.4f} | {ips:.0f} img/s | elapsed "
                f"{time.strftime('%H:%M:%S', time.gmtime(time.time() - run.t_start))}" +
                "".join(f" | mfu {v}" for v in mfu.values()), flush=True)
    else:
        bar.set_postfix(loss=f"{loss_avg:.4f}", img_s=f"{ips:.0f}", **mfu)
    write_log(run, rec)


def write_log(run, rec):
    if run.master:
        with open(os.path.join(run.out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")


def save_run(run, it):
    """Rank 0: the resumable checkpoint out_dir/ckpt.pt (written atomically): model, EMA, optimizer,
    step, config, data position and every RNG state; with ckpt_keep also a copy ckpt_<step>.pt."""
    if not run.master:
        return
    save_checkpoint({
        "model": run.raw.state_dict(), "ema": run.ema.state_dict(), "optimizer": run.optimizer.state_dict(),
        "step": it, "config": run.cfg,
        "data_pos": {"epoch": it // run.steps_per_epoch, "batch": it % run.steps_per_epoch, "n_train": run.n_train},
        "rng": rng_states(run.cuda),
    }, os.path.join(run.out_dir, "ckpt.pt"))
    if run.ckpt_keep:  # a learning curve: every checkpoint stays as ckpt_<step>.pt for the probes
        shutil.copyfile(os.path.join(run.out_dir, "ckpt.pt"), os.path.join(run.out_dir, f"ckpt_{it:06d}.pt"))


def rng_states(cuda):
    """torch (and CUDA), NumPy and Python RNG states, as a checkpoint stores them (weights_only-loadable)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None,
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_rest": list(np_state[2:]),
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_states(rng, cuda):
    torch.set_rng_state(rng["torch"])
    if cuda and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), *rng["numpy_rest"]))
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))


@contextlib.contextmanager
def stop_signals():
    """Ctrl-C (SIGINT) and SIGTERM append to the yielded list instead of killing the run (main
    thread only); the previous handlers come back on exit."""
    stop, handlers = [], {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


def stop_requested(run, stop, step):
    """Has a signal asked to stop? Under DDP every rank must stop at the same step: they agree at log steps."""
    if not run.ddp:
        return bool(stop)
    if step % run.log_interval:
        return False
    flag = torch.tensor(float(bool(stop)), device=run.dev)
    torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
    return flag.item() > 0


# -----------------------------------------------------------------------------
# what a run writes (log lines, sample grids, curves.png), the benchmark, the DataLoader's sampler, FLOPs

def eval_line(r):
    knn = f"kNN {r['knn']:.2f}% " if "knn" in r else ""
    return (f"{knn}z removes {r['z_removed_-3']:.1f}% of x0-MSE at log-SNR -3, {r['z_removed_mean']:.1f}% over -6..+2 "
            f"(z-gap {r['zgap']:+.4f}) grid {r['grid']}")


def save_grid(columns, labels, path, min_px=96):
    """Labelled columns of images ((n, 3, H, W) in [-1, 1] each), one example per row, enlarged with
    nearest to >= min_px a side so the pixels can be seen: one PNG."""
    import torchvision
    from PIL import Image, ImageDraw
    s = -(-min_px // columns[0].shape[-1])  # an integer factor keeps the pixels square
    cells = torch.stack([F.interpolate((c.float().cpu() + 1) / 2, scale_factor=s, mode="nearest") for c in columns], 1)
    grid = torchvision.utils.make_grid(cells.flatten(0, 1).clamp(0, 1), nrow=len(columns), padding=2, pad_value=1)
    img = Image.fromarray(grid.mul(255).add(0.5).byte().permute(1, 2, 0).numpy())
    page = Image.new("RGB", (img.width, img.height + 14), "white")  # a row of labels on top
    page.paste(img, (0, 14))
    for i, text in enumerate(labels):
        ImageDraw.Draw(page).text((4 + i * (cells.shape[-1] + 2), 1), text, fill="black")
    page.save(path)


def plot_curves(out_dir):
    """out_dir/curves.png from what log.jsonl holds so far: loss, kNN and z-usage against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    panels = [("training loss", {"loss": "loss"}), ("kNN top-1 (%), held-out split", {"knn": "kNN"}),
              ("x0-MSE removed by z (%)", {"z_removed_-3": "at log-SNR -3", "z_removed_mean": "mean over -6..+2"})]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (title, keys) in zip(axes, panels):
        for k, label in keys.items():
            pts = [(r["step"], r[k]) for r in recs if k in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 40 else "", ms=3, label=label)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=90)
    plt.close(fig)


def bench(run):
    """Throughput of the training step, of the data pipeline alone, and of DDIM sampling (under the
    training autocast, as the eval grid samples); one line and out_dir/bench.json. Timed between
    device syncs, after warm-up steps (compile happens there)."""
    cuda, dev = run.cuda, run.dev
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    w, n = run.bench_warmup, run.bench_iters
    for it in range(w):
        train_step(run, it)
    sync()
    t = time.perf_counter()
    for it in range(w, w + n):
        loss = train_step(run, it)
    loss.item()
    sync()
    train_ips = n * run.global_batch / (time.perf_counter() - t)
    t = time.perf_counter()
    for it in range(n):  # gather + augment, the same work as in train_step, without the model
        xb, _, idx = get_batch(run, it)
        views_of(run, xb, idx, data.Rng(run.seed, it, run.global_batch, run.rows, dev))
    sync()
    data_ips = n * run.global_batch / (time.perf_counter() - t)
    x = run.x_train[: run.bench_sample_n].float() / 127.5 - 1
    t = time.perf_counter()
    with torch.no_grad(), run.autocast():
        D.ddim(run.ema, run.ema.encode(x), x.shape, steps=run.sample_steps, schedule=run.sample_schedule,
               generator=torch.Generator(dev).manual_seed(0), segments=segment_schedule(run.cfg))
    sync()
    sample_s = time.perf_counter() - t
    if cuda:
        mem_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource
        mem_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res = {"train_img_s": train_ips, "data_img_s": data_ips, "sample_s": sample_s,
           "sample_img_steps_s": len(x) * run.sample_steps / sample_s, "peak_mem_gb": mem_gb,
           "mfu": run.flops_per_img * train_ips / run.peak if run.flops_per_img and run.peak else None,
           "device": torch.cuda.get_device_name(dev) if cuda else f"cpu x{torch.get_num_threads()} threads",
           **{k: run.cfg[k] for k in ("encoder", "unet", "batch_size", "compile", "channels_last", "dtype", "cpu_bf16",
                                "fused_adamw", "threads")}}
    with open(os.path.join(run.out_dir, "bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    mfu = f" mfu {res['mfu']:.1%}" if res["mfu"] else ""
    print(f"bench: train {train_ips:.1f} img/s | data {data_ips:.0f} img/s | DDIM {len(x)} images x "
          f"{run.sample_steps} steps {sample_s:.1f} s ({res['sample_img_steps_s']:.0f} img-steps/s) | "
          f"peak mem {mem_gb:.2f} GB{mfu} | {res['device']}")
    return res


class StepBatches(torch.utils.data.Sampler):
    """Index batches for DataLoader workers: this process's rows of each global batch, starting at
    `start` step, in the same (seed, epoch) order as the in-memory path."""

    def __init__(self, n, global_batch, rows, seed, start, stop):
        self.n, self.gb, self.rows, self.seed, self.start, self.stop = n, global_batch, rows, seed, start, stop

    def __iter__(self):
        per_epoch, order = self.n // self.gb, (None, None)
        for it in range(self.start, self.stop):
            epoch, i = divmod(it, per_epoch)
            if order[0] != epoch:
                order = (epoch, data.epoch_order(self.n, self.gb, self.seed, epoch))
            yield order[1][i][self.rows].tolist()

    def __len__(self):
        return self.stop - self.start


def count_flops(net, image_size, dev, autocast):
    """Model FLOPs of one training image (forward + backward), counted once (for MFU)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(2, 3, image_size, image_size, device=dev)
    rays = torch.randn(2, 6, image_size, image_size, device=dev) if net.ray_freqs else None
    counter = FlopCounterMode(display=False)
    with counter, autocast():
        net(x, torch.zeros(2, device=dev), x, rays_src=rays, rays_tgt=rays).float().sum().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, CheckpointError, data.DataError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
