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
from configurator import (SEED_RANGE, ConfigError, check_device, check_keys, check_out_dir, check_schedules, check_writable,
                          configure, parse_list)
from evaluation import CheckpointError, model_from_checkpoint, psnr, save_gif, save_grid, ssim, to_unit

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
DEFAULTS = {k_: v for k_, v in dict(globals()).items() if not k_.startswith("_") and isinstance(v, (int, float, bool, str))}


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


def generate(net, x_src, r_src, r_tgt, C, seed, keep=None):
    """Target views for rays r_tgt (B, 6, H, W) from source views (B, k, 3, H, W) with rays."""
    g = torch.Generator(x_src.device).manual_seed(seed)
    z = net.encode(x_src, r_src)
    w = 1.0 if keep is not None else C["guidance_z"]  # the masked-z baseline is not guided by z
    return D.sample(net, z, (len(z), 3, *x_src.shape[-2:]), steps=C["steps"],
                    eta=1.0 if C["sampler"] == "ddpm" else 0.0, schedule=C["schedule"],
                    generator=g, w=w, keep=keep, rays_tgt=r_tgt, w_pose=C["guidance_pose"])


def main(argv):
    C = configure(argv, DEFAULTS)
    if C["sampler"] not in ("ddpm", "ddim"):
        raise ConfigError(f"sampler must be 'ddpm' or 'ddim', got {C['sampler']!r}")
    try:
        ks = sorted(set(parse_list(C["k"], int)))
    except ConfigError:
        raise ConfigError(f"k={C['k']!r}: expected comma-separated whole numbers of source views, e.g. 1,2") from None
    if not ks or min(ks) < 1:
        raise ConfigError(f"k must be comma-separated numbers of source views >= 1, got {C['k']!r}")
    check_keys(C, None, [(("n_targets", "steps", "n_show", "batch"), lambda v: v >= 1, ">= 1"),
                         (("turntable_object", "turntable_view", "threads"), lambda v: v >= 0, ">= 0"),
                         (("guidance_z", "guidance_pose"), lambda v: True, "finite"), SEED_RANGE])
    check_schedules(C, "schedule")
    check_device(C["device"])
    ck_dir = os.path.dirname(C["ckpt"]) or "."
    out = C["out_dir"] or os.path.join(ck_dir, "nvs")
    if os.path.isdir(ck_dir):  # before anything heavy is loaded (else: no checkpoint, said below)
        check_writable("ckpt", C["ckpt"], ck_dir, "nvs.json (beside the checkpoint)")
    if C["out_dir"] or os.path.isdir(ck_dir):
        check_out_dir("out_dir", out)  # made only once every input is known good
    if C["threads"] > 0:
        torch.set_num_threads(C["threads"])
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if C["device"] == "auto" else C["device"]
    net, tcfg = model_from_checkpoint(C["ckpt"], dev)
    if tcfg["dataset"] not in data.MULTIVIEW or not tcfg["ray_freqs"]:
        raise data.DataError(f"nvs.py needs a model trained on posed multi-view data ({', '.join(data.MULTIVIEW)}, "
                             f"ray_freqs > 0); this checkpoint was trained on {tcfg['dataset']!r} with "
                             f"ray_freqs={tcfg['ray_freqs']}")
    mv = data.load_multiview(tcfg["dataset"], C["data_dir"] or tcfg["data_dir"], "test", tcfg["image_size"])
    N, V, _, H, W = mv.images.shape
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
        raise ConfigError(f"turntable_view={C['turntable_view']} is out of range: the objects have {V} views (0..{V - 1})")
    os.makedirs(out, exist_ok=True)
    objs, tgts, srcs = eval_pairs(N, V, C["n_targets"], max(ks), C["seed"])
    P = len(objs)
    what = (f"{P} pairs of {N} held-out objects, {tcfg['dataset']} test split of {C['data_dir'] or tcfg['data_dir']}; "
            f"checkpoint {C['ckpt']} step {tcfg['step']}")  # what every result line measured
    print(f"nvs: {N} held-out objects x {C['n_targets']} target views = {P} pairs; k = {ks}; "
          f"{C['sampler']} {C['steps']} steps, guidance z {C['guidance_z']:g} pose {C['guidance_pose']:g}")

    img = lambda o, v: mv.images[o, v].to(dev).float() / 127.5 - 1
    rays = lambda o, v: data.camera_rays(mv.K[o, v], mv.c2w[o, v], H, W).to(dev)
    x_tgt = img(objs, tgts)
    preds, results = {}, {}
    none = torch.zeros(1, net.n_sections, device=dev)
    with torch.no_grad():
        for kk in ks + [0]:  # 0: the masked-z baseline (sources ignored), computed once
            outs = []
            for i in tqdm(range(0, P, C["batch"]), desc=f"k={kk}" if kk else "z masked", leave=False):
                sl = slice(i, i + C["batch"])
                o, s = objs[sl, None].expand(-1, max(kk, 1)), srcs[sl, :max(kk, 1)]
                outs.append(generate(net, img(o, s), rays(o, s), rays(objs[sl], tgts[sl]), C, C["seed"] + i,
                                     keep=none if kk == 0 else None))
            preds[kk] = torch.cat(outs)
        measure = lambda pred: {"psnr": psnr(to_unit(x_tgt), to_unit(pred)).mean().item(),
                                "ssim": ssim(to_unit(x_tgt), to_unit(pred)).mean().item()}
        masked = measure(preds[0])
        for kk in ks:
            near = nearest_source(mv.c2w[objs[:, None], srcs[:, :kk]], mv.c2w[objs, tgts])
            copy = img(objs, srcs[torch.arange(P), near])
            results[f"k{kk}"] = {**measure(preds[kk]), "nearest_source": measure(copy), "z_masked": masked}
            r = results[f"k{kk}"]
            print(f"k={kk}: PSNR {r['psnr']:6.2f} dB SSIM {r['ssim']:.4f} | nearest source view "
                  f"{r['nearest_source']['psnr']:6.2f} / {r['nearest_source']['ssim']:.4f} | z masked "
                  f"{masked['psnr']:6.2f} / {masked['ssim']:.4f} ({what})")

        # the grid: a spread of pairs, one row each
        show = torch.linspace(0, P - 1, min(C["n_show"], P)).round().long()
        cols, labels = [], []
        for j in range(max(ks)):
            cols.append(img(objs[show], srcs[show, j]))
            labels.append(f"source {j + 1}")
        for kk in ks:
            cols.append(preds[kk][show])
            labels.append(f"k={kk}")
        cols += [preds[0][show], x_tgt[show]]
        labels += ["z masked", "target"]
        png = save_grid(os.path.join(out, "nvs.png"), torch.stack(cols, dim=1),
                        [f"{mv.ids[o]} v{t}" for o, t in zip(objs[show].tolist(), tgts[show].tolist())], labels)

        # the turntable: one source view, every view on its ring; each frame is sampled with the
        # same seed (the same x_T and the same sampler noise), so frames differ only by the pose
        o, v = C["turntable_object"], C["turntable_view"]
        if not (0 <= o < N and 0 <= v < V):
            raise ConfigError(f"turntable_object must be in 0..{N - 1} and turntable_view in 0..{V - 1}")
        views = ring(mv.c2w[o], v)
        one = torch.tensor([[o]])
        frames = torch.cat([generate(net, img(one, torch.tensor([[v]])), rays(one, torch.tensor([[v]])),
                                     rays(one[0], views[t:t + 1]), C, C["seed"])
                            for t in tqdm(range(len(views)), desc="turntable", leave=False)])
        real = img(torch.full((len(views),), o), views)
        gif = save_gif(os.path.join(out, "turntable.gif"), torch.cat([real, frames], dim=-1), ms=120, bounce=False)

    js = os.path.join(os.path.dirname(C["ckpt"]) or ".", "nvs.json")
    with open(js, "w") as f:
        json.dump({**results, "pairs": P, "objects": N, "sampler": C["sampler"], "steps": C["steps"],
                   "guidance_z": C["guidance_z"], "guidance_pose": C["guidance_pose"], "seed": C["seed"],
                   "ckpt": C["ckpt"], "step": tcfg["step"], "data": what, "grid": png, "turntable": gif}, f, indent=1)
    for path in (png, gif, js):
        print(f"wrote {path}")
    print(" ".join(f"k{kk} psnr {results[f'k{kk}']['psnr']:.2f} ssim {results[f'k{kk}']['ssim']:.4f}" for kk in ks) + f" ({what})")
    return results


if __name__ == "__main__":
    configurator.plain_warnings()
    try:
        main(sys.argv[1:])
    except (ConfigError, CheckpointError, data.DataError) as e:
        sys.exit(f"error: {e}")
