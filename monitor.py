"""
What a training run measures and writes at its intervals (train.py): the evaluation (kNN of z on
held-out images, the z-gap, z-usage, a sample grid), the log lines and log.jsonl, curves.png; and
what a checkpoint holds besides tensors (the RNG states) and what a step costs (FLOPs, for MFU).
"""
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import diffsiam
import diffusion as D
import model as M
import multiview
import zusage
from common import save_columns
from solvers import extract_features, image_batches, knn_accuracy


def fixed_eval_batch(run):
    """64 fixed (source, target, u, eps, source rays, target rays) for the z-gap and the sample grid:
    held-out images, or one source view of an unseen object and another view of it."""
    if run.multiview:
        frng = data.Rng(run.seed, -1, 64, device=run.dev)
        xs, rs, xt, rt = multiview.multiview_batch(run.mv_val, 1, frng)
        return xs[:, 0], xt, frng.rand(), frng.randn(3, run.image_size, run.image_size), rs[:, 0], rt
    if run.x_val is not None:  # in memory, or a folder run's fixed validation images (rank 0)
        fx = run.x_val[:64].to(run.dev)
        frng = data.Rng(run.seed, -1, len(fx), device=run.dev)
        f_src, f_tgt = data.make_views(fx, run.views if run.views != "class" else "identical", run.aug, frng,
                                       crop_min=run.crop_min)
        return f_src, f_tgt, frng.rand(), frng.randn(3, run.image_size, run.image_size), None, None
    return None


# the evaluation's kNN compares held-out images with at most this many training images: a monitor that
# stays cheap on big in-memory sets (dSprites: 41k images at 64 px take 6 minutes at 1 thread); probe.py
# gives the real figure on the whole training set
KNN_REFERENCES = 10_000


# image folders (ImageNet, CelebA): the evaluation reads this many fixed random train and val images,
# decoded once when the run starts and held as uint8 on the CPU (at 128 px: 246 + 49 MB)
FOLDER_EVAL = (5_000, 1_000)


def folder_eval_sets(run):
    """A folder run's evaluation images: ((train x, y), (val x, y)), uint8 on the CPU, a fixed random
    FOLDER_EVAL choice of each split, decoded once by DataLoader workers (less the files that cannot be
    read: each said once, and counted in run.bad_files)."""
    sets, what = [], "not among the evaluation images; where training meets it, the next readable image stands in"
    for ds, n in ((run.train_set, FOLDER_EVAL[0]), (run.val_set, FOLDER_EVAL[1])):
        xs, ys = zip(*image_batches(data.subset(ds, n, run.seed), 256, run.num_workers, seen=run.bad_files, what=what))
        sets.append((torch.cat(xs), torch.cat(ys)))
    run.say(f"evaluation images: {len(sets[0][0]):,} train and {len(sets[1][0]):,} val, decoded once")
    return sets


@torch.no_grad()
def evaluate(run, it):
    """kNN of z on the held-out split, the z-gap (eps-MSE without z minus with z), z-usage
    (zusage.z_usage: x0-MSE with z vs z masked on the log-SNR grid, zusage.png), a sample grid."""
    out = {}
    if run.fixed is None:
        return out
    ema, autocast = run.ema, run.autocast
    if run.labelled and run.y_val.dim() == 1:  # kNN of z on held-out images (no labels: multi-view, a folder
        # without class subfolders; CelebA's are 40 attributes)
        ref = slice(0, KNN_REFERENCES)
        x_ref, y_ref = (run.x_train[ref], run.y_train[ref]) if run.in_memory else (run.x_knn, run.y_knn)
        with autocast():
            ftr = extract_features(ema, x_ref)[1]
            fva = extract_features(ema, run.x_val)[1]
        out["knn"] = knn_accuracy(ftr, y_ref.cpu(), fva, run.y_val)
    f_src, f_tgt, u, eps, r_src, r_tgt = run.fixed
    logsnr = run.schedule_fn(u)
    x_t = D.q_sample(f_tgt, logsnr, eps)
    with autocast():
        z = ema.encode(f_src, r_src)
    losses = []
    on = torch.ones(len(f_src), ema.n_sections, device=run.dev)
    # DiffSiam: "with z" is the segments training switches on at these noise levels (u)
    seg = {"segments_on": diffsiam.segments_switched_on(u, run.segments, run.segment_mode)} if run.segments else {}
    for z_on in (on, torch.zeros_like(on)):
        with autocast():
            eps_hat = ema.denoise(x_t, logsnr, z, z_on, r_tgt, **seg)
        losses.append(F.mse_loss(eps_hat.float(), eps).item())
    out["loss_z"], out["zgap"] = losses[0], losses[1] - losses[0]  # > 0: the decoder uses z
    with autocast():  # x0-MSE with z vs z masked on the log-SNR grid (zusage.z_usage)
        if run.multiview:  # the source view of an unseen object -> its target view
            zu = zusage.z_usage(ema, f_tgt, x_src=f_src, seed=run.seed, rays_src=r_src, rays_tgt=r_tgt)
        else:  # held-out images, z from the image itself
            zu = zusage.z_usage(ema, data.to_signed(run.x_val[:256].to(run.dev)), seed=run.seed)
    out["zusage"] = {k: zu[k] for k in ("logsnr", "mse_z", "mse_masked", "removed", "grey", "mean_colour")}
    out["z_removed_-3"], out["z_removed_mean"] = zu["removed_at_-3"], zu["removed_mean"]
    zusage.plot_z_usage(zu, os.path.join(run.out_dir, "zusage.png"), title=f"step {it}")
    n = 8
    g = torch.Generator(run.dev).manual_seed(run.seed)
    first = lambda t: None if t is None else t[:n]
    with autocast():
        rec = D.ddim(ema, ema.encode(f_src[:n], first(r_src)), f_tgt[:n].shape, steps=run.sample_steps,
                     schedule=run.sample_schedule, generator=g, rays_tgt=first(r_tgt))
    path = os.path.join(run.out_dir, f"samples_{it:06d}.png")
    save_columns([f_src[:n], f_tgt[:n], rec], ["source", "target", "sample"], path)
    out["grid"] = path
    return out


def evaluate_and_log(run, it):
    """Rank 0: evaluate, print one line, append it to log.jsonl (with the evaluation's seconds,
    eval_s), redraw curves.png."""
    if not run.master:
        return
    t = time.time()
    r = evaluate(run, it)
    if r:
        tqdm.write(f"step {it}{' (random init)' if it == 0 else ''}: {eval_line(r)}")
        sys.stdout.flush()
        write_log(run, {"step": it, **r, "eval_s": round(time.time() - t, 2)})
        plot_curves(run.out_dir)


def log_progress(run, bar, loss_sum, n, t0, lr):
    """Rank 0: the mean loss and img/s of the n steps since the last log line (at time t0), on the
    bar or as a plain line, and into log.jsonl (with MFU on a GPU)."""
    if not run.master:
        return
    ips = n * run.global_batch / (time.time() - t0)
    loss_avg = (loss_sum / n).item()
    rec = {"step": run.step, "loss": loss_avg, "lr": lr, "img_s": ips}
    if run.bad_count is not None:  # image files: how many could not be read so far (train.unreadable_count)
        rec["bad_files"] = run.bad_count
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


def eval_line(r):
    knn = f"kNN {r['knn']:.2f}% " if "knn" in r else ""
    return (f"{knn}z removes {r['z_removed_-3']:.1f}% of x0-MSE at log-SNR -3, {r['z_removed_mean']:.1f}% over -6..+2 "
            f"(z-gap {r['zgap']:+.4f}) grid {r['grid']}")


def plot_curves(out_dir):
    """out_dir/curves.png from what log.jsonl holds so far: loss, kNN and z-usage against the step."""
    plt = common.pyplot()
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


def count_flops(build, image_size):
    """Model FLOPs of one training image (forward + backward), for MFU: counted on a fresh copy of
    the model, build(), on the meta device (no memory, no arithmetic), so it issues no collective
    (z_bn's all-reduce is off in the copy) and touches no weight, statistic or RNG of the run."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        net = build().train()
        x = torch.empty(2, 3, image_size, image_size)
        rays = torch.empty(2, 6, image_size, image_size) if net.ray_freqs else None
    for m in net.modules():
        if isinstance(m, M.BatchStandardize):
            m.sync = False
    counter = FlopCounterMode(display=False)
    with counter, torch.random.fork_rng(devices=[]):
        net(x, torch.zeros(2, device="meta"), x, rays_src=rays, rays_tgt=rays).float().sum().backward()
    return counter.get_total_flops() / 2
