"""
Benchmark SODA's training step, as nanoGPT's bench.py does its own: synthetic images, the model,
optimizer and arithmetic of a training config, timed after warm-up (compilation happens there);
then the data pipeline alone and DDIM sampling. One process; one line and out_dir/bench.json.

    python bench.py configs/cifar10_cpu.py                    # the CPU teaching config
    python bench.py configs/cifar10.py --batch_size=256       # one GPU
    python bench.py configs/imagenet.py --compile=False       # a speed switch off

A training config file may be named: its keys that the benchmark has are read, the others (the
data, the run's length and evaluation) are not a training step's business. Flags must be its keys,
and a key train.py has too takes train.py's default. The step is train.py's own (training.py) on
images held in memory, as CIFAR-10's are: the batch and its views, encoder noise, the denoising
loss under autocast, backward, gradient clipping, AdamW in train.py's groups, the EMA.
"""
import copy
import json
import os
import sys
import time
import types

import torch

import common
import data
import diffusion as D
import monitor
import runtime
import training
from configurator import ConfigError, check_device, check_keys, check_out_dir, check_schedules, configure
from model import PRESETS, SODAConfig

# -----------------------------------------------------------------------------
# the model: SODAConfig's fields (encoder, unet, z_dim, image_size, cond, ..., prediction), as train.py's keys
globals().update(vars(SODAConfig()))
# the step, as train.py's keys of the same names
views = "augment"
aug = "cropflip"
crop_min = 0.25
enc_noise = 0.05
schedule = "inverted"
logsnr_shift = 0.0
weighting = "eps"
batch_size = 64  # images per step
lr = 2e-4
enc_lr_mult = 1.0
weight_decay = 0.0
beta2 = 0.99
grad_clip = 1.0
ema_halflife_kimg = 50.0
ema_rampup = 0.05
seed = 0
# sampling, as the evaluation's grid samples
sample_steps = 50
sample_schedule = "cosine"
# speed switches, as train.py's
device = "auto"
dtype = "bfloat16"
cpu_bf16 = "auto"
compile = False
compile_backend = "inductor"
fused_adamw = True
channels_last = False
threads = 0
peak_flops = 0.0
# the benchmark's own
iters = 30  # timed training steps, after `warmup` steps
warmup = 5
sample_n = 64  # images sampled with DDIM for the sampling figure
out_dir = "out/bench"
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str))}


def check(cfg):
    """Every value against what it allows, before any work: one ConfigError."""
    check_keys(cfg, {"encoder": tuple(PRESETS["encoder"]), "unet": tuple(PRESETS["unet"]),
                     "dtype": ("bfloat16", "float32"), "views": ("augment", "identical", "distort"),
                     "aug": ("none", "cropflip", "simclr", "randaugment", "gaussian"), "weighting": ("eps", "v")},
               [(("iters", "batch_size", "sample_n", "sample_steps"), lambda v: v >= 1, ">= 1"),
                (("warmup", "threads", "enc_noise", "grad_clip", "weight_decay", "peak_flops", "ema_rampup"),
                 lambda v: v >= 0, ">= 0"),
                (("lr", "enc_lr_mult", "ema_halflife_kimg"), lambda v: v > 0, "> 0"),
                (("crop_min",), lambda v: 0 < v <= 1, "in (0, 1]"),
                (("image_size",), lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8")])
    if cfg["cpu_bf16"].lower() not in ("auto", "true", "false"):
        raise ConfigError(f"cpu_bf16={cfg['cpu_bf16']!r} is not allowed: choose from 'auto', 'true', 'false'")
    if cfg["ray_freqs"]:
        raise ConfigError(f"ray_freqs={cfg['ray_freqs']}: the benchmark's synthetic images have no camera poses; "
                          "time the model with --ray_freqs=0")
    check_schedules(cfg, "schedule", "sample_schedule")
    check_device(cfg["device"])
    check_out_dir("out_dir", cfg["out_dir"])


def timed(fn, n, sync):
    """Seconds for n calls of fn(i), between device syncs."""
    sync()
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    sync()
    return time.perf_counter() - t


def build(C, dev, autocast):
    """train.py's Run for one process, its data the benchmark's images in memory: the model (seeded),
    its EMA, AdamW in train.py's groups, the network the step calls (compiled where asked). The
    learning rate stays at lr (no warm-up or decay: a step costs the same at any rate)."""
    torch.manual_seed(C["seed"])
    mem = torch.channels_last if C["channels_last"] else torch.contiguous_format
    raw = common.build_model(common.model_args(C)).to(dev).to(memory_format=mem).train()
    ema = copy.deepcopy(raw).eval().requires_grad_(False)
    opt = torch.optim.AdamW(training.param_groups(raw, C["enc_lr_mult"], C["weight_decay"]), lr=C["lr"],
                            betas=(0.9, C["beta2"]), fused=C["fused_adamw"])
    net = torch.compile(raw, backend=C["compile_backend"]) if C["compile"] else raw
    B, S = C["batch_size"], C["image_size"]
    images = torch.randint(0, 256, (max(4096, 2 * B), 3, S, S), dtype=torch.uint8, device=dev)  # uint8, as CIFAR's
    return types.SimpleNamespace(
        **C, dev=dev, autocast=autocast, mem=mem, raw=raw, ema=ema, optimizer=opt, net=net,
        schedule_fn=D.get_schedule(C["schedule"], C["logsnr_shift"]),
        **dict(zip(("ema_params", "raw_params", "ema_buffers"), training.ema_pairs(ema, raw))),
        warmup_iters=0, decay_lr=False, min_lr_ratio=1.0, max_iters=C["warmup"] + C["iters"],
        in_memory=True, multiview=False, x_train=images, y_train=torch.zeros(len(images), dtype=torch.long, device=dev),
        n_train=len(images), global_batch=B, steps_per_epoch=len(images) // B, order_cache={},
        ddp=False, world=1, grad_accum=1, slots=[0], micro_rows=[slice(0, B)], view_size=None,
        segments=0, simsiam_weight=0.0)


def main(argv):
    C = configure(argv, DEFAULTS, lenient_files=True)
    check(C)
    dev = runtime.pick_device(C["device"])
    cuda = dev.startswith("cuda")
    if C["threads"] > 0:
        torch.set_num_threads(C["threads"])
    autocast, cpu_line = runtime.precision(dev, C["dtype"], C["cpu_bf16"])
    if not cuda:
        print(cpu_line)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    run = build(C, dev, autocast)
    rows = run.micro_rows[0]

    def views_at(it):  # the data pipeline alone: the step's batch and its two views
        xb, _, idx, aspect = training.get_batch(run, it, rows)
        return training.views_of(run, xb, idx, data.Rng(run.seed, it, run.global_batch, rows, dev), aspect)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timed(lambda i: training.train_step(run, i), C["warmup"], sync)
    train_ips = C["iters"] * run.global_batch / timed(lambda i: training.train_step(run, C["warmup"] + i), C["iters"],
                                                       sync)
    data_ips = C["iters"] * run.global_batch / timed(lambda i: views_at(i)[1], C["iters"], sync)
    x = data.to_signed(run.x_train[: C["sample_n"]])
    with torch.no_grad(), autocast():
        sample_s = timed(lambda i: D.ddim(run.ema, run.ema.encode(x), x.shape, steps=C["sample_steps"],
                                          schedule=C["sample_schedule"], generator=torch.Generator(dev).manual_seed(0)),
                         1, sync)
    return report(C, dev, train_ips, data_ips, sample_s, len(x))


def report(C, dev, train_ips, data_ips, sample_s, n_sampled):
    """One line and out_dir/bench.json: the figures, the model's FLOPs and MFU, the switches."""
    cuda = dev.startswith("cuda")
    mem_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else _cpu_peak_gb()
    flops = monitor.count_flops(lambda: common.build_model(common.model_args(C)), C["image_size"])
    peak = runtime.peak_flops(dev, C["peak_flops"])
    res = {"train_img_s": train_ips, "data_img_s": data_ips, "sample_s": sample_s,
           "sample_img_steps_s": n_sampled * C["sample_steps"] / sample_s, "peak_mem_gb": mem_gb,
           "gflop_per_img": flops / 1e9, "mfu": flops * train_ips / peak if peak else None,
           "device": torch.cuda.get_device_name(dev) if cuda else f"cpu x{torch.get_num_threads()} threads",
           **{k: C[k] for k in ("encoder", "unet", "batch_size", "compile", "channels_last", "dtype", "cpu_bf16",
                                "fused_adamw", "threads")}}
    os.makedirs(C["out_dir"], exist_ok=True)
    with open(os.path.join(C["out_dir"], "bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    mfu = f" mfu {res['mfu']:.1%}" if res["mfu"] else ""
    print(f"bench: train {train_ips:.1f} img/s | data {data_ips:.0f} img/s | DDIM {n_sampled} images x "
          f"{C['sample_steps']} steps {sample_s:.1f} s ({res['sample_img_steps_s']:.0f} img-steps/s) | "
          f"peak mem {mem_gb:.2f} GB | {res['gflop_per_img']:.2f} GFLOP per image{mfu} | {res['device']}")
    return res


def _cpu_peak_gb():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
