"""
Measure the representation of a trained SODA encoder (paper §4.1): a linear probe or a kNN
classifier on frozen EMA-encoder features.

    python probe.py --ckpt=out/cifar10_cpu/ckpt.pt                      # linear, pooled features
    python probe.py --ckpt=out/cifar10_cpu/ckpt.pt --features=z --task=knn
    python probe.py --ckpt=out/cifar10_cpu/ckpt.pt --random=True        # same encoder, random init

Features are extracted once (no grad, batched) and standardised with training-set statistics.
The linear probe is a multinomial logistic regression fitted by L-BFGS; its weight decay is chosen
on a validation split of the training set, then it is refitted on the whole training set and
measured once on the test split. The last line printed is a machine-readable summary, and the
same figures go to a JSON file beside the checkpoint.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

import data
from train import (CheckpointError, ConfigError, build_model, configure, extract_features, knn_accuracy,
                   load_checkpoint)

# -----------------------------------------------------------------------------
ckpt = "out/cifar10_cpu/ckpt.pt"  # a train.py checkpoint
random = False  # True: the same encoder config at random init (the baseline for every figure)
task = "linear"  # 'linear' | 'knn'
features = "pool"  # 'pool' (encoder features before the bottleneck) | 'z' (the bottleneck latent)
dataset = ""  # default: the checkpoint's
data_dir = ""  # default: the checkpoint's
probe_aug = 0  # linear: number of crop+flip copies of the probe's training set (0 = none)
val_frac = 0.1  # linear: fraction of the training set used to choose the weight decay
device = "auto"
seed = 0
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}


def fit_logreg(x, y, n_classes, wd, iters=100):
    """Multinomial logistic regression, full batch L-BFGS, L2 penalty wd on the weights."""
    W = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ W + b, y) + wd * W.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return W.detach(), b.detach()


def topk(logits, y, k):
    return 100.0 * (logits.topk(min(k, logits.shape[1]), dim=1).indices == y[:, None]).any(1).float().mean().item()


def linear_probe(ftr, ytr, fte, yte, n_classes, wds=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2), val_frac=0.1, seed=0,
                 n_orig=None):
    """-> dict(top1, top5, wd). ftr may hold augmented copies after the first n_orig rows; the
    validation rows are taken from the originals and their copies are left out of the fit."""
    n_orig = n_orig or len(ftr)
    mean, std = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mean) / std, (fte - mean) / std
    perm = torch.randperm(n_orig, generator=torch.Generator().manual_seed(seed))
    val = perm[: int(val_frac * n_orig)]
    is_val = torch.zeros(len(ftr), dtype=torch.bool)
    for c in range(len(ftr) // n_orig):  # an image in the validation split, with all its copies
        is_val[val + c * n_orig] = True
    scores = {}
    for wd in wds:
        W, b = fit_logreg(ftr[~is_val], ytr[~is_val], n_classes, wd)
        scores[wd] = topk(ftr[val] @ W + b, ytr[val], 1)
    best = max(wds, key=lambda wd: (scores[wd], wd))
    W, b = fit_logreg(ftr, ytr, n_classes, best)
    logits = fte @ W + b
    return {"top1": topk(logits, yte, 1), "top5": topk(logits, yte, 5), "wd": best,
            "val_top1": scores[best]}


def main(argv):
    cfg = configure(argv, DEFAULTS)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if cfg["device"] == "auto" else cfg["device"]
    ck = load_checkpoint(cfg["ckpt"], dev)
    tcfg = ck["config"]
    net = build_model(tcfg)
    if cfg["random"]:
        torch.manual_seed(cfg["seed"])
        net = build_model(tcfg)
    else:
        net.load_state_dict(ck["ema"])
    net = net.to(dev).eval()
    ds, dd = cfg["dataset"] or tcfg["dataset"], cfg["data_dir"] or tcfg["data_dir"]
    if ds != "cifar10":
        raise data.DataError(f"probe.py reads cifar10 so far, got dataset {ds!r}")
    # the probe trains on the whole training split (train + the held-out val of train.py) and tests on test
    xtr, ytr, classes = data.load_cifar10(dd, "train", n_val=0)
    xte, yte, _ = data.load_cifar10(dd, "test")
    which = 0 if cfg["features"] == "pool" else 1
    if cfg["features"] not in ("pool", "z"):
        raise ConfigError(f"features must be 'pool' or 'z', got {cfg['features']!r}")
    ftr = extract_features(net, xtr)[which]
    fte = extract_features(net, xte)[which]
    name = f"{cfg['task']} {cfg['features']}{' random-init' if cfg['random'] else ''}"
    if cfg["task"] == "knn":
        res = {"top1": knn_accuracy(ftr, ytr, fte, yte)}
        summary = f"knn top1 {res['top1']:.2f}"
    elif cfg["task"] == "linear":
        copies = [ftr]
        for c in range(cfg["probe_aug"]):  # crop+flip copies of the training images (paper Table 1)
            rng = data.Rng(cfg["seed"], c, len(xtr))
            xa = (data.augment(xtr, "cropflip", rng) * 255).round().to(torch.uint8)
            copies.append(extract_features(net, xa)[which])
        res = linear_probe(torch.cat(copies), ytr.repeat(len(copies)), fte, yte, len(classes),
                           val_frac=cfg["val_frac"], seed=cfg["seed"], n_orig=len(ftr))
        summary = f"linear top1 {res['top1']:.2f} top5 {res['top5']:.2f}"
    else:
        raise ConfigError(f"task must be 'linear' or 'knn', got {cfg['task']!r}")
    res.update(task=cfg["task"], features=cfg["features"], random_init=cfg["random"], ckpt=cfg["ckpt"],
               step=ck["step"], n_train=len(xtr), n_test=len(xte))
    out = os.path.join(os.path.dirname(cfg["ckpt"]) or ".",
                       f"probe_{cfg['task']}_{cfg['features']}{'_random' if cfg['random'] else ''}.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{name}: {json.dumps(res)}")
    print(summary)
    return res


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, CheckpointError, data.DataError) as e:
        sys.exit(f"error: {e}")
