"""
The contrastive yardstick: SimCLR (Chen et al. 2020) on SODA's encoder, with the data, seed and
budget of a train.py config, saved as a checkpoint probe.py measures as it measures SODA's.

    python tools/contrastive.py configs/cifar10_cpu.py                    # the config's max_iters steps
    python tools/contrastive.py configs/cifar10_cpu.py --minutes=4 --threads=2
    python probe.py --ckpt=out/cifar10_cpu_contrastive/ckpt.pt             # z; --features=pool, --task=knn

From the config (its file and --key=value flags, as train.py reads them): the model (encoder preset,
z_dim, image_size, ...), dataset and data_dir (in memory: cifar10, dsprites), n_val and seed (the
same training split, the validation images held out), batch_size, max_iters (the step budget),
crop_min, threads, device, dtype and cpu_bf16 (bf16 autocast where train.py would use it),
log_interval. The rest of a SODA config (its loss, learning rate, schedule) is not read.

Each step: batch_size training images drawn with replacement, two 'simclr' views of each (data.py's
batched crop, flip and colour jitter), z of both by the encoder, a 2-layer projection head on z,
NT-Xent at temperature simclr_temperature, Adam at simclr_lr (constant). The budget: --steps=N (0:
the config's max_iters), or --minutes=M of training (wall clock, setup and data loading excepted):
it stops at the first step past M minutes (and at N steps where both are given).

OUT_DIR/ckpt.pt is a SODA checkpoint (common.build_model of the config, seeded as train.py seeds
it) whose encoder holds the contrastive weights, as both 'model' and 'ema' (probe.py reads 'ema');
the UNet stays at its init and no probe reads it. It is marked: trained_by='contrastive' and the
tool's keys in its config. OUT_DIR defaults to the config's out_dir + '_contrastive', so the SODA
run's checkpoint is never overwritten; log.jsonl has the mean loss of every log_interval steps.

tools/probe_solvers.py trains its SimCLR stand-in with this file's SimCLR class and nt_xent.
"""
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, ROOT)
sys.path.insert(0, TOOLS)
import common  # noqa: E402
import configurator  # noqa: E402
import data  # noqa: E402
import model as M  # noqa: E402
import runtime  # noqa: E402
from configurator import SEED_RANGE, ConfigError, check_device, check_keys, check_out_dir  # noqa: E402
from memory_table import train_defaults  # noqa: E402

IN_MEMORY = ("cifar10", "dsprites")  # data.load holds these as tensors; folders are decoded by workers
# the tool's own keys, beside train.py's (named apart from them: a config file's keys set train.py's)
OWN = {"steps": 0, "minutes": 0.0, "simclr_temperature": 0.5, "simclr_proj_dim": 64, "simclr_lr": 1e-3}


# -----------------------------------------------------------------------------
# SimCLR: the loss and one training step (tools/probe_solvers.py trains with these too)

def nt_xent(a, b, T=0.5):
    """SimCLR's loss (Chen et al. 2020): each view's partner among the 2B - 1 other views, by cosine / T."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / T
    sim.fill_diagonal_(float("-inf"))
    B = len(a)
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(sim.device)
    return F.cross_entropy(sim, target)


def projection_head(z_dim, out_dim=64):
    """SimCLR's projection g(z): Linear, ReLU, Linear; the loss reads its output, the probes read z."""
    return torch.nn.Sequential(torch.nn.Linear(z_dim, z_dim), torch.nn.ReLU(), torch.nn.Linear(z_dim, out_dim))


class SimCLR:
    """SimCLR training of an encoder on uint8 images x (N, 3, H, W): encode(images in [-1, 1]) -> z
    (B, z_dim), whose weights are `params`. The projection head is built here, from the global RNG
    as it stands (the caller seeds it); batches and views are functions of (seed, step)."""

    def __init__(self, encode, params, x, z_dim, batch, seed=0, lr=1e-3, temperature=0.5, proj_dim=64,
                 crop_min=0.25, autocast=contextlib.nullcontext):
        self.encode, self.x, self.batch, self.seed = encode, x, batch, seed
        self.temperature, self.crop_min, self.autocast = temperature, crop_min, autocast
        self.head = projection_head(z_dim, proj_dim).to(x.device)
        self.opt = torch.optim.Adam(list(params) + list(self.head.parameters()), lr=lr)
        self.g = torch.Generator().manual_seed(seed)  # the batches' images, drawn with replacement

    def step(self, step):
        """One Adam step on a batch: two 'simclr' views of each image, z of each under autocast, the
        projection and NT-Xent in float32. -> the loss (detached)."""
        xb = self.x[torch.randint(len(self.x), (self.batch,), generator=self.g)]
        src, tgt = data.make_views(xb, "augment", "simclr", data.Rng(self.seed, step, self.batch, device=xb.device),
                                   crop_min=self.crop_min)
        with self.autocast():
            za, zb = self.encode(src), self.encode(tgt)
        loss = nt_xent(self.head(za.float()), self.head(zb.float()), self.temperature)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.detach()


# -----------------------------------------------------------------------------
# The tool: a train.py config -> a contrastive run -> OUT_DIR/ckpt.pt

def configure(argv):
    """[config.py ...] [--key=value ...] -> the config: train.py's defaults (read from its source),
    the tool's own keys, the files (their keys this tool lacks skipped) and the flags (strict);
    out_dir, unless a flag names it, is the config's + '_contrastive'."""
    cfg = configurator.configure(argv, {**train_defaults(), **OWN}, lenient_files=True)
    if not any(a.startswith("--out_dir=") for a in argv):
        cfg["out_dir"] = cfg["out_dir"].rstrip("/") + "_contrastive"
    return cfg


def check(cfg):
    """Every value the tool reads, before any work: one ConfigError."""
    check_keys(cfg, {"encoder": tuple(M.PRESETS["encoder"]), "unet": tuple(M.PRESETS["unet"]),
                     "dtype": ("bfloat16", "float32")},
               [(("batch_size", "max_iters", "log_interval", "z_dim", "simclr_proj_dim"), lambda v: v >= 1, ">= 1"),
                (("steps", "minutes", "threads"), lambda v: v >= 0, ">= 0"),
                (("simclr_temperature", "simclr_lr"), lambda v: v > 0, "> 0"),
                (("crop_min",), lambda v: 0 < v <= 1, "in (0, 1]"),
                (("image_size",), lambda v: v > 0 and v % 8 == 0, "a positive multiple of 8"), SEED_RANGE])
    if cfg["cpu_bf16"].lower() not in ("auto", "true", "false"):
        raise ConfigError(f"cpu_bf16={cfg['cpu_bf16']!r} is not allowed: choose from 'auto', 'true', 'false'")
    if cfg["dataset"] not in IN_MEMORY:
        raise ConfigError(f"dataset={cfg['dataset']!r}: the contrastive run reads a training split held in memory "
                          f"({', '.join(map(repr, IN_MEMORY))}), not image files decoded by workers")
    if cfg["dataset"] != "cifar10" and not cfg["data_dir"]:
        raise ConfigError(f"dataset={cfg['dataset']!r} needs data_dir (only cifar10 is searched for)")
    check_device(cfg["device"])
    try:  # the model's own checks, on the meta device: no memory, no time
        with torch.device("meta"):
            common.build_model(common.model_args(cfg))
    except (ValueError, AssertionError, TypeError) as e:
        raise ConfigError(f"the model cannot be built: {e}") from None
    out = cfg["out_dir"]
    check_out_dir("out_dir", out)
    runtime.check_lock(out)  # a live train.py there
    if os.path.exists(os.path.join(out, "ckpt.pt")) and not cfg["overwrite"]:
        raise ConfigError(f"out_dir={out!r} already holds ckpt.pt: pick another out_dir, or pass --overwrite=True")


def load_train_split(cfg):
    """The training split as train.py reads it (data_dir '' searched for; n_val images held out with
    the config's seed) -> uint8 images (N, 3, H, W)."""
    path, download = cfg["data_dir"], cfg["download"]
    if cfg["dataset"] == "cifar10":
        path, why, download = data.find_cifar10(path, download)
        print(f"data: using {path} ({why})")
    x, _ = data.load(cfg["dataset"], path, "train", cfg["image_size"], download, cfg["n_val"], cfg["seed"])
    return x


def main(argv):
    cfg = configure(argv)
    check(cfg)
    dev = runtime.pick_device(cfg["device"])
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    autocast, cpu_line = runtime.precision(dev, cfg["dtype"], cfg["cpu_bf16"])
    if not dev.startswith("cuda"):
        print(cpu_line)
    x = load_train_split(cfg).to(dev)
    args = common.model_args(cfg)
    torch.manual_seed(cfg["seed"])  # train.py's init of the same config: the UNet stays at it
    net = common.build_model(args).to(dev).train()
    B = cfg["batch_size"]
    run = SimCLR(lambda xb: net.encode_features(xb)[1], net.encoder.parameters(), x, cfg["z_dim"], B,
                 seed=cfg["seed"], lr=cfg["simclr_lr"], temperature=cfg["simclr_temperature"],
                 proj_dim=cfg["simclr_proj_dim"], crop_min=cfg["crop_min"], autocast=autocast)
    minutes = cfg["minutes"]
    max_steps = cfg["steps"] or (math.inf if minutes else cfg["max_iters"])
    budget = f"{minutes:g} minutes" + (f" or {max_steps} steps" if max_steps < math.inf else "") if minutes \
        else f"{max_steps} steps"
    print(f"contrastive: SimCLR on encoder {cfg['encoder']} (z_dim {cfg['z_dim']}), {len(x):,} train images, "
          f"batch {B}, budget {budget}")
    out = cfg["out_dir"]
    os.makedirs(out, exist_ok=True)
    log = open(os.path.join(out, "log.jsonl"), "w")  # a new run, a new log
    step, loss_sum, n_sum, last_loss, last_n = 0, 0.0, 0, float("nan"), 0
    t0 = time.perf_counter()
    while step < max_steps:
        loss_sum += run.step(step).item()
        n_sum += 1
        step += 1
        seconds = time.perf_counter() - t0
        done = step >= max_steps or (minutes > 0 and seconds >= 60 * minutes)
        if step % cfg["log_interval"] == 0 or done:
            last_loss, last_n = loss_sum / n_sum, n_sum  # the mean over the steps since the last log line
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"non-finite loss by step {step}; no checkpoint written")
            log.write(json.dumps({"step": step, "loss": last_loss, "seconds": round(seconds, 2),
                                  "img_s": round(step * B / seconds, 1)}) + "\n")
            log.flush()
            loss_sum, n_sum = 0.0, 0
        if done:
            break
    log.close()
    sd = net.state_dict()
    stats = {"steps": step, "minutes": seconds / 60, "img_s": step * B / seconds, "final_loss": last_loss,
             "images": step * B}
    path = os.path.join(out, "ckpt.pt")
    common.save_checkpoint({"model": sd, "ema": sd, "step": step, "config": cfg, "model_args": args,
                            "trained_by": "contrastive", "contrastive": stats}, path)
    print(f"contrastive: {step} steps in {stats['minutes']:.2f} minutes, {stats['img_s']:.1f} img/s "
          f"(images, two views each), final loss {last_loss:.4f} (mean of the last {last_n}); {path} "
          f"(python probe.py --ckpt={path})")
    return stats


if __name__ == "__main__":
    configurator.plain_warnings()
    try:
        main(sys.argv[1:])
    except (ConfigError, common.CheckpointError, data.DataError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
