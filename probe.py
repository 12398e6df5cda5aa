"""
Measure the representation of a trained SODA encoder (paper §4.1, §4.3.2, thesis §4.1.2) on frozen
EMA-encoder features: a linear probe or kNN classifier, a multi-label probe of CelebA's 40
attributes, 5-way few-shot episodes, or DCI disentanglement on dSprites or Cars3D.

    python probe.py --ckpt=out/cifar10_cpu/ckpt.pt                      # linear probe on z (the paper's)
    python probe.py --ckpt=out/cifar10_cpu/ckpt.pt --task=knn           # reads the features cached above
    python probe.py --ckpt=out/cifar10_cpu/ckpt.pt --random=True        # same encoder, random init
    python probe.py --ckpt=out/cifar10_cpu/ckpt.pt --features=pool      # the pooled features before the bottleneck
    python probe.py --ckpt=out/imagenet/ckpt.pt                         # DATA_DIR/train -> DATA_DIR/val, streamed
    python probe.py --ckpt=out/photos/ckpt.pt --task=zusage             # a folder without class subfolders
    python probe.py --ckpt=out/cifar10_cpu/ckpt.pt --task=fewshot --episodes=2000
    python probe.py --ckpt=out/celeba/ckpt.pt --task=multilabel         # DATA_DIR/celeba/...
    python probe.py --ckpt=out/dsprites_cpu/ckpt.pt --task=dci
    python probe.py --ckpt=out/dsprites_cpu/ckpt.pt --task=dci --dci_model=gbt   # the paper's Table 4 recipe
    python probe.py --ckpt=out/cars3d_cpu/ckpt.pt --task=dci            # elevation, azimuth, object
    python probe.py --ckpt=out/cifar10_cpu/ckpt.pt --task=zusage         # x0-MSE with z vs z masked

The dataset is the checkpoint's (another only when --dataset= asks). Features are streamed: image
files are decoded by DataLoader workers a batch at a time, encoded without gradients, kept as fp16
and cached beside the checkpoint (keyed by checkpoint, data, split and features), so the next probe
of the same checkpoint reads them. The linear probe (solvers.linear_probe) is a multinomial logistic
regression on standardised features, fitted by full-batch L-BFGS to convergence (--solver=sgd:
mini-batch): its weight decay is chosen on a held-out part of the training split, then it is
refitted on the whole training split and measured once on the test split (top-1, top-5). The
last line printed is a machine-readable summary, and the same figures go to a JSON file beside the
checkpoint (DCI also saves its importance heat map).
"""
import hashlib
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import common
import configurator
import data
import diffusion as D
import multiview
import runtime
import zusage
from common import CheckpointError, load_checkpoint, model_of
from configurator import SEED_RANGE, ConfigError, check_device, check_keys, check_writable, configure, parse_list
from solvers import (EPOCHS, LINEAR_WDS, WDS, cached_features, count_images, extract_features, file_digest, fit_logreg,
                     image_batches, knn_accuracy, linear_probe, standardise, standardise_stats, stream_features, topk)
from zusage import plot_z_usage, z_usage_table

# -----------------------------------------------------------------------------
ckpt = "out/cifar10_cpu/ckpt.pt"  # a train.py checkpoint
random = False  # True: the same encoder config at random init (the baseline for every figure)
task = "linear"  # 'linear' | 'knn' | 'fewshot' | 'zusage' (cifar10) | 'multilabel' (celeba) | 'dci' (dsprites, cars3d)
features = "z"  # 'z' (the bottleneck latent: the paper's probe, §4.1) | 'pool' (the encoder's features before the
# bottleneck) | 'unet' (the denoiser's pooled middle block on a lightly noised image, z masked: the paper's
# unconditional-diffusion baseline, footnote 2)
unet_logsnr = 4.0  # features='unet': the noise level of the image the denoiser sees (4: abar = 0.98)
dataset = ""  # '': the checkpoint's, if the task reads it (cifar10, folder, celeba, dsprites, cars3d); else refused
data_dir = ""  # default: the checkpoint's, when it was trained on that dataset
split = "test"  # 'test' (train on train, measure on test; a folder: its val/ or held-out part, the final figure)
# | 'val' (cifar10: train on train.py's training split, measure on its n_val held-out images: choosing recipes
# without the test split)
probe_aug = 0  # linear: number of crop+flip copies of the probe's training set (0 = none)
val_frac = 0.1  # linear: fraction of the training set held out to choose the weight decay and epochs
solver = "lbfgs"  # linear: 'lbfgs' (full batch, to convergence) | 'sgd' (mini-batch, epochs chosen from lin_epochs)
lin_epochs = ",".join(map(str, EPOCHS))  # linear, solver='sgd': the epoch counts tried (chosen on the held-out rows)
lin_batch = 0  # linear, solver='sgd': mini-batch size (0: max(256, images / 200))
episodes = 2000  # fewshot: episodes per shot count (thesis §4.1.2: 2000)
batch = 256  # images per encoder call when extracting features
num_workers = 4  # DataLoader workers decoding image files (image folders, CelebA)
cache = True  # keep extracted features (fp16) in <checkpoint dir>/features/, keyed by checkpoint, data, split and
# features, so the next probe of the same checkpoint reads them instead of extracting again
n_images = 0  # linear, knn on image folders; multilabel, dci: at most this many images of each split (0 = all;
# dci_model='gbt': 10,000 train / 5,000 test, disentanglement_lib's numbers); zusage: (0 = 256)
dci_model = "logreg"  # dci: 'logreg' (fast: |weights| of a logistic regression per factor) | 'gbt' (the paper's
# Table 4 and disentanglement_lib's recipe: gradient-boosted trees' feature importances; needs scikit-learn)
out = ""  # the result JSON (its PNGs go beside it); '': beside the checkpoint, named by task and features
device = "auto"
seed = 0
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
FOLDERS = ("folder", "imagenet")  # any folder of images ('imagenet': another name of it)
TASK_DATA = {"linear": ("cifar10",) + FOLDERS, "knn": ("cifar10",) + FOLDERS, "fewshot": ("cifar10",) + FOLDERS,
             "zusage": ("cifar10",) + FOLDERS + ("celeba",), "multilabel": ("celeba",), "dci": ("dsprites", "cars3d")}
ENCODER_OUTPUT = {"pool": 0, "z": 1}  # features -> its place in net.encode_features' (pooled, z)
CELEBA_SPLITS = ("train", "val", "test")  # multilabel: the decay is chosen on val, then refitted on train + val


def unet_features(net, logsnr=4.0, seed=0):
    """-> a function of images in [-1, 1] (B, 3, H, W) -> (B, C): the UNet's middle block,
    average-pooled, over the image noised to `logsnr` with noise from one generator (fixed by seed),
    with z masked (the decoder alone: the paper's "unconditional diffusion" features, footnote 2: a
    middle denoiser layer over a lightly-noised image)."""
    dev = next(net.parameters()).device
    g = torch.Generator(dev).manual_seed(seed)

    @torch.no_grad()
    def fn(xb):
        acts = []
        hook = net.unet.mid[-1].register_forward_hook(lambda mod, inp, h: acts.append(h.mean(dim=(2, 3)).float()))
        try:
            ls = torch.full((len(xb),), float(logsnr), device=dev)
            x_t = D.q_sample(xb, ls, torch.randn(xb.shape, generator=g, device=dev))
            net.denoise(x_t, ls, torch.zeros(len(xb), sum(net.unet.sec_dims), device=dev),
                        z_on=torch.zeros(len(xb), net.n_sections, device=dev))
        finally:
            hook.remove()
        return acts[0]
    return fn


# -----------------------------------------------------------------------------
# Multi-label attributes (paper §4.1: CelebA, mean F1 over its 40 attributes)

def f1_per_attribute(pred, target):
    """{0, 1} predictions and targets (N, A) -> F1 = 2TP / (2TP + FP + FN) per attribute (A,);
    0 where an attribute has neither positives nor positive predictions (as scikit-learn)."""
    pred, target = pred.bool(), target.bool()
    tp = (pred & target).sum(0).float()
    wrong = (pred ^ target).sum(0).float()  # FP + FN
    return 2 * tp / (2 * tp + wrong).clamp(min=1)


def mean_f1(pred, target):
    return f1_per_attribute(pred, target).mean().item()


def multilabel_probe(ftr, ytr, fva, yva, fte, yte, wds=WDS):
    """One linear layer, a logistic regression per attribute (BCE); the weight decay with the best
    mean F1 on the validation split is refitted on train + val and measured on test. -> F1 in %."""
    mean, std = standardise_stats(ftr, float64=False)
    ftr, fva, fte = (standardise(f, mean, std) for f in (ftr, fva, fte))
    fit = lambda x, y, wd: fit_logreg(x, y.float(), y.shape[1], wd, loss_fn=F.binary_cross_entropy_with_logits)
    scores = {}
    for wd in wds:
        W, b = fit(ftr, ytr, wd)
        scores[wd] = 100 * mean_f1(fva @ W + b > 0, yva)
    best = max(wds, key=lambda wd: (scores[wd], wd))
    W, b = fit(torch.cat([ftr, fva]), torch.cat([ytr, yva]), best)
    per_attr = 100 * f1_per_attribute(fte @ W + b > 0, yte)
    return {"f1": per_attr.mean().item(), "wd": best, "val_f1": scores[best], "f1_per_attribute": per_attr.tolist()}


# -----------------------------------------------------------------------------
# Few-shot episodes (thesis §4.1.2: 5-way 1/5/10-shot, 15 queries per class, 2000 episodes from the
# test split, a linear head trained 100 epochs by SGD, lr 0.01, weight decay 0.001, batch 4)

def sample_episodes(y, n_episodes, ways=5, shots=1, queries=15, seed=0):
    """-> support (E, ways * shots) and query (E, ways * queries) indices into y, class-major: in
    every episode, column c of the support holds class c // shots of its `ways` classes (query:
    c // queries). Each episode draws `ways` distinct classes, then shots + queries distinct images
    of each, so no support image is ever a query. Classes with too few images are never drawn."""
    g = torch.Generator().manual_seed(seed)
    classes, counts = y.unique(return_counts=True)
    classes = classes[counts >= shots + queries]
    if len(classes) < ways:
        raise data.DataError(f"{ways}-way {shots}-shot needs {ways} classes with >= {shots + queries} "
                             f"images; found {len(classes)}")
    members = [(y == c).nonzero().squeeze(1) for c in classes]
    width = max(len(m) for m in members)
    table = torch.stack([F.pad(m, (0, width - len(m)), value=-1) for m in members])  # (C, width), -1 = none
    cls = torch.rand(n_episodes, len(classes), generator=g).argsort(1)[:, :ways]  # (E, ways)
    cand = table[cls]  # (E, ways, width)
    keys = torch.rand(cand.shape, generator=g).masked_fill(cand < 0, 2.0)  # padding sorts last
    pick = cand.gather(2, keys.argsort(2)[:, :, :shots + queries])  # (E, ways, shots + queries), distinct
    return pick[:, :, :shots].flatten(1), pick[:, :, shots:].flatten(1)


def train_heads(fs, ys, n_classes, epochs=100, lr=0.01, wd=0.001, batch=4, seed=0):
    """A linear head per episode on support features fs (E, S, D) with labels ys (E, S), all E heads
    at once as one (E, D, n_classes) weight tensor; every episode reshuffles its support each epoch."""
    E, S, dim = fs.shape
    W = torch.zeros(E, dim, n_classes, requires_grad=True)
    b = torch.zeros(E, 1, n_classes, requires_grad=True)
    opt = torch.optim.SGD([W, b], lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(E)[:, None]
    for _ in range(epochs):
        order = torch.rand(E, S, generator=g).argsort(1)
        xs, ts = fs[rows, order], ys[rows, order]  # (E, S, D), (E, S): this epoch's order
        for i in range(0, S, batch):
            logits = xs[:, i:i + batch] @ W + b  # (E, B, n_classes)
            # a sum over episodes of each one's mean loss, so every head gets its own SGD step
            loss = F.cross_entropy(logits.flatten(0, 1), ts[:, i:i + batch].flatten(), reduction="sum")
            loss = loss / logits.shape[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
    return W.detach(), b.detach()


def fewshot_probe(f, y, n_episodes=2000, shots=(1, 5, 10), ways=5, queries=15, seed=0, chunk=1000):
    """Standardised features f (N, D) of the test split -> accuracy in % per shot count: the mean over
    episodes and its 95% interval (1.96 standard errors)."""
    res = {}
    for k in shots:
        sup, qry = sample_episodes(y, n_episodes, ways, k, queries, seed)
        ys = torch.arange(ways).repeat_interleave(k).expand(len(sup), -1)  # (E, ways * shots)
        yq = torch.arange(ways).repeat_interleave(queries)
        acc = []
        for i in range(0, n_episodes, chunk):  # bounds memory: (chunk, ways * queries, D) features
            W, b = train_heads(f[sup[i:i + chunk]], ys[i:i + chunk], ways, seed=seed)
            acc.append(((f[qry[i:i + chunk]] @ W + b).argmax(-1) == yq).float().mean(1))
        acc = 100 * torch.cat(acc)
        res[f"{k}shot"] = acc.mean().item()
        res[f"{k}shot_ci95"] = 1.96 * acc.std().item() / math.sqrt(len(acc)) if len(acc) > 1 else float("nan")
    return res


# -----------------------------------------------------------------------------
# DCI (Eastwood & Williams 2018, "A framework for the quantitative evaluation of disentangled
# representations"; paper §4.3.2)

def entropy(p, base, dim):
    """Entropy in the given base of p normalised along dim."""
    p = p / p.sum(dim, keepdim=True).clamp(min=1e-12)
    return -(p * p.clamp(min=1e-12).log()).sum(dim) / math.log(base)


def gbt_classifier():
    """scikit-learn's GradientBoostingClassifier, or one ConfigError saying how to install it."""
    try:
        from sklearn.ensemble import GradientBoostingClassifier
    except ImportError:
        raise ConfigError("dci_model='gbt' needs scikit-learn, which is optional: pip install scikit-learn") from None
    return GradientBoostingClassifier


def gbt_importance(ctr, ytr, cte, yte, seed=0):
    """disentanglement_lib's DCI predictors: per factor a scikit-learn GradientBoostingClassifier
    (default settings) on the raw codes -> (importances (n_codes, n_factors), test accuracy per factor)."""
    GradientBoostingClassifier = gbt_classifier()
    from tqdm import tqdm
    R, acc = [], []
    for j in tqdm(range(ytr.shape[1]), desc="dci gbt, one factor at a time",
                  disable=ytr.shape[1] < 2 or len(ytr) < 2000):
        gbt = GradientBoostingClassifier(random_state=seed).fit(ctr.numpy(), ytr[:, j].numpy())
        R.append(torch.from_numpy(gbt.feature_importances_).abs().float())
        acc.append(float((gbt.predict(cte.numpy()) == yte[:, j].numpy()).mean()))
    return torch.stack(R, 1), acc


def dci(ctr, ytr, cte, yte, model="logreg", wd=1e-4, seed=0):
    """Codes (N, n_codes) and factor classes (N, n_factors) of a train and a test set -> D, C, I and
    the importance matrix R (n_codes, n_factors), each column normalised to sum 1. model='gbt':
    gradient-boosted trees' importances (the original's and the paper's recipe); 'logreg': factor j's
    predictor is a multinomial logistic regression on standardised codes and R[i, j] = |weights| of
    code i summed over j's classes (fast, but on a different scale: README "Disentanglement").
    I is the predictors' mean test accuracy."""
    ctr, cte = ctr.float(), cte.float()
    if model == "gbt":
        R, acc = gbt_importance(ctr, ytr, cte, yte, seed)
    else:
        mean, std = standardise_stats(ctr, float64=False)
        ctr, cte = standardise(ctr, mean, std), standardise(cte, mean, std)
        R, acc = [], []
        for j in range(ytr.shape[1]):
            n_classes = int(max(ytr[:, j].max(), yte[:, j].max())) + 1
            W, b = fit_logreg(ctr, ytr[:, j], n_classes, wd)
            R.append(W.abs().sum(1))
            acc.append(topk(cte @ W + b, yte[:, j], 1) / 100)
        R = torch.stack(R, 1)
    R = R / R.sum(0, keepdim=True).clamp(min=1e-12)
    n_codes, n_factors = R.shape
    rho = R.sum(1) / R.sum()  # each code's share of the total importance
    disentanglement = (rho * (1 - entropy(R, n_factors, dim=1))).sum().item()  # does each code capture one factor?
    completeness = (1 - entropy(R, n_codes, dim=0)).mean().item()  # is each factor captured by one code?
    return {"D": disentanglement, "C": completeness, "I": sum(acc) / len(acc), "I_per_factor": acc, "R": R}


def save_heatmap(R, names, path):
    """The importance matrix as a (factors x codes) heat map PNG."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(min(20, 2 + 0.1 * len(R)), 0.4 * len(names) + 1))
    im = ax.imshow(R.T.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("code")
    ax.set_title("DCI importance (columns of R sum to 1)")
    fig.colorbar(im, ax=ax)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# -----------------------------------------------------------------------------
# The run: its checks, the network, the data

def parse_epochs(text):
    """lin_epochs -> the epoch counts (ints), or one ConfigError."""
    try:
        epochs = parse_list(text)
    except ConfigError:
        epochs = []
    if not epochs or any(e < 1 or e != int(e) for e in epochs):
        raise ConfigError(f"lin_epochs={text!r}: expected comma-separated whole numbers >= 1, e.g. 10,30,100")
    return tuple(map(int, epochs))


def check(cfg):
    """Every check of the config, made once, before any work: one ConfigError (CheckpointError,
    DataError) naming what is wrong. The keys alone first; then the checkpoint, read on the CPU and its
    network built (that is what checks its config and weights; only the network is kept, not the
    training weights and AdamW's two moments it also holds); then the probe against the checkpoint's
    training config. -> the run so far (a SimpleNamespace)."""
    task = cfg["task"]
    check_keys(cfg, {"task": tuple(TASK_DATA), "features": ("pool", "z", "unet"), "split": ("test", "val"),
                     "dci_model": ("logreg", "gbt"), "solver": ("sgd", "lbfgs")},
               [(("episodes", "batch"), lambda v: v >= 1, ">= 1"),
                (("probe_aug", "n_images", "lin_batch", "num_workers"), lambda v: v >= 0, ">= 0"),
                (("val_frac",), lambda v: 0 < v < 1, "in (0, 1)"), (("unet_logsnr",), lambda v: True, "finite"),
                SEED_RANGE])
    epochs = parse_epochs(cfg["lin_epochs"])
    check_device(cfg["device"])
    allowed = TASK_DATA[task]
    if cfg["dataset"] and cfg["dataset"] not in allowed:
        raise ConfigError(f"dataset={cfg['dataset']!r} is not allowed with task={task!r}: choose from "
                          f"{', '.join(map(repr, allowed))} (or '': the checkpoint's)")
    if task == "dci" and cfg["dci_model"] == "gbt":
        gbt_classifier()  # scikit-learn is there, or one ConfigError now
    if cfg["out"] and not (cfg["out"].endswith(".json") and os.path.isdir(os.path.dirname(cfg["out"]) or ".")):
        raise ConfigError(f"out={cfg['out']!r} must be a .json file in an existing directory "
                          "('': beside the checkpoint)")
    res_dir = os.path.dirname(cfg["out"] or cfg["ckpt"]) or "."
    if os.path.isdir(res_dir):  # else load_checkpoint says there is no checkpoint
        key = "out" if cfg["out"] else "ckpt"
        beside = "" if cfg["out"] else " beside the checkpoint"
        check_writable(key, cfg[key], res_dir, f"probe.py's result (a JSON{beside})")
    checkpoint = load_checkpoint(cfg["ckpt"], "cpu")
    torch.manual_seed(cfg["seed"])  # --random=True: this seed's init is the baseline
    net = model_of(checkpoint, cfg["ckpt"], None if cfg["random"] else "ema")
    train_cfg, step = checkpoint["config"], checkpoint.get("step")
    del checkpoint  # net holds its own copy of the weights: the checkpoint's tensors are freed
    if not cfg["dataset"] and train_cfg["dataset"] not in allowed:  # never a stand-in dataset without being asked
        raise ConfigError(f"the checkpoint was trained on {train_cfg['dataset']}, and task={task!r} reads "
                          f"{' or '.join(allowed)}: pass --dataset={allowed[0]} (and its --data_dir) to measure it "
                          "there")
    dataset = cfg["dataset"] or train_cfg["dataset"]
    if train_cfg["ray_freqs"] and dataset != "cars3d":  # Cars3D is the one probe set with cameras
        raise ConfigError(f"the checkpoint's model reads camera rays (ray_freqs={train_cfg['ray_freqs']}, trained on "
                          f"{train_cfg['dataset']}), and task={task!r} on {dataset} has no cameras: only task='dci' on "
                          "cars3d gives it its rays")
    if train_cfg["ray_freqs"] and cfg["features"] == "unet":
        raise ConfigError("features='unet' gives the denoiser no camera: use 'pool' or 'z' for Cars3D DCI")
    if cfg["split"] == "val" and dataset != "cifar10":
        raise ConfigError(f"split='val' is CIFAR-10's (train.py's held-out images); {dataset} is probed on its test "
                          "split (a folder: its val/ or held-out part), and its weight decay is chosen on a held-out "
                          "part of train")
    if cfg["probe_aug"] and dataset != "cifar10":
        raise ConfigError(f"probe_aug={cfg['probe_aug']} augments a training set held in memory (cifar10); "
                          f"{dataset} is streamed")
    data_dir = cfg["data_dir"] or (train_cfg["data_dir"] if train_cfg["dataset"] == dataset else "")
    if not data_dir and dataset != "cifar10":  # cifar10: '' is searched for as train.py does
        raise ConfigError(f"the checkpoint was trained on {train_cfg['dataset']}: say where {dataset} is with "
                          "--data_dir")
    if dataset == "dsprites" and train_cfg["image_size"] != 64:
        raise data.DataError(f"dSprites images are 64x64, but the checkpoint's image_size is {train_cfg['image_size']}"
                             "; --dataset=cars3d measures DCI at any size")
    return SimpleNamespace(cfg=cfg, task=task, net=net, train_cfg=train_cfg, step=step, dataset=dataset,
                           data_dir=data_dir, epochs=epochs)


def prepare(run):
    """The checked run -> ready: the network on its device, where the data is (CIFAR-10: found as
    train.py finds it), the function of images that gives the features, and the result file."""
    cfg = run.cfg
    run.dev = runtime.pick_device(cfg["device"])
    run.net = net = run.net.to(run.dev).eval()
    run.download = False
    if run.dataset == "cifar10":  # '' searched for as train.py does (data.find_cifar10)
        run.data_dir, why, run.download = data.find_cifar10(run.data_dir)
        print(f"data: using {run.data_dir} ({why})")
    run.num_workers = cfg["num_workers"]
    if run.dataset in FOLDERS + ("celeba",):  # decoded by DataLoader workers: no more than the cores
        run.num_workers, line = data.fit_workers(cfg["num_workers"])
        if line:
            print(line)
    if cfg["features"] == "unet":
        run.encode = unet_features(net, cfg["unet_logsnr"], cfg["seed"])
    else:
        part = ENCODER_OUTPUT[cfg["features"]]
        run.encode = lambda xb: net.encode_features(xb)[part]
    gbt = "_gbt" if run.task == "dci" and cfg["dci_model"] == "gbt" else ""
    run.out = cfg["out"] or os.path.join(os.path.dirname(cfg["ckpt"]) or ".",
                                         f"probe_{run.task}{gbt}_{cfg['features']}{'_random' if cfg['random'] else ''}"
                                         f"{'_val' if cfg['split'] == 'val' else ''}.json")
    run.digest = ""  # the checkpoint's SHA-256: read when features are first cached (DCI and z-usage need none)
    run.speed = {}  # img/s of each split's extraction (not of a cache read)
    return run


def split_features(run, source, split):
    """Features of every image of a split (streamed through run.encode), read from the cache when it
    holds them."""
    cfg, n = run.cfg, count_images(source)
    if cfg["cache"] and not run.digest:
        run.digest = file_digest(cfg["ckpt"])
    key = {"ckpt": run.digest, "dataset": run.dataset, "data_dir": os.path.abspath(run.data_dir), "split": split,
           "n": n, "probe_split": cfg["split"],  # cifar10's train split differs between split='test' and 'val'
           "image_size": run.train_cfg["image_size"], "features": cfg["features"], "random": cfg["random"],
           "seed": cfg["seed"] if cfg["random"] or cfg["features"] == "unet" or cfg["n_images"] else 0,  # what it draws
           "unet_logsnr": cfg["unet_logsnr"] if cfg["features"] == "unet" else 0.0}
    tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(os.path.dirname(cfg["ckpt"]) or ".", "features",
                        f"{run.dataset}_{split}_{cfg['features']}_{tag}.pt") if cfg["cache"] else ""

    def extract():
        t = time.time()
        got = stream_features(run.encode, source, run.dev, cfg["batch"], run.num_workers,
                              desc=f"{run.dataset} {split} {cfg['features']} features")
        run.speed[split] = round(n / (time.time() - t), 1)
        return got
    return cached_features(path, key, extract)


def probe_sets(run):
    """-> (train, test, class names, what each is): (uint8 images, labels) tensors for sets held in
    memory, or Datasets whose images DataLoader workers decode batch by batch (image folders, CelebA)."""
    cfg, train_cfg, data_dir, download = run.cfg, run.train_cfg, run.data_dir, run.download
    if run.dataset == "cifar10":  # the probe trains on the whole training split (train + train.py's held-out val)
        if cfg["split"] == "test":
            xtr, ytr, classes = data.load_cifar10(data_dir, "train", download, n_val=0)
            xte, yte, _ = data.load_cifar10(data_dir, "test", download)
            about = (f"{data_dir} train split", f"{data_dir} test split")
        else:  # 'val': the same held-out images train.py set aside (its n_val and seed)
            n_val, held_seed = train_cfg["n_val"], train_cfg["seed"]
            xtr, ytr, classes = data.load_cifar10(data_dir, "train", download, n_val=n_val, seed=held_seed)
            xte, yte, _ = data.load_cifar10(data_dir, "val", download, n_val=n_val, seed=held_seed)
            about = (f"{data_dir} train split less its {n_val} held out", f"those {n_val} held out of {data_dir} train "
                     f"(seed {held_seed})")
        return (xtr, ytr), (xte, yte), classes, about
    n = cfg["n_images"]
    if run.dataset in FOLDERS:  # train/ and val/, or the part train.py held out (its n_val, seed), at the image size
        train, test = (data.load_folder(data_dir, sp, train_cfg["image_size"], train_cfg["n_val"], train_cfg["seed"])
                       for sp in ("train", "test"))
        if not (train.labelled and test.labelled) and run.task != "zusage":
            raise data.DataError(f"{train.about}: task={run.task!r} needs labels, and the images are not all in class "
                                 "subfolders (2 or more); task='zusage' measures a folder without them")
        sub = lambda d: f"{d.about}{f'; {n:,} of them, a fixed random choice' if 0 < n < len(d) else ''}"
        return (data.subset(train, n, cfg["seed"]), data.subset(test, n, cfg["seed"]), train.classes,
                (sub(train), sub(test)))
    train, test = (data.CelebAData(data_dir, sp, train_cfg["image_size"], n) for sp in ("train", "test"))
    return train, test, train.names, (f"{data_dir} CelebA train partition", f"{data_dir} CelebA test partition")


def factor_sets(run):
    """DCI's data: every image of dSprites or Cars3D in memory, split into train and test, each with its
    factors and (Cars3D, for an encoder that reads rays) its camera (K, c2w)."""
    cfg, data_dir = run.cfg, run.data_dir
    gbt = cfg["dci_model"] == "gbt"
    n_tr, n_te = cfg["n_images"] or (10000 if gbt else 0), cfg["n_images"] or (5000 if gbt else 0)
    if run.dataset == "dsprites":  # image_size 64: checked
        (xtr, ctr), (xte, cte) = data.load_dsprites(data_dir, "train", n_tr), data.load_dsprites(data_dir, "test", n_te)
        names, cams_tr, cams_te = data.DSPRITES_FACTORS, None, None
    else:  # cars3d: every view of all 183 cars, each with its camera
        splits = multiview.load_cars3d_factors(data_dir, run.train_cfg["image_size"], n_tr, n_te)
        (xtr, ctr, *cams_tr), (xte, cte, *cams_te) = splits["train"], splits["test"]
        names = multiview.CARS3D_FACTORS
        if not run.train_cfg["ray_freqs"]:  # an encoder without rays (a posed one with features='unet': refused)
            cams_tr = cams_te = None
    print(f"dci ({cfg['dci_model']}): {len(xtr):,} train / {len(xte):,} test images, factors {', '.join(names)}")
    return SimpleNamespace(train=(xtr, ctr, cams_tr), test=(xte, cte, cams_te), names=names, n_train=len(xtr),
                           n_test=len(xte), about=(f"{data_dir} ({run.dataset})",) * 2)


def load_data(run):
    """The one place the data is read -> what the task reads (a SimpleNamespace), with what its train
    and test images are (about) and how many (n_train, n_test). linear, knn, fewshot: the features of
    both splits (streamed, cached) beside the sets; zusage: the first images of the test split;
    multilabel: CelebA's three partitions (Datasets: the task extracts their features); dci: see
    factor_sets."""
    cfg, data_dir = run.cfg, run.data_dir
    if run.task == "dci":
        return factor_sets(run)
    if run.task == "multilabel":
        parts = [data.CelebAData(data_dir, sp, run.train_cfg["image_size"], cfg["n_images"]) for sp in CELEBA_SPLITS]
        return SimpleNamespace(parts=parts, names=parts[0].names, n_train=len(parts[0]), n_test=len(parts[2]),
                               about=(f"{data_dir} CelebA train + val partitions", f"{data_dir} CelebA test partition"))
    train, test, classes, about = probe_sets(run)
    d = SimpleNamespace(train=train, test=test, classes=classes, about=about, n_train=count_images(train),
                        n_test=count_images(test))
    print(f"probe: {run.task} on {run.dataset}, features {cfg['features']}, checkpoint {cfg['ckpt']} step {run.step}\n"
          f"  train: {d.n_train:,} images, {about[0]}\n  {cfg['split']}: {d.n_test:,} images, {about[1]}")
    if run.task == "zusage":  # only the images it reads
        k = min(cfg["n_images"] or 256, d.n_test)
        if isinstance(test, tuple):
            d.x = test[0][:k]
        else:  # from files: less those that cannot be read
            first = torch.utils.data.Subset(test, range(k))
            d.x = torch.cat([xb for xb, _ in image_batches(first, cfg["batch"], run.num_workers)])
    else:
        (d.ftr, d.ytr), (d.fte, d.yte) = split_features(run, train, "train"), split_features(run, test, cfg["split"])
        d.n_train, d.n_test = len(d.ftr), len(d.fte)  # less the files that could not be read
    return d


# -----------------------------------------------------------------------------
# The tasks: (run, its data) -> (result dict, summary)

def linear_task(run, d):
    cfg, copies = run.cfg, [d.ftr]
    for c in range(cfg["probe_aug"]):  # crop+flip copies of the training images (paper Table 1)
        rng = data.Rng(cfg["seed"], c, len(d.train[0]))
        xa = (data.augment(d.train[0], "cropflip", rng) * 255).round().to(torch.uint8)
        copies.append(stream_features(run.encode, (xa, d.ytr), run.dev, cfg["batch"],
                                      desc=f"augmented copy {c + 1}")[0])
    res = linear_probe(torch.cat(copies), d.ytr.repeat(len(copies)), d.fte, d.yte, len(d.classes), wds=LINEAR_WDS,
                       epochs=run.epochs, val_frac=cfg["val_frac"], seed=cfg["seed"], n_orig=len(d.ftr),
                       solver=cfg["solver"], batch=cfg["lin_batch"], device=run.dev)
    return res, f"linear top1 {res['top1']:.2f} top5 {res['top5']:.2f}"


def knn_task(run, d):
    # on the probe's device: the fp16 features go there once (half float's memory), and knn_accuracy
    # makes them float a chunk at a time, as it does on the CPU
    dev = run.dev
    top1, top5 = knn_accuracy(d.ftr.to(dev), d.ytr.to(dev), d.fte.to(dev), d.yte.to(dev), n_classes=len(d.classes),
                              top5=True)
    return {"top1": top1, "top5": top5}, f"knn top1 {top1:.2f} top5 {top5:.2f}"


def fewshot_task(run, d):
    mean, std = standardise_stats(d.ftr)
    res = fewshot_probe(standardise(d.fte, mean, std), d.yte, run.cfg["episodes"], seed=run.cfg["seed"])
    res["episodes"] = run.cfg["episodes"]
    return res, "fewshot " + " ".join(f"{k}shot {res[f'{k}shot']:.2f}+-{res[f'{k}shot_ci95']:.2f}" for k in (1, 5, 10))


def zusage_task(run, d):
    """How much of the image the decoder takes from z (zusage.z_usage)."""
    dev, cfg = run.dev, run.cfg
    x = data.to_signed(d.x.to(dev))
    with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=dev.startswith("cuda")):
        res = zusage.z_usage(run.net, x, seed=cfg["seed"])
    res["plot"] = plot_z_usage(res, run.out[:-len(".json")] + ".png",
                               title=f"{'random init' if cfg['random'] else 'step ' + str(run.step)}")
    print(z_usage_table(res))
    return res, f"zusage removed_at_-3 {res['removed_at_-3']:.2f} removed_mean {res['removed_mean']:.2f}"


def multilabel_task(run, d):
    (ftr, ytr), (fva, yva), (fte, yte) = (split_features(run, part, sp) for part, sp in zip(d.parts, CELEBA_SPLITS))
    res = multilabel_probe(ftr.float(), ytr, fva.float(), yva, fte.float(), yte)
    res["attributes"] = d.names
    return res, f"multilabel f1 {res['f1']:.2f}"


def dci_features(run, x, cams):
    """Features of images held in memory (DCI's), each with its camera for an encoder that reads rays."""
    if run.cfg["features"] == "unet":
        return stream_features(run.encode, (x, torch.zeros(len(x))), run.dev, run.cfg["batch"])[0].float()
    return extract_features(run.net, x, cams=cams)[ENCODER_OUTPUT[run.cfg["features"]]]


def dci_task(run, d):
    cfg = run.cfg
    (xtr, ctr, cams_tr), (xte, cte, cams_te) = d.train, d.test
    res = dci(dci_features(run, xtr, cams_tr), ctr, dci_features(run, xte, cams_te), cte, model=cfg["dci_model"],
              seed=cfg["seed"])
    R = res.pop("R")
    res.update(factors=list(d.names), dci_model=cfg["dci_model"], dataset=run.dataset, importance=R.tolist(),
               heatmap=run.out[:-len(".json")] + ".png")
    save_heatmap(R, d.names, res["heatmap"])
    return res, f"dci D {res['D']:.2f} C {res['C']:.2f} I {res['I']:.2f}"


TASKS = {"linear": linear_task, "knn": knn_task, "fewshot": fewshot_task, "zusage": zusage_task,
         "multilabel": multilabel_task, "dci": dci_task}


def report(run, d, res, summary, t_task):
    """The result JSON; a line of it (lists: in the file); then the summary line, the last printed."""
    cfg, random_init = run.cfg, " random-init" if run.cfg["random"] else ""
    res.update(task=run.task, features=cfg["features"], random_init=cfg["random"], ckpt=cfg["ckpt"], split=cfg["split"],
               dataset=run.dataset, data_train=d.about[0], data_test=d.about[1], step=run.step, n_train=d.n_train,
               n_test=d.n_test, extract_img_s=run.speed, task_s=round(time.time() - t_task, 2))
    with open(run.out, "w") as f:
        json.dump(res, f, indent=1)
    figures = {k: v for k, v in res.items() if not isinstance(v, list)}
    print(f"{run.task} {cfg['features']}{random_init}: {json.dumps(figures)}")
    solver = f", solver {res['solver']}" if run.task == "linear" else ""
    counts = f"{len(d.x):,}" if run.task == "zusage" else f"{d.n_train:,} train / {d.n_test:,}"  # zusage: k test images
    print(f"{summary} ({cfg['features']}{random_init}{solver}; {counts} {cfg['split']} images of {d.about[1]}; "
          f"{cfg['ckpt']} step {run.step})")
    return res


def main(argv):
    cfg = configure(argv, DEFAULTS)
    run = prepare(check(cfg))  # every check first, before any work
    d = load_data(run)
    t_task = time.time()
    res, summary = TASKS[run.task](run, d)
    return report(run, d, res, summary, t_task)


if __name__ == "__main__":
    configurator.plain_warnings()
    try:
        main(sys.argv[1:])
    except (ConfigError, CheckpointError, data.DataError) as e:
        sys.exit(f"error: {e}")
