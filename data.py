"""
Data for SODA: datasets -> batches of views (x_src, x_tgt, label), paper §3.3 and §4.1.

Small sets (CIFAR-10) live in memory as one uint8 tensor; a batch is gathered by index and
augmented as a whole batch on the training device (one affine grid_sample for crops, flips,
rotations and shears; elementwise ops for colour). Large sets (ImageNet, CelebA) are decoded by DataLoader
workers, then augmented the same batched way. Every random number comes from `Rng`: drawn for the
global batch and sliced to this process's rows, from a generator seeded by (seed, step). So a
DDP run equals one process on the same global batch, and resuming at a step replays it exactly.
This file imports no other project file.
"""
import copy
import functools
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F


class DataError(Exception):
    """A data problem the user can fix; train.py prints it as one line."""


def from_worker(e):
    """A DataError raised in a DataLoader worker reaches the main process with the worker's
    traceback as its message: the same error, with only the line the worker's raise said."""
    return DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1])


def to_signed(x):
    """uint8 images (0..255) -> float32 in [-1, 1], the range the networks read (common.to_unit goes
    back to [0, 1])."""
    return x.float() / 127.5 - 1


class Rng:
    """Per-sample random numbers for a global batch of `n` samples, of which this process holds
    `rows`. Every process draws the same numbers, in the same order, from a generator seeded by
    (seed, step)."""

    def __init__(self, seed, step, n, rows=slice(None), device="cpu"):
        self.n, self.rows, self.device = n, rows, torch.device(device)
        self.g = torch.Generator(self.device).manual_seed(seed * 1_000_003 + step)

    def rand(self, *shape):
        return torch.rand(self.n, *shape, generator=self.g, device=self.device)[self.rows]

    def randn(self, *shape):
        return torch.randn(self.n, *shape, generator=self.g, device=self.device)[self.rows]

    def randint(self, high, *shape):
        return torch.randint(high, (self.n, *shape), generator=self.g, device=self.device)[self.rows]

    def shared_randint(self, high):
        """One integer in [0, high), the same on every process (e.g. the number of source views)."""
        return int(torch.randint(high, (1,), generator=self.g, device=self.device))


# -----------------------------------------------------------------------------
# Batched augmentations on float images in [0, 1], (B, 3, H, W)

@functools.lru_cache(maxsize=None)
def constant(values, device):
    """A tensor of Python numbers (nested tuples), made once per device: built inside a training
    step, it would be copied from the host every step (on CUDA, a wait for the GPU)."""
    return torch.tensor(values, device=device)


@functools.lru_cache(maxsize=None)
def yiq_matrices(device):
    """RGB -> YIQ and its inverse (for the hue rotation), inverted once on the CPU, then copied."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    return yiq.to(device), torch.linalg.inv(yiq).to(device)


def _affine(x, theta, size=None):
    # theta (B, 2, 3) maps output coords to input coords, in [-1, 1]; reflect at the borders; the
    # output is size x size (default: x's size)
    shape = list(x.shape) if size is None else [*x.shape[:2], size, size]
    grid = F.affine_grid(theta, shape, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def crop_flip_theta(rng, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), aspect=None):
    """RandomResizedCrop + horizontal flip as one affine map per image (B, 2, 3): a crop of `area`
    of the image with the pixel aspect ratio r (width / height). aspect (B,): each image's width /
    height before it was squashed to a square (FolderData.whole_images), so that r is the crop's
    aspect in the original picture, as torchvision's RandomResizedCrop cuts it there."""
    area = scale[0] + (scale[1] - scale[0]) * rng.rand()
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rng.rand()
    r = logr.exp() if aspect is None else logr.exp() / aspect  # the crop's aspect in the square's units
    w = (area * r).sqrt().clamp(max=1)  # crop size as a fraction of the image
    h = (area / r).sqrt().clamp(max=1)
    cx, cy = (1 - w) * (2 * rng.rand() - 1), (1 - h) * (2 * rng.rand() - 1)
    flip = torch.where(rng.rand() < 0.5, -1.0, 1.0)
    zero = torch.zeros_like(w)
    return torch.stack([torch.stack([w * flip, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)


def gray(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_jitter(x, rng, b=0.4, c=0.4, s=0.4, h=0.1, p=0.8, p_gray=0.2):
    """SimCLR colour distortion, per image: brightness, contrast, saturation, hue (a rotation in
    YIQ space), applied with probability p; then grayscale with probability p_gray."""
    B = x.shape[0]
    u = lambda r: (1 - r + 2 * r * rng.rand())[:, None, None, None]  # factor in [1 - r, 1 + r]
    bf, cf, sf = u(b), u(c), u(s)
    angle = (2 * rng.rand() - 1) * h * 2 * math.pi
    on, to_gray = rng.rand()[:, None, None, None] < p, rng.rand()[:, None, None, None] < p_gray
    y = x * bf
    y = (y - gray(y).mean(dim=(2, 3), keepdim=True)) * cf + gray(y).mean(dim=(2, 3), keepdim=True)
    y = gray(y) + (y - gray(y)) * sf
    yiq, yiq_inv = yiq_matrices(x.device)
    cos, sin = angle.cos(), angle.sin()
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rot = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                       torch.stack([zero, sin, cos], 1)], 1)  # (B, 3, 3)
    M = yiq_inv @ rot @ yiq
    y = torch.einsum("bij,bjhw->bihw", M, y).clamp(0, 1)
    y = torch.where(on, y, x)
    return torch.where(to_gray, gray(y).expand(-1, 3, -1, -1), y)


def randaugment(x, rng, n_ops=2, magnitude=9):
    """RandAugment (Cubuk et al. 2020), batched: each image draws n_ops ops from the list below at
    a fixed magnitude (of 30), signs at random. Every op runs on the whole batch and each image keeps
    its own; at 32x32 or on a GPU that is cheaper than a Python loop over images."""
    m = magnitude / 30
    ops = ["identity", "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
           "autocontrast", "rotate", "shear_x", "shear_y", "translate_x", "translate_y"]
    B = x.shape[0]
    eye = torch.eye(2, 3, device=x.device).expand(B, 2, 3)
    row0, row1 = constant(((1.0,), (0.0,)), x.device), constant(((0.0,), (1.0,)), x.device)
    for _ in range(n_ops):
        op = rng.randint(len(ops))
        sign = torch.where(rng.rand() < 0.5, -1.0, 1.0)[:, None, None, None]
        f = 1 + sign * 0.9 * m  # enhancement factor
        mean = gray(x).mean(dim=(2, 3), keepdim=True)
        blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
        lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
        bits = 8 - int(round(4 * m))
        s = sign.view(B, 1)
        rot = s * m * math.pi / 6  # up to 30 degrees
        shear, shift = s * 0.3 * m, s * 0.45 * m
        thetas = {
            "rotate": torch.cat([torch.cat([rot.cos(), -rot.sin(), 0 * rot], 1)[:, None],
                                 torch.cat([rot.sin(), rot.cos(), 0 * rot], 1)[:, None]], 1),
            "shear_x": eye + F.pad(shear, (1, 1))[:, None, :] * row0,
            "shear_y": eye + F.pad(shear, (0, 2))[:, None, :] * row1,
            "translate_x": eye + F.pad(shift, (2, 0))[:, None, :] * row0,
            "translate_y": eye + F.pad(shift, (2, 0))[:, None, :] * row1,
        }
        outs = {
            "identity": x,
            "brightness": x * f,
            "color": gray(x) + (x - gray(x)) * f,
            "contrast": mean + (x - mean) * f,
            "sharpness": blur + (x - blur) * f,
            "posterize": torch.floor(x * 255 / 2 ** (8 - bits)) * 2 ** (8 - bits) / 255,
            "solarize": torch.where(x >= 1 - m, 1 - x, x),
            "autocontrast": (x - lo) / (hi - lo).clamp(min=1e-3),
        }
        for name, theta in thetas.items():
            outs[name] = _affine(x, theta)
        stacked = torch.stack([outs[k] for k in ops])  # (n_ops_total, B, 3, H, W)
        x = stacked[op, torch.arange(B, device=x.device)].clamp(0, 1)
    return x


GAUSSIAN_STD = 0.1  # aug='gaussian': std of the pixel noise, images in [0, 1]


def augment(x, aug, rng, crop_min=0.25, aspect=None, size=None):
    """uint8 or [0,1] images (B, 3, H, W) -> augmented images in [0, 1]. aug: 'none' | 'cropflip'
    (light: crop + flip) | 'simclr' (+ colour jitter) | 'randaugment' (crop + flip + RandAugment) |
    'gaussian' (CelebA, §4.1 "Gaussian data augmentation": a horizontal flip and additive N(0,
    GAUSSIAN_STD^2) pixel noise, clipped to [0, 1]; the paper names no more, so no crop: the faces
    stay aligned). crop_min: the smallest crop, as a fraction of the image's area. Whole images
    decoded larger (FolderData.whole_images): their aspect (B,) and the views' size."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    if aug == "none":
        return x
    if aug == "gaussian":
        flip = (rng.rand() < 0.5).view(-1, 1, 1, 1)
        return (torch.where(flip, x.flip(-1), x) + GAUSSIAN_STD * rng.randn(*x.shape[1:])).clamp(0, 1)
    if aug not in ("cropflip", "simclr", "randaugment"):
        raise ValueError(f"aug must be 'none', 'cropflip', 'simclr', 'randaugment' or 'gaussian', got {aug!r}")
    x = _affine(x, crop_flip_theta(rng, scale=(crop_min, 1.0), aspect=aspect), size)
    if aug == "simclr":
        x = color_jitter(x, rng)
    elif aug == "randaugment":
        x = randaugment(x, rng)
    return x


def make_views(x, views, aug, rng, x_other=None, crop_min=0.25, aspect=None, size=None):
    """A batch of images -> (x_src, x_tgt) in [-1, 1] (§3.3, §4.1).
    'augment': two independent augmentations of each image (novel views);
    'identical': one augmentation used as both (auto-encoding, the "w/o novel views" ablation);
    'distort': one augmentation as the target, the same view colour-distorted as the source (SimCLR's
    jitter and grey): z must carry what survives the distortion, the decoder restores the colours;
    'class': the source is x_other, another image of the same class.
    aspect, size: whole images decoded larger, cropped to size x size views (augment)."""
    if views == "augment":
        src, tgt = (augment(x, aug, rng, crop_min, aspect, size) for _ in range(2))
    elif views == "identical":
        src = tgt = augment(x, aug, rng, crop_min, aspect, size)
    elif views == "distort":
        tgt = augment(x, aug, rng, crop_min, aspect, size)
        src = color_jitter(tgt, rng)
    elif views == "class":
        src, tgt = augment(x_other, aug, rng, crop_min), augment(x, aug, rng, crop_min)
    else:
        raise ValueError(f"views must be 'augment', 'identical', 'distort' or 'class', got {views!r}")
    return src * 2 - 1, tgt * 2 - 1


# -----------------------------------------------------------------------------
# Datasets

CIFAR_HINT = ("CIFAR-10 is read from DATA_DIR/cifar-10-batches-py (torchvision's layout), from "
              "DATA_DIR/train/<class>/*.png + DATA_DIR/test/<class>/*.png (ImageFolder), or "
              "downloaded there with --download=True on a machine with internet")
CIFAR_SEARCH = ("data/cifar10", "../shared/data/cifar10-subset")  # data_dir='' looks here, relative to the cwd


def has_cifar10(d):
    return os.path.isdir(os.path.join(d, "cifar-10-batches-py")) or \
        os.path.isdir(os.path.join(d, "train")) and os.path.isdir(os.path.join(d, "test"))


def find_cifar10(data_dir="", download=False):
    """Where CIFAR-10 comes from -> (path, reason, download). data_dir if given; else the first of
    CIFAR_SEARCH that holds it; else a torchvision download into CIFAR_SEARCH[0] (needs internet)."""
    if data_dir:
        return data_dir, "data_dir", download
    for d in CIFAR_SEARCH:
        if has_cifar10(d):
            return d, f"found by the search order {' -> '.join(CIFAR_SEARCH)}", False
    return CIFAR_SEARCH[0], f"none in {' or '.join(CIFAR_SEARCH)}: downloading with torchvision (needs internet)", True


def _load_cifar_records(data_dir, train):
    import torchvision

    class PartialCIFAR10(torchvision.datasets.CIFAR10):
        def _check_integrity(self):  # a cut copy (like ../shared/data) fails the md5: read it anyway
            return os.path.isdir(os.path.join(self.root, self.base_folder))

    try:
        ds = PartialCIFAR10(data_dir, train=train, download=False)
    except Exception as e:  # a missing, cut short or foreign batch file
        where = os.path.join(os.path.abspath(data_dir), "cifar-10-batches-py")
        raise DataError(f"cannot read the CIFAR-10 records in {where!r} ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]}): {CIFAR_HINT}") from None
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), ds.classes


def to_rgb(img):
    """A PIL image of any mode -> uint8 (H, W, 3): turned upright by its EXIF orientation (phone
    photos), 16-bit and float grey scaled to 8 bits (PIL's convert would clip them white), and
    transparency (RGBA, LA, palette) laid on white."""
    from PIL import Image, ImageOps
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "F" else (1.0 if a.max() <= 1 else a.max())
        img = Image.fromarray((a / top * 255).clip(0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    return np.array(img.convert("RGB"))


def read_rgb(path):
    """An image file -> uint8 (H, W, 3) (to_rgb; a multi-page file: its first page). A file PIL cannot
    read is one DataError naming it: cut short, empty, not an image, or over PIL's decompression-bomb
    limit (more than twice Image.MAX_IMAGE_PIXELS: DecompressionBombError). One between once and twice
    the limit is read, without PIL's DecompressionBombWarning, which every DataLoader worker would print
    without naming the file."""
    from PIL import Image
    # the filter below, added once rather than around each read: after any change of the filters Python
    # shows again the warnings it has shown once (a partial data copy's, ...)
    if ("ignore", None, Image.DecompressionBombWarning, None, 0) not in warnings.filters:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except Exception as e:
        detail = (str(e).splitlines() or [""])[0].replace(f" {str(path)!r}", "")[:120]  # PIL's may name the file again
        raise DataError(f"cannot read image file {path!r} ({type(e).__name__}{': ' * bool(detail)}{detail})") from None


def read_or_next(files, i):
    """File i as uint8 (H, W, 3) (read_rgb); one that cannot be read is replaced by the next file that
    can (i + 1, i + 2, ..., on from the first after the last): a function of i alone, so a resumed run
    replays the same images. -> (image, the index read, file i's DataError message or '' where it read)."""
    bad = ""
    for k in range(len(files)):
        j = (i + k) % len(files)
        try:
            return read_rgb(files[j]), j, bad
        except DataError as e:
            bad = bad or str(e)  # file i's own error: the one this item reports
    raise DataError(f"not one of the {len(files):,} image files can be read ({bad})")


# A split is tried at start on READ_CHECK of its files (a fixed random choice): when more than half of
# them cannot be read, it is refused there, before any step. A few bad files (a camera's leftovers, a
# cut download) are replaced as they are met (read_or_next), but a mostly unreadable split is the wrong
# folder or a broken copy, where training would repeat its few good images. With 64 files tried, a split
# with 30% bad files passes with probability 99.97%, one with 70% is refused with 99.94% (binomial).
READ_CHECK = 64


def check_readable(files, about):
    """One DataError, naming the first unreadable file, when more than half of READ_CHECK files of the
    split (all of a smaller one) cannot be read."""
    bad = []
    for i in fixed_choice(len(files), READ_CHECK).tolist():
        try:
            read_rgb(files[i])
        except DataError as e:
            bad.append(str(e))
    if 2 * len(bad) > min(len(files), READ_CHECK):
        raise DataError(f"{about}: {len(bad)} of the {min(len(files), READ_CHECK)} image files tried cannot be read, "
                        f"e.g. {bad[0]}: is it the right folder, and is its copy complete?")


def warn_unreadable(bad, seen, what):
    """A warning for each unreadable file the first time it is met: `bad` holds the items' DataError
    messages ('' where the file read: read_or_next), `seen` the messages said so far (updated). The
    DataLoader workers put them in the batch; the process that reads the batches warns, once."""
    for msg in bad:
        if msg and msg not in seen:
            seen.add(msg)
            warnings.warn(f"{msg}: {what}", stacklevel=2)


def _load_image_folder(root):
    """An image folder root/<class>/<image> held in memory -> (uint8 (N, 3, H, W), labels (N,), class
    names); its images must share one size."""
    files, labels, classes = list_images(root, min_classes=1) if os.path.isdir(root) else ([], None, [])
    if labels is None:
        raise DataError(f"{os.path.abspath(root)!r} is not an image folder (<class>/<image> files): "
                        + ("some images lie outside a class folder" if files else "no image files in class folders"))
    images = []
    for path in files:
        try:
            img = read_rgb(path)  # (H, W, 3)
        except DataError as e:  # held in memory whole, image by image: every file must read
            raise DataError(f"{e}: remove or replace it") from None
        if images and img.shape != images[0].shape:
            (h, w), (h0, w0) = img.shape[:2], images[0].shape[:2]
            raise DataError(f"image {path!r} is {w}x{h}, but {files[0]!r} is {w0}x{h0}: "
                            "the images of a folder must share one size")
        images.append(torch.from_numpy(img))
    x = torch.stack(images)
    return x.permute(0, 3, 1, 2).contiguous(), labels, classes


def load_cifar10(data_dir, split="train", download=False, n_val=500, seed=0):
    """CIFAR-10 as (uint8 images (N, 3, 32, 32), labels (N,), class names). split: 'train' | 'val' |
    'test'; 'val' is n_val images carved from the training set with a fixed seed, 'train' the rest."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    train = split != "test"
    records = os.path.join(data_dir, "cifar-10-batches-py")
    folder = os.path.join(data_dir, "train" if train else "test")
    if os.path.isdir(records):
        x, y, classes = _load_cifar_records(data_dir, train)
    elif os.path.isdir(folder) and os.path.isdir(os.path.join(data_dir, "test")):
        x, y, classes = _load_image_folder(folder)
    elif download:
        import torchvision
        try:
            torchvision.datasets.CIFAR10(data_dir, train=train, download=True)
        except Exception as e:
            msg = (str(e).splitlines() or [""])[0][:200]
            raise DataError(f"could not download CIFAR-10 to {data_dir!r} ({type(e).__name__}: {msg}). "
                            f"{CIFAR_HINT}") from None
        x, y, classes = _load_cifar_records(data_dir, train)
    else:
        raise DataError(f"no CIFAR-10 found in {os.path.abspath(data_dir)!r}. {CIFAR_HINT}")
    full = 50_000 if train else 10_000
    if len(x) < full:
        warnings.warn(f"CIFAR-10 {'train' if train else 'test'}: found {len(x):,} of {full:,} images "
                      f"in {data_dir!r}; this is a partial copy", stacklevel=2)
    if x.shape[-2:] != (32, 32):
        raise DataError(f"CIFAR-10 images in {data_dir!r} are {tuple(x.shape[-2:])}, expected (32, 32)")
    if train:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        idx = perm[:n_val] if split == "val" else perm[n_val:]
        x, y = x[idx], y[idx]
    return x, y, classes


CROP_AUGS = ("cropflip", "simclr", "randaugment")  # the augmentations that start with a random crop


def decode_size(image_size, crop_min):
    """The side whole images are decoded at for training: the smallest crop (crop_min of the area,
    sqrt(crop_min) of the side) still has image_size pixels across, so it is never upsampled."""
    return 8 * math.ceil(image_size / math.sqrt(crop_min) / 8)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff")


def list_images(root, min_classes=2):
    """The image files under root at any depth -> (paths, labels or None, class names), in
    torchvision ImageFolder's order (root's own files, then each subfolder by name, walked in sorted
    order); hidden files and folders ('.*') are skipped. The first-level subfolders are the classes
    when every image lies inside one and at least min_classes hold images; else there are no labels."""
    is_image = lambda f: f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
    top = sorted(e for e in os.listdir(root) if not e.startswith("."))
    classes = [e for e in top if os.path.isdir(os.path.join(root, e))]
    paths = [os.path.join(root, f) for f in top if is_image(f) and os.path.isfile(os.path.join(root, f))]
    labels = [-1] * len(paths)
    for c, name in enumerate(classes):
        walk = []
        for dirpath, dirnames, files in os.walk(os.path.join(root, name), followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # not into hidden folders
            walk.append((dirpath, files))
        for dirpath, files in sorted(walk):
            got = [os.path.join(dirpath, f) for f in sorted(files) if is_image(f)]
            paths += got
            labels += [c] * len(got)
    labelled = -1 not in labels and len(set(labels)) >= min_classes
    return paths, (torch.tensor(labels) if labelled else None), (classes if labelled else [])


class FolderData(torch.utils.data.Dataset):
    """A folder of image files read by DataLoader workers (any depth, png / jpg / webp / bmp / ...,
    any mode and size: to_rgb): decode, resize the short side to `image_size`, centre-crop, uint8
    (3, S, S) (evaluation, probes, samples). For training, whole_images(size): each whole picture
    squashed to size x size, with its aspect ratio, so the batched random crops on the device
    (augment) cut from all of it, as RandomResizedCrop does. Labels come from class subfolders
    (list_images); without them every label is -1 and `classes` is empty. Every item ends with the
    DataError message of its file where that could not be read ('' where it read): the next readable
    file is in its place (read_or_next); a folder mostly unreadable is refused here (check_readable)."""

    def __init__(self, root, image_size, min_classes=2):
        import torchvision.transforms.v2 as T
        if not os.path.isdir(root):
            raise DataError(f"no image folder at {os.path.abspath(root)!r}")
        self.files, labels, self.classes = list_images(root, min_classes)
        if not self.files:
            raise DataError(f"no image files in {os.path.abspath(root)!r} (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                            "at any depth)")
        self.labelled = labels is not None
        self.targets = labels if self.labelled else torch.full((len(self.files),), -1)
        self.tf = T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size)])
        self.whole = 0
        self.about = f"{os.path.abspath(root)}: {len(self.files):,} images, " + \
            (f"{len(self.classes)} classes" if self.labelled else "no labels")
        check_readable(self.files, repr(os.path.abspath(root)))

    def select(self, idx, about):
        """The images at indices idx (in this order), described by `about`."""
        part = copy.copy(self)
        part.files, part.targets, part.about = [self.files[i] for i in idx], self.targets[idx], about
        return part

    def whole_images(self, size):
        """The same images for training: (uint8 (3, size, size) of the whole picture, label, width / height,
        '' or an unreadable file's message)."""
        import torchvision.transforms.v2 as T
        views = copy.copy(self)
        views.tf, views.whole = T.Resize((size, size), antialias=True), size
        return views

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img, j, bad = read_or_next(self.files, i)
        img = torch.from_numpy(img).permute(2, 0, 1)
        if self.whole:
            return self.tf(img), int(self.targets[j]), img.shape[2] / img.shape[1], bad
        return self.tf(img), int(self.targets[j]), bad


def load_folder(data_dir, split="train", image_size=32, n_val=500, seed=0):
    """Any folder of images as one split ('train' | 'val' | 'test'). With train/ and val/
    subfolders (ImageNet's layout) those are the splits ('val' and 'test' both read val/), their
    classes matched by name; otherwise every image under data_dir, of which min(n_val, a fifth)
    are held out for 'val' and 'test' (a fixed random choice by seed) and the rest is 'train'."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    root = os.path.expanduser(data_dir)
    if not os.path.isdir(root):
        raise DataError(f"no folder {os.path.abspath(root)!r}: data_dir names a folder of images")
    tr, va = os.path.join(root, "train"), os.path.join(root, "val")
    if os.path.isdir(tr) and os.path.isdir(va):
        # val/: any of train's classes
        ds = FolderData(tr if split == "train" else va, image_size, 2 if split == "train" else 1)
        if split != "train" and ds.labelled:  # val/'s classes by name, numbered as train/'s
            train_classes = [e for e in sorted(os.listdir(tr))
                             if not e.startswith(".") and os.path.isdir(os.path.join(tr, e))]
            unknown = sorted(set(ds.classes) - set(train_classes))
            if unknown:
                raise DataError(f"{va!r} has class folders train/ lacks: {', '.join(unknown[:5])}"
                                f"{' ...' if len(unknown) > 5 else ''}: val/ and train/ must share their classes")
            ds.targets = torch.tensor([train_classes.index(c) for c in ds.classes])[ds.targets]
            ds.classes = train_classes
        return ds
    ds = FolderData(root, image_size)
    n = len(ds)
    if n < 2:
        raise DataError(f"{os.path.abspath(root)!r} holds {n} image: training needs at least 2 (one is held out)")
    k = max(1, min(n_val, n // 5))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    idx = (perm[:k] if split != "train" else perm[k:]).sort().values
    why = f"n_val={n_val}, seed {seed}" if k == n_val else f"a fifth: n_val={n_val} is more; seed {seed}"
    labels = f"{len(ds.classes)} classes" if ds.labelled else "no labels"
    part = f"the other {k:,} held out" if split == "train" else "held out for validation"
    return ds.select(idx, f"{os.path.abspath(root)}: {len(idx):,} of its {n:,} images, {part} ({why}), {labels}")


def read_images(paths, image_size):
    """Your own images: comma-separated files and folders (a folder: every image in it, at any
    depth, list_images's order) -> (uint8 (N, 3, S, S), file paths). Each is made RGB (to_rgb), its
    short side resized to image_size and centre-cropped, as FolderData does for evaluation. A file
    that cannot be read is skipped with a warning naming it; when none can, one DataError."""
    import torchvision.transforms.v2 as T
    tf = T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size)])
    files = []
    for p in (s.strip() for s in paths.split(",")):
        path = os.path.expanduser(p)
        if os.path.isdir(path):
            found = list_images(path)[0]
            if not found:
                raise DataError(f"images: no image files in the folder {os.path.abspath(path)!r} "
                                f"(looked for {', '.join(IMAGE_EXTENSIONS)}, at any depth)")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        elif p:
            raise DataError(f"images: no file or folder {os.path.abspath(path)!r}")
    if not files:
        raise DataError(f"images={paths!r} names no file: give image files or folders, comma-separated")
    images, read, bad = [], [], []
    for f in files:
        try:
            images.append(tf(torch.from_numpy(read_rgb(f)).permute(2, 0, 1)))
            read.append(f)
        except DataError as e:
            bad.append(str(e))
    if not images:
        raise DataError(f"images={paths!r}: not one of its {len(files)} image files can be read ({bad[0]})")
    warn_unreadable(bad, set(), "skipped")
    return torch.stack(images), read


def load(dataset, data_dir, split="train", image_size=32, download=False, n_val=500, seed=0):
    """dataset name -> either (x uint8 (N,3,H,W), y (N,)) in memory, or a Dataset that DataLoader
    workers decode (image folders, CelebA). split: 'train' | 'val' | 'test'; a folder's val/ (or
    its held-out part) serves 'val' and 'test'."""
    if dataset == "cifar10":
        if image_size != 32:
            raise DataError(f"cifar10 images are 32x32, but image_size={image_size}")
        x, y, _ = load_cifar10(data_dir, split, download, n_val, seed)
        return x, y
    if dataset in ("folder", "imagenet"):  # 'imagenet': its train/ and val/ are one case of a folder
        return load_folder(data_dir, split, image_size, n_val, seed)
    if dataset == "celeba":  # the official partition: train / val / test
        return CelebAData(data_dir, split, image_size)
    if dataset == "dsprites":
        if image_size != 64:
            raise DataError(f"dsprites images are 64x64, but image_size={image_size}")
        x, factors = load_dsprites(data_dir, split, n_val=n_val)  # fixed split seed: probe.py's test images stay unseen
        return x, factors[:, 0]  # shape as the label for the kNN check / views='class'
    raise DataError(f"unknown dataset {dataset!r}: 'cifar10', 'folder' (or 'imagenet'), 'celeba' or 'dsprites'")


def epoch_order(n, global_batch, seed, epoch):
    """The global batches of an epoch: a permutation seeded by (seed, epoch), cut into full batches."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[: n // global_batch * global_batch].view(-1, global_batch)


def usable_cores():
    """The CPU cores this process may use: its affinity where the OS tells it (a job's cgroup, taskset),
    else all of them; under torchrun, its share of the node's (LOCAL_WORLD_SIZE processes)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def fit_workers(num_workers):
    """num_workers capped at usable_cores(): more decoding processes than cores only take turns on them
    (and torch warns that the DataLoader may run slow or freeze). -> (workers, '' or a line saying so)."""
    cores = usable_cores()
    if num_workers <= cores:
        return num_workers, ""
    return cores, f"data: {cores} DataLoader worker{'s' * (cores > 1)}, not num_workers={num_workers}: " \
                  f"this process may use {cores} CPU core{'s' * (cores > 1)}"


class StepBatches(torch.utils.data.Sampler):
    """Index batches for DataLoader workers: this process's rows of each global batch, one batch per
    micro-step (`rows`: a slice per micro-step), starting at `start` step, in the same (seed, epoch)
    order as the in-memory path."""

    def __init__(self, n, global_batch, rows, seed, start, stop):
        self.n, self.gb, self.rows, self.seed, self.start, self.stop = n, global_batch, rows, seed, start, stop

    def __iter__(self):
        per_epoch, order = self.n // self.gb, (None, None)
        for it in range(self.start, self.stop):
            epoch, i = divmod(it, per_epoch)
            if order[0] != epoch:
                order = (epoch, epoch_order(self.n, self.gb, self.seed, epoch))
            for rows in self.rows:
                yield order[1][i][rows].tolist()

    def __len__(self):
        return (self.stop - self.start) * len(self.rows)


def class_table(y):
    """For class_partners, made once: every index grouped by class (increasing within a class), and
    where each class starts in that order and how many it has."""
    count = torch.bincount(y)
    return torch.sort(y, stable=True).indices, count.cumsum(0) - count, count


def class_partners(idx, y, table, rng):
    """For views='class': for each index another index of the same class, drawn by rng: one of the
    class's indices (class_table) picked by a uniform draw, on the device (no host sync)."""
    order, start, count = table
    c = y[idx]
    return order[start[c] + (rng.rand() * count[c]).long() % count[c]]


# -----------------------------------------------------------------------------
# Datasets with attributes or factors, for probe.py (CelebA multi-label, dSprites DCI)

CELEBA_HINT = ("expected torchvision's CelebA layout: DATA_DIR/celeba/img_align_celeba/*.jpg, "
               "DATA_DIR/celeba/list_attr_celeba.txt, DATA_DIR/celeba/list_eval_partition.txt")


class CelebAData(torch.utils.data.Dataset):
    """CelebA in torchvision's layout, one split ('train' | 'val' | 'test': the official partition
    0 / 1 / 2), read by DataLoader workers: (uint8 (3, S, S), attributes (40,) in {0, 1}, '' or the
    DataError message of an unreadable file: as FolderData's). Images are resized (short side) and
    centre-cropped to image_size; n > 0 keeps the first n."""

    def __init__(self, data_dir, split="train", image_size=64, n=0):
        import torchvision.transforms.v2 as T
        root = os.path.join(data_dir, "celeba")
        paths = [os.path.join(root, p) for p in ("img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt")]
        for p in paths:
            if not os.path.exists(p):
                raise DataError(f"no {os.path.abspath(p)!r}: {CELEBA_HINT}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        # list_attr_celeba.txt: a count line, a line of 40 names, then "000001.jpg -1  1 ..." rows
        lines = open(paths[1]).read().split("\n")
        self.names = lines[1].split()
        attrs = {}
        for line in lines[2:]:
            if line.strip():
                f, *v = line.split()
                if len(v) != len(self.names):
                    raise DataError(f"{paths[1]!r}: row {f!r} has {len(v)} values for {len(self.names)} attributes")
                attrs[f] = [int(a) > 0 for a in v]
        # list_eval_partition.txt: "000001.jpg 0" rows, 0 train / 1 val / 2 test
        want = {"train": "0", "val": "1", "test": "2"}[split]
        files = [f for f, s in (line.split() for line in open(paths[2]) if line.strip()) if s == want]
        files = files[:n] if n > 0 else files
        if not files:
            raise DataError(f"no {split} images listed in {paths[2]!r}")
        for f in files:
            if f not in attrs:
                raise DataError(f"{f} is listed in list_eval_partition.txt but has no row in {paths[1]!r}")
            if not os.path.isfile(os.path.join(paths[0], f)):
                raise DataError(f"no {os.path.abspath(os.path.join(paths[0], f))!r}, listed in "
                                f"list_eval_partition.txt: {CELEBA_HINT}")
        self.files = [os.path.join(paths[0], f) for f in files]
        self.targets = torch.tensor([attrs[f] for f in files], dtype=torch.long)  # (N, 40)
        self.tf = T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size)])
        check_readable(self.files, f"CelebA's {split} partition in {os.path.abspath(paths[0])!r}")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img, j, bad = read_or_next(self.files, i)
        return self.tf(torch.from_numpy(img).permute(2, 0, 1)), self.targets[j], bad


def load_celeba(data_dir, split="train", image_size=64, n=0):
    """CelebA in memory: (uint8 images (N, 3, S, S), attributes (N, 40) in {0, 1}, attribute names)."""
    ds = CelebAData(data_dir, split, image_size, n)
    x, y, bad = zip(*(ds[i] for i in range(len(ds))))
    warn_unreadable(bad, set(), "the next readable image is in its place")
    return torch.stack(x), torch.stack(y), ds.names


def fixed_choice(n_total, n, seed=0):
    """min(n, n_total) of range(n_total), a fixed random choice by seed, in order (n <= 0: all)."""
    if n <= 0 or n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def subset(ds, n, seed=0):
    """At most n images of a Dataset, a fixed random choice (an image folder lists its classes in
    order, so its first n would be a few classes), kept in the folder's order."""
    if n <= 0 or n >= len(ds):
        return ds
    idx = fixed_choice(len(ds), n, seed)
    sub = torch.utils.data.Subset(ds, idx.tolist())
    sub.targets = ds.targets[idx]
    return sub


DSPRITES_FACTORS = ("shape", "scale", "orientation", "posX", "posY")


def read_npz(path, keys, **kw):
    """np.load of an .npz that must hold `keys`: a file numpy cannot read, or one without them, is
    one DataError naming it."""
    try:
        d = np.load(path, **kw)
        missing = [k for k in keys if k not in getattr(d, "files", ())]
    except Exception as e:
        raise DataError(f"cannot read {path!r} as an .npz archive ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None
    if missing:
        raise DataError(f"{path!r} has no {', '.join(missing)}: expected the keys {', '.join(keys)}")
    return d


def load_dsprites(data_dir, split="train", n=0, n_val=500, seed=0, test_frac=0.1):
    """dSprites' full coarse factor grid (46,080 images, ../shared/data/dsprites/README.md) as
    (uint8 images (N, 3, 64, 64) in {0, 255}, factor classes (N, 5): DSPRITES_FACTORS).
    A fixed seeded permutation splits it: 'test' = test_frac of it, 'val' = the next n_val images,
    'train' the rest; n > 0 keeps the first n of the split."""
    path = os.path.join(data_dir, "dsprites_downsampled.npz")
    if not os.path.isfile(path):
        raise DataError(f"no dSprites at {os.path.abspath(path)!r}: expected DATA_DIR/dsprites_downsampled.npz "
                        "with keys imgs (N, 64, 64) and latents_classes (N, 5)")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    d = read_npz(path, ("imgs", "latents_classes"), allow_pickle=True, encoding="latin1")
    perm = torch.randperm(len(d["imgs"]), generator=torch.Generator().manual_seed(seed))
    n_test = int(test_frac * len(perm))
    idx = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}[split]
    idx = idx[:n] if n > 0 else idx
    x = torch.from_numpy(d["imgs"])[idx] * 255  # (N, 64, 64) binary -> uint8 image
    return x[:, None].expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(d["latents_classes"])[idx]
