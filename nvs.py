"""
Novel view synthesis (paper §3.3, §4.2.2): from k posed source views of an unseen object, generate
the view seen from a target camera, and measure it against the real view.

    python nvs.py --ckpt=out/cars3d_cpu/ckpt.pt                                  # k = 1, 2
    python nvs.py --ckpt=out/cars3d_cpu/ckpt.pt --sampler=ddim --steps=50 --guidance_z=2

For each held-out object, `n_targets` target views each get k_max source views (never the target);
k = 1 uses the first of them, k = 2 the first two, so more views only add information. Two
baselines on the same pairs give the numbers their meaning: copying the source view whose camera
is nearest the target's (by the angle between camera centres: the nearest azimuth on a turntable),
and the same model with z masked (it sees the target pose only). Writes nvs.png (sources |
predictions | baselines | ground truth), turntable.gif (one source view -> every view on its ring,
beside the real ones) and nvs.json beside the checkpoint; the last line printed is machine-readable.
"""
import json
import math
import os
import sys

import torch
from tqdm import tqdm

import configurator
import data
import diffusion as D
import multiview
import runtime
from common import CheckpointError, model_from_checkpoint, psnr, save_gif, save_grid, ssim, to_unit
from configurator import (SEED_RANGE, ConfigError, check_device, check_keys, check_out_dir, check_schedules,
                          check_writable, configure, parse_list)

# -----------------------------------------------------------------------------
ckpt = "out/cars3d_cpu/ckpt.pt"  # a train.py checkpoint of a posed multi-view model (its EMA is used)
out_dir = ""  # default: <checkpoint dir>/nvs
data_dir = ""  # default: the checkpoint's
k = "1,2"  # numbers of source views evaluated
n_targets = 16  # target views per held-out object
sampler = "ddpm"  # 'ddpm' (the paper's) | 'ddim'
steps = 20  # sampler steps (the paper's NVS table uses 20)
schedule = "cosine"  # sampling schedule: a diffusion.get_schedule name
guidance_z = 1.0  # guidance scale of the latent (1: none)
guidance_pose = 1.0  # guidance scale of the target pose (1: none)
n_show = 8  # pairs shown in nvs.png
turntable_object = 0  # held-out object of the turntable GIF
turntable_view = 3  # its source view (Cars3D: view 24 e + a, so 3 = elevation 0, azimuth 45)
batch = 64  # pairs per sampler call
device = "auto"
threads = 0  # CPU threads for torch (0: torch's default)
seed = 0
# -----------------------------------------------------------------------------
DEFAULTS = {k_: v for k_, v in dict(globals()).items()
            if not k_.startswith("_") and isinstance(v, (int, float, bool, str))}


def eval_pairs(n_objects, n_views, n_targets, k_max, seed):
    """-> (objects (P,), targets (P,), sources (P, k_max)): for each object, n_targets distinct
    target views, each with k_max distinct source views drawn from its other views."""
    if n_views < k_max + 1 or n_targets > n_views:
        raise ConfigError(f"objects have {n_views} views: need n_targets <= {n_views} and k <= {n_views - 1}")
    g = torch.Generator().manual_seed(seed)
    objs, tgts, srcs = [], [], []
    for o in range(n_objects):
        for t in torch.randperm(n_views, generator=g)[:n_targets].tolist():
            others = torch.tensor([v for v in range(n_views) if v != t])
            objs.append(o)
            tgts.append(t)
            srcs.append(others[torch.randperm(len(others), generator=g)[:k_max]])
    return torch.tensor(objs), torch.tensor(tgts), torch.stack(srcs)


def nearest_source(c2w_src, c2w_tgt):
    """(P, k, 4, 4), (P, 4, 4) -> (P,) index of the source camera whose centre direction is
    closest to the target's (on a turntable: the nearest azimuth)."""
    cs = torch.nn.functional.normalize(c2w_src[..., :3, 3], dim=-1)
    ct = torch.nn.functional.normalize(c2w_tgt[..., :3, 3], dim=-1)
    return (cs @ ct[..., None]).squeeze(-1).argmax(dim=1)


def ring(c2w, view, tol=1e-3):
    """The views on the same ring as `view` (camera centres at its height), ordered by azimuth
    starting from it: the frames of a turntable."""
    c = c2w[:, :3, 3]
    on = ((c[:, 1] - c[view, 1]).abs() < tol * c.norm(dim=1).max()).nonzero().squeeze(1)
    az = torch.atan2(c[on, 0], c[on, 2])
    az = (az - az[(on == view).nonzero()[0, 0]]) % (2 * math.pi)
    return on[az.argsort()]


def images_of(mv, objs, views, dev):
    """Views of held-out objects (index tensors of one shape) -> images in [-1, 1] on dev."""
    return data.to_signed(mv.images[objs, views].to(dev))


def rays_of(mv, objs, views, dev):
    """The camera rays of those views -> (..., 6, H, W) on dev."""
    return multiview.camera_rays(mv.K[objs, views], mv.c2w[objs, views], *mv.images.shape[-2:]).to(dev)


def generate(net, x_src, r_src, r_tgt, C, seed, z_on=None):
    """Target views for rays r_tgt (B, 6, H, W) from source views (B, k, 3, H, W) with rays."""
    g = torch.Generator(x_src.device).manual_seed(seed)
    z = net.encode(x_src, r_src)
    w = 1.0 if z_on is not None else C["guidance_z"]  # the masked-z baseline is not guided by z
    return D.sample(net, z, (len(z), 3, *x_src.shape[-2:]), steps=C["steps"], eta=D.SAMPLERS[C["sampler"]],
                    schedule=C["schedule"], generator=g, w=w, z_on=z_on, rays_tgt=r_tgt, w_pose=C["guidance_pose"])


def check(C):
    """Every check of the config alone, made once, before anything is read: one ConfigError naming
    the key. -> (the numbers of source views, sorted; the output directory). What needs the
    checkpoint or the views is checked by load(), as soon as they are read."""
    check_keys(C, {"sampler": tuple(D.SAMPLERS)},
               [(("n_targets", "steps", "n_show", "batch"), lambda v: v >= 1, ">= 1"),
                (("turntable_object", "turntable_view", "threads"), lambda v: v >= 0, ">= 0"),
                (("guidance_z", "guidance_pose"), lambda v: True, "finite"), SEED_RANGE])
    try:
        ks = sorted(set(parse_list(C["k"], int)))
    except ConfigError:
        raise ConfigError(f"k={C['k']!r}: expected comma-separated whole numbers of source views, e.g. 1,2") from None
    if not ks or min(ks) < 1:
        raise ConfigError(f"k must be comma-separated numbers of source views >= 1, got {C['k']!r}")
    check_schedules(C, "schedule")
    check_device(C["device"])
    ckpt_dir = os.path.dirname(C["ckpt"]) or "."
    out = C["out_dir"] or os.path.join(ckpt_dir, "nvs")
    if os.path.isdir(ckpt_dir):  # before anything heavy is loaded (else: no checkpoint, said below)
        check_writable("ckpt", C["ckpt"], ckpt_dir, "nvs.json (beside the checkpoint)")
    if C["out_dir"] or os.path.isdir(ckpt_dir):
        check_out_dir("out_dir", out)  # made only once every input is known good
    return ks, out


def load(C, ks, dev):
    """The one place that reads: the checkpoint's EMA model (on dev) and the views of the held-out
    objects (the test split) -> (net, its training config, the views). What needs them is checked
    as soon as they are read: the model must read the camera rays of a multi-view set, and k,
    n_targets and turntable_* must fit the objects and their views."""
    net, train_cfg = model_from_checkpoint(C["ckpt"], dev)
    if train_cfg["dataset"] not in multiview.MULTIVIEW or not train_cfg["ray_freqs"]:
        raise data.DataError(f"nvs.py needs a model trained on posed multi-view data "
                             f"({', '.join(multiview.MULTIVIEW)}, ray_freqs > 0); this checkpoint was trained on "
                             f"{train_cfg['dataset']!r} with ray_freqs={train_cfg['ray_freqs']}")
    mv = multiview.load_multiview(train_cfg["dataset"], C["data_dir"] or train_cfg["data_dir"], "test",
                                  train_cfg["image_size"])
    N, V = mv.images.shape[:2]
    if max(ks) > V - 1:
        raise ConfigError(f"k={C['k']!r}: the held-out objects have {V} views, so k (source views besides the target) "
                          f"must be <= {V - 1}")
    if C["n_targets"] > V:
        raise ConfigError(f"n_targets={C['n_targets']} is out of range: the held-out objects have {V} views, so "
                          f"n_targets must be <= {V}")
    if C["turntable_object"] >= N:
        raise ConfigError(f"turntable_object={C['turntable_object']} is out of range: there are {N} held-out objects "
                          f"(0..{N - 1})")
    if C["turntable_view"] >= V:
        raise ConfigError(f"turntable_view={C['turntable_view']} is out of range: the objects have {V} views "
                          f"(0..{V - 1})")
    return net, train_cfg, mv


def predict(net, mv, pairs, ks, C, dev):
    """-> {k: the target views generated from k source views of every pair}, and under 0 the masked-z
    baseline (sources ignored), computed once."""
    objs, tgts, srcs = pairs
    none = torch.zeros(1, net.n_sections, device=dev)
    preds = {}
    for kk in ks + [0]:
        outs = []
        for i in tqdm(range(0, len(objs), C["batch"]), desc=f"k={kk}" if kk else "z masked", leave=False):
            sl = slice(i, i + C["batch"])
            o, s = objs[sl, None].expand(-1, max(kk, 1)), srcs[sl, :max(kk, 1)]
            outs.append(generate(net, images_of(mv, o, s, dev), rays_of(mv, o, s, dev),
                                 rays_of(mv, objs[sl], tgts[sl], dev), C, C["seed"] + i,
                                 z_on=none if kk == 0 else None))
        preds[kk] = torch.cat(outs)
    return preds


def measure_all(mv, pairs, x_tgt, preds, ks, what, dev):
    """PSNR and SSIM against the real target views of each k's predictions and of its two baselines
    (the nearest source view, z masked), a line printed per k -> {'k1': ..., ...}."""
    objs, tgts, srcs = pairs
    measure = lambda pred: {"psnr": psnr(to_unit(x_tgt), to_unit(pred)).mean().item(),
                            "ssim": ssim(to_unit(x_tgt), to_unit(pred)).mean().item()}
    masked, results = measure(preds[0]), {}
    for kk in ks:
        near = nearest_source(mv.c2w[objs[:, None], srcs[:, :kk]], mv.c2w[objs, tgts])
        copy = images_of(mv, objs, srcs[torch.arange(len(objs)), near], dev)
        results[f"k{kk}"] = r = {**measure(preds[kk]), "nearest_source": measure(copy), "z_masked": masked}
        print(f"k={kk}: PSNR {r['psnr']:6.2f} dB SSIM {r['ssim']:.4f} | nearest source view "
              f"{r['nearest_source']['psnr']:6.2f} / {r['nearest_source']['ssim']:.4f} | z masked "
              f"{masked['psnr']:6.2f} / {masked['ssim']:.4f} ({what})")
    return results


def save_pairs_grid(mv, pairs, x_tgt, preds, ks, C, out, dev):
    """nvs.png: a spread of pairs, one row each: sources | predictions | z masked | target."""
    objs, tgts, srcs = pairs
    show = torch.linspace(0, len(objs) - 1, min(C["n_show"], len(objs))).round().long()
    cols = [images_of(mv, objs[show], srcs[show, j], dev) for j in range(max(ks))]
    labels = [f"source {j + 1}" for j in range(max(ks))]
    cols += [preds[kk][show] for kk in ks] + [preds[0][show], x_tgt[show]]
    labels += [f"k={kk}" for kk in ks] + ["z masked", "target"]
    return save_grid(os.path.join(out, "nvs.png"), torch.stack(cols, dim=1),
                     [f"{mv.ids[o]} v{t}" for o, t in zip(objs[show].tolist(), tgts[show].tolist())], labels)


def save_turntable(net, mv, C, out, dev):
    """turntable.gif: one source view -> every view on its ring, beside the real ones. Each frame is
    sampled with the same seed (the same x_T and the same sampler noise), so frames differ only by
    the pose."""
    o, v = C["turntable_object"], C["turntable_view"]
    views = ring(mv.c2w[o], v)
    one, src = torch.tensor([[o]]), torch.tensor([[v]])
    frames = torch.cat([generate(net, images_of(mv, one, src, dev), rays_of(mv, one, src, dev),
                                 rays_of(mv, one[0], views[t:t + 1], dev), C, C["seed"])
                        for t in tqdm(range(len(views)), desc="turntable", leave=False)])
    real = images_of(mv, torch.full((len(views),), o), views, dev)
    return save_gif(os.path.join(out, "turntable.gif"), torch.cat([real, frames], dim=-1), ms=120, bounce=False)


def main(argv):
    C = configure(argv, DEFAULTS)
    ks, out = check(C)  # every check of the config alone, before anything is read
    if C["threads"] > 0:
        torch.set_num_threads(C["threads"])
    dev = runtime.pick_device(C["device"])
    net, train_cfg, mv = load(C, ks, dev)
    os.makedirs(out, exist_ok=True)
    N, V = mv.images.shape[:2]
    pairs = eval_pairs(N, V, C["n_targets"], max(ks), C["seed"])
    P = len(pairs[0])
    # what every result line measured
    what = (f"{P} pairs of {N} held-out objects, {train_cfg['dataset']} test split of "
            f"{C['data_dir'] or train_cfg['data_dir']}; checkpoint {C['ckpt']} step {train_cfg['step']}")
    print(f"nvs: {N} held-out objects x {C['n_targets']} target views = {P} pairs; k = {ks}; "
          f"{C['sampler']} {C['steps']} steps, guidance z {C['guidance_z']:g} pose {C['guidance_pose']:g}")
    with torch.no_grad():
        x_tgt = images_of(mv, pairs[0], pairs[1], dev)
        preds = predict(net, mv, pairs, ks, C, dev)
        results = measure_all(mv, pairs, x_tgt, preds, ks, what, dev)
        png = save_pairs_grid(mv, pairs, x_tgt, preds, ks, C, out, dev)
        gif = save_turntable(net, mv, C, out, dev)
    js = os.path.join(os.path.dirname(C["ckpt"]) or ".", "nvs.json")
    with open(js, "w") as f:
        json.dump({**results, "pairs": P, "objects": N, "sampler": C["sampler"], "steps": C["steps"],
                   "guidance_z": C["guidance_z"], "guidance_pose": C["guidance_pose"], "seed": C["seed"],
                   "ckpt": C["ckpt"], "step": train_cfg["step"], "data": what, "grid": png, "turntable": gif},
                  f, indent=1)
    for path in (png, gif, js):
        print(f"wrote {path}")
    print(" ".join(f"k{kk} psnr {results[f'k{kk}']['psnr']:.2f} ssim {results[f'k{kk}']['ssim']:.4f}" for kk in ks)
          + f" ({what})")
    return results


if __name__ == "__main__":
    configurator.plain_warnings()
    try:
        main(sys.argv[1:])
    except (ConfigError, CheckpointError, data.DataError) as e:
        sys.exit(f"error: {e}")
