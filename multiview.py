"""
Multi-view 3D data (§3.3 "Perspective", §4.2.2): posed views of objects, their cameras and each
pixel's ray, the readers of Cars3D, NMR and SRN, and the batches of k source views + a target view.
Cameras use one convention throughout (OpenGL's): camera-to-world matrices whose camera looks along
its -z axis with +y up and +x right; intrinsics K in pixels of the stored image size. Every reader
returns the same record (MultiView), so the rest of the code never knows which set it reads.
This file imports data.py only (its errors, .npz reader and random numbers).
"""
import glob
import math
import os
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from data import DataError, read_npz, to_signed


class MultiView(NamedTuple):
    images: torch.Tensor  # uint8 (N objects, V views, 3, H, W)
    K: torch.Tensor  # float32 (N, V, 3, 3) pixel intrinsics at H x W
    c2w: torch.Tensor  # float32 (N, V, 4, 4) camera-to-world (OpenGL convention)
    ids: list  # N object names


def look_at(center, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)):
    """Camera-to-world (4, 4) of a camera at `center` looking at `target` (+y up): columns are the
    camera's right, up and backward (-viewing direction) axes, then its centre."""
    c, t, up = (torch.as_tensor(v, dtype=torch.float64) for v in (center, target, up))
    back = F.normalize(c - t, dim=0)  # the camera looks along -back
    right = F.normalize(torch.linalg.cross(up, back), dim=0)
    M = torch.eye(4, dtype=torch.float64)
    M[:3, 0], M[:3, 1], M[:3, 2], M[:3, 3] = right, torch.linalg.cross(back, right), back, c
    return M.float()


def intrinsics(focal, size):
    """K (3, 3) of a square image of `size` pixels with the principal point at its centre."""
    return torch.tensor([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]], dtype=torch.float32)


def camera_rays(K, c2w, H, W):
    """Each pixel's ray through its centre: K (..., 3, 3), c2w (..., 4, 4) -> (..., 6, H, W), the
    camera centre (3 channels) and the unit direction (3) in world coordinates (§3.3 "Perspective")."""
    i, j = torch.meshgrid(torch.arange(H, dtype=torch.float32, device=K.device) + 0.5,
                          torch.arange(W, dtype=torch.float32, device=K.device) + 0.5, indexing="ij")
    fx, fy, cx, cy = (K[..., a, b][..., None, None] for a, b in ((0, 0), (1, 1), (0, 2), (1, 2)))
    d_cam = torch.stack([(j - cx) / fx, -(i - cy) / fy, -torch.ones_like(j - cx)], dim=-1)  # row i goes down
    d = F.normalize((c2w[..., None, None, :3, :3] @ d_cam[..., None]).squeeze(-1), dim=-1)  # (..., H, W, 3)
    o = c2w[..., None, None, :3, 3].expand_as(d)
    return torch.cat([o, d], dim=-1).movedim(-1, -3)


def _resize_u8(x, size):
    # uint8 (..., 3, h, w) -> (..., 3, size, size), antialiased
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    lead = x.shape[:-3]
    y = F.interpolate(x.reshape(-1, *x.shape[-3:]).float(), size=(size, size), mode="bilinear",
                      antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8).reshape(*lead, 3, size, size)


# Cars3D has no recorded camera distance or field of view (../shared/data/cars3d/README.md): one
# nominal pair, the same for every image, so relative poses are exact up to a common scale.
CARS3D_RADIUS = 2.0  # camera distance from the origin (object units)
CARS3D_FOV_DEG = 40.0  # horizontal field of view


def cars3d_camera(azimuth_deg, elevation_deg, radius=CARS3D_RADIUS):
    """Camera-to-world of a Cars3D view: C = r (cos e sin a, sin e, cos e cos a), looking at the
    origin, +y up (our convention: azimuth 0 is the front view, the nose along +z)."""
    a, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    return look_at((radius * math.cos(e) * math.sin(a), radius * math.sin(e), radius * math.cos(e) * math.cos(a)))


def load_cars3d(data_dir, split="train", image_size=64):
    """Cars3D (183 cars x 4 elevations x 24 azimuths, 64x64) -> MultiView of the 'train' (165) or
    'test' (18 unseen cars) objects; views ordered elevation-major (view = 24 e + a)."""
    path = os.path.join(data_dir, "cars3d_64.npz")
    if not os.path.isfile(path):
        raise DataError(f"no Cars3D at {os.path.abspath(path)!r}: expected DATA_DIR/cars3d_64.npz "
                        "(images, elevation_deg, azimuth_deg, object_names, split; ../shared/data/cars3d)")
    if split not in ("train", "test"):
        raise ValueError(f"Cars3D splits are 'train' and 'test', got {split!r}")
    d = read_npz(path, ("images", "elevation_deg", "azimuth_deg", "object_names", "split"))
    objs = np.flatnonzero(d["split"] == split)
    x = torch.from_numpy(d["images"][objs])  # (N, E, A, 64, 64, 3)
    N, E, A = x.shape[:3]
    x = _resize_u8(x.permute(0, 1, 2, 5, 3, 4).reshape(N, E * A, 3, 64, 64), image_size)
    c2w = torch.stack([cars3d_camera(a, e) for e in d["elevation_deg"].tolist() for a in d["azimuth_deg"].tolist()])
    focal = image_size / 2 / math.tan(math.radians(CARS3D_FOV_DEG) / 2)
    K = intrinsics(focal, image_size)
    return MultiView(x, K.expand(N, E * A, 3, 3).clone(), c2w.expand(N, E * A, 4, 4).clone(),
                     [str(n) for n in d["object_names"][objs]])


CARS3D_FACTORS = ("elevation", "azimuth", "object")


def load_cars3d_factors(data_dir, image_size=64, n_train=0, n_test=0, seed=0, test_frac=1 / 3):
    """Cars3D as a disentanglement set (paper §4.3.2; disentanglement_lib's factors): every view of
    all 183 cars -> {'train': split, 'test': split}, each split (uint8 images (N, 3, H, W), factor
    classes (N, 3): CARS3D_FACTORS, K (N, 3, 3), c2w (N, 4, 4)). A fixed seeded permutation of the
    17,568 images splits it: 'test' = test_frac of it, 'train' the rest (both hold every car, so the
    object is a factor both can score); n_train, n_test > 0 keep the first n of a split."""
    parts = [load_cars3d(data_dir, s, image_size) for s in ("train", "test")]
    imgs = torch.cat([p.images for p in parts])  # (183, 96, 3, H, W), views elevation-major
    N, V = imgs.shape[:2]
    E = len(np.load(os.path.join(data_dir, "cars3d_64.npz"))["elevation_deg"])  # 4 elevations x 24 azimuths
    obj = torch.arange(N)[:, None].expand(N, V)
    view = torch.arange(V)[None].expand(N, V)
    y = torch.stack([view // (V // E), view % (V // E), obj], -1).reshape(N * V, 3)
    imgs = imgs.reshape(N * V, *imgs.shape[2:])
    K = torch.cat([p.K for p in parts]).reshape(N * V, 3, 3)
    c2w = torch.cat([p.c2w for p in parts]).reshape(N * V, 4, 4)
    perm = torch.randperm(N * V, generator=torch.Generator().manual_seed(seed))
    n_test_all = int(test_frac * len(perm))
    out = {}
    for split, idx, n in (("train", perm[n_test_all:], n_train), ("test", perm[:n_test_all], n_test)):
        idx = idx[:n] if n > 0 else idx
        out[split] = (imgs[idx], y[idx], K[idx], c2w[idx])
    return out


def _read_png(path):
    from PIL import Image
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def _stack_objects(objects, where):
    # [(id, images (V,3,H,W), K (V,3,3), c2w (V,4,4))] -> MultiView; objects keep the smallest view count
    if not objects:
        raise DataError(f"no objects found in {where}")
    V = min(len(o[1]) for o in objects)
    if any(len(o[1]) != V for o in objects):
        warnings.warn(f"{where}: objects have different view counts; keeping the first {V} views of each")
    return MultiView(torch.stack([o[1][:V] for o in objects]), torch.stack([o[2][:V] for o in objects]),
                     torch.stack([o[3][:V] for o in objects]), [o[0] for o in objects])


NMR_HINT = ("expected the NMR layout (DVR / pixelNeRF's NMR_Dataset): DATA_DIR/<category>/<object>/image/*.png, "
            "DATA_DIR/<category>/<object>/cameras.npz (world_mat_i, camera_mat_i), and split lists "
            "DATA_DIR/<category>/softras_<split>.lst")


def load_nmr(data_dir, split="train", image_size=64):
    """NMR ShapeNet renderings (13 categories, 24 views per object, 64x64) -> MultiView.
    cameras.npz holds DVR's world_mat_i (world -> OpenCV camera) and camera_mat_i (normalised
    intrinsics, image spanning [-1, 1]); the conversion follows pixelNeRF's DVR reader: world
    rotated to +y up, camera flipped from OpenCV (y down, z forward) to OpenGL."""
    lists = sorted(glob.glob(os.path.join(data_dir, "*", f"softras_{split}.lst")))
    if not lists:
        raise DataError(f"no split lists for {split!r} under {os.path.abspath(data_dir)!r}: {NMR_HINT}")
    world = torch.tensor([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float32)
    cam = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    objects = []
    for lst in lists:
        cat_dir = os.path.dirname(lst)
        for name in [line.strip() for line in open(lst) if line.strip()]:
            obj = os.path.join(cat_dir, name)
            pngs = sorted(glob.glob(os.path.join(obj, "image", "*.png")))
            if not pngs or not os.path.isfile(os.path.join(obj, "cameras.npz")):
                raise DataError(f"{obj!r} is listed in {lst!r} but has no image/*.png or cameras.npz: {NMR_HINT}")
            cams = np.load(os.path.join(obj, "cameras.npz"))
            imgs = torch.stack([_read_png(p) for p in pngs])
            Ks, c2ws = [], []
            for v in range(len(pngs)):
                w2c = torch.eye(4)
                w2c[: cams[f"world_mat_{v}"].shape[0]] = torch.from_numpy(cams[f"world_mat_{v}"]).float()
                c2ws.append(world @ torch.linalg.inv(w2c) @ cam)
                m = torch.from_numpy(cams[f"camera_mat_{v}"]).float()
                s = image_size / 2  # normalised [-1, 1] -> pixels
                Ks.append(torch.tensor([[m[0, 0] * s, 0, s * (1 + m[0, 2])], [0, m[1, 1] * s, s * (1 + m[1, 2])],
                                        [0, 0, 1]]))
            objects.append((f"{os.path.basename(cat_dir)}/{name}", _resize_u8(imgs, image_size),
                            torch.stack(Ks), torch.stack(c2ws)))
    return _stack_objects(objects, os.path.abspath(data_dir))


SRN_HINT = ("expected the SRN layout: DATA_DIR/<name>_<split>/<object>/rgb/*.png, "
            "<object>/pose/*.txt (4x4 camera-to-world, OpenCV axes) and <object>/intrinsics.txt")


def load_srn(data_dir, split="train", image_size=64):
    """SRN cars / chairs (Sitzmann et al. 2019; 128x128 renderings) -> MultiView. Poses are
    camera-to-world with OpenCV axes (flipped here to OpenGL, as pixelNeRF's SRN reader does);
    intrinsics.txt's first line is 'f cx cy 0' and its last 'H W', in pixels."""
    roots = sorted(glob.glob(os.path.join(data_dir, f"*_{split}")))
    if len(roots) != 1:
        raise DataError(f"expected one folder *_{split} in {os.path.abspath(data_dir)!r}, found {len(roots)}: "
                        f"{SRN_HINT}")
    cam = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    objects = []
    for obj in sorted(p for p in glob.glob(os.path.join(roots[0], "*")) if os.path.isdir(p)):
        pngs = sorted(glob.glob(os.path.join(obj, "rgb", "*.png")))
        poses = sorted(glob.glob(os.path.join(obj, "pose", "*.txt")))
        if not pngs or len(pngs) != len(poses) or not os.path.isfile(os.path.join(obj, "intrinsics.txt")):
            raise DataError(f"{obj!r}: needs rgb/*.png, as many pose/*.txt, and intrinsics.txt: {SRN_HINT}")
        lines = [line.split() for line in open(os.path.join(obj, "intrinsics.txt")) if line.strip()]
        f, cx, cy = (float(v) for v in lines[0][:3])
        h = float(lines[-1][0])
        s = image_size / h
        K = torch.tensor([[f * s, 0, cx * s], [0, f * s, cy * s], [0, 0, 1]], dtype=torch.float32)
        c2w = torch.stack([torch.from_numpy(np.loadtxt(p, dtype=np.float32).reshape(4, 4)) @ cam for p in poses])
        imgs = _resize_u8(torch.stack([_read_png(p) for p in pngs]), image_size)
        objects.append((os.path.basename(obj), imgs, K.expand(len(pngs), 3, 3).clone(), c2w))
    return _stack_objects(objects, roots[0])


MULTIVIEW = ("cars3d", "nmr", "srn")


def load_multiview(dataset, data_dir, split="train", image_size=64):
    """'cars3d' | 'nmr' | 'srn' -> MultiView (all in memory: NMR at 64x64 is ~9 GB of uint8)."""
    readers = {"cars3d": load_cars3d, "nmr": load_nmr, "srn": load_srn}
    if dataset not in readers:
        raise DataError(f"unknown multi-view dataset {dataset!r}: {sorted(readers)}")
    return readers[dataset](data_dir, split, image_size)


def multiview_batch(mv, k, rng, objects=None):
    """k source views + 1 target view of the same object per row (§3.3): -> x_src (B, k, 3, H, W),
    rays_src (B, k, 6, H, W), x_tgt (B, 3, H, W), rays_tgt (B, 6, H, W), images in [-1, 1].
    Views come from a random permutation of the object's views: the target is its first entry,
    the sources the next k, so the target is never among the sources. `objects` (optional)
    restricts the objects drawn."""
    N, V = mv.images.shape[:2]
    if not 1 <= k < V:
        raise ValueError(f"k source views must be in 1..{V - 1}, got {k}")
    pool = torch.arange(N) if objects is None else torch.as_tensor(objects)
    obj = pool[rng.randint(len(pool)).cpu()]  # (B,)
    perm = rng.rand(V).argsort(dim=1).cpu()[:, : k + 1]  # (B, k + 1): target, then the sources
    o = obj[:, None].expand_as(perm)
    imgs = to_signed(mv.images[o, perm].to(rng.device))  # (B, k + 1, 3, H, W)
    H, W = imgs.shape[-2:]
    rays = camera_rays(mv.K[o, perm].to(rng.device), mv.c2w[o, perm].to(rng.device), H, W)
    return imgs[:, 1:], rays[:, 1:], imgs[:, 0], rays[:, 0]
