"""
See what a trained SODA model learned (paper §4.2.1, §4.3): reconstructions with metrics,
interpolations, latent directions, layer-wise mixing, guided samples.

    python sample.py --ckpt=out/cifar10_cpu/ckpt.pt --mode=recon                  # PSNR/SSIM vs z masked
    python sample.py --ckpt=out/cifar10_cpu/ckpt.pt --mode=interp --sections=0,1  # A -> B, a PNG and a GIF
    python sample.py --ckpt=out/diffsiam_cpu/ckpt.pt --mode=interp --sections='0-7;8-31;32-63'  # a row per group
    python sample.py --ckpt=out/cifar10_cpu/ckpt.pt --mode=directions --attr=3    # PCA + probe directions
    python sample.py --ckpt=out/cifar10_cpu/ckpt.pt --mode=mix                    # sections of A into B
    python sample.py --ckpt=out/cifar10_cpu/ckpt.pt --mode=random --ws=1,2,3      # unconditional vs guided
    python sample.py --ckpt=out/cifar10_cpu/ckpt.pt --mode=interp --images=me.jpg,cat.png  # your own images

Images come from the test split of the checkpoint's dataset (CIFAR-10; an image folder: its val/
or the part train.py held out; CelebA: its test partition), of which only the images a mode shows
are read from files; or from your own files and folders (--images: any size and mode, made RGB,
resized and centre-cropped to the checkpoint's image size; directions still takes its directions
from the test split). The model is the checkpoint's EMA. Each mode writes a
labelled PNG grid to out_dir (default <checkpoint dir>/samples) and prints where. Deterministic under
--seed: every sampler call gets its own torch.Generator, and the columns of a grid (settings being
compared) reuse one seed, so that along a row only the setting changes. Reconstruction is
meaningful for a model trained with views='identical' (§4.2.1); a views='augment' model decodes a
novel view of its source, so its PSNR is lower by design.
"""
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import configurator
import data
import diffusion as D
import multiview
import runtime
from common import CheckpointError, model_from_checkpoint, psnr, save_gif, save_grid, ssim, to_unit
from configurator import (SEED_RANGE, ConfigError, check_device, check_keys, check_out_dir, check_schedules, configure,
                          parse_groups, parse_list)
from solvers import fit_logreg, standardise, standardise_stats

# -----------------------------------------------------------------------------
ckpt = "out/cifar10_cpu/ckpt.pt"  # a train.py checkpoint (its EMA weights are used)
mode = "recon"  # 'recon' | 'interp' | 'directions' | 'mix' | 'random'
out_dir = ""  # default: <checkpoint dir>/samples
data_dir = ""  # default: the checkpoint's
images = ""  # your own image files or folders, comma-separated: they replace the test images (directions: the image
# walked)
index = 0  # the first test image used (interp: index and index + 1)
n = 64  # recon: test images measured
n_show = 4  # random: source images shown; mix: (A, B) pairs shown
sampler = "ddim"  # 'ddpm' (eta=1, the paper's) | 'ddim' (eta=0); interp is always DDIM (it inverts)
steps = 50  # sampler (and inversion) steps
schedule = "cosine"  # sampling schedule: a diffusion.get_schedule name
guidance = 1.0  # classifier-free guidance scale w (1: the conditional model alone)
frames = 8  # interp: frames from A to B
invert_logsnr = -6.0  # interp: DDIM inversion ends at this log-SNR (-15 = pure noise: its round trip fails)
sections = ""  # interp: sections of z to interpolate, e.g. 0,1 or 0-7;8-15 (a grid row per group; '': all of z)
n_dirs = 4  # directions: principal components shown
attr = 0  # directions: the class whose one-vs-rest probe gives the supervised direction
alphas = "-3,-2,-1,0,1,2,3"  # directions: steps along a direction, in std of z along it
ws = "1,2,3"  # random: guidance scales shown beside the unconditional samples
batch = 64  # images per sampler call (recon) and per encoder call
device = "auto"
threads = 0  # CPU threads for torch (0: torch's default)
seed = 0
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str))}


# -----------------------------------------------------------------------------
# Interpolation

def slerp(a, b, t):
    """Spherical interpolation of two noises (flattened). x_T ~ N(0, I) has norm ~ sqrt(dim): lerp
    would shrink it mid-way, handing the sampler an unlikely, too quiet x_T; slerp keeps it."""
    cos = (a.flatten() @ b.flatten() / (a.norm() * b.norm())).clamp(-1, 1)
    omega = torch.acos(cos)
    if omega < 1e-4:  # (nearly) parallel: lerp is as good
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


# -----------------------------------------------------------------------------
# Sampling and pictures

def decode(net, z, C, seed, z_on=None, x_T=None, w=None):
    """One sampler call with its own generator: the same seed gives the same noise, so calls that
    differ only in z, z_on or w are comparable image by image."""
    g = torch.Generator(z.device).manual_seed(seed)
    size = net.config.image_size  # the decoder's output size
    return D.sample(net, z, (len(z), 3, size, size), steps=C["steps"], eta=D.SAMPLERS[C["sampler"]],
                    schedule=C["schedule"], generator=g, x_T=x_T, progress=True,
                    w=C["guidance"] if w is None else w, z_on=z_on)


def section_mask(net, secs, z, parts=None):
    """(1, z_dim): 1 on the dims of z that belong to the sections `secs` (of `parts` equal cuts of
    z; default the UNet's sections), 0 elsewhere."""
    z_on = torch.zeros(1, parts or net.n_sections, device=z.device)
    z_on[:, list(secs)] = 1
    return net.mask_z(torch.ones_like(z[:1]), z_on)


def mix_latents(net, z_a, z_b, from_a):
    """z with the sections in `from_a` taken from z_a and the others from z_b."""
    return torch.where(section_mask(net, from_a, z_a).bool(), z_a, z_b)


def pick(run, k):
    """The k images from test image run.index on: run.x holds the images main() read, that one at
    row run.at."""
    i = run.at
    if i < 0 or i + k > len(run.x):
        raise data.DataError(f"need images {run.index}..{run.index + k - 1}, but {len(run.x)} were read")
    return run.x[i:i + k]


# -----------------------------------------------------------------------------
# Modes: (the run: the model and the images main() read, see read_images; config) -> a result dict

def recon(run, C):
    """§4.2.1: encode, decode, measure. The same images and seeds decoded with z masked (z_on = 0,
    the unconditional model) are the baseline that gives the numbers their meaning."""
    net, xs = run.net, pick(run, run.n)
    uncond = torch.zeros(1, net.n_sections, device=xs.device)
    rec, base = [], []
    for i in range(0, len(xs), C["batch"]):
        z = net.encode(xs[i:i + C["batch"]])
        rec.append(decode(net, z, C, C["seed"] + i))
        base.append(decode(net, z, C, C["seed"] + i, z_on=uncond, w=1.0))
    rec, base, metrics = torch.cat(rec), torch.cat(base), {}
    for name, r in (("z", rec), ("z_masked", base)):
        metrics[name] = {"psnr": psnr(to_unit(xs), to_unit(r)).mean().item(),
                         "ssim": ssim(to_unit(xs), to_unit(r)).mean().item()}
    how = f"{C['sampler']} {C['steps']} steps, w={C['guidance']:g}, {len(xs)} images of {run.about}, z, {run.model}"
    for name, label in (("z", "with z"), ("z_masked", "z masked (baseline)")):
        print(f"recon {label:20s}: PSNR {metrics[name]['psnr']:6.2f} dB  SSIM {metrics[name]['ssim']:.4f}  ({how})")
    k = min(len(xs), 16)
    grid = torch.stack([xs[:k], rec[:k], base[:k]])
    png = save_grid(os.path.join(run.out, "recon.png"), grid, ["source", "with z", "z masked"])
    js = os.path.join(run.out, "recon.json")
    with open(js, "w") as f:
        json.dump({**metrics, "sampler": C["sampler"], "steps": C["steps"], "guidance": C["guidance"], "n": len(xs),
                   "data": run.about, "seed": C["seed"], "ckpt": C["ckpt"], "step": run.step}, f, indent=1)
    return {"files": [png, js], "metrics": metrics, "images": grid}


def interp_groups(net, C):
    """-> (P, 'sections' or 'segments', the groups of C['sections']): the parts of z interp moves,
    one grid row per group (thesis Fig. 4.1); a part the model does not have is one ConfigError."""
    segments = getattr(net, "segments", 0)  # a DiffSiam model interpolates its segments (thesis Alg. 2)
    P, what = (segments, "segments") if segments else (net.n_sections, "sections")
    groups = parse_groups(C["sections"]) or [list(range(P))]
    if any(not 0 <= s < P for secs in groups for s in secs):
        raise ConfigError(f"sections {C['sections']!r}: this model's z has {P} {what} (0..{P - 1})")
    return P, what, groups


def interp(run, C):
    """§4.3: DDIM-invert A and B to x_T (each with its own z), slerp x_T, lerp z (all of it, or the
    chosen sections while the others stay A's), and decode every frame with DDIM from its x_T."""
    if C["frames"] < 2:
        raise ConfigError(f"frames must be >= 2, got {C['frames']}")
    net = run.net
    P, what, groups = interp_groups(net, C)
    xs = pick(run, 2)
    z = net.encode(xs)
    schedule = D.get_schedule(C["schedule"], logsnr_min=C["invert_logsnr"])
    x_T = D.ddim_invert(net, xs, z, C["steps"], schedule, progress=True, w=C["guidance"])
    ts = torch.linspace(0, 1, C["frames"]).tolist()
    moves = [section_mask(net, secs, z, P) for secs in groups]  # 1 where z goes from A to B
    z_t = torch.cat([z[:1] + t * (z[1:] - z[:1]) * m for m in moves for t in ts])  # (groups * frames, z_dim)
    x_T_t = torch.stack([slerp(x_T[0], x_T[1], t) for t in ts]).repeat(len(groups), 1, 1, 1)
    frames = D.ddim(net, z_t, x_T_t.shape, steps=C["steps"], schedule=schedule, x_T=x_T_t,
                    progress=True, w=C["guidance"])
    rows = frames.view(len(groups), len(ts), *frames.shape[1:])

    def label(secs):
        if len(secs) == P:
            return "z"
        consecutive = secs == list(range(secs[0], secs[-1] + 1))
        return f"{what} {secs[0]}-{secs[-1]}" if consecutive else f"{what} {','.join(map(str, secs))}"
    png = save_grid(os.path.join(run.out, "interp.png"),
                    torch.cat([xs[:1].expand(len(groups), -1, -1, -1)[:, None], rows,
                               xs[1:].expand(len(groups), -1, -1, -1)[:, None]], dim=1),
                    [f"lerp {label(secs)}" for secs in groups], ["A"] + [f"{t:.2f}" for t in ts] + ["B"])
    gif = save_gif(os.path.join(run.out, "interp.gif"), rows[0])
    return {"files": [png, gif], "frames": frames, "z": z, "z_t": z_t, "x_T": x_T}


def pca_directions(zs, k):
    """The top-k principal directions of z (rows, unit norm), from the SVD of the centred z."""
    return torch.linalg.svd(zs - zs.mean(0), full_matrices=False)[2][:k]


def probe_direction(zs, is_cls, wd=1e-3):
    """The normal of a one-vs-rest logistic probe, in z units and unit norm: the probe sees z
    standardised, so its weights are divided by the std to point in z space."""
    mean, std = standardise_stats(zs, float64=False)
    W, _ = fit_logreg(standardise(zs, mean, std).cpu(), is_cls.long().cpu(), 2, wd)
    return F.normalize((W[:, 1] - W[:, 0]).to(zs.device) / std, dim=0)


def directions(run, C):
    """§4.3: unsupervised (PCA of z over the test set) and supervised (a linear probe of class
    `attr`) directions; the image at `index` walks along each, z + alpha * std * d, every cell
    decoded from one fixed x_T, so only z changes across the grid."""
    net, x, y, classes = run.net, run.x, run.y, run.classes
    check_attr(y, classes, C)
    src = pick(run, 1)[0] if run.walk is None else run.walk  # the image walked: test image index, or yours
    zs = torch.cat([net.encode(x[i:i + C["batch"]]) for i in range(0, len(x), C["batch"])])  # (N, z_dim)
    if len(zs) < 2:
        raise data.DataError(f"directions needs 2 or more images to find directions in, and {run.about} has "
                             f"{len(zs)}")
    dirs = pca_directions(zs, min(C["n_dirs"], len(zs) - 1))  # N centred points span N - 1 directions
    labels = [f"PC{i + 1}" for i in range(len(dirs))]
    if classes:  # and the supervised direction (no labels: the principal ones alone)
        dirs = torch.cat([dirs, probe_direction(zs, members(y, C["attr"]))[None]])  # (R, z_dim)
        labels.append(f"{'attribute' if y.dim() == 2 else 'class'} {classes[C['attr']]}")
    sd = ((zs - zs.mean(0)) @ dirs.T).std(0)[:, None]  # (R, 1): spread of z along each direction
    R, hw = len(dirs), net.config.image_size
    g = torch.Generator(x.device).manual_seed(C["seed"])
    x_T = torch.randn(1, 3, hw, hw, generator=g, device=x.device).expand(R, -1, -1, -1)
    alphas = parse_list(C["alphas"])
    z0 = zs[run.at] if run.walk is None else net.encode(src[None])[0]
    cols = [decode(net, z0 + a * sd * dirs, C, C["seed"], x_T=x_T) for a in alphas]
    grid = torch.stack([src.expand(R, -1, -1, -1)] + cols, dim=1)  # (R, 1 + alphas, 3, H, W)
    png = save_grid(os.path.join(run.out, "directions.png"), grid, labels,
                    ["source"] + [f"{a:+g} sd" for a in alphas])
    return {"files": [png], "images": grid, "directions": dirs}


def mix(run, C):
    """§4.3 layer-wise mixing: section s from A and the rest from B; and only section s of A with
    the other sections unconditioned (z_on = 0 there: layer-wise guidance, §3.2.1). One seed for
    every row, so rows differ only in what conditions the decoder."""
    net, xs = run.net, pick(run, 2 * run.n_show)
    x_a, x_b = xs[0::2], xs[1::2]
    z_a, z_b = net.encode(x_a), net.encode(x_b)
    S = net.n_sections
    only = lambda s: F.one_hot(torch.tensor([s]), S).float().to(xs.device)  # (1, S)
    rows = [("A", z_a, None), ("B", z_b, None)]
    rows += [(f"sec {s} from A, rest B", mix_latents(net, z_a, z_b, [s]), None) for s in range(S)]
    rows += [(f"only sec {s} of A", z_a, only(s)) for s in range(S)]
    rows += [("unconditional", z_a, torch.zeros(1, S, device=xs.device))]
    samples = [decode(net, z, C, C["seed"], z_on=z_on) for _, z, z_on in rows]
    grid = torch.stack([x_a, x_b] + samples)  # (2 + rows, pairs, 3, H, W)
    labels = ["source A", "source B"] + [r[0] for r in rows]
    png = save_grid(os.path.join(run.out, "mix.png"), grid, labels, [f"pair {i}" for i in range(len(x_a))])
    return {"files": [png], "images": grid, "labels": labels}


def random_samples(run, C):
    """Unconditional samples (z_on = 0) beside samples guided by each source's z at several
    scales w (§3.2.1), with the same noise along a row."""
    net, xs = run.net, pick(run, run.n_show)
    z = net.encode(xs)
    uncond = torch.zeros(1, net.n_sections, device=xs.device)
    ws_ = parse_list(C["ws"])
    cols = [decode(net, z, C, C["seed"], z_on=uncond, w=1.0)] + [decode(net, z, C, C["seed"], w=w) for w in ws_]
    grid = torch.stack([xs] + cols, dim=1)  # (n_show, 2 + len(ws), 3, H, W)
    png = save_grid(os.path.join(run.out, "random.png"), grid, [f"image {run.index + i}" for i in range(len(xs))],
                    ["source", "uncond"] + [f"w={w:g}" for w in ws_])
    return {"files": [png], "images": grid}


MODES = {"recon": recon, "interp": interp, "directions": directions, "mix": mix, "random": random_samples}
# the test images a mode reads from index on
IMAGES = {"recon": lambda C: C["n"], "interp": lambda C: 2, "directions": lambda C: 1,
          "mix": lambda C: 2 * C["n_show"], "random": lambda C: C["n_show"]}


def members(y, attr):
    """Which images have class `attr` (labels (N,)) or attribute `attr` (CelebA's (N, 40))."""
    return y[:, attr] == 1 if y.dim() == 2 else y == attr


def check_attr(y, classes, C):
    if not classes:  # a folder without labels: the principal directions alone
        return
    what = "an attribute" if y.dim() == 2 else "a class"
    if not 0 <= C["attr"] < len(classes) or not members(y, C["attr"]).any():
        raise ConfigError(f"attr must be {what} index present in the test images (0..{len(classes) - 1}), "
                          f"got {C['attr']}")


def check_images(n_test, y, classes, C, index):
    """The test images (and class) the mode reads from test image `index` on exist: one error naming
    the keys, before any file is written. y: the labels of the images directions reads."""
    k = IMAGES[C["mode"]](C)
    if index + k > n_test:
        keys = {"recon": f"index={index}, n={C['n']}", "mix": f"index={index}, n_show={C['n_show']} (pairs)",
                "random": f"index={index}, n_show={C['n_show']}"}.get(C["mode"], f"index={index}")
        fix = f"index must be <= {n_test - k}" if k <= n_test else f"it has fewer than the {k} images the mode reads"
        raise data.DataError(f"{keys}: mode={C['mode']!r} reads test images {index}..{index + k - 1}, but "
                             f"the test split has {n_test} ({fix})")
    if C["mode"] == "directions":
        check_attr(y, classes, C)


TEST_SPLIT = {"cifar10": "test split", "folder": "val/ or held-out part", "imagenet": "val/ or held-out part",
              "celeba": "test partition"}
DIRECTIONS_FROM_FILES = 2_000  # directions on images read from files: z of this many test images, a fixed random choice


def read_test_images(C, train_cfg, index):
    """-> (uint8 images, labels, class or attribute names, the row of test image `index` among them,
    what they are): the test images the mode reads, and no others for sets read from files
    (ImageNet's val folder, CelebA). CIFAR-10 is held in memory whole; directions on a set read from
    files takes the z of DIRECTIONS_FROM_FILES test images (a fixed random choice) and image `index`."""
    data_dir = C["data_dir"] or train_cfg["data_dir"]
    if train_cfg["dataset"] == "cifar10":
        data_dir, why, download = data.find_cifar10(data_dir)  # '' searches as train.py does
        print(f"data: using {data_dir} ({why})")
        x, y, classes = data.load_cifar10(data_dir, "test", download)
        check_images(len(x), y, classes, C, index)
        return x, y, classes, index, f"{data_dir} test split"
    test_set = data.load(train_cfg["dataset"], data_dir, "test", train_cfg["image_size"], n_val=train_cfg["n_val"],
                         seed=train_cfg["seed"])
    classes = test_set.classes if isinstance(test_set, data.FolderData) else test_set.names
    if C["mode"] == "directions":
        ref = data.fixed_choice(len(test_set), DIRECTIONS_FROM_FILES, C["seed"])
        rows = sorted(set(ref.tolist()) | {index}) if index < len(test_set) else []
    else:
        rows = list(range(index, min(index + IMAGES[C["mode"]](C), len(test_set))))
    check_images(len(test_set), test_set.targets[rows], classes, C, index)
    about = getattr(test_set, "about", f"{data_dir} {TEST_SPLIT[train_cfg['dataset']]}")
    print(f"data: {len(rows):,} of the {len(test_set):,} images of the {train_cfg['dataset']} "
          f"{TEST_SPLIT[train_cfg['dataset']]}: {about}")
    x, y, bad = zip(*(test_set[i] for i in rows))
    data.warn_unreadable(bad, set(), "the next readable test image is in its place")  # the rows keep their index
    return torch.stack(x), torch.stack([torch.as_tensor(v) for v in y]), classes, rows.index(index), about


def read_own_images(C, size):
    """--images: your files -> (uint8 images (N, 3, size, size), what they are), or one error when
    there are fewer than the mode reads from index on."""
    x, files = data.read_images(C["images"], size)
    n, k = len(x), len(x) - C["index"]
    need = 2 if C["mode"] in ("interp", "mix") else 1
    if k < need:
        raise data.DataError(f"images={C['images']!r}: mode={C['mode']!r} reads {need} image(s) from "
                             f"index={C['index']}, but {n} {'was' if n == 1 else 'were'} given")
    print(f"data: {n} of your images ({', '.join(files[:3])}{', ...' if n > 3 else ''}), made RGB, short side "
          f"resized and centre-cropped to {size}x{size}")
    return x, f"your images {C['images']} ({n} file{'s' if n > 1 else ''})"


def read_images(C, train_cfg, dev):
    """The one place images are read -> the run (a SimpleNamespace): x, the images in [-1, 1] on dev;
    y and classes, their labels and class (or attribute) names (your images: none); index, the test
    image a mode starts from, at row `at` of x; about, what they are; walk, the image directions
    walks (yours, --images) or None; n and n_show, the counts the modes read, fitted to your images."""
    run = SimpleNamespace(y=None, classes=[], index=C["index"], walk=None, n=C["n"], n_show=C["n_show"])
    if C["images"]:
        x, run.about = read_own_images(C, train_cfg["image_size"])
        k = len(x) - C["index"]
        run.n, run.n_show, run.at = min(C["n"], k), min(C["n_show"], k // 2 if C["mode"] == "mix" else k), C["index"]
        if C["mode"] == "directions":  # your image walks along the directions of the test split (from image 0)
            run.walk, run.index = data.to_signed(x[C["index"]].to(dev)), 0
    if not C["images"] or run.walk is not None:
        x, y, run.classes, run.at, about = read_test_images(C, train_cfg, run.index)
        run.y = y.to(dev)
        run.about = about if run.walk is None else f"{run.about}, directions from {about}"
    run.x = data.to_signed(x.to(dev))  # (N, 3, S, S) in [-1, 1]
    return run


def check(C):
    """Every check of the config alone, made once, before anything is loaded: one ConfigError naming
    the key. -> the output directory."""
    check_keys(C, {"mode": tuple(MODES), "sampler": tuple(D.SAMPLERS)},
               [(("steps", "n", "n_show", "n_dirs", "batch"), lambda v: v >= 1, ">= 1"),
                (("frames",), lambda v: v >= 2, ">= 2"), (("index", "threads"), lambda v: v >= 0, ">= 0"),
                (("guidance",), lambda v: True, "finite"),
                (("invert_logsnr",), lambda v: D.LOGSNR_MIN <= v < D.LOGSNR_MAX,
                 f"in [{D.LOGSNR_MIN:g}, {D.LOGSNR_MAX:g}) (the log-SNR range the model knows)"), SEED_RANGE])
    check_schedules(C, "schedule")
    check_device(C["device"])
    for key in ("alphas", "ws"):  # the lists, parsed now: a typo is an error before any work
        try:
            parse_list(C[key])
        except ConfigError:
            raise ConfigError(f"{key}={C[key]!r}: expected comma-separated numbers, e.g. 1,2,3") from None
    if C["mode"] == "directions" and not parse_list(C["alphas"]):
        raise ConfigError("alphas='' gives the directions grid no steps: name some, e.g. -2,0,2")
    parse_groups(C["sections"])
    out = C["out_dir"] or os.path.join(os.path.dirname(C["ckpt"]) or ".", "samples")
    if C["out_dir"] or os.path.isdir(os.path.dirname(C["ckpt"]) or "."):  # (else: no checkpoint, said below)
        check_out_dir("out_dir", out)  # before anything heavy is loaded; made only once every input is known good
    return out


def check_model(net, train_cfg, C):
    """What the checkpoint's model and data allow: one error, before any image is read."""
    own = C["images"] and C["mode"] != "directions"  # your images alone: no dataset read
    if train_cfg["dataset"] not in TEST_SPLIT and not own:
        shows = " (nvs.py shows its novel views)" if train_cfg["dataset"] in multiview.MULTIVIEW else ""
        raise data.DataError(f"sample.py reads {', '.join(TEST_SPLIT)}; the checkpoint was trained on "
                             f"{train_cfg['dataset']!r}{shows}")
    if train_cfg["ray_freqs"]:
        raise data.DataError(f"the checkpoint's model reads camera rays (ray_freqs={train_cfg['ray_freqs']}), and "
                             f"{train_cfg['dataset']} has no cameras, so sample.py cannot run it")
    if C["mode"] == "interp":
        interp_groups(net, C)


def main(argv):
    C = configure(argv, DEFAULTS)
    out = check(C)
    if C["threads"] > 0:
        torch.set_num_threads(C["threads"])
    dev = runtime.pick_device(C["device"])
    net, train_cfg = model_from_checkpoint(C["ckpt"], dev)
    check_model(net, train_cfg, C)
    run = read_images(C, train_cfg, dev)
    run.net, run.out, run.step = net, out, train_cfg["step"]
    run.model = f"checkpoint {C['ckpt']} step {train_cfg['step']}"
    os.makedirs(out, exist_ok=True)
    with torch.no_grad():
        res = MODES[C["mode"]](run, C)
    print(f"{C['mode']}: {run.about}; {run.model}")
    for path in res["files"]:
        print(f"wrote {path}")
    return res


if __name__ == "__main__":
    configurator.plain_warnings()
    try:
        main(sys.argv[1:])
    except (ConfigError, CheckpointError, data.DataError) as e:
        sys.exit(f"error: {e}")
