"""Does the linear probe's figure depend on its solver? The default probe (solvers.linear_probe, as
probe.py runs it) against the same fit computed another way (reference_probe: float64 throughout,
every fit from zero, 4x the iterations, tolerances 100x tighter), on every kind of feature set a CPU
can make: a trained SODA checkpoint's z and pooled features, the same encoder at random init, and
the same encoder trained with another objective (SimCLR's contrastive loss, contrastive_encoder
below). Both fits choose their weight decay on the same held-out rows; the table gives top-1 and the
decay chosen. Measured on the CIFAR-10 validation split (train.py's n_val held-out images,
probe.py --split=val), so choosing the solver never reads the test split.

    python tools/probe_solvers.py --ckpt=out/cifar10_cpu/ckpt.pt            # seed 0: ~9 minutes on 2 cores
    python tools/probe_solvers.py --ckpt=out/cifar10_cpu/ckpt.pt --seeds=0,1,2 --simclr_steps=300
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(TOOLS, "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, TOOLS)
import data  # noqa: E402
import model as M  # noqa: E402
from common import load_checkpoint, model_of  # noqa: E402
from contrastive import SimCLR  # noqa: E402
from solvers import LINEAR_WDS, extract_features, linear_probe, standardise_stats  # noqa: E402


def contrastive_encoder(x, steps=300, batch=128, z_dim=128, preset="tiny", lr=1e-3, seed=0, log=None):
    """The SODA encoder preset (a ResNet, pooled, a linear bottleneck to z_dim) trained by SimCLR on
    uint8 images x (N, 3, 32, 32): two 'simclr' views of each image, NT-Xent on a 2-layer projection
    of z, Adam (tools/contrastive.py's SimCLR, in float32). -> the encoder (eval mode)."""
    torch.manual_seed(seed)
    enc = M.Encoder(z_dim, **M.PRESETS["encoder"][preset], image_size=x.shape[-1])
    run = SimCLR(lambda xb: enc.forward_features(xb)[1], enc.parameters(), x, z_dim, batch, seed=seed, lr=lr)
    for step in range(steps):
        loss = run.step(step)
        if log and (step + 1) % 50 == 0:
            log(f"simclr step {step + 1}/{steps}: loss {loss.item():.3f}")
    return enc.eval()


def reference_probe(ftr, ytr, fte, yte, seed=0, val_frac=0.1, wds=LINEAR_WDS, iters=20_000):
    """The same probe computed another way: everything in float64, each weight decay fitted from zero
    (no warm start) by L-BFGS with 4x the probe's iteration cap and tolerances 100x tighter, on the
    same standardised features and held-out rows (linear_probe's draw), the decay chosen the
    same way. -> dict(top1, wd)."""
    mean, std = standardise_stats(ftr)
    xtr, xte = ((ftr.double() - mean.double()) / std.double()), ((fte.double() - mean.double()) / std.double())
    val = torch.randperm(len(ftr), generator=torch.Generator().manual_seed(seed))[: int(val_frac * len(ftr))]
    rest = torch.ones(len(ftr), dtype=torch.bool)
    rest[val] = False

    def fit(rows, wd):
        W = torch.zeros(xtr.shape[1], 10, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, max_eval=iters * 5 // 4, history_size=20,
                                tolerance_grad=1e-9, tolerance_change=1e-11, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(xtr[rows] @ W + b, ytr[rows]) + wd * W.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        return W.detach(), b.detach()
    top1 = lambda x, y, Wb: 100 * ((x @ Wb[0] + Wb[1]).argmax(1) == y).double().mean().item()
    scores = {wd: top1(xtr[val], ytr[val], fit(rest, wd)) for wd in wds}
    best = max(scores, key=lambda wd: (scores[wd], wd))  # ties: more decay, as the probe
    return {"top1": top1(xte, yte, fit(torch.ones_like(rest), best)), "wd": best}


def compare(ftr, ytr, fte, yte, seed=0, solver="lbfgs"):
    """-> (the probe's result with `solver` and its defaults, the reference's) on the same rows."""
    return linear_probe(ftr, ytr, fte, yte, 10, seed=seed, solver=solver), reference_probe(ftr, ytr, fte, yte, seed)


def feature_sets(ckpt_path, simclr_steps, cache=""):
    """-> ({name: (train features, validation features)}, train labels, validation labels, what they are):
    the checkpoint's EMA encoder and the same encoder at random init (z and pooled), and a SimCLR-trained
    one. cache: a file that keeps them (read when it exists)."""
    if cache and os.path.exists(cache):
        return torch.load(cache, weights_only=True).values()
    ck = load_checkpoint(ckpt_path)
    tcfg, step = ck["config"], ck["step"]
    dd, _, _ = data.find_cifar10(tcfg["data_dir"])
    xtr, ytr, _ = data.load_cifar10(dd, "train", n_val=tcfg["n_val"], seed=tcfg["seed"])
    xva, yva, _ = data.load_cifar10(dd, "val", n_val=tcfg["n_val"], seed=tcfg["seed"])
    sets = {}
    trained = model_of(ck, ckpt_path, "ema").eval()
    torch.manual_seed(0)
    random_init = model_of(ck, ckpt_path, None).eval()
    for name, net in ((f"SODA step {step}", trained), ("random init", random_init)):
        (ptr, ztr), (pva, zva) = (extract_features(net, x) for x in (xtr, xva))
        sets[f"{name}, z"], sets[f"{name}, pooled"] = (ztr, zva), (ptr, pva)
    enc = contrastive_encoder(xtr, steps=simclr_steps, log=lambda s: print(s, flush=True))
    (ptr, ztr), (pva, zva) = (extract_features(enc, x) for x in (xtr, xva))
    sets[f"SimCLR {simclr_steps} steps, z"], sets[f"SimCLR {simclr_steps} steps, pooled"] = (ztr, zva), (ptr, pva)
    about = f"{len(xtr):,} train / {len(xva):,} validation images of {dd} (n_val={tcfg['n_val']}, seed {tcfg['seed']})"
    if cache:
        torch.save({"sets": sets, "ytr": ytr, "yva": yva, "about": about}, cache)
    return sets, ytr, yva, about


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="out/cifar10_cpu/ckpt.pt")
    p.add_argument("--seeds", default="0", help="comma-separated: the probe's seed (its held-out rows and batches)")
    p.add_argument("--simclr_steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--features", default="", help="a file that keeps the feature sets (read when it exists)")
    p.add_argument("--solver", default="lbfgs", help="the probe's solver compared with the reference: lbfgs | sgd")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    sets, ytr, yva, about = feature_sets(a.ckpt, a.simclr_steps, a.features)
    print(f"\n{about}; features of {a.ckpt} and two stand-ins")
    print(f"| features | seed | probe, solver {a.solver} (wd) | reference: float64, from zero (wd) | difference |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for name, (f_tr, f_va) in sets.items():
        for seed in map(int, a.seeds.split(",")):
            d, c = compare(f_tr, ytr, f_va, yva, seed, a.solver)
            worst = max(worst, abs(d["top1"] - c["top1"]))
            print(f"| {name} | {seed} | {d['top1']:.2f} ({d['wd']:g}) | {c['top1']:.2f} ({c['wd']:g}) | "
                  f"{d['top1'] - c['top1']:+.2f} |")
    print(f"\nlargest difference {worst:.2f} points; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
