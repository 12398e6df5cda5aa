"""What several test files share: the options and markers (--runslow, --multiprocess, slow,
numerics, multiprocess, full_eval), the light_eval fixture, tiny models, tiny data sets written in
their public layouts, tiny training runs and checkpoints, and the one-line error checks. A fixture
that trains has pytest's widest scope: it runs at most once per pytest-xdist worker, whichever files use it."""
import contextlib
import io
import os
import re
import runpy
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One intra-op thread: these tests use tiny tensors, and with more threads a busy 2-core machine
# (e.g. a training run alongside) makes OpenMP spin and the suite ~10x slower.
torch.set_num_threads(1)

import common  # noqa: E402
import configurator  # noqa: E402
import data  # noqa: E402
import monitor  # noqa: E402
import multiview  # noqa: E402
import train  # noqa: E402

SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
DSPRITES = os.path.join(SHARED_DATA, "dsprites")
CIFAR_PNG = os.path.join(SHARED_DATA, "cifar10-subset")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (e.g. the full inductor compile, ~150 s on 2 cores)")
    parser.addoption("--multiprocess", action="store_true", default=False,
                     help="also run tests marked multiprocess (torchrun with 2 gloo processes, ~60 s on 2 cores; "
                          ".ci/run runs them after the suite)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test, skipped unless pytest is given --runslow")
    config.addinivalue_line("markers", "numerics: compares two code paths to float rounding; tests/test_kernels.py "
                            "runs these again under a second CPU kernel set")
    config.addinivalue_line("markers", "multiprocess: starts torchrun (2 gloo processes); skipped unless pytest is "
                            "given --multiprocess")
    config.addinivalue_line("markers", "full_eval: keep train.main's full end-of-run evaluation (see light_eval)")


# the longest tests start first, so that with two processes the others fill the time around them
# (longest-first scheduling) instead of one long test starting last and running alone
LONGEST_FIRST = ("test_tools.py::test_dry_run_reports_every_item",
                 "test_train.py::test_torchrun_sigterm_saves_and_resumes_on_another_process_count",
                 "test_train.py::test_ddp_two_processes_equal_one",
                 "test_train.py::test_compiled_step_equals_eager",
                 "test_train.py::test_imagenet_config_builds_and_steps")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("/")[-1], len(rank)))  # stable: the rest keep their order
    for marker, option in (("slow", "--runslow"), ("multiprocess", "--multiprocess")):
        if not config.getoption(option):
            skip = pytest.mark.skip(reason=f"{marker}: run with {option}")
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip)


# --- tiny models ------------------------------------------------------------------------------

Z = 32  # z_dim of the tiny models (divisible by the aggregator's 4 heads)


def tiny_soda(**kw):
    """SODA (DiffSiam where a DiffSiamConfig field is given) of the tiny presets, with no training
    dropout of z or pose unless asked for: tests that draw it say so."""
    import dataclasses

    import diffsiam
    import model as M
    kw = {"p_mask_layer": 0.0, "p_uncond": 0.0, "p_uncond_pose": 0.0, **kw}
    if set(kw) - {f.name for f in dataclasses.fields(M.SODAConfig)}:
        return diffsiam.DiffSiam(diffsiam.DiffSiamConfig(**kw))
    return M.SODA(M.SODAConfig(**kw))


def randomize_zeros(module, std=0.05, skip=(), seed=0):
    """Re-init every parameter that is all zeros (zero-init convs/projections, GroupNorm biases,
    zero-init residual norms) with N(0, std^2), except those whose name contains one of `skip`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in skip):
                continue
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def make(seed=0, randomized=True, **kw):
    """The tiny SODA at 16 px (z_dim Z) in eval mode, its zero-initialised parameters randomised
    (randomized=True) so that z and every layer count."""
    torch.manual_seed(seed)
    args = dict(encoder="tiny", unet="tiny", z_dim=Z, image_size=16)
    args.update(kw)
    m = tiny_soda(**args).eval()
    if randomized:
        randomize_zeros(m, seed=seed + 100)
    return m


def inputs(B=2, H=16, seed=0, ch=3):
    """(x, logsnr, generator): B random images and noise levels, and the generator for more."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, ch, H, H, generator=g)
    logsnr = torch.empty(B).uniform_(-5, 5, generator=g)
    return x, logsnr, g


def images(n=16, size=16, seed=0):
    """n random images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 2 - 1).clamp(-1, 1)


def blobs(n_per, n_classes, dim, sep, seed):
    """Gaussian clusters: features (n_per * n_classes, dim), labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(n_per)
    mu = torch.randn(n_classes, dim, generator=g) * sep
    return mu[y] + torch.randn(len(y), dim, generator=g), y


# --- tiny data sets in their public layouts ---------------------------------------------------

@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory):
    """A tiny CIFAR-10 in ImageFolder layout: 10 classes x 12 train / 3 test PNGs, 32x32."""
    root = tmp_path_factory.mktemp("cifar")
    rs = np.random.RandomState(0)
    for split, n in (("train", 12), ("test", 3)):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = (rs.rand(32, 32, 3) * 60 + c * 19).astype(np.uint8)  # class-dependent colour
                Image.fromarray(img).save(d / f"{i}.png")
    return str(root)


def save_image(path, img):
    """img: a PIL image or a uint8 array; the folders are made."""
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(path)
    return str(path)


CELEBA_ATTRS = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
                "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
                "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
                "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
                "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie "
                "Young").split()


def write_celeba(root, colours, partition):
    """A tiny CelebA in torchvision's layout and the real file formats: 178x218 JPEGs, a count line
    and a names line above '000001.jpg -1  1 ...' rows, and '000001.jpg 0' partition rows."""
    d = root / "celeba"
    (d / "img_align_celeba").mkdir(parents=True)
    rs = np.random.RandomState(0)
    attrs = rs.rand(len(colours), 40) < 0.4
    rows = []
    for i, (c, a) in enumerate(zip(colours, attrs)):
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(np.full((218, 178, 3), c, np.uint8)).save(d / "img_align_celeba" / name, quality=95)
        rows.append(name + " " + " ".join(f"{1 if v else -1:2d}" for v in a))
    (d / "list_attr_celeba.txt").write_text(f"{len(colours)}\n{' '.join(CELEBA_ATTRS)} \n" + "\n".join(rows) + "\n")
    (d / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(partition)))
    return attrs


@pytest.fixture(scope="session")
def celeba_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba_root")
    colours = [(20 * i, 255 - 20 * i, 100) for i in range(12)]
    partition = [0, 0, 1, 0, 2, 0, 0, 1, 2, 0, 1, 2]
    attrs = write_celeba(root, colours, partition)
    return str(root), colours, partition, attrs


def write_cars3d(root, n=4):
    """A small file with the real cars3d_64.npz keys: n objects x 2 elevations x 4 azimuths."""
    rs = np.random.RandomState(2)
    np.savez(root / "cars3d_64.npz",
             images=(rs.rand(n, 2, 4, 64, 64, 3) * 255).astype(np.uint8), masks=np.ones((n, 2, 4, 64, 64), bool),
             elevation_deg=np.array([0, 6], np.float32), azimuth_deg=np.array([0, 90, 180, 270], np.float32),
             object_names=np.array([f"car_{i:03d}" for i in range(n)]),
             split=np.array(["train"] * (n - 2) + ["test"] * 2))


@pytest.fixture(scope="session")
def cars_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cars3d")
    write_cars3d(root)
    return root


def labelled_views(N=5, V=7, size=4):
    """Each image stores its object in channel 0 and its view in channel 1."""
    x = torch.zeros(N, V, 3, size, size, dtype=torch.uint8)
    x[:, :, 0] = torch.arange(N)[:, None, None, None] * 10
    x[:, :, 1] = torch.arange(V)[None, :, None, None] * 10
    c2w = torch.stack([torch.stack([multiview.cars3d_camera(360 * v / V, 0) for v in range(V)])] * N)
    return multiview.MultiView(x, multiview.intrinsics(5.0, size).expand(N, V, 3, 3), c2w, [f"o{i}" for i in range(N)])


# --- tiny training runs -----------------------------------------------------------------------

def base_args(cifar_dir, out_dir, **kw):
    args = dict(out_dir=str(out_dir), data_dir=cifar_dir, n_val=20, batch_size=8, max_iters=4,
                warmup_iters=2, log_interval=1, eval_interval=0, ckpt_interval=100, eval_at_start=False,
                sample_steps=2, z_dim=32, p_mask_layer=0.3, p_uncond=0.2, aug="simclr", threads=1,
                cpu_bf16="false")  # fp32 unless a test asks: 'auto' would depend on the machine's CPU
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def run_train(argv):
    with pytest.warns(UserWarning, match="partial copy"):
        train.main(argv)


def state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def mv_args(root, out, **kw):
    args = dict(dataset="cars3d", data_dir=str(root), out_dir=str(out), image_size=16, ray_freqs=2, k_max=2,
                cond="xattn", n_tokens=4, z_dim=32, batch_size=4, max_iters=4, warmup_iters=2, log_interval=1,
                eval_interval=0, ckpt_interval=100, eval_at_start=False, sample_steps=2, threads=1,
                p_uncond_pose=0.3, p_mask_layer=0.2)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


TINY = ["--encoder=tiny", "--unet=tiny", "--z_dim=32", "--batch_size=16", "--num_workers=0", "--threads=1",
        "--sample_steps=2", "--warmup_iters=1", "--log_interval=12"]


@pytest.fixture(scope="session")
def imagenet_dir(tmp_path_factory):
    """The first 24 train and 8 test PNGs of each CIFAR-10 class, linked as DATA_DIR/train and /val."""
    if not os.path.isdir(CIFAR_PNG):
        pytest.skip(f"no CIFAR-10 PNGs at {CIFAR_PNG}")
    root = tmp_path_factory.mktemp("imagenet")
    for split, name, n in (("train", "train", 24), ("test", "val", 8)):
        for c in sorted(os.listdir(os.path.join(CIFAR_PNG, split))):
            os.makedirs(root / name / c)
            for f in sorted(os.listdir(os.path.join(CIFAR_PNG, split, c)))[:n]:
                os.symlink(os.path.abspath(os.path.join(CIFAR_PNG, split, c, f)), root / name / c / f)
    return root


@pytest.fixture(scope="session")
def imagenet_run(imagenet_dir, tmp_path_factory):
    """24 steps of train.py --dataset=imagenet at 32 px, evaluated at steps 0, 12 and 24 on a fixed
    part of the folders (FOLDER_EVAL made small: 120 train, 40 val images; z-usage on 2 noise levels)."""
    out = tmp_path_factory.mktemp("imagenet_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(monitor, "FOLDER_EVAL", (120, 40))
        lighten_eval(mp)
        train.main(["--dataset=imagenet", f"--data_dir={imagenet_dir}", "--image_size=32", f"--out_dir={out}",
                    "--max_iters=24", "--eval_interval=12", *TINY])
    return out


def mixed_photos(root):
    """A flat folder of 20 'photos' of mixed sizes and modes (RGB, RGBA, grey, 16-bit, palette GIF,
    EXIF-rotated JPEG, one in a subfolder), plus a hidden broken file and a text file to skip."""
    from PIL import Image
    rs = np.random.RandomState(0)
    rgb = lambda h, w: (rs.rand(h, w, 3) * 255).astype(np.uint8)
    for i in range(14):
        save_image(root / f"{i:02d}.{'png' if i % 2 else 'jpg'}", rgb(24 + 3 * i, 40 - i))
    save_image(root / "rgba.png", Image.fromarray((rs.rand(30, 30, 4) * 255).astype(np.uint8), "RGBA"))
    save_image(root / "grey.png", Image.fromarray((rs.rand(33, 40) * 255).astype(np.uint8), "L"))
    save_image(root / "grey16.png", Image.fromarray((rs.rand(36, 36) * 65535).astype(np.uint16)))
    save_image(root / "pal.gif", Image.fromarray(rgb(32, 32)).convert("P"))
    exif = Image.Exif()
    exif[274] = 6
    Image.fromarray(rgb(20, 40)).save(root / "rotated.jpg", exif=exif)
    save_image(root / "album" / "deep.webp", rgb(48, 36))
    (root / ".broken.png").write_bytes(b"not a png")  # hidden: never read
    (root / "album" / ".broken.jpg").write_bytes(b"not a jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def png_header(width, height):
    """The start of a PNG: its signature and an IHDR chunk claiming width x height RGB pixels, then IEND."""
    import struct
    import zlib
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def unreadable_images(root, prefix=""):
    """One file of each kind PIL cannot read, written into root: a JPEG cut short, a text file named .png, an
    empty .jpg, and a PNG claiming 50,000 x 50,000 pixels (over PIL's decompression-bomb limit). -> their paths."""
    os.makedirs(root, exist_ok=True)
    jpeg = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 40, 3), np.uint8)).save(jpeg, "JPEG")
    kinds = {"cut.jpg": jpeg.getvalue()[:len(jpeg.getvalue()) // 2], "text.png": b"not a PNG", "empty.jpg": b"",
             "bomb.png": png_header(50_000, 50_000)}
    paths = []
    for name, body in kinds.items():
        paths.append(os.path.join(root, prefix + name))
        with open(paths[-1], "wb") as f:
            f.write(body)
    return paths


@pytest.fixture(scope="session")
def photo_run(tmp_path_factory):
    """train.py configs/cifar10_cpu.py --dataset=folder on a flat folder of 20 mixed photos (4 held
    out, 16 trained on), 2 steps at 32 px, evaluated at steps 0 and 2; -> (out dir, folder, stdout)."""
    import contextlib
    import io
    photos = mixed_photos(tmp_path_factory.mktemp("photos"))
    out = tmp_path_factory.mktemp("photo_run")
    text = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(text):
        lighten_eval(mp)
        train.main([os.path.join(ROOT, "configs", "cifar10_cpu.py"), "--dataset=folder", f"--data_dir={photos}",
                    "--image_size=32", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2", "--ckpt_interval=2",
                    *TINY[:3], "--batch_size=8", *TINY[4:7], "--warmup_iters=1", "--log_interval=1"])
    return out, photos, text.getvalue()


def lighten_eval(mp):
    """The real zusage.z_usage on 2 noise levels and 8 images, and no z-usage figure (see light_eval)."""
    import zusage

    real = zusage.z_usage

    def z_usage(model, x_0, logsnrs=None, **kw):
        n = min(8, len(x_0))
        kw = {k: v[:n] if isinstance(v, torch.Tensor) and len(v) == len(x_0) else v for k, v in kw.items()}
        return real(model, x_0[:n], logsnrs=(-3.0, 0.0), **kw)

    mp.setattr(zusage, "z_usage", z_usage)
    mp.setattr(zusage, "plot_z_usage", lambda res, path, title="": path)


@pytest.fixture
def light_eval(request, monkeypatch):
    """train.main evaluates at the end of every run; for these tiny runs that costs ~1.6 s, most of
    it the z-usage curve (8 noise levels) and its matplotlib figure, which only the smoke test reads.
    Modules that use this fixture get the real zusage.z_usage on 2 levels and 8 images, and no
    figure; a test marked full_eval keeps the real evaluation."""
    if "full_eval" not in request.keywords:
        lighten_eval(monkeypatch)


# --- tiny checkpoints, and errors in one line -------------------------------------------------

ERRORS = (configurator.ConfigError, common.CheckpointError, data.DataError)


def save_model(path, **kw):
    """A checkpoint of a tiny random model, as train.py writes one (model, ema, config, step, ...)."""
    cfg = dict(train.DEFAULTS, **kw)
    torch.manual_seed(0)
    sd = common.build_model(common.model_args(cfg)).state_dict()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    common.save_checkpoint({"model": sd, "ema": sd, "config": cfg, "step": 0, "optimizer": {}, "rng": {},
                                "data_pos": {}}, path)
    return path


def write_cars(root, n=3, views=4):
    """cars3d_64.npz with 1 elevation x `views` azimuths: n - 1 train objects, 1 test object."""
    os.makedirs(root, exist_ok=True)
    rs = np.random.RandomState(0)
    np.savez(os.path.join(root, "cars3d_64.npz"), images=(rs.rand(n, 1, views, 64, 64, 3) * 255).astype(np.uint8),
             elevation_deg=np.array([0], np.float32), azimuth_deg=np.arange(views, dtype=np.float32) * 360 / views,
             object_names=np.array([f"car_{i}" for i in range(n)]), split=np.array(["train"] * (n - 1) + ["test"]))
    return root


class World:
    pass


@pytest.fixture(scope="session")
def w(tmp_path_factory, cifar_dir):
    """Tiny checkpoints and data, built once per xdist worker; every test checks that nothing
    under them changed."""
    root = str(tmp_path_factory.mktemp("inputs"))
    W = World()
    W.root, W.cifar = root, cifar_dir
    W.c10 = save_model(os.path.join(root, "c10", "ckpt.pt"), z_dim=16, data_dir=cifar_dir)
    W.cars = write_cars(os.path.join(root, "cars"))  # 4 views per object, 1 held-out object
    W.posed = save_model(os.path.join(root, "posed", "ckpt.pt"), dataset="cars3d", data_dir=W.cars, image_size=16,
                         ray_freqs=2, cond="xattn", n_tokens=4, z_dim=8)
    W.unposed = save_model(os.path.join(root, "unposed", "ckpt.pt"), dataset="cars3d", data_dir=W.cars, image_size=16,
                           z_dim=8)
    # CIFAR-10 folders with one image of another size (train and test), and one file that is no image
    W.badsize = os.path.join(root, "badsize")
    W.notimage = os.path.join(root, "notimage")
    for d in (W.badsize, W.notimage):
        for split in ("train", "test"):
            os.makedirs(os.path.join(d, split, "c0"))
            for i in range(3):
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(os.path.join(d, split, "c0", f"{i}.png"))
    for split in ("train", "test"):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(os.path.join(W.badsize, split, "c0", "z_big.png"))
        with open(os.path.join(W.notimage, split, "c0", "z_text.png"), "w") as f:
            f.write("not a PNG")
    W.npz = os.path.join(root, "npz")  # a dSprites without its keys, a Cars3D file that is text
    os.makedirs(W.npz)
    np.savez(os.path.join(W.npz, "dsprites_downsampled.npz"), x=np.zeros(2))
    with open(os.path.join(W.npz, "cars3d_64.npz"), "w") as f:
        f.write("not an archive")
    W.records = os.path.join(root, "records")  # torchvision's layout with its batch files missing
    os.makedirs(os.path.join(W.records, "cifar-10-batches-py"))
    W.text = os.path.join(root, "notes.txt")
    with open(W.text, "w") as f:
        f.write("lr = 0.1\n")
    W.png = os.path.join(W.badsize, "train", "c0", "0.png")
    W.plain = os.path.join(root, "plain.pt")  # a torch file, not a checkpoint
    torch.save({"weights": torch.ones(2)}, W.plain)
    W.noconfig = os.path.join(root, "noconfig.pt")  # config and ema, but not train.py's
    torch.save({"config": {"lr": 0.1}, "ema": {}}, W.noconfig)
    W.mismatch = os.path.join(root, "mismatch", "ckpt.pt")  # the c10 config, the posed model's weights
    os.makedirs(os.path.dirname(W.mismatch))
    ck, other = torch.load(W.c10, weights_only=True), torch.load(W.posed, weights_only=True)
    torch.save({**ck, "ema": other["ema"]}, W.mismatch)
    return W


def snapshot(*roots):
    out = {}
    for r in roots:
        for d, dirs, files in os.walk(r):
            out[d] = None
            for f in files:
                st = os.stat(os.path.join(d, f))
                out[os.path.join(d, f)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def refused(w, tmp_path):
    """refused(main, argv, match) -> the message: one of the three errors, one line matching
    `match` (the key or file it names), and nothing under the fixtures or tmp_path written."""
    def check(main, argv, match, kind=ERRORS):
        before = snapshot(w.root, w.cifar, str(tmp_path))
        with pytest.raises(ERRORS) as e:
            main([str(a) for a in argv])
        msg = str(e.value)
        assert isinstance(e.value, kind), f"{type(e.value).__name__}: {msg}"
        assert msg and "\n" not in msg and msg == msg.strip(), repr(msg)
        assert re.search(match, msg), f"{match!r} not in {msg!r}"
        after = snapshot(w.root, w.cifar, str(tmp_path))
        assert after == before, f"{argv} wrote {sorted(set(after) ^ set(before)) or 'into existing files'}"
        return msg
    return check


def one_line_error(cmd, *absent):
    """A script as a user runs it: stderr is one line `error: ...`, the exit non-zero, `absent` not made.
    train.py in a new interpreter; the others run their `__main__` block in this one (runpy), which
    is what `python script.py` runs, without another ~3 s interpreter start."""
    if cmd[0] == "train.py":
        r = subprocess.run([sys.executable] + cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
        rc, stderr = r.returncode, r.stderr
    else:
        argv, formatwarning, err = sys.argv, warnings.formatwarning, io.StringIO()
        sys.argv = [os.path.join(ROOT, cmd[0])] + cmd[1:]
        try:
            with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
                runpy.run_path(sys.argv[0], run_name="__main__")
        finally:
            sys.argv, warnings.formatwarning = argv, formatwarning
        code = e.value.code  # sys.exit("error: ...") prints its text to stderr and exits 1
        rc, stderr = (1, err.getvalue() + code + "\n") if isinstance(code, str) else (code, err.getvalue())
    lines = stderr.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    for p in absent:
        assert not os.path.exists(p), p
    return lines[0]
