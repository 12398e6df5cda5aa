"""
What probe.py measures with: the features of a frozen encoder (streamed over any number of images,
cached on disk) and the classifiers fitted on them: weighted kNN, logistic regression by full-batch
L-BFGS or by mini-batch SGD, and the linear probe made of them (linear_probe: its weight decay chosen
on a validation part, then refitted and measured once). train.py's evaluation reads its kNN too, and
tools/probe_solvers.py checks the linear probe's solver.
"""
import hashlib
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import multiview
from common import save_checkpoint


@torch.no_grad()
def extract_features(net, x, batch=500, cams=None):
    """uint8 images (N, 3, H, W) -> (pooled (N, F), z (N, z_dim)), float32 on the CPU, from a SODA
    model's encode_features (or a bare model.Encoder's forward_features, which reads no rays). cams:
    each image's (K (N, 3, 3), c2w (N, 4, 4)), for an encoder that reads camera rays."""
    dev = next(net.parameters()).device
    encode = net.encode_features if hasattr(net, "encode_features") else lambda xb, rays: net.forward_features(xb)
    pooled, zs = [], []
    for i in range(0, len(x), batch):
        xb = data.to_signed(x[i:i + batch].to(dev))
        rays = None if cams is None else multiview.camera_rays(cams[0][i:i + batch].to(dev),
                                                          cams[1][i:i + batch].to(dev), *xb.shape[-2:])
        p, z = encode(xb, rays)
        pooled.append(p.float().cpu())
        zs.append(z.float().cpu())
    return torch.cat(pooled), torch.cat(zs)


def count_images(source):
    """The number of images of (images, labels) tensors or of a Dataset."""
    return len(source[0]) if isinstance(source, tuple) else len(source)


def image_batches(source, batch, num_workers=0, pin_memory=False, seen=None, what="skipped"):
    """(uint8 images (B, 3, H, W), labels) batches, in order: from (images, labels) tensors in memory,
    or from a Dataset of (uint8 image, label, unreadable file's message) decoded by DataLoader workers
    (pin_memory: into page-locked memory, from which a copy to a CUDA device is faster and can be
    asynchronous), less the images whose files could not be read, each named once in a warning that
    ends with `what` (data.warn_unreadable; seen: the messages said before, updated)."""
    if isinstance(source, tuple):
        x, y = source
        for i in range(0, len(x), batch):
            yield x[i:i + batch], y[i:i + batch]
        return
    seen = set() if seen is None else seen
    try:
        for xb, yb, bad in torch.utils.data.DataLoader(source, batch_size=batch, num_workers=num_workers,
                                                       prefetch_factor=4 if num_workers else None,
                                                       pin_memory=pin_memory):
            data.warn_unreadable(bad, seen, what)
            read = [k for k, msg in enumerate(bad) if not msg]
            if len(read) < len(bad):  # the next readable file stands in for each: dropped, not counted twice
                xb, yb = xb[read], yb[read]
            if read:
                yield xb, yb
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
            feats.append(fn(data.to_signed(xb.to(device, non_blocking=True))).half().cpu())
            labels.append(torch.as_tensor(yb))
            bar.update(len(xb))
    dt, n = time.time() - t0, sum(map(len, feats))  # n: the images read (image_batches skips unreadable files)
    if not n:
        raise data.DataError(f"{desc}: not one of the {count_images(source):,} images could be read")
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
    prep = (lambda xc: xc.float()) if mean is None else (lambda xc: standardise(xc, mean, std))
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


def standardise_stats(f, chunk=65536, float64=True):
    """Mean and std (float32, (D,)) of the rows of f, the std + 1e-6 (a constant feature divides by
    1e-6, not 0), by which features are standardised (standardise). float64=True: f of any float
    dtype and length, summed in float64 a chunk at a time (the linear and few-shot probes). False:
    torch's float32 mean and std of f at once, f float32 and in memory (the multi-label and DCI
    probes, sample.py's probe direction: the arithmetic their figures were measured with; the two
    differ in the last bits of float32)."""
    if not float64:
        return f.mean(0), f.std(0) + 1e-6
    n, s1, s2 = len(f), 0.0, 0.0
    for i in range(0, n, chunk):
        x = f[i:i + chunk].double()
        s1, s2 = s1 + x.sum(0), s2 + x.pow(2).sum(0)
    mean = s1 / n
    var = (s2 - n * mean.pow(2)) / max(n - 1, 1)
    return mean.float(), var.clamp(min=0).sqrt().float() + 1e-6


def standardise(f, mean, std):
    """(f - mean) / std in float32 (f of any float dtype), with standardise_stats' mean and std."""
    return (f.float() - mean) / std


def top_eigenvalue(f, mean, std, n=10_000, iters=100, seed=0):
    """The largest eigenvalue of the covariance of the standardised rows of f (n of them, drawn with
    a fixed seed), by power iteration: it bounds the curvature of the logistic loss, so 1 / it is a
    step size that cannot diverge whatever the number of features."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(f), generator=g)[:n].to(f.device)
    x = standardise(f[rows], mean, std)
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
            logits = torch.einsum("bd,cdk->cbk", standardise(f[idx], mean, std), W) + b  # (C, B, K)
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
    return torch.cat([(standardise(f[i:i + chunk], mean, std) @ W + b).cpu() for i in range(0, len(f), chunk)])


# -----------------------------------------------------------------------------
# The linear probe (probe.py --task=linear; tools/probe_solvers.py checks its solver)

WDS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # the weight decays of probe.py's multilabel probe
# the linear probe's: 1e-2, the top of WDS, was chosen on some features, so 1e-1 is in. Below 1e-6 the fit is
# flat along many directions (a float32 fit stops short of it) and barely differs from no penalty at all: on
# the CIFAR-10 z here held-out top-1 at wd 1e-6 ... 0 stays within 0.8
LINEAR_WDS = WDS + (1e-1,)
# L-BFGS iterations at most: it stops where torch's tolerances say it has converged. From scratch (float64
# loss) wd=1e-5 takes ~1,000 iterations and 1e-6 ~2,200 (a cap of 100 leaves fits several points short);
# each decay here starts from the next larger one's fit, which takes fewer
LBFGS_ITERS = 5000
EPOCHS = (30, 100)  # solver='sgd': the epoch counts tried (probe.py's lin_epochs)


def topk(logits, y, k):
    """Top-k accuracy in % of logits (N, C) against labels y (N,)."""
    return 100.0 * (logits.topk(min(k, logits.shape[1]), dim=1).indices == y[:, None]).any(1).float().mean().item()


def linear_probe(ftr, ytr, fte, yte, n_classes, wds=LINEAR_WDS, epochs=EPOCHS, val_frac=0.1, seed=0, n_orig=None,
                 solver="lbfgs", batch=0, device="cpu", lbfgs_iters=LBFGS_ITERS):
    """-> dict(top1, top5, wd, epochs, val_top1). A multinomial logistic regression on standardised
    features: its weight decay (and, solver='sgd', its epochs) chosen on a held-out val_frac of the
    training rows, then refitted on all of them and measured once on the test rows. solver='lbfgs':
    full batch, to convergence (solvers.fit_logreg: one pass over the features per step, a chunk
    at a time, on `device`); 'sgd': mini-batch (solvers.fit_linear: a fixed number of epochs, so
    on badly conditioned features it stops short of the optimum, docs/probe.md). ftr may hold
    augmented copies after the first n_orig rows; the validation rows are taken from the originals
    and their copies are left out of the fit."""
    n_orig = n_orig or len(ftr)
    ftr, ytr = ftr.to(device), ytr.to(device)
    mean, std = standardise_stats(ftr)
    perm = torch.randperm(n_orig, generator=torch.Generator().manual_seed(seed))
    val = perm[: int(val_frac * n_orig)].to(device)
    is_val = torch.zeros(len(ftr), dtype=torch.bool, device=device)
    for c in range(len(ftr) // n_orig):  # an image in the validation split, with all its copies
        is_val[val + c * n_orig] = True
    if solver == "lbfgs":  # full batch on `device`, the features standardised a chunk at a time
        def fits(rows, settings, init=None):  # from the largest decay down, each fit starting from the last
            x, y, heads = ftr[rows], ytr[rows], {}
            for wd, _ in sorted(settings, reverse=True):
                init = heads[wd, 0] = fit_logreg(x, y, n_classes, wd, lbfgs_iters, mean=mean, std=std, init=init,
                                                 dtype=torch.float64)
            return [heads[s] for s in settings]
        epochs = (0,)
    else:  # every (weight decay, epochs) pair side by side, in one pass over the data
        batch = batch or max(256, len(ftr) // 200)  # at least 200 steps an epoch on big sets
        lam = top_eigenvalue(ftr, mean, std, seed=seed)
        fits = lambda rows, settings: fit_linear(ftr[rows], ytr[rows], n_classes, settings, mean, std, batch, seed,
                                                 curvature=lam)
    logits = lambda f, W, b: linear_logits(f.to(device), W, b, mean, std)
    grid = [(wd, ep) for wd in wds for ep in epochs]
    heads = fits((~is_val).nonzero().squeeze(1), grid)
    scores = {k: topk(logits(ftr[val], W, b), ytr[val].cpu(), 1) for k, (W, b) in zip(grid, heads)}
    best_wd, best_ep = max(scores, key=lambda k: (scores[k], k[0], -k[1]))  # ties: more decay, fewer epochs
    W, b = fits(torch.arange(len(ftr), device=device), [(best_wd, best_ep)],
                *([heads[grid.index((best_wd, best_ep))]] if solver == "lbfgs" else []))[0]
    out = logits(fte, W, b)
    res = {"top1": topk(out, yte, 1), "top5": topk(out, yte, 5), "wd": best_wd, "val_top1": scores[best_wd, best_ep],
           "solver": solver}
    if solver == "sgd":
        res.update(epochs=best_ep, batch=batch)
    return res
