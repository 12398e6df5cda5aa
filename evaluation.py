"""
What the scripts share to load a trained SODA and to measure and show it: checkpoints (written
atomically, read with weights_only=True), features of a frozen encoder, kNN and logistic
regression on them, PSNR and SSIM, image grids and GIFs, the z-usage table and plot; and what a
training run measures and writes at its intervals (evaluate, log lines, curves.png, the RNG states
a checkpoint holds, FLOPs for MFU). train.py, probe.py, sample.py and nvs.py import it; it imports
no script.
"""
import hashlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import configurator
import data
import diffsiam
import diffusion as D
import model as M


# -----------------------------------------------------------------------------
# checkpoints

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
    if os.path.isdir(path):
        raise CheckpointError(f"{path!r} is a directory, not a checkpoint file (train.py writes OUT_DIR/ckpt.pt)")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path!r}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"could not read checkpoint {path!r} (corrupted or not a SODA checkpoint): "
                              f"{_load_failure(path, e)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("ema"), dict):
        held = f"a dict of {', '.join(map(repr, list(ckpt)[:6]))}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise CheckpointError(f"{path!r} is not a SODA checkpoint (no config/ema entries): train.py's hold a 'config' "
                              f"dict and 'ema' weights, this file holds {held}")
    return ckpt


def _load_failure(path, e):
    # torch.load's error -> a few words: its messages run to many lines of advice
    msg = str(e)
    if "WeightsUnpickler error:" in msg:
        detail = " ".join(msg.split("WeightsUnpickler error:", 1)[1].split())
        if detail.startswith("Unsupported global"):
            return f"it holds Python objects besides tensors ({detail.split(' was not')[0]}), which weights_only refuses"
        with open(path, "rb") as f:
            head = f.read(8)
        return f"not a torch.save file (it starts with {head!r})"
    lines = msg.strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


# what every train.py checkpoint's config holds, and the scripts read besides build_model's keys
CONFIG_KEYS = ("dataset", "data_dir", "image_size", "encoder", "unet", "z_dim", "cond", "ray_freqs")


def model_of(ckpt, path, which="ema"):
    """The model a loaded checkpoint's config describes, with its `which` weights (None: left at
    their init); a config or weights this code cannot build or load is one CheckpointError."""
    missing = [k for k in CONFIG_KEYS if k not in ckpt["config"]]
    if missing:
        raise CheckpointError(f"{path!r} is not a train.py checkpoint: its config has no {', '.join(missing)}")
    try:
        net = configurator.build_model(ckpt["config"])
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"{path!r}: its config does not describe a model this code builds "
                              f"({type(e).__name__}: {e})") from None
    if which:
        if not isinstance(ckpt.get(which), dict):
            raise CheckpointError(f"{path!r} holds no {which!r} weights")
        try:
            net.load_state_dict(ckpt[which])
        except (RuntimeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path!r}: its {which!r} weights do not fit the model its config describes "
                                  f"({' '.join(str(e).split())[:300]})") from None
    return net


def model_from_checkpoint(path, device="cpu", which="ema"):
    """-> (SODA in eval mode with the EMA (or 'model') weights, on `device`, its config with the
    checkpoint's training step as config['step']). path='random' is not handled here: scripts build
    a fresh model from a config for that."""
    # read and built on the CPU: only the network goes to the device, not the checkpoint's other
    # weights or AdamW's moments; the checkpoint's tensors are freed on return
    ckpt = load_checkpoint(path, "cpu")
    net = model_of(ckpt, path, which)
    return net.to(device).eval(), {**ckpt["config"], "step": ckpt.get("step")}


# -----------------------------------------------------------------------------
# features of a frozen encoder, and classifiers on them

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


def count_images(source):
    """The number of images of (images, labels) tensors or of a Dataset."""
    return len(source[0]) if isinstance(source, tuple) else len(source)


def image_batches(source, batch, num_workers=0, pin_memory=False):
    """(uint8 images (B, 3, H, W), labels) batches, in order: from (images, labels) tensors in memory,
    or from a Dataset of (uint8 image, label) decoded by DataLoader workers (pin_memory: into
    page-locked memory, from which a copy to a CUDA device is faster and can be asynchronous)."""
    if isinstance(source, tuple):
        x, y = source
        for i in range(0, len(x), batch):
            yield x[i:i + batch], y[i:i + batch]
        return
    try:
        yield from torch.utils.data.DataLoader(source, batch_size=batch, num_workers=num_workers,
                                               prefetch_factor=4 if num_workers else None, pin_memory=pin_memory)
    except data.DataError as e:
        raise data.from_worker(e) from None


@torch.no_grad()
def stream_features(fn, source, device, batch=256, num_workers=0, desc="features"):
    """fn (images in [-1, 1] on the device -> (B, D) features) over every image of `source` (see
    image_batches) -> (features fp16 (N, D), labels) on the CPU. Memory holds one batch of images
    and the fp16 features, however many images there are; a progress bar, then the img/s."""
    feats, labels, t0, n = [], [], time.time(), count_images(source)
    pin = torch.device(device).type == "cuda"  # pinned batches make the non_blocking copy below asynchronous
    with tqdm(total=n, desc=desc, unit="img", disable=n < 5000 or not sys.stderr.isatty(), leave=False) as bar:
        for xb, yb in image_batches(source, batch, num_workers, pin_memory=pin):
            feats.append(fn(xb.to(device, non_blocking=True).float() / 127.5 - 1).half().cpu())
            labels.append(torch.as_tensor(yb))
            bar.update(len(xb))
    dt = time.time() - t0
    print(f"{desc}: {n:,} images in {dt:.1f} s ({n / max(dt, 1e-9):,.0f} img/s)")
    return torch.cat(feats), torch.cat(labels)


def file_digest(path, n_hex=12):
    """The first n_hex hex digits of a file's SHA-256 (read 1 MB at a time): a cache key that
    changes whenever the checkpoint does."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n_hex]


def cached_features(path, key, compute):
    """compute() -> (features, labels), stored at `path` with `key` (a dict of str / int / float) and
    read back instead of computed when the file holds the same key. path '': no cache."""
    if path and os.path.isfile(path):
        try:
            got = torch.load(path, weights_only=True)
            if got.get("key") == key:
                print(f"features: read {path}")
                return got["features"], got["labels"]
        except Exception:
            pass  # unreadable or of another version: computed again and replaced
    f, y = compute()
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save_checkpoint({"key": key, "features": f, "labels": y}, path)
    return f, y


def knn_accuracy(train_f, train_y, test_f, test_y, k=20, T=0.07, n_classes=None, chunk=65536, top5=False):
    """Weighted kNN top-1 (%) on cosine similarity, votes weighted by exp(sim / T) (Wu et al. 2018).
    Streams: queries 1,000 at a time against `chunk` training features at a time (a running top k),
    so memory stays bounded for any number of training images. top5=True: (top-1, top-5). Runs on
    train_f's device (features of any float dtype: made float a chunk at a time)."""
    dev = train_f.device
    train_y, test_y = train_y.to(dev), test_y.to(dev)
    n_classes = n_classes or int(max(train_y.max(), test_y.max())) + 1
    k = min(k, len(train_f))
    correct1 = correct5 = 0
    for i in range(0, len(test_f), 1000):
        q = F.normalize(test_f[i:i + 1000].to(dev).float(), dim=1)
        sim = idx = None
        for j in range(0, len(train_f), chunk):
            ref = F.normalize(train_f[j:j + chunk].float(), dim=1)  # row by row: the same as normalising them all once
            s, ix = (q @ ref.T).topk(min(k, len(ref)), dim=1)
            if sim is None:
                sim, idx = s, ix + j
            else:  # the running top k over the chunks seen so far
                sim, pos = torch.cat([sim, s], 1).topk(k, dim=1)
                idx = torch.cat([idx, ix + j], 1).gather(1, pos)
        votes = torch.zeros(len(idx), n_classes, device=dev).scatter_add_(1, train_y[idx], (sim / T).exp())
        y = test_y[i:i + 1000]
        correct1 += (votes.argmax(1) == y).sum().item()
        if top5:
            correct5 += (votes.topk(min(5, n_classes), dim=1).indices == y[:, None]).any(1).sum().item()
    acc1 = 100.0 * correct1 / len(test_f)
    return (acc1, 100.0 * correct5 / len(test_f)) if top5 else acc1


def fit_logreg(x, y, n_classes, wd, iters=100, loss_fn=F.cross_entropy, mean=None, std=None, chunk=65536, init=None,
               dtype=torch.float32):
    """Multinomial logistic regression, full batch L-BFGS, L2 penalty wd on the weights: at most
    `iters` iterations, fewer when it has converged (torch's tolerances). loss_fn=
    F.binary_cross_entropy_with_logits with y (N, n_classes) in {0, 1}: one logistic regression per
    output. mean, std: x is standardised (x - mean) / std a chunk of rows at a time, so x may be any
    float type of any length (each L-BFGS step is one pass over it, on x's device). init: (W, b) to
    start from (a neighbouring weight decay's fit: the same optimum, reached in fewer steps).
    dtype=torch.float64: the weights and the loss in float64 (the products stay float32), so L-BFGS
    sees the loss's last digits: in float32 it stops where its changes drop below float32's
    resolution, short of the optimum of a weakly penalised fit. -> (W, b) in float32."""
    dev = x.device
    W = torch.zeros(x.shape[1], n_classes, device=dev, dtype=dtype) if init is None else init[0].to(dtype, copy=True)
    b = torch.zeros(n_classes, device=dev, dtype=dtype) if init is None else init[1].to(dtype, copy=True)
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, max_eval=iters * 5 // 4, history_size=20,
                            line_search_fn="strong_wolfe")
    prep = (lambda xc: xc.float()) if mean is None else (lambda xc: (xc.float() - mean) / std)
    logits = (lambda xc: xc @ W + b) if dtype == torch.float32 else (lambda xc: (xc @ W.float()).to(dtype) + b)

    def closure():
        opt.zero_grad()
        if len(x) <= chunk:  # one pass
            loss = loss_fn(logits(prep(x)), y) + wd * W.pow(2).sum()
            loss.backward()
            return loss
        total = wd * W.pow(2).sum()
        total.backward()
        total = total.detach()
        for i in range(0, len(x), chunk):  # the mean loss, a chunk's share at a time
            part = loss_fn(logits(prep(x[i:i + chunk])), y[i:i + chunk], reduction="sum") / y.numel()
            part.backward()
            total += part.detach()
        return total
    opt.step(closure)
    return W.detach().float(), b.detach().float()


def standardise_stats(f, chunk=65536):
    """Mean and std (float32, (D,)) of the rows of f (any float dtype), a chunk at a time."""
    n, s1, s2 = len(f), 0.0, 0.0
    for i in range(0, n, chunk):
        x = f[i:i + chunk].double()
        s1, s2 = s1 + x.sum(0), s2 + x.pow(2).sum(0)
    mean = s1 / n
    var = (s2 - n * mean.pow(2)) / max(n - 1, 1)
    return mean.float(), var.clamp(min=0).sqrt().float() + 1e-6


def top_eigenvalue(f, mean, std, n=10_000, iters=100, seed=0):
    """The largest eigenvalue of the covariance of the standardised rows of f (n of them, drawn with
    a fixed seed), by power iteration: it bounds the curvature of the logistic loss, so 1 / it is a
    step size that cannot diverge whatever the number of features."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(f), generator=g)[:n].to(f.device)
    x = (f[rows].float() - mean) / std
    cov = x.T @ x / len(x)
    v = torch.randn(len(cov), 1, generator=g).to(cov)
    for _ in range(iters):
        v = F.normalize(cov @ v, dim=0)
    return (v.T @ cov @ v).item()


def fit_linear(f, y, n_classes, settings, mean, std, batch=256, seed=0, lr_scale=3.0, curvature=None):
    """The objective of fit_logreg (mean cross-entropy + wd |W|^2 on the standardised features
    (f - mean) / std) minimised by mini-batch SGD with momentum 0.9, for feature sets of any size:
    f stays as it is (fp16 is fine), a batch is standardised at a time, on f's device. settings:
    (wd, epochs) pairs, trained side by side as one stacked weight (every pair sees the same
    batches; each has its own cosine decay over its epochs and stops there) -> [(W, b)] in order.
    The step is lr_scale / L, L = curvature / 2 + 2 wd bounding the loss's curvature (softmax
    cross-entropy's Hessian is at most half the features' covariance; heavy-ball momentum 0.9 is
    stable below 3.8 / L)."""
    dev, C = f.device, len(settings)
    lam = curvature if curvature is not None else top_eigenvalue(f, mean, std, seed=seed)
    wd = torch.tensor([w for w, _ in settings], device=dev)
    peak = lr_scale / (0.5 * lam + 2 * wd)  # (C,)
    W = torch.zeros(C, f.shape[1], n_classes, device=dev, requires_grad=True)
    b = torch.zeros(C, 1, n_classes, device=dev, requires_grad=True)
    vW, vb = torch.zeros_like(W), torch.zeros_like(b)  # momentum buffers
    g = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(f) / batch)
    steps = torch.tensor([ep * per_epoch for _, ep in settings], device=dev, dtype=torch.float64)
    for epoch in range(max(ep for _, ep in settings)):
        perm = torch.randperm(len(f), generator=g).to(dev)
        for i in range(0, len(f), batch):
            step = epoch * per_epoch + i // batch
            lr = (peak * 0.5 * (1 + torch.cos(math.pi * step / steps))).where(step < steps, 0.0).float()  # (C,)
            idx = perm[i:i + batch]
            logits = torch.einsum("bd,cdk->cbk", (f[idx].float() - mean) / std, W) + b  # (C, B, K)
            ce = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat(C), reduction="none").view(C, -1).mean(1)
            loss = ce.sum() + (wd * W.pow(2).sum((1, 2))).sum()  # the pairs' losses are independent
            gW, gb = torch.autograd.grad(loss, [W, b])
            with torch.no_grad():
                vW.mul_(0.9).add_(gW)
                vb.mul_(0.9).add_(gb)
                W.sub_(lr[:, None, None] * vW)
                b.sub_(lr[:, None, None] * vb)
    return [(W[c].detach(), b[c, 0].detach()) for c in range(C)]


def linear_logits(f, W, b, mean, std, chunk=65536):
    """Logits of standardised features, a chunk at a time (on the CPU)."""
    return torch.cat([((f[i:i + chunk].float() - mean) / std @ W + b).cpu() for i in range(0, len(f), chunk)])


# -----------------------------------------------------------------------------
# metrics: images in [0, 1], (B, C, H, W)

def psnr(x, y):
    """Peak signal-to-noise ratio in dB per image -> (B,); inf where x == y."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse)).float()


def gaussian_window(size=11, sigma=1.5):
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r**2 / (2 * sigma**2))
    return (g / g.sum())[:, None] * (g / g.sum())[None, :]  # (size, size), sums to 1


def ssim(x, y, size=11, sigma=1.5):
    """Structural similarity (Wang et al. 2004) per image -> (B,): Gaussian window 11 / sigma 1.5,
    C1 = 0.01^2, C2 = 0.03^2 (data range 1), at every position where the window fits, averaged
    over positions and channels."""
    C1, C2 = 0.01**2, 0.03**2
    x, y, ch = x.double(), y.double(), x.shape[1]
    win = gaussian_window(size, sigma).to(x.device)[None, None].repeat(ch, 1, 1, 1)  # (C, 1, k, k)
    blur = lambda t: F.conv2d(t, win, groups=ch)  # local means, channel by channel
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    s = (2 * mu_x * mu_y + C1) * (2 * cov + C2) / ((mu_x**2 + mu_y**2 + C1) * (var_x + var_y + C2))
    return s.flatten(1).mean(1).float()


# -----------------------------------------------------------------------------
# pictures

def to_unit(x):
    # [-1, 1] -> [0, 1] on the 8-bit levels a saved image has
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 255


def save_grid(path, images, row_labels, col_labels=()):
    """images (R, C, 3, H, W) in [-1, 1] -> a PNG with a label per row (and column)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torchvision
    R, Cn, _, H, W = images.shape
    grid = torchvision.utils.make_grid(to_unit(images.flatten(0, 1)).cpu(), nrow=Cn, padding=1, pad_value=1)
    fig, ax = plt.subplots(figsize=(2 + 0.7 * Cn, 0.4 + 0.7 * R))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_yticks([1 + i * (H + 1) + H / 2 for i in range(R)], row_labels, fontsize=8)
    ax.set_xticks([1 + j * (W + 1) + W / 2 for j in range(len(col_labels))], col_labels, fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def save_columns(columns, labels, path, min_px=96):
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


def save_gif(path, frames, ms=150, bounce=True):
    """frames (T, 3, H, W) in [-1, 1] -> a looping GIF (there and back if bounce), enlarged to >= 128 px."""
    from PIL import Image
    s = max(1, 128 // frames.shape[-1])
    u8 = (to_unit(frames) * 255).round().to(torch.uint8).repeat_interleave(s, -1).repeat_interleave(s, -2)
    imgs = [Image.fromarray(f.permute(1, 2, 0).cpu().numpy()) for f in u8]
    if bounce:
        imgs = imgs + imgs[-2:0:-1]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=ms, loop=0)
    return path


def z_usage_table(res):
    """The z-usage dict as a small text table (one column per log-SNR)."""
    row = lambda name, vals, fmt: f"{name:<16}" + "".join(f"{v:>8{fmt}}" for v in vals)
    return "\n".join([row("log-SNR", res["logsnr"], ".0f"), row("x0-MSE with z", res["mse_z"], ".3f"),
                      row("x0-MSE z masked", res["mse_masked"], ".3f"), row("removed by z %", res["removed"], ".1f"),
                      f"grey image {res['grey']:.3f}, per-image mean colour {res['mean_colour']:.3f}; "
                      f"z removes {res['removed_at_-3']:.1f}% at log-SNR -3, {res['removed_mean']:.1f}% on average over -6..+2"])


def plot_z_usage(res, path, title="z usage"):
    """Both x0-MSE curves against log-SNR, with the grey-image and mean-colour lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(res["logsnr"], res["mse_masked"], "o-", label="z masked (unconditional)")
    ax.plot(res["logsnr"], res["mse_z"], "o-", label="with z")
    ax.axhline(res["grey"], ls="--", c="grey", label="grey image")
    ax.axhline(res["mean_colour"], ls=":", c="k", label="each image's mean colour")
    for l, m, r in zip(res["logsnr"], res["mse_z"], res["removed"]):
        ax.annotate(f"{r:.0f}%", (l, m), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7)
    ax.set(xlabel="log-SNR (noisier to the left)", ylabel="x0-MSE", yscale="log",
           title=f"{title}: z removes {res['removed_at_-3']:.0f}% at -3, {res['removed_mean']:.0f}% over -6..+2")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------
# a training run's evaluation (train.py, at every eval_interval) and what it draws

def fixed_eval_batch(run):
    """64 fixed (source, target, u, eps, source rays, target rays) for the z-gap and the sample grid:
    held-out images, or one source view of an unseen object and another view of it."""
    if run.multiview:
        frng = data.Rng(run.seed, -1, 64, device=run.dev)
        xs, rs, xt, rt = data.multiview_batch(run.mv_val, 1, frng)
        return xs[:, 0], xt, frng.rand(), frng.randn(3, run.image_size, run.image_size), rs[:, 0], rt
    if run.x_val is not None:  # in memory, or a folder run's fixed validation images (rank 0)
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
# image folders (ImageNet, CelebA): the evaluation reads this many fixed random train and val images,
# decoded once when the run starts and held as uint8 on the CPU (at 128 px: 246 + 49 MB)
FOLDER_EVAL = (5_000, 1_000)


def folder_eval_sets(run):
    """A folder run's evaluation images: ((train x, y), (val x, y)), uint8 on the CPU, a fixed random
    FOLDER_EVAL choice of each split, decoded once by DataLoader workers."""
    sets = []
    for ds, n in ((run.train_set, FOLDER_EVAL[0]), (run.val_set, FOLDER_EVAL[1])):
        xs, ys = zip(*image_batches(data.subset(ds, n, run.seed), 256, run.num_workers))
        sets.append((torch.cat(xs), torch.cat(ys)))
    run.say(f"evaluation images: {len(sets[0][0]):,} train and {len(sets[1][0]):,} val, decoded once")
    return sets


@torch.no_grad()
def evaluate(run, it):
    """kNN of z on the held-out split, the z-gap (eps-MSE without z minus with z), z-usage
    (diffusion.z_usage: x0-MSE with z vs z masked on the log-SNR grid, zusage.png), a sample grid."""
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
    seg = {"seg_keep": diffsiam.segment_keep(u, run.segments, run.segment_mode)} if run.segments else {}
    for keep in (on, torch.zeros_like(on)):
        with autocast():
            eps_hat = ema.denoise(x_t, logsnr, z, keep, r_tgt, **seg)
        losses.append(F.mse_loss(eps_hat.float(), eps).item())
    out["loss_z"], out["zgap"] = losses[0], losses[1] - losses[0]  # > 0: the decoder uses z
    with autocast():  # x0-MSE with z vs z masked on the log-SNR grid (diffusion.z_usage)
        if run.multiview:  # the source view of an unseen object -> its target view
            zu = D.z_usage(ema, f_tgt, x_src=f_src, seed=run.seed, rays_src=r_src, rays_tgt=r_tgt)
        else:  # held-out images, z from the image itself
            zu = D.z_usage(ema, run.x_val[:256].to(run.dev).float() / 127.5 - 1, seed=run.seed)
    out["zusage"] = {k: zu[k] for k in ("logsnr", "mse_z", "mse_masked", "removed", "grey", "mean_colour")}
    out["z_removed_-3"], out["z_removed_mean"] = zu["removed_at_-3"], zu["removed_mean"]
    plot_z_usage(zu, os.path.join(run.out_dir, "zusage.png"), title=f"step {it}")
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



# -----------------------------------------------------------------------------
# what a checkpoint holds besides tensors, and what a step costs

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
