"""
What every script shares to read a trained SODA and to show it: checkpoints (written atomically,
read with weights_only=True) and the model they hold, the image metrics PSNR and SSIM, and
pictures (grids, labelled columns, GIFs). train.py, probe.py, sample.py and nvs.py import it.
"""
import contextlib
import dataclasses
import os
import re

import torch
import torch.nn.functional as F

import diffsiam
import model as M


# -----------------------------------------------------------------------------
# checkpoints

class CheckpointError(Exception):
    pass


def checkpoint_path(path, age):
    """The checkpoint saved `age` saves before path's (train.py's ckpt_keep_last): path itself (age 0),
    then out/ckpt.1.pt, out/ckpt.2.pt, ..."""
    root, ext = os.path.splitext(path)
    return f"{root}.{age}{ext}" if age else path


def saved_checkpoints(path):
    """path and its older checkpoints (checkpoint_path) that are on disk, newest first."""
    root, ext = os.path.splitext(path)
    folder = os.path.dirname(path) or "."
    older = re.compile(re.escape(os.path.basename(root)) + r"\.(\d+)" + re.escape(ext))
    names = os.listdir(folder) if os.path.isdir(folder) else []
    ages = sorted(int(m.group(1)) for m in map(older.fullmatch, names) if m)
    return [p for p in (checkpoint_path(path, a) for a in [0] + ages) if os.path.isfile(p)]


def save_checkpoint(obj, path, keep=1):
    """Atomic: write a temporary file, flush it to disk, then rename over the old checkpoint, so an
    interrupted write leaves the previous checkpoint intact. keep > 1: the keep - 1 checkpoints before
    it stay, each renamed one age on (checkpoint_path) once the new one is written; older ones go. A
    write that fails (a full disk) removes its temporary file: one CheckpointError naming the path."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:  # a full disk (torch.save's writer fails as a RuntimeError), Ctrl-C
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"could not write {path!r} ({type(e).__name__}: {why})") from None
    for age in range(keep - 1, 0, -1):  # ckpt.1.pt -> ckpt.2.pt, then ckpt.pt -> ckpt.1.pt
        if os.path.isfile(checkpoint_path(path, age - 1)):
            os.replace(checkpoint_path(path, age - 1), checkpoint_path(path, age))
    os.replace(tmp, path)
    for old in saved_checkpoints(path)[keep:]:  # the keep newest stay (a run resumed with a smaller ckpt_keep_last)
        os.remove(old)


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
        held = (f"a dict of {', '.join(map(repr, list(ckpt)[:6]))}" if isinstance(ckpt, dict)
                else f"a {type(ckpt).__name__}")
        raise CheckpointError(f"{path!r} is not a SODA checkpoint (no config/ema entries): train.py's hold a 'config' "
                              f"dict and 'ema' weights, this file holds {held}")
    return ckpt


def _load_failure(path, e):
    # torch.load's error -> a few words: its messages run to many lines of advice
    msg = str(e)
    if "WeightsUnpickler error:" in msg:
        detail = " ".join(msg.split("WeightsUnpickler error:", 1)[1].split())
        if detail.startswith("Unsupported global"):
            what = detail.split(" was not")[0]
            return f"it holds Python objects besides tensors ({what}), which weights_only refuses"
        with open(path, "rb") as f:
            head = f.read(8)
        return f"not a torch.save file (it starts with {head!r})"
    lines = msg.strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def model_args(cfg):
    """A train.py config -> the model's arguments: SODAConfig's fields, and DiffSiamConfig's where they
    describe the thesis' variant (is_diffsiam). A key the config lacks (a checkpoint written before
    the key existed) takes the field's default, which is what the model was then."""
    args = {f.name: cfg.get(f.name, f.default) for f in dataclasses.fields(diffsiam.DiffSiamConfig)}
    # the SimSiam heads exist only where their loss is used; the frozen denoiser where one is named
    args.update(simsiam_dim=args["simsiam_dim"] if cfg.get("simsiam_weight", 0) > 0 else 0,
                pdae=bool(cfg.get("pretrained")))
    if is_diffsiam(args):
        return args
    return {f.name: args[f.name] for f in dataclasses.fields(M.SODAConfig)}


def is_diffsiam(args):
    """Which model a model's arguments describe: DiffSiam where one of the thesis' three changes is on
    (z in segments, SimSiam heads, PDAE's frozen denoiser), else SODA."""
    return bool(args.get("segments") or args.get("simsiam_dim") or args.get("pdae"))


def build_model(args):
    """model_args -> SODA(SODAConfig(**args)), or DiffSiam(DiffSiamConfig(**args)) (is_diffsiam)."""
    if is_diffsiam(args):
        return diffsiam.DiffSiam(diffsiam.DiffSiamConfig(**args))
    return M.SODA(M.SODAConfig(**args))


# what every train.py checkpoint's config holds, and the scripts read besides the model's arguments
CONFIG_KEYS = ("dataset", "data_dir", "image_size", "encoder", "unet", "z_dim", "cond", "ray_freqs")


def model_of(ckpt, path, which="ema"):
    """The model a loaded checkpoint describes (its model_args; one written before them: its config),
    with its `which` weights (None: left at their init); a config or weights this code cannot build
    or load is one CheckpointError."""
    missing = [k for k in CONFIG_KEYS if k not in ckpt["config"]]
    if missing:
        raise CheckpointError(f"{path!r} is not a train.py checkpoint: its config has no {', '.join(missing)}")
    try:
        net = build_model(ckpt.get("model_args") or model_args(ckpt["config"]))
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

def pyplot():
    """matplotlib's pyplot, drawing into files only (the Agg backend: no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def to_unit(x):
    # [-1, 1] -> [0, 1] on the 8-bit levels a saved image has
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 255


def save_grid(path, images, row_labels, col_labels=()):
    """images (R, C, 3, H, W) in [-1, 1] -> a PNG with a label per row (and column)."""
    plt = pyplot()
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
