"""
Train SODA. One code path for a laptop CPU, one GPU, and many GPUs:

    python train.py configs/cifar10_cpu.py                      # CPU teaching run
    python train.py configs/cifar10.py --batch_size=256          # one GPU
    torchrun --nproc_per_node=8 train.py configs/imagenet.py     # 8 GPUs (DDP)

Config files are plain Python assignments to the globals below; `--key=value` flags override
them. Only existing keys may be set (a typo raises, naming the closest key), values keep their type.

Reading order: the config (the globals below), then main() and loop(): setup() builds a Run (the
config as attributes, plus the processes, data, model, EMA and optimizer), and each step calls
train_step(run, it) (training.py, the step bench.py times too), with evaluate (monitor.py) and
save_run at their intervals.
"""
import contextlib
import copy
import datetime
import math
import os
import shutil
import signal
import sys
import threading
import time
import types

import torch
from tqdm import tqdm

import common
import configurator
import data
import diffsiam
import diffusion as D
import model as M
import multiview
import runtime
from common import CheckpointError, load_checkpoint, save_checkpoint
from configurator import SEED_RANGE, ConfigError, check_device, check_keys, check_out_dir, check_schedules, configure
from monitor import (count_flops, evaluate_and_log, fixed_eval_batch, folder_eval_sets, log_progress, rng_states,
                     set_rng_states)
from training import ema_pairs, lr_at, param_groups, train_step

# -----------------------------------------------------------------------------
# default config (a small CPU run); every key can be set by a config file or --key=value
# I/O
out_dir = "out"  # checkpoint, log.jsonl and sample grids go here
init_from = "scratch"  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
overwrite = False  # a scratch run may replace an out_dir that already holds ckpt.pt (its checkpoints and log go)
log_interval = 20  # steps between log lines (with checkpoint steps, the only waits for the GPU)
eval_interval = 500  # steps between evaluations (kNN, z-gap, sample grid); 0 = only at the end
ckpt_interval = 500  # steps between checkpoints (and one at the end)
ckpt_keep = False  # also keep every checkpoint as ckpt_<step>.pt (learning curves: probe each one)
ckpt_keep_last = 2  # checkpoints kept: ckpt.pt, the one before as ckpt.1.pt, ...; resume reads the newest that loads
eval_at_start = True  # evaluate the untrained model too: the baseline every figure is compared with
# data
# 'cifar10' | 'folder' (any folder of images; 'imagenet' is another name) | 'celeba' | 'dsprites' | multi-view:
# 'cars3d' | 'nmr' | 'srn'
dataset = "cifar10"
# '' (cifar10 only): ./data/cifar10, else ../shared/data/cifar10-subset, else download into ./data/cifar10
data_dir = ""
download = False  # with a data_dir that holds no CIFAR-10: let torchvision download it there (needs internet)
image_size = 32
views = "augment"  # 'augment' (two augmentations: novel views) | 'identical' (auto-encoding) | 'distort' (one crop;
# the source colour-distorted) | 'class'
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
# 'mod' (layer modulation) | 'xattn' (cross-attention) | 'mod+xattn' (both, §3.3) | 'emb' (z into the noise embedding)
cond = "mod"
n_tokens = 8  # tokens of z for cond='xattn'
agg = "mean"  # aggregation of k source views: 'mean' | 'transformer'
ray_freqs = 0  # ray positional-encoding frequencies for posed 3D views (0: no poses)
z_norm = False  # layer-normalise z on its way into the decoder (the encoder's z is unchanged)
z_bn = False  # standardise z over the batch on its way into the decoder (running statistics in eval)
coords = False  # two pixel-coordinate channels on the encoder's and the UNet's input (where position is a factor)
z_init = 0.0  # init of the z projections: 0 = zero (the untrained decoder ignores z); > 0 = N(0, z_init^2 / fan_in)
prediction = "eps"  # what the UNet outputs: 'eps' (the paper) | 'v' (Salimans & Ho 2022) | 'x0'; read as eps everywhere
bottleneck = True  # False: no compact z, the encoder's whole feature map goes to the decoder (ablation)
# False: the UNet's full-resolution up level gets no skip connections (detail must pass where z modulates)
top_skips = True
# SODA training (§3.2.1, §3.4)
schedule = "inverted"  # training noise schedule: diffusion.get_schedule name
logsnr_shift = 0.0  # added to the training schedule's log-SNR (negative: more noise)
weighting = "eps"  # 'eps' (the paper's plain eps-MSE) | 'v' (eps-MSE / abar: more weight on high noise)
p_mask_layer = 0.1  # probability of zeroing each section of z (layer masking)
p_uncond = 0.1  # probability of zeroing all of z (classifier-free guidance dropout)
p_uncond_pose = 0.1  # multi-view: probability of zeroing the target's rays, independently (§3.3 "Guidance")
p_uncond_src_pose = 0.0  # multi-view: probability of zeroing each source view's rays (§3.3; 0: never, no draw)
enc_noise = 0.05  # std of the Gaussian noise on the encoder input ([-1, 1] images)
# DiffSiam (thesis §3, diffsiam.py): hierarchical latent segments + SimSiam on the two augmented views
segments = 0  # > 0: z in this many segments; noise level u uses the first ceil(u n) (0: plain SODA)
segment_mode = "hierarchical"  # 'hierarchical' (segments 1..k) | 'sequential' (segment k only; the thesis' ablation)
simsiam_weight = 0.0  # weight of the SimSiam loss; > 0 builds its heads (needs segments > 0)
simsiam_dim = 512  # width of the SimSiam projector (the predictor's hidden layer is a quarter of it)
pretrained = ""  # PDAE decoder: a checkpoint whose EMA UNet becomes the frozen denoiser ('': train the UNet jointly)
# optimizer
batch_size = 64  # images per process and micro-step
grad_accum = 1  # micro-steps per optimizer step: the global batch is batch_size * world_size * grad_accum
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
dist_timeout_min = 30.0  # torchrun: how long a process waits for the others at a collective (first-step compiles, a
# download or a folder listing on one process per node) before the run fails
seed = 0
peak_flops = 0.0  # device peak FLOP/s for MFU; 0 = look up bf16 peak by GPU name
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
DEFAULTS = {k: globals()[k] for k in config_keys}  # configure() copies these, then applies files and flags

# -----------------------------------------------------------------------------
# the config's rules: what each key allows, what a resume may change

CHOICES = dict(
    init_from=("scratch", "resume"),
    dataset=("cifar10", "folder", "imagenet", "celeba", "dsprites") + multiview.MULTIVIEW,
    views=("augment", "identical", "distort", "class"), aug=("none", "cropflip", "simclr", "randaugment", "gaussian"),
    cond=("mod", "xattn", "mod+xattn", "emb"), agg=("mean", "transformer"), prediction=M.PREDICTIONS,
    weighting=("eps", "v"), segment_mode=("hierarchical", "sequential"), dtype=("bfloat16", "float32"),
    encoder=tuple(M.PRESETS["encoder"]), unet=tuple(M.PRESETS["unet"]))


RANGES = [
    (("batch_size", "grad_accum", "max_iters", "log_interval", "ckpt_interval", "sample_steps", "k_max", "z_dim",
      "n_tokens", "simsiam_dim", "ckpt_keep_last"), lambda v: v >= 1, ">= 1"),
    (("eval_interval", "n_val", "num_workers", "ray_freqs", "segments", "threads", "warmup_iters",
      "weight_decay", "grad_clip", "enc_noise", "z_init", "simsiam_weight", "peak_flops",
      "ema_rampup"), lambda v: v >= 0, ">= 0"),
    (("lr", "enc_lr_mult", "ema_halflife_kimg", "dist_timeout_min"), lambda v: v > 0, "> 0"),
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
                     "ckpt_keep_last", "batch_size", "grad_accum",
                     "eval_at_start", "max_iters", "data_dir", "download", "num_workers", "sample_steps",
                     "sample_schedule", "device", "dtype", "cpu_bf16", "compile", "compile_backend", "fused_adamw",
                     "channels_last", "threads", "peak_flops", "dist_timeout_min"}


def validate(cfg):
    """Every value against what it allows, before anything is read or written: one ConfigError
    naming the key, the value given and what is allowed."""
    check_keys(cfg, CHOICES, RANGES)
    if cfg["cpu_bf16"].lower() not in ("auto", "true", "false"):
        raise ConfigError(f"cpu_bf16={cfg['cpu_bf16']!r} is not allowed: choose from 'auto', 'true', 'false'")
    check_schedules(cfg, "schedule", "sample_schedule")
    check_device(cfg["device"])
    if cfg["dataset"] != "cifar10" and not cfg["data_dir"]:
        raise ConfigError(f"dataset={cfg['dataset']!r} needs data_dir (only cifar10 is searched for or downloaded)")
    if cfg["dataset"] in multiview.MULTIVIEW and not cfg["ray_freqs"]:
        raise ConfigError(f"dataset {cfg['dataset']!r} has camera poses: set ray_freqs > 0 so the model sees them")
    if cfg["ray_freqs"] and cfg["dataset"] not in multiview.MULTIVIEW:
        raise ConfigError(f"ray_freqs={cfg['ray_freqs']} feeds the model camera rays, but dataset={cfg['dataset']!r} "
                          f"has no camera poses: set ray_freqs=0, or train on {', '.join(multiview.MULTIVIEW)}")
    if cfg["p_uncond_src_pose"] > 0 and cfg["dataset"] not in multiview.MULTIVIEW:
        raise ConfigError(f"p_uncond_src_pose={cfg['p_uncond_src_pose']} drops source poses: only multi-view datasets "
                          f"have them ({', '.join(multiview.MULTIVIEW)}), not {cfg['dataset']!r}")
    if cfg["views"] == "class" and cfg["dataset"] in ("folder", "imagenet", "celeba"):
        raise ConfigError(f"views='class' pairs images of a class in memory: not for {cfg['dataset']} "
                          "(decoded from files)")
    if cfg["simsiam_weight"] > 0 and (cfg["segments"] < 1 or cfg["views"] != "augment"):
        raise ConfigError("simsiam_weight > 0 is DiffSiam: it needs segments >= 1 and views='augment' "
                          "(two augmented views)")
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
            common.build_model(common.model_args(cfg))
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"the model cannot be built: {e}") from None
    out = cfg["out_dir"]
    check_out_dir("out_dir", out)
    runtime.check_lock(out)
    saved = common.saved_checkpoints(os.path.join(out, "ckpt.pt"))  # ckpt.pt and the older ckpt.1.pt, ...
    if cfg["init_from"] == "scratch" and not cfg["overwrite"] and saved:
        raise ConfigError(f"out_dir={out!r} already holds {os.path.basename(saved[0])}: continue it with "
                          "--init_from=resume, pick another out_dir, or pass --overwrite=True to start over")


def resume_conflicts(old, new):
    """Keys whose value differs between a checkpoint's config and this run's, and may not."""
    return [f"{k}={old[k]!r} (now {new[k]!r})" for k in new
            if k not in RESUME_MAY_CHANGE and k in old and old[k] != new[k]]


# -----------------------------------------------------------------------------
# The run: main() sets it up once, then loops over train_step, evaluate and save_run.

def main(argv):
    runtime.check_torch()
    cfg = configure(argv, DEFAULTS)
    validate(cfg)
    run = None
    # a signal (Ctrl-C, SIGTERM, SIGUSR1) from here on asks the loop to stop with a checkpoint, one
    # that comes during setup too: a launcher's or a cluster's SIGTERM does not wait for the loop
    with stop_signals() as stop:
        try:
            run = setup(cfg, resume_checkpoint(cfg))
            run.stop = stop
            return loop(run)
        finally:  # out_dir is free for the next run, and the process group is gone, however this one ended
            if run is not None:
                run.loader_iter = None  # its workers (which ignore stop signals) end here
                if run.lock:
                    runtime.release_lock(run.lock)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


def loop(run):
    """The training loop: a step, and at their intervals a log line, an evaluation, a checkpoint.
    After every step the processes agree whether a signal asked any of them to stop (stop_requested);
    at log and checkpoint steps whether any step on any of them was not finite (first_bad_step)."""
    if stop_requested(run):  # a signal during setup: nothing trained, nothing to save
        run.say(f"stopped by {stop_name(run)} before step {run.step + 1}; nothing saved")
        return
    if run.eval_at_start and run.step == 0:
        evaluate_and_log(run, 0)
        wait_for_rank_0(run)
    # a bar on a terminal; in a file (nohup, a job log) one plain line per log_interval instead
    run.t_start = time.time()  # the elapsed time of the plain lines counts from here
    bar = tqdm(total=run.max_iters, initial=run.step, disable=not (run.master and sys.stderr.isatty()),
               dynamic_ncols=True, desc="train")
    # first step with a non-finite loss or gradient norm, or -1 (a device tensor: read at log and checkpoint steps)
    bad = torch.zeros((), dtype=torch.long, device=run.dev) - 1
    loss_sum, t0, seen0 = torch.zeros((), device=run.dev), time.time(), run.step  # since the last log line
    run.raw.train()
    while run.step < run.max_iters:
        it = run.step
        loss = train_step(run, it)
        bad = torch.where((bad < 0) & ~(torch.isfinite(loss) & torch.isfinite(run.grad_norm)), it, bad)
        loss_sum += loss
        run.step = step = it + 1
        bar.update(1)
        last = step == run.max_iters
        halt = not last and stop_requested(run)
        saving = step % run.ckpt_interval == 0 or last or halt
        if step % run.log_interval == 0 or saving:
            first = first_bad_step(run, bad)  # a host sync, at log and checkpoint steps only: never save a NaN model
            if first >= 0:
                raise FloatingPointError(f"non-finite loss or gradient at step {first}; stopping. The last good "
                                         f"checkpoint is {os.path.join(run.out_dir, 'ckpt.pt')} (if any)")
        if step % run.log_interval == 0 or last:
            run.bad_count = unreadable_count(run)  # image files: how many could not be read so far (logged)
            log_progress(run, bar, loss_sum, step - seen0, t0, lr_at(run, it))
            t0, seen0 = time.time(), step
            loss_sum.zero_()
        if halt:  # a stop agreed at an evaluation step: the checkpoint first (the job may end during the evaluation)
            save_run(run, step)
        evaluating = (run.eval_interval > 0 and step % run.eval_interval == 0) or last
        if evaluating:
            t_eval = time.time()
            evaluate_and_log(run, step)
            t0 += time.time() - t_eval  # evaluation time is not training time
        if saving and not halt:
            save_run(run, step)
        if evaluating or saving:
            wait_for_rank_0(run)
        if halt:
            bar.close()
            run.say(f"stopped by {stop_name(run)} after step {step}; "
                    f"checkpoint {os.path.join(run.out_dir, 'ckpt.pt')}; continue with --init_from=resume", flush=True)
            break
    bar.close()
    skipped = f"; {run.bad_count} unreadable image file{'s' * (run.bad_count > 1)} (named in the warnings) " \
        "replaced by the next readable image" if run.bad_count else ""
    run.say(f"done: {run.step} steps; checkpoint {os.path.join(run.out_dir, 'ckpt.pt')}{skipped}")


class Run(types.SimpleNamespace):
    """One training run: every config key as an attribute (run.lr, run.seed, ...), the config dict
    itself (run.cfg, saved in each checkpoint), and what setup() builds: the processes and device,
    the data, the model, its EMA, the optimizer and the step."""


def resume_checkpoint(cfg):
    """init_from='resume': the newest checkpoint of out_dir that can be read and resumed (ckpt.pt, else the
    older ckpt.1.pt, ...: ckpt_keep_last; a fall back is said in one line), once this config is known to be
    allowed to continue it (asked before any work); scratch: None. ckpt['unreadable'] lists the newer
    files it could not use: the next save removes them, so that they never push a good one out."""
    if cfg["init_from"] != "resume":
        return None
    newest = os.path.join(cfg["out_dir"], "ckpt.pt")
    unreadable = []  # (path, why)
    for path in common.saved_checkpoints(newest) or [newest]:
        try:
            ckpt = load_checkpoint(path)
            if any(k not in ckpt for k in ("model", "optimizer", "step", "rng")):
                raise CheckpointError(f"cannot resume {path}: it holds no model/optimizer/step/rng, so it is not a "
                                      "resumable train.py checkpoint (start a new out_dir, or --init_from=scratch "
                                      "--overwrite=True)")
            break
        except CheckpointError as e:
            unreadable.append((path, str(e)))
    else:
        raise CheckpointError("; the older ".join(why for _, why in unreadable))
    if path != newest and int(os.environ.get("RANK", 0)) == 0:  # no ckpt.pt: a run stopped between two renames
        why = f"{unreadable[0][1]} (the next checkpoint replaces it)" if unreadable else f"no checkpoint at {newest!r}"
        print(f"resume: {why}; resuming from the older {path} (step {ckpt['step']})", flush=True)
    ckpt["unreadable"] = [p for p, _ in unreadable]
    bad = resume_conflicts(ckpt["config"], cfg)
    if bad:
        raise ConfigError(f"cannot resume {path} with {', '.join(bad)}: these keys change the model, the data "
                          "order or the optimisation (start a new out_dir instead)")
    # the global batch must stay; how it is split (processes x batch_size x grad_accum) may change. A
    # checkpoint from before the split was recorded does not say how many processes wrote it: the same
    # batch_size without accumulation continues it (on any number, as before), as this one would have
    world = int(os.environ.get("WORLD_SIZE", 1))
    now = {"world": world, "batch_size": cfg["batch_size"], "grad_accum": cfg["grad_accum"]}
    was = ckpt.get("batch") or {"world": world, "batch_size": ckpt["config"]["batch_size"], "grad_accum": 1}
    if math.prod(was.values()) != math.prod(now.values()):
        split = lambda b: f"{math.prod(b.values())} ({b['world']} process{'es' * (b['world'] != 1)} x " \
                          f"batch_size={b['batch_size']} x grad_accum={b['grad_accum']})"
        raise ConfigError(f"cannot resume {path}: it was trained with a global batch of {split(was)}, this run's is "
                          f"{split(now)}; keep the global batch (e.g. --batch_size={cfg['batch_size']} "
                          f"--grad_accum={max(1, math.prod(was.values()) // (world * cfg['batch_size']))}) or start "
                          "a new out_dir")
    return ckpt


def setup(cfg, ckpt=None):
    """-> Run: processes and precision, the data (and DataLoader), the model, EMA and optimizer
    (continuing `ckpt` where given), the fixed evaluation batch; then out_dir, the run's first
    write; FLOPs per image and the GPU's peak, for MFU."""
    run = Run(**cfg, cfg=cfg, model_args=common.model_args(cfg), step=0, t_start=time.time())
    setup_processes(run)
    setup_data(run, ckpt)
    # the step of the last checkpoint, and the newer files a resume could not use (the next save removes them)
    run.saved_step, run.unreadable_ckpts = (ckpt["step"], ckpt.pop("unreadable")) if ckpt is not None else (None, [])
    setup_model(run, ckpt)
    # a checkpoint's size before the first is written: model, EMA and AdamW's two moments of each trained parameter
    tensors = [*run.raw.state_dict().values(), *run.ema.state_dict().values(), *run.raw_params, *run.raw_params]
    run.ckpt_bytes = sum(t.numel() * t.element_size() for t in tensors)
    # files decoded by DataLoader workers: no more of them than cores; the unreadable files met (their messages)
    from_files = not (run.in_memory or run.multiview)
    run.bad_files, run.bad_count = (set(), 0) if from_files else (None, None)
    if from_files:
        run.num_workers, line = data.fit_workers(run.num_workers)
        if line:
            run.say(line)
    # image folders: DataLoader workers, built after setup_model so they start at the resumed step
    run.loader_iter = iter(torch.utils.data.DataLoader(
        run.train_views, batch_sampler=data.StepBatches(run.n_train, run.global_batch, run.micro_rows, run.seed,
                                                        run.step, run.max_iters),
        num_workers=run.num_workers, pin_memory=run.cuda, persistent_workers=run.num_workers > 0,
        prefetch_factor=4 if run.num_workers > 0 else None, worker_init_fn=ignore_stop_signals)) if from_files else None
    # batches of (seed, step): a resume replays them
    if run.master and from_files:  # decoded once: the evaluation's kNN and z-usage images
        (run.x_knn, run.y_knn), (run.x_val, run.y_val) = folder_eval_sets(run)
    run.fixed = fixed_eval_batch(run)
    run.lock = None
    if run.master:  # the first write of the run: a bad input above has left nothing behind
        need, free = checkpoint_room(run)
        if free < need:  # said now, not after hours of training
            raise CheckpointError(f"out_dir={run.out_dir!r} has {free / 1e9:.2f} GB free, and a checkpoint of this "
                                  f"run needs about {need / 1e9:.2f} GB ({need:,} bytes): free some space, or pick "
                                  "another out_dir")
        try:
            os.makedirs(run.out_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"out_dir={run.out_dir!r} cannot be created: {e.strerror}") from None
        run.lock = runtime.take_lock(run.out_dir)  # refused if a live run writes there
        if run.overwrite and run.init_from == "scratch":  # a new run: a new log, and none of the old checkpoints
            old = common.saved_checkpoints(os.path.join(run.out_dir, "ckpt.pt"))
            for path in filter(os.path.exists, old + [os.path.join(run.out_dir, "log.jsonl")]):
                os.remove(path)
    # every process, no collective
    run.flops_per_img = count_flops(lambda: common.build_model(run.model_args), run.image_size)
    run.peak = runtime.peak_flops(run.dev, run.peak_flops)
    return run


def setup_processes(run):
    """torchrun sets RANK: DDP, NCCL on GPUs and gloo on the CPU (so a 2-process test runs
    anywhere); the device, threads and autocast; this process's rows of each global batch."""
    run.ddp = int(os.environ.get("RANK", -1)) != -1
    dev = runtime.pick_device(run.device)
    run.stop_group = None  # the processes' stop flag goes through the default group: gloo on the CPU
    if run.ddp:
        run.rank, run.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        run.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if dev.startswith("cuda"):
            dev = f"cuda:{run.local_rank % torch.cuda.device_count()}"  # srun --gpus-per-task: one GPU each
            torch.cuda.set_device(dev)
        cuda = dev.startswith("cuda")  # device_id: NCCL binds this process's GPU now (barriers know it)
        timeout = datetime.timedelta(minutes=run.dist_timeout_min)  # NCCL's own default is 10 minutes
        torch.distributed.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(dev) if cuda else None,
                                             timeout=timeout)
        if cuda:  # on GPUs a gloo group of the CPUs: agreeing to stop, or waiting for a download, never waits for a GPU
            run.stop_group = torch.distributed.new_group(backend="gloo", timeout=timeout)
    else:
        run.rank, run.world, run.local_rank = 0, 1, 0
    run.dev, run.cuda, run.master = dev, dev.startswith("cuda"), run.rank == 0
    if run.threads > 0:
        torch.set_num_threads(run.threads)
    run.autocast, cpu_line = runtime.precision(dev, run.dtype, run.cpu_bf16)
    run.global_batch = run.batch_size * run.world * run.grad_accum
    # the global batch in slots of batch_size rows; micro-step m of this process takes slot m * world + rank:
    # one process x grad_accum 2 and two processes x 1 split it the same way
    run.slots = [m * run.world + run.rank for m in range(run.grad_accum)]
    run.micro_rows = [slice(s * run.batch_size, (s + 1) * run.batch_size) for s in run.slots]
    run.say = print if run.master else (lambda *a, **k: None)
    if not run.cuda:
        run.say(cpu_line)
    warning = launcher_signal_warning(os.environ)
    if warning:
        run.say(warning)


def setup_data(run, ckpt):
    """The training split, and a validation split held out of it for the kNN / z-usage checks;
    multi-view sets: the train objects, and the unseen test objects for the evaluation grid."""
    run.multiview = run.dataset in multiview.MULTIVIEW
    run.train_set = run.x_train = run.y_train = run.x_val = run.y_val = run.view_size = None
    run.labelled = not run.multiview  # folders: where they have class subfolders (load_data)
    with local_rank_first(run):  # one download per node
        load_data(run)
    run.in_memory = isinstance(run.train_set, tuple)
    if run.in_memory:
        run.x_train, run.y_train = (t.to(run.dev) for t in run.train_set)
        run.n_train = len(run.x_train)
        if run.views == "class":
            run.classes = tuple(t.to(run.dev) for t in data.class_table(run.y_train.cpu()))
    elif not run.multiview:  # image folders, CelebA: the evaluation reads a fixed part of train and val (setup)
        run.n_train, run.y_train = len(run.train_set), run.train_set.targets
        run.train_views, run.view_size = run.train_set, None
        if isinstance(run.train_set, data.FolderData) and run.aug in data.CROP_AUGS:  # crops from the whole picture
            run.train_views = run.train_set.whole_images(data.decode_size(run.image_size, run.crop_min))
            run.view_size = run.image_size
    run.steps_per_epoch = run.n_train // run.global_batch
    run.order_cache = {}  # in memory: the current epoch's order (get_batch)
    if run.steps_per_epoch == 0:
        raise data.DataError(f"the global batch ({run.global_batch}) is larger than the training set ({run.n_train})")
    if ckpt is not None and ckpt.get("data_pos", {}).get("n_train", run.n_train) != run.n_train:
        raise data.DataError(f"cannot resume: the checkpoint was trained on {ckpt['data_pos']['n_train']:,} images, "
                             f"data_dir now gives {run.n_train:,} (another copy of the data changes the data order)")
    split = f"{run.batch_size} x {run.world} processes" + \
        (f" x {run.grad_accum} micro-steps" if run.grad_accum > 1 else "")
    run.say(f"data: {run.dataset} {run.n_train:,} train images, global batch {run.global_batch} "
            f"({split}), {run.steps_per_epoch} steps per epoch")
    if run.multiview:
        run.say(f"multi-view: {run.mv_train.images.shape[0]} train objects x {run.mv_train.images.shape[1]} views, "
                f"1..{run.k_max} source views per step; {run.mv_val.images.shape[0]} unseen objects for the eval grid")


@contextlib.contextmanager
def local_rank_first(run):
    """The block runs on each node's first process (LOCAL_RANK 0) first, then on the others, which
    find what it downloaded or wrote (torchrun: every process calls this once). The others wait on the
    CPUs (run.stop_group), for up to dist_timeout_min: a download or the listing of a large folder on a
    network file system can take longer than NCCL's watchdog allows."""
    if run.ddp and run.local_rank != 0:
        torch.distributed.barrier(group=run.stop_group)
    yield
    if run.ddp and run.local_rank == 0:
        torch.distributed.barrier(group=run.stop_group)


def load_data(run):
    """The training split and the validation split (or the multi-view train and test objects)."""
    if run.multiview:  # batches come from multiview.multiview_batch; an "epoch" counts train_images images
        run.mv_train = multiview.load_multiview(run.dataset, run.data_dir, "train", run.image_size)
        run.mv_val = multiview.load_multiview(run.dataset, run.data_dir, "test", run.image_size)
        run.n_train = run.mv_train.images.shape[0] * run.mv_train.images.shape[1]
        V = min(run.mv_train.images.shape[1], run.mv_val.images.shape[1])  # a step takes k_max sources + a target
        if run.k_max >= V:
            raise ConfigError(f"k_max={run.k_max} is out of range: the objects of {run.dataset} in {run.data_dir!r} "
                              f"have {V} view(s), and a step needs k_max source views and another one, the target")
    else:
        data_path, dl = run.data_dir, run.download
        if run.dataset == "cifar10":  # data_dir='': ./data/cifar10, ../shared/data/cifar10-subset, else a download
            data_path, why, dl = data.find_cifar10(run.data_dir, run.download)
            run.say(f"data: using {data_path} ({why})")
        run.train_set = data.load(run.dataset, data_path, "train", run.image_size, dl, run.n_val, run.seed)
    if isinstance(run.train_set, tuple):
        run.x_val, run.y_val = data.load(run.dataset, data_path, "val", run.image_size, dl, run.n_val, run.seed)
    elif not run.multiview:
        run.val_set = data.load(run.dataset, data_path, "val", run.image_size, n_val=run.n_val, seed=run.seed)
        if isinstance(run.train_set, data.FolderData):
            run.say(f"data: train {run.train_set.about}\ndata: val {run.val_set.about}")
            run.labelled = run.train_set.labelled and run.val_set.labelled
            if not run.labelled:
                run.say("data: no labels (the images are not all in class subfolders, 2 or more): no kNN check; the "
                        "evaluation measures z-usage, the sample grid and the loss")


def setup_model(run, ckpt):
    """The model (seeded first, so every rank builds the same one), its EMA, AdamW; with a
    checkpoint its weights, optimizer state, step and RNG states; then compile and DDP, the training
    schedule, and the parameter (and z_bn buffer) pairs the EMA follows."""
    torch.manual_seed(run.seed)
    raw = common.build_model(run.model_args).to(run.dev)
    if run.pretrained and run.init_from == "scratch":  # on resume the checkpoint holds the frozen denoiser
        ck = load_checkpoint(run.pretrained)  # PDAE: its EMA UNet becomes the frozen denoiser
        why = diffsiam.check_pretrained(ck.get("model_args") or common.model_args(ck["config"]), run.model_args)
        if why:
            raise ConfigError(f"pretrained={run.pretrained!r} cannot be the frozen denoiser: {why}")
        diffsiam.load_frozen(raw, ck["ema"])
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
        for group in ckpt["optimizer"]["param_groups"]:  # they hold the saving run's kernel choice: this run's,
            group["fused"] = run.fused_adamw  # before loading (a fused AdamW keeps its step counts on the device)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.step = ckpt["step"]
        set_rng_states(ckpt["rng"], run.cuda)
        run.say(f"resumed from step {run.step} (epoch {run.step // run.steps_per_epoch}, "
                f"batch {run.step % run.steps_per_epoch})")
    run.net = torch.compile(raw, backend=run.compile_backend) if run.compile else raw
    if run.ddp:
        run.net = torch.nn.parallel.DistributedDataParallel(run.net, device_ids=[run.dev] if run.cuda else None)
    run.schedule_fn = D.get_schedule(run.schedule, run.logsnr_shift)
    run.ema_params, run.raw_params, run.ema_buffers = ema_pairs(run.ema, raw)
    if ckpt is not None:
        ckpt.clear()  # its tensors (model, EMA, optimizer) are loaded: free the host copy


def save_run(run, it):
    """Rank 0: the resumable checkpoint out_dir/ckpt.pt (written atomically): model, EMA, optimizer,
    step, config, data position and every RNG state; the ckpt_keep_last - 1 before it stay as ckpt.1.pt,
    ...; with ckpt_keep also a copy ckpt_<step>.pt. One that does not fit on the disk, or whose write
    fails, stops every process with one CheckpointError, and the checkpoints before it stay."""
    failed = write_checkpoint(run, it) if run.master else ""
    if run.ddp:  # the others wait here while rank 0 writes, and learn whether it could
        flag = torch.tensor(float(bool(failed)))
        torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX, group=run.stop_group)
        failed = failed or ("rank 0 could not save the checkpoint" if flag.item() else "")
    if failed:
        raise CheckpointError(failed)


def checkpoint_state(run, it):
    """What a checkpoint holds: model, EMA, optimizer, step, config, data position and every RNG state."""
    return {
        "model": run.raw.state_dict(), "ema": run.ema.state_dict(), "optimizer": run.optimizer.state_dict(),
        "step": it, "config": run.cfg, "model_args": run.model_args,
        # resume: the product stays
        "batch": {"world": run.world, "batch_size": run.batch_size, "grad_accum": run.grad_accum},
        "data_pos": {"epoch": it // run.steps_per_epoch, "batch": it % run.steps_per_epoch, "n_train": run.n_train},
        "rng": rng_states(run.cuda),
    }


def write_checkpoint(run, it):
    """Rank 0's part of save_run -> '' or why the checkpoint of step `it` could not be saved."""
    path = os.path.join(run.out_dir, "ckpt.pt")
    for stale in filter(os.path.exists, run.unreadable_ckpts):  # a resume's unusable newer files go first
        os.remove(stale)
    run.unreadable_ckpts = []
    need, free = checkpoint_room(run)
    try:
        if free < need:  # not even tried: a write that fills the disk stops the run the same way, later
            raise CheckpointError(f"no room for {path!r}")
        save_checkpoint(checkpoint_state(run, it), path, run.ckpt_keep_last)
        run.saved_step = it
        if run.ckpt_keep:  # a learning curve: every checkpoint stays as ckpt_<step>.pt for the probes
            copy_checkpoint(path, os.path.join(run.out_dir, f"ckpt_{it:06d}.pt"))
    except CheckpointError as e:
        kept = "nothing was saved: free some space and start again" if run.saved_step is None else \
            f"the checkpoint of step {run.saved_step} stays: free some space, then continue with --init_from=resume"
        return f"checkpoint of step {it}: {e}: it needs about {need:,} bytes ({need / 1e9:.2f} GB), and " \
               f"{run.out_dir!r} had {free:,} free; {kept}"
    return ""


def copy_checkpoint(path, copy_path):
    """A copy of a checkpoint (ckpt_keep); one that fails (a full disk) leaves no part behind: one CheckpointError."""
    try:
        shutil.copyfile(path, copy_path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(copy_path)
        raise CheckpointError(f"could not copy {path!r} to {copy_path!r} ({e.strerror or e})") from None


def checkpoint_room(run):
    """-> (bytes the next checkpoint needs, bytes free where out_dir is: its nearest folder, before it is
    made). It needs the size of the last one (before the first, that of its tensors), twice that with
    ckpt_keep (the copy), free while the checkpoints before it are still there."""
    last = os.path.join(run.out_dir, "ckpt.pt")
    need = max(run.ckpt_bytes, os.path.getsize(last) if os.path.isfile(last) else 0) * (2 if run.ckpt_keep else 1)
    where = os.path.abspath(run.out_dir)
    while not os.path.isdir(where):
        where = os.path.dirname(where)
    return need, shutil.disk_usage(where).free


def unreadable_count(run):
    """How many unreadable image files the processes have met (each decodes its own rows): the union of
    their run.bad_files, gathered on the CPUs (run.stop_group); None where the data is held in memory."""
    if run.bad_files is None or not run.ddp:
        return None if run.bad_files is None else len(run.bad_files)
    every = [None] * run.world
    torch.distributed.all_gather_object(every, run.bad_files, group=run.stop_group)
    return len(set().union(*every))


# Ctrl-C; torchrun's, Kubernetes' and SLURM's stop; SLURM's customary --signal=USR1@secs
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")


def launcher_signal_warning(env):
    """torchrun passes on to its workers only the signals it handles (SIGTERM, SIGINT, SIGHUP and SIGQUIT,
    or those its --signals_to_handle names where it has that flag); another one ends torchrun, and with
    it this run, without a checkpoint. -> a warning line where that loses the recipe's stop signal
    (SIGTERM), or SLURM's customary SIGUSR1 in a SLURM job; else ''."""
    if "TORCHELASTIC_RUN_ID" not in env:
        return ""
    passed = env.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT").split(",")
    lost = [s for s in ("SIGTERM",) + (("SIGUSR1",) if "SLURM_JOB_ID" in env else ()) if s not in passed]
    if not lost:
        return ""
    return (f"warning: this torchrun passes on {', '.join(passed)} only: {' or '.join(lost)} would end it without a "
            "checkpoint. Stop the job with SIGTERM (#SBATCH --signal=TERM@300, as tools/slurm/*.sbatch do), or "
            f"start torchrun (2.10 or newer) with --signals_to_handle={','.join(passed + lost)}")


def ignore_stop_signals(worker_id):
    """DataLoader workers ignore the stop signals: torchrun and SLURM signal every process of the job,
    and a worker that dies of it takes the run down before it can save (the main process ends them)."""
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


@contextlib.contextmanager
def stop_signals(enabled=True):
    """Ctrl-C (SIGINT), SIGTERM and SIGUSR1 append to the yielded list instead of killing the run
    (main thread only); the previous handlers come back on exit."""
    stop, handlers = [], {}
    if enabled and threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                    for sig in (getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name))}
    try:
        yield stop
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


def stop_name(run):
    """The signal that asked this process to stop, by name ('a signal': another process got it)."""
    return signal.Signals(run.stop[0]).name if run.stop else "a signal"


def stop_requested(run):
    """Has a signal asked any process to stop? Every process asks after every step, so all stop at the
    same step: one all-reduce of one number, on the CPUs (run.stop_group), never waiting for a GPU."""
    if not run.ddp:
        return bool(run.stop)
    flag = torch.tensor(float(bool(run.stop)))
    torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX, group=run.stop_group)
    return flag.item() > 0


def first_bad_step(run, bad):
    """The first step with a non-finite loss or gradient on any process, or -1 (waits for the device)."""
    if run.ddp:
        bad = torch.where(bad < 0, 2**62, bad)  # -1 (none) must not win the minimum
        torch.distributed.all_reduce(bad, torch.distributed.ReduceOp.MIN)
        bad = torch.where(bad == 2**62, -1, bad)
    return bad.item()


def wait_for_rank_0(run):
    """The other processes wait on the CPUs while rank 0 alone evaluates or saves: nothing of theirs
    is queued on the GPU meanwhile, so NCCL's 10-minute watchdog never sees a slow evaluation or disk."""
    if run.ddp:
        torch.distributed.barrier(group=run.stop_group)


if __name__ == "__main__":
    configurator.plain_warnings()
    try:
        main(sys.argv[1:])
    except (ConfigError, CheckpointError, data.DataError, FloatingPointError) as e:
        # under torchrun every process meets the same error: the first one says it
        sys.exit(f"error: {e}" if int(os.environ.get("RANK", 0)) == 0 else 1)
