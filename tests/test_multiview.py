"""multiview.py: cameras and rays against hand cases, the k-view batch never leaks the target, the
NMR / SRN readers round-trip fixtures written in their public layouts to the same record as Cars3D,
and Cars3D's factor labels and cameras."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import multiview
from conftest import ROOT, labelled_views, write_cars3d

SHARED_CARS3D = os.path.join(ROOT, "..", "shared", "data", "cars3d")


# --- cameras and rays -----------------------------------------------------------------------------

@pytest.mark.usefixtures("light_eval")
def test_rays_hand_case():
    """A 2x2 image, focal 1, principal point at its centre, camera at (1, 2, 3) with identity
    rotation: pixel (row 0, col 1) has its centre at (+0.5, +0.5) pixels from the principal point,
    so its ray points along (0.5, 0.5, -1) (row 0 is the top: +y), from the camera centre."""
    K = multiview.intrinsics(1.0, 2)
    c2w = torch.eye(4)
    c2w[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    r = multiview.camera_rays(K, c2w, 2, 2)  # (6, 2, 2)
    assert r.shape == (6, 2, 2)
    o, d = r[:3], r[3:]
    assert torch.allclose(o, torch.tensor([1.0, 2.0, 3.0])[:, None, None].expand(3, 2, 2))
    assert torch.allclose(d.norm(dim=0), torch.ones(2, 2))
    expect = torch.tensor([0.5, 0.5, -1.0]) / math.sqrt(1.5)
    assert torch.allclose(d[:, 0, 1], expect, atol=1e-6)
    assert torch.allclose(d[:, 1, 0], expect * torch.tensor([-1.0, -1.0, 1.0]), atol=1e-6)


@pytest.mark.usefixtures("light_eval")
def test_rays_pass_through_pixel_centres_for_any_pose():
    """For a rotated, shifted camera, each ray hits the world point that projects (with K and the
    inverse of c2w) back onto its pixel centre."""
    c2w = multiview.look_at((0.3, 1.2, -2.0), target=(0.1, -0.2, 0.4))
    K = torch.tensor([[20.0, 0, 7.5], [0, 22.0, 8.5], [0, 0, 1]])
    H, W = 16, 15
    r = multiview.camera_rays(K, c2w, H, W)
    assert torch.allclose(r[3:].norm(dim=0), torch.ones(H, W), atol=1e-5)
    p = r[:3] + 2.7 * r[3:]  # a point along each ray, (3, H, W)
    w2c = torch.linalg.inv(c2w)
    pc = (w2c[:3, :3] @ p.flatten(1) + w2c[:3, 3:]).view(3, H, W)  # camera frame: looks along -z
    assert (pc[2] < 0).all()
    col = K[0, 0] * pc[0] / -pc[2] + K[0, 2]
    row = -K[1, 1] * pc[1] / -pc[2] + K[1, 2]
    jj, ii = torch.meshgrid(torch.arange(W) + 0.5, torch.arange(H) + 0.5, indexing="xy")
    assert torch.allclose(col, jj, atol=1e-3) and torch.allclose(row, ii, atol=1e-3)


@pytest.mark.usefixtures("light_eval")
def test_cars3d_camera_convention():
    """Azimuth 0 / elevation 0 sits on +z and looks along -z at the origin, +y up; azimuth 90 sits
    on +x (the car's left flank); a higher elevation raises the camera."""
    c = multiview.cars3d_camera(0, 0)
    assert torch.allclose(c[:3, 3], torch.tensor([0, 0, multiview.CARS3D_RADIUS]), atol=1e-6)
    assert torch.allclose(-c[:3, 2], torch.tensor([0.0, 0, -1]), atol=1e-6)  # viewing direction
    assert torch.allclose(c[:3, 1], torch.tensor([0.0, 1, 0]), atol=1e-6)  # camera up
    centre_ray = multiview.camera_rays(multiview.intrinsics(10.0, 4), c, 4, 4)[3:, 1:3, 1:3].mean(dim=(1, 2))
    assert torch.allclose(torch.nn.functional.normalize(centre_ray, dim=0), torch.tensor([0.0, 0, -1]), atol=1e-6)
    assert torch.allclose(multiview.cars3d_camera(90, 0)[:3, 3], torch.tensor([multiview.CARS3D_RADIUS, 0, 0]),
                          atol=1e-6)
    assert multiview.cars3d_camera(0, 18)[1, 3] > 0
    for a, e in ((0, 0), (135, 12), (300, 18)):  # every camera looks at the origin
        c = multiview.cars3d_camera(a, e)
        assert torch.allclose(torch.nn.functional.normalize(c[:3, 3], dim=0), c[:3, 2], atol=1e-6)


# --- the k-view batch -----------------------------------------------------------------------------

def decode_labels(x):  # images in [-1, 1] -> (object, view)
    u8 = ((x + 1) * 127.5).round()
    return (u8[..., 0, 0, 0] / 10).round().long(), (u8[..., 1, 0, 0] / 10).round().long()


@pytest.mark.usefixtures("light_eval")
@pytest.mark.parametrize("k", [1, 2, 6])
def test_multiview_batch_never_leaks_the_target(k):
    mv = labelled_views()
    for step in range(20):
        x_src, r_src, x_tgt, r_tgt = multiview.multiview_batch(mv, k, data.Rng(0, step, 16))
        assert x_src.shape == (16, k, 3, 4, 4) and r_src.shape == (16, k, 6, 4, 4)
        assert x_tgt.shape == (16, 3, 4, 4) and r_tgt.shape == (16, 6, 4, 4)
        o_s, v_s = decode_labels(x_src)
        o_t, v_t = decode_labels(x_tgt)
        assert (o_s == o_t[:, None]).all()  # one object per row
        assert not (v_s == v_t[:, None]).any()  # the target is never a source
        assert all(len(set(row)) == k for row in v_s.tolist())  # distinct sources
        # the rays are those of the chosen views
        assert torch.allclose(r_tgt, multiview.camera_rays(mv.K[o_t, v_t], mv.c2w[o_t, v_t], 4, 4))
    with pytest.raises(ValueError, match="k source views"):
        multiview.multiview_batch(mv, 7, data.Rng(0, 0, 4))


@pytest.mark.usefixtures("light_eval")
def test_multiview_batch_rows_match_one_process():
    """Two processes holding halves of the global batch get exactly one process's rows."""
    mv = labelled_views()
    full = multiview.multiview_batch(mv, 2, data.Rng(3, 5, 8))
    halves = [multiview.multiview_batch(mv, 2, data.Rng(3, 5, 8, rows=slice(i * 4, i * 4 + 4))) for i in (0, 1)]
    for a, b0, b1 in zip(full, *halves):
        assert torch.equal(a, torch.cat([b0, b1]))


# --- readers: NMR and SRN fixtures in their public layouts, Cars3D --------------------------------

def fixture_cameras(V):
    c2w = torch.stack([multiview.look_at((2 * math.sin(0.9 * v), 0.5 + 0.1 * v, 2 * math.cos(0.9 * v)))
                       for v in range(V)])
    return c2w, [multiview.intrinsics(30.0 + v, 32) for v in range(V)]


def write_png(path, rs, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((rs.rand(size, size, 3) * 255).astype(np.uint8)).save(path)


def write_nmr(root, V=3):
    """DVR / pixelNeRF NMR layout: <cat>/<obj>/image/*.png, cameras.npz (world_mat_i = world ->
    OpenCV camera in DVR's z-up world, camera_mat_i = normalised intrinsics), softras_<split>.lst."""
    rs = np.random.RandomState(0)
    c2w, Ks = fixture_cameras(V)
    world = torch.tensor([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])
    cam = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    for cat, objs in (("02958343", ["a", "b"]), ("03001627", ["c"])):
        for o in objs:
            cams = {}
            for v in range(V):
                write_png(str(root / cat / o / "image" / f"{v:04d}.png"), rs, 32)
                c2w_file = torch.linalg.inv(world) @ c2w[v] @ torch.linalg.inv(cam)
                cams[f"world_mat_{v}"] = torch.linalg.inv(c2w_file)[:3].numpy()
                m = np.eye(4, dtype=np.float32)
                m[0, 0] = m[1, 1] = Ks[v][0, 0].item() / 16  # pixels -> normalised ([-1, 1] spans 32 px)
                cams[f"camera_mat_{v}"] = m
            np.savez(root / cat / o / "cameras.npz", **cams)
        (root / cat / "softras_train.lst").write_text("\n".join(objs) + "\n")
        (root / cat / "softras_test.lst").write_text("")
    return c2w, Ks


def write_srn(root, V=3):
    """SRN layout: cars_<split>/<obj>/rgb/*.png, pose/*.txt (camera-to-world, OpenCV axes),
    intrinsics.txt ('f cx cy 0', origin, scale, 'H W'), images 64x64 here."""
    rs = np.random.RandomState(1)
    c2w, _ = fixture_cameras(V)
    cam = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    for o in ("x1", "x2"):
        d = root / "cars_train" / o
        for v in range(V):
            write_png(str(d / "rgb" / f"{v:06d}.png"), rs, 64)
            os.makedirs(d / "pose", exist_ok=True)
            np.savetxt(d / "pose" / f"{v:06d}.txt", (c2w[v] @ cam).numpy().reshape(1, 16))
        (d / "intrinsics.txt").write_text("70.0 32.0 32.0 0.\n0. 0. 0.\n1.\n64 64\n")
    return c2w


def check_record(mv, N, V, size):
    assert isinstance(mv, multiview.MultiView) and len(mv.ids) == N
    assert mv.images.shape == (N, V, 3, size, size) and mv.images.dtype == torch.uint8
    assert mv.K.shape == (N, V, 3, 3) and mv.c2w.shape == (N, V, 4, 4)
    assert mv.K.dtype == mv.c2w.dtype == torch.float32


@pytest.mark.usefixtures("light_eval")
def test_nmr_fixture_round_trip(tmp_path):
    c2w, Ks = write_nmr(tmp_path)
    mv = multiview.load_multiview("nmr", str(tmp_path), "train", 32)
    check_record(mv, 3, 3, 32)
    assert mv.ids == ["02958343/a", "02958343/b", "03001627/c"]
    for o in range(3):
        assert torch.allclose(mv.c2w[o], c2w, atol=1e-5)
        assert torch.allclose(mv.K[o], torch.stack(Ks), atol=1e-4)
    raw = np.array(Image.open(tmp_path / "02958343" / "b" / "image" / "0001.png"))
    assert torch.equal(mv.images[1, 1], torch.from_numpy(raw).permute(2, 0, 1))
    half = multiview.load_multiview("nmr", str(tmp_path), "train", 16)  # resized: intrinsics scale with it
    assert torch.allclose(half.K[0, :, :2], mv.K[0, :, :2] / 2, atol=1e-4)


@pytest.mark.usefixtures("light_eval")
def test_srn_fixture_round_trip_and_same_record_as_cars3d(tmp_path):
    c2w = write_srn(tmp_path)
    mv = multiview.load_multiview("srn", str(tmp_path), "train", 32)  # 64 -> 32 px
    check_record(mv, 2, 3, 32)
    assert torch.allclose(mv.c2w[0], c2w, atol=1e-5)
    assert torch.allclose(mv.K[0, 0], multiview.intrinsics(35.0, 32))
    cars = multiview.MultiView._fields
    assert cars == ("images", "K", "c2w", "ids")
    with pytest.raises(data.DataError, match="_test"):
        multiview.load_multiview("srn", str(tmp_path), "test", 32)


# The two published conventions, by hand (not through the readers' matrices): a camera at world
# point C whose OpenCV axes (x right, y down, z forward) are given as world vectors.
SIDE_CAM = dict(C=(3.0, 0.0, 0.0), right=(0.0, 0.0, -1.0), down=(0.0, -1.0, 0.0), fwd=(-1.0, 0.0, 0.0))


def opencv_c2w(C, right, down, fwd):
    """The 4x4 camera-to-world matrix as SRN's pose/*.txt stores it: columns x, y, z axes, centre."""
    M = torch.eye(4)
    M[:3, 0], M[:3, 1], M[:3, 2], M[:3, 3] = (torch.tensor(v) for v in (right, down, fwd, C))
    return M


@pytest.mark.usefixtures("light_eval")
def test_srn_pose_is_opencv_camera_to_world(tmp_path):
    """SRN: pose/*.txt = OpenCV camera-to-world. A camera on +x looking at the origin (right = -z,
    down = -y) becomes the OpenGL c2w [right, up = +y, back = +x, C]; and the record's ray through
    a pixel centre points at the world point OpenCV's pinhole model projects there."""
    obj = tmp_path / "cars_train" / "o"
    write_png(str(obj / "rgb" / "000000.png"), np.random.RandomState(0), 64)
    write_png(str(obj / "rgb" / "000001.png"), np.random.RandomState(1), 64)
    os.makedirs(obj / "pose")
    for v in range(2):
        np.savetxt(obj / "pose" / f"{v:06d}.txt", opencv_c2w(**SIDE_CAM).numpy().reshape(1, 16))
    (obj / "intrinsics.txt").write_text("70.0 32.0 32.0 0.\n0. 0. 0.\n1.\n64 64\n")
    mv = multiview.load_multiview("srn", str(tmp_path), "train", 64)
    want = torch.tensor([[0.0, 0, 1, 3], [0, 1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]])  # columns right, up, back, C
    assert torch.allclose(mv.c2w[0, 0], want, atol=1e-6)
    i, j, Z = 25, 18, 2.5  # the world point P that OpenCV's pinhole (u = f X / Z + cx) puts at the
    X, Y = (j + 0.5 - 32) / 70 * Z, (i + 0.5 - 32) / 70 * Z  # centre of pixel (row i, column j)
    P = sum(c * torch.tensor(SIDE_CAM[k]) for c, k in ((1, "C"), (X, "right"), (Y, "down"), (Z, "fwd")))
    ray = multiview.camera_rays(mv.K[0, 0], mv.c2w[0, 0], 64, 64)[:, i, j]
    assert torch.allclose(ray[:3], P.new_tensor(SIDE_CAM["C"]))
    assert torch.allclose(ray[3:], torch.nn.functional.normalize(P - ray[:3], dim=0), atol=1e-6)


@pytest.mark.usefixtures("light_eval")
def test_nmr_cameras_follow_pixelnerf(tmp_path):
    """NMR (pixelNeRF's DVR reader): world_mat_i is world -> OpenCV camera (3x4) in DVR's world,
    c2w = T_world inv(world_mat) diag(1, -1, -1, 1) with T_world (x, y, z) -> (x, -z, y);
    camera_mat_i holds the focal in units of half the image. Written by hand for a camera at
    C = (1, 2, 3) with OpenCV axes along DVR's x, y, z."""
    o = tmp_path / "02958343" / "a"
    for v in range(2):
        write_png(str(o / "image" / f"{v:04d}.png"), np.random.RandomState(v), 64)
    w2c = np.array([[1, 0, 0, -1], [0, 1, 0, -2], [0, 0, 1, -3]], np.float32)  # R = I, t = -C
    cam_mat = np.diag([1.5, 1.5, 1.0, 1.0]).astype(np.float32)
    np.savez(o / "cameras.npz", world_mat_0=w2c, world_mat_1=w2c, camera_mat_0=cam_mat, camera_mat_1=cam_mat)
    (tmp_path / "02958343" / "softras_train.lst").write_text("a\n")
    mv = multiview.load_multiview("nmr", str(tmp_path), "train", 64)
    # C -> (1, -3, 2); right = x -> (1, 0, 0); down = y -> (0, 0, 1) so up = (0, 0, -1);
    # forward = z -> (0, -1, 0) so back = (0, 1, 0)
    want = torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, -3], [0, -1, 0, 2], [0, 0, 0, 1]])
    assert torch.allclose(mv.c2w[0, 0], want, atol=1e-6)
    # pixelNeRF: focal = camera_mat[0, 0] * W / 2, principal point at the centre
    assert torch.allclose(mv.K[0, 0], torch.tensor([[48.0, 0, 32], [0, 48, 32], [0, 0, 1]]))


@pytest.mark.usefixtures("light_eval")
def test_cars3d_reader(tmp_path):
    write_cars3d(tmp_path)
    mv = multiview.load_multiview("cars3d", str(tmp_path), "test", 32)
    check_record(mv, 2, 8, 32)
    assert mv.ids == ["car_002", "car_003"]
    assert torch.allclose(mv.c2w[0, 5], multiview.cars3d_camera(90, 6))  # view = 4 e + a
    with pytest.raises(data.DataError, match="cars3d_64.npz"):
        multiview.load_multiview("cars3d", str(tmp_path / "nowhere"), "test", 32)


@pytest.mark.usefixtures("light_eval")
@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_CARS3D, "cars3d_64.npz")), reason="no ../shared/data/cars3d")
def test_shared_cars3d_loads():
    mv = multiview.load_multiview("cars3d", SHARED_CARS3D, "test", 32)
    check_record(mv, 18, 96, 32)
    assert mv.ids[0] == "car_010"


def test_cars3d_factors_split_and_labels(tmp_path):
    from conftest import write_cars3d  # 4 cars x 2 elevations x 4 azimuths of noise, in the real layout
    write_cars3d(tmp_path)
    splits = multiview.load_cars3d_factors(str(tmp_path), 16)
    (xtr, ytr, Ktr, ctr), (xte, yte, Kte, cte) = splits["train"], splits["test"]
    assert len(xtr) + len(xte) == 32 and len(xte) == 10 and xtr.shape[1:] == (3, 16, 16) and Ktr.shape == (22, 3, 3)
    key = lambda y: set((y * torch.tensor([4, 1, 8])).sum(1).tolist())  # (elevation, azimuth, object) -> index
    assert len(key(ytr) | key(yte)) == 32 and not key(ytr) & key(yte)
    assert ytr.max(0).values.tolist() == [1, 3, 3]
    full = np.load(tmp_path / "cars3d_64.npz")
    order = np.concatenate([np.flatnonzero(full["split"] == s) for s in ("train", "test")])  # the 'train' cars first
    for img, (e, a, o), c2w in zip(xte, yte.tolist(), cte):
        full_size = torch.from_numpy(full["images"][order[o], e, a]).permute(2, 0, 1)[None, None]
        assert torch.equal(img, multiview._resize_u8(full_size, 16)[0, 0])
        cam = multiview.cars3d_camera(float(full["azimuth_deg"][a]), float(full["elevation_deg"][e]))
        assert torch.allclose(c2w, cam)
