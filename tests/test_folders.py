"""The code paths of the paper's big datasets, on real images: the CIFAR-10 PNG subset laid out as
an ImageNet folder (train/ and val/ links) through train.py --dataset=imagenet, its evaluation,
probe.py's streaming probe with its feature cache, kNN and sample.py; CelebA trained from a fixture
in its public layout, then probe.py --task=multilabel and sample.py on it."""
import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import monitor  # noqa: E402
import solvers  # noqa: E402
import probe  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from conftest import lighten_eval  # noqa: E402
from test_probe import write_celeba  # noqa: E402

CIFAR_PNG = os.path.join(ROOT, "..", "shared", "data", "cifar10-subset")
TINY = ["--encoder=tiny", "--unet=tiny", "--z_dim=32", "--batch_size=16", "--num_workers=0", "--threads=1",
        "--sample_steps=2", "--warmup_iters=1", "--log_interval=12"]


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
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


def test_a_folder_run_evaluates_like_a_cifar_run(imagenet_run):
    log = [json.loads(line) for line in open(imagenet_run / "log.jsonl")]
    evals = [r for r in log if "knn" in r]
    assert [r["step"] for r in evals] == [0, 12, 24]
    for r in evals:
        assert 0 <= r["knn"] <= 100 and np.isfinite(r["zgap"]) and np.isfinite(r["z_removed_mean"])
    for name in ("curves.png", "samples_000000.png", "samples_000024.png"):
        assert (imagenet_run / name).stat().st_size > 1000, name
    ck = torch.load(imagenet_run / "ckpt.pt", weights_only=True)
    assert ck["config"]["dataset"] == "imagenet" and ck["step"] == 24


def test_streaming_probe_of_a_folder_run_and_its_cache(imagenet_run, capsys, monkeypatch):
    """The val folder, never CIFAR-10 (80 images, not 1,017); features extracted once, then read from
    the cache by the next probe; the extraction goes through DataLoader workers when asked."""
    ck = f"--ckpt={imagenet_run / 'ckpt.pt'}"
    res = probe.main([ck, "--task=linear", "--num_workers=2"])
    assert res["dataset"] == "imagenet" and res["features"] == "z" and (res["n_train"], res["n_test"]) == (240, 80)
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["solver"] == "lbfgs" and res["wd"] in solvers.LINEAR_WDS
    assert set(res["extract_img_s"]) == {"train", "test"}
    cached = sorted(os.listdir(imagenet_run / "features"))
    assert len(cached) == 2 and all(f.startswith("imagenet_") for f in cached)
    out = capsys.readouterr().out
    assert "imagenet train z features: 240 images" in out and "linear top1" in out
    extracted = []
    monkeypatch.setattr(probe, "stream_features", lambda *a, **k: extracted.append(1))
    knn = probe.main([ck, "--task=knn"])  # the same features: read, not extracted
    assert not extracted and knn["extract_img_s"] == {} and 0 <= knn["top1"] <= knn["top5"] <= 100
    assert "features: read" in capsys.readouterr().out
    monkeypatch.undo()
    pool = probe.main([ck, "--task=knn", "--features=pool", "--cache=False"])  # other features: extracted
    assert set(pool["extract_img_s"]) == {"train", "test"} and len(os.listdir(imagenet_run / "features")) == 2


def test_probe_refuses_another_dataset_unless_asked(imagenet_run):
    ck = f"--ckpt={imagenet_run / 'ckpt.pt'}"
    with pytest.raises(probe.ConfigError, match="probed on its test split"):
        probe.main([ck, "--split=val"])
    with pytest.raises(probe.ConfigError, match="augments a training set held in memory"):
        probe.main([ck, "--probe_aug=1"])
    # a folder without train/ and val/ (the run's own PNGs) is a folder of images, but without class subfolders
    with pytest.raises(data.DataError, match="task='linear' needs labels.*task='zusage' measures"):
        probe.main([ck, f"--data_dir={imagenet_run}"])
    empty = imagenet_run / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(data.DataError, match="no image files in"):
        probe.main([ck, f"--data_dir={empty}"])


def test_sample_reads_only_the_images_it_shows(imagenet_run, imagenet_dir, capsys, monkeypatch):
    reads = []
    real = data.FolderData.__getitem__
    monkeypatch.setattr(data.FolderData, "__getitem__", lambda self, i: reads.append(i) or real(self, i))
    res = sample.main([f"--ckpt={imagenet_run / 'ckpt.pt'}", "--mode=recon", "--n=4", "--index=10", "--steps=2",
                       "--threads=1", f"--out_dir={imagenet_run / 'samples'}"])
    assert reads == [10, 11, 12, 13]
    assert all(np.isfinite(res["metrics"][k]["psnr"]) for k in ("z", "z_masked"))
    got = json.load(open(imagenet_run / "samples" / "recon.json"))
    assert got["n"] == 4 and "data: 4 of the 80 images of the imagenet val/ or held-out part: " in capsys.readouterr().out
    reads.clear()
    res = sample.main([f"--ckpt={imagenet_run / 'ckpt.pt'}", "--mode=interp", "--index=40", "--steps=2", "--frames=3",
                       "--threads=1", f"--out_dir={imagenet_run / 'samples'}"])
    assert reads == [40, 41] and res["frames"].shape == (3, 3, 32, 32)
    with pytest.raises(data.DataError, match="the test split has 80"):
        sample.main([f"--ckpt={imagenet_run / 'ckpt.pt'}", "--mode=interp", "--index=79", "--steps=2"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sgd_probe_agrees_with_lbfgs(seed):
    """The mini-batch probe against the full-batch L-BFGS probe on the same features: 10 overlapping
    Gaussian classes in 32 dimensions of unequal scales (3,000 train / 2,000 test, a hard problem:
    ~55% top-1), each probe choosing its own weight decay (1e-6 ... 1e-2; and epochs) on the same
    held-out rows. Within 0.5 points, at three seeds (well-conditioned features: the mini-batch solver
    converges here, not on tests/test_probe.py's low_variance_signal)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(10, 32, generator=g) * 0.3
    y = torch.randint(0, 10, (5000,), generator=g)
    f = (mu[y] + torch.randn(5000, 32, generator=g)) * torch.rand(32, generator=g) * 3
    ftr, fte, ytr, yte = f[:3000].half(), f[3000:].half(), y[:3000], y[3000:]
    a = solvers.linear_probe(ftr, ytr, fte, yte, 10, wds=solvers.WDS, solver="sgd")
    b = solvers.linear_probe(ftr, ytr, fte, yte, 10, wds=solvers.WDS, solver="lbfgs")
    assert 40 < b["top1"] < 70, b  # neither trivial nor hopeless
    assert abs(a["top1"] - b["top1"]) <= 0.5 and abs(a["top5"] - b["top5"]) <= 0.5, (a, b)


def test_knn_streams_over_chunks_of_references():
    g = torch.Generator().manual_seed(0)
    ftr, fte = torch.randn(700, 16, generator=g), torch.randn(300, 16, generator=g)
    ytr, yte = torch.randint(0, 5, (700,), generator=g), torch.randint(0, 5, (300,), generator=g)
    whole = solvers.knn_accuracy(ftr, ytr, fte, yte, top5=True)
    assert solvers.knn_accuracy(ftr.half(), ytr, fte.half(), yte, chunk=64, top5=True) == pytest.approx(whole, abs=0.34)
    assert solvers.knn_accuracy(ftr, ytr, fte, yte, chunk=64, top5=True) == whole


def test_gaussian_augmentation_flips_and_adds_noise():
    x = torch.linspace(0, 1, 8).repeat(64, 3, 8, 1)  # (64, 3, 8, 8), brighter to the right
    out = data.augment(x, "gaussian", data.Rng(0, 0, 64))
    flipped = (out[:, :, :, 0] > out[:, :, :, -1]).float().mean((1, 2)) > 0.5
    assert 0.25 < flipped.float().mean() < 0.75  # about half the images flipped
    back = torch.where(flipped[:, None, None, None], out.flip(-1), out)
    inside = (x > 0.3) & (x < 0.7)  # away from the clipping at 0 and 1
    assert abs((back - x)[inside].std().item() - data.GAUSSIAN_STD) < 0.01
    assert torch.equal(out, data.augment(x, "gaussian", data.Rng(0, 0, 64)))  # a function of (seed, step)


def test_celeba_trains_probes_and_samples(tmp_path, capsys, light_eval):
    """configs/celeba.py on a fixture in CelebA's public layout (at 32 px, tiny nets): train.py reads
    the official partition through DataLoader workers and evaluates without kNN (40 attributes, not a
    class); probe.py --task=multilabel and sample.py --mode=directions --attr=... run on the result."""
    colours = [(10 * i, 200 - 8 * i, 60 + 5 * i) for i in range(24)]
    write_celeba(tmp_path, colours, [0] * 16 + [1] * 4 + [2] * 4)
    out = tmp_path / "run"
    train.main([os.path.join(ROOT, "configs", "celeba.py"), f"--data_dir={tmp_path}", f"--out_dir={out}",
                "--image_size=32", "--max_iters=4", "--eval_interval=4", "--compile=False", "--channels_last=False",
                *TINY[:3], "--batch_size=8", *TINY[4:], "--warmup_iters=1"])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    evals = [r for r in log if "zgap" in r]
    assert [r["step"] for r in evals] == [0, 4] and not any("knn" in r for r in evals)
    res = probe.main([f"--ckpt={out / 'ckpt.pt'}", "--task=multilabel"])
    assert res["dataset"] == "celeba" and (res["n_train"], res["n_test"]) == (16, 4) and len(res["f1_per_attribute"]) == 40
    got = sample.main([f"--ckpt={out / 'ckpt.pt'}", "--mode=directions", "--attr=2", "--steps=2", "--alphas=-1,1",
                       "--n_dirs=2", "--threads=1"])
    assert got["images"].shape[:2] == (3, 3)  # PC1, PC2 and the attribute's probe direction x (source + 2 steps)
    assert "data: 4 of the 4 images of the celeba test partition" in capsys.readouterr().out


# --- any folder of images (dataset='folder'), any image mode, and your own images in sample.py ----------

def save_image(path, img):
    """img: a PIL image or a uint8 array; the folders are made."""
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(path)
    return str(path)


def flat_folder(root, n, size=(12, 10)):
    """n random RGB PNGs directly in root (no class subfolders), w x h = size."""
    rs = np.random.RandomState(n)
    return [save_image(root / f"{i:02d}.png", (rs.rand(size[1], size[0], 3) * 255).astype(np.uint8)) for i in range(n)]


def test_to_rgb_scales_16_bit_grey_instead_of_clipping(tmp_path):
    from PIL import Image
    a = np.array([[0, 32768, 65535, 257]], dtype=np.uint16)  # 0, half, full, 1/255
    path = save_image(tmp_path / "grey16.png", Image.fromarray(a))
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")  # a 16-bit PNG as PIL reads it
    want = [[[0] * 3, [128] * 3, [255] * 3, [1] * 3]]
    assert data.read_rgb(path).tolist() == want  # convert('RGB') would clip 32768 to 255
    assert data.to_rgb(Image.fromarray(a.astype(np.int32))).tolist() == want  # mode 'I'
    assert data.read_rgb(path).dtype == np.uint8


def test_to_rgb_lays_transparency_on_white(tmp_path):
    from PIL import Image
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 0, 0)
    rgba[0, :, 3] = (0, 255, 128)  # transparent, opaque, half
    got = data.read_rgb(save_image(tmp_path / "rgba.png", Image.fromarray(rgba, "RGBA")))
    assert got[0, 0].tolist() == [255, 255, 255]  # alpha 0: white, not the hidden red (nor black)
    assert got[0, 1].tolist() == [200, 0, 0]
    assert np.allclose(got[0, 2], [227, 127, 127], atol=1)  # 200 * 128/255 + 255 * 127/255
    la = np.stack([np.full((2, 2), 10, np.uint8), np.array([[0, 255], [0, 255]], np.uint8)], -1)
    assert data.to_rgb(Image.fromarray(la, "LA"))[:, :, 0].tolist() == [[255, 10], [255, 10]]
    pal = Image.new("P", (3, 2), 1)
    pal.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)  # index 0 blue, 1 red
    pal.putpixel((2, 1), 0)
    path = tmp_path / "pal.png"
    pal.save(path, transparency=1)  # red (index 1) is transparent
    got = data.read_rgb(path)
    assert got[0, 0].tolist() == [255, 255, 255] and got[1, 2].tolist() == [0, 0, 255]


@pytest.mark.parametrize("orientation, top", [(6, "red"), (8, "blue"), (1, None)])
def test_read_rgb_turns_exif_rotated_photos_upright(tmp_path, orientation, top):
    """A 40 x 20 JPEG, red left half and blue right half, its EXIF saying the camera was turned:
    orientation 6 is shown turned 90 degrees clockwise (the left edge on top), 8 anticlockwise."""
    from PIL import Image
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20, 0] = 255
    a[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[274] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(a).save(path, exif=exif, quality=95)
    got = data.read_rgb(path)
    if orientation == 1:
        assert got.shape == (20, 40, 3)
        return
    assert got.shape == (40, 20, 3)  # 20 wide, 40 tall
    first, last = got[2, 10].astype(int), got[-3, 10].astype(int)
    red, blue = (first, last) if top == "red" else (last, first)
    assert red[0] > 200 and red[2] < 60 and blue[2] > 200 and blue[0] < 60


def test_read_rgb_names_an_unreadable_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a JPEG at all")
    with pytest.raises(data.DataError, match="cannot read image file .*broken.jpg") as e:
        data.read_rgb(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(data.DataError, match="broken.jpg"):  # a folder with it: the same error, naming it
        data.FolderData(str(tmp_path), 8)[0]


def test_list_images_labels_only_when_every_image_has_a_class(tmp_path):
    px = np.zeros((4, 4, 3), np.uint8)
    for p in ("a/1.png", "a/deep/2.jpg", "a/.3.png", "b/4.webp", "b/notes.txt", ".c/5.png"):
        save_image(tmp_path / "L" / p, px) if not p.endswith(".txt") else (tmp_path / "L" / p).write_text("x")
    files, y, classes = data.list_images(tmp_path / "L")
    assert [os.path.relpath(f, tmp_path / "L") for f in files] == ["a/1.png", "a/deep/2.jpg", "b/4.webp"]
    assert y.tolist() == [0, 0, 1] and classes == ["a", "b"]
    save_image(tmp_path / "L" / "top.png", px)  # one image outside the class folders: no labels at all
    files, y, classes = data.list_images(tmp_path / "L")
    assert len(files) == 4 and y is None and classes == []
    save_image(tmp_path / "one" / "a" / "1.png", px)  # a single class holding images: no labels
    (tmp_path / "one" / "b").mkdir()
    assert data.list_images(tmp_path / "one")[1:] == (None, [])
    ds = data.FolderData(str(tmp_path / "L"), 8)
    assert not ds.labelled and ds.classes == [] and ds.targets.tolist() == [-1] * 4 and "no labels" in ds.about


def test_list_images_skips_hidden_folders_below_the_classes(tmp_path):
    px = np.zeros((4, 4, 3), np.uint8)
    for p in ("a/1.png", "a/.thumbs/2.png", "b/3.png"):
        save_image(tmp_path / p, px)
    files = data.list_images(tmp_path)[0]
    assert [os.path.relpath(f, tmp_path) for f in files] == ["a/1.png", "b/3.png"]


def test_folder_holds_out_a_seeded_part(tmp_path):
    files = flat_folder(tmp_path / "imgs", 23)
    save_image(tmp_path / "imgs" / ".hidden.png", np.zeros((4, 4, 3), np.uint8))
    split = lambda sp, n_val=500, seed=0: data.load_folder(str(tmp_path / "imgs"), sp, 8, n_val, seed)
    tr, va, te = split("train"), split("val"), split("test")
    assert (len(tr), len(va)) == (19, 4)  # a fifth of 23 (n_val=500 is more)
    assert va.files == te.files and not set(tr.files) & set(va.files) and sorted(tr.files + va.files) == files
    assert not tr.labelled and tr.classes == [] and tr.targets.tolist() == [-1] * 19
    assert split("train").files == tr.files and split("val", seed=1).files != va.files  # a function of the seed
    assert len(split("val", n_val=3)) == 3 and len(split("train", n_val=3)) == 20
    assert len(split("val", n_val=10)) == 4  # min(n_val, a fifth)
    x, y = tr[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and y == -1
    ds = data.load("folder", str(tmp_path / "imgs"), "test", 8, n_val=3, seed=1)
    assert isinstance(ds, data.FolderData) and ds.files == split("test", 3, 1).files
    few = flat_folder(tmp_path / "few", 4)
    few_dir = str(tmp_path / "few")
    assert len(data.load_folder(few_dir, "val")) == 1 and len(data.load_folder(few_dir)) == 3  # 4 // 5 = 0: at least 1
    assert sorted(few) == few


def test_folder_expands_home_and_refuses_folders_without_images(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    flat_folder(tmp_path / "photos", 5)
    assert len(data.load_folder("~/photos", "train")) == 4
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    save_image(tmp_path / "empty" / ".hidden.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(data.DataError, match="no image files in"):
        data.load_folder(str(tmp_path / "empty"), "train")
    with pytest.raises(data.DataError, match="no folder"):
        data.load_folder(str(tmp_path / "missing"), "train")
    flat_folder(tmp_path / "single", 1)
    with pytest.raises(data.DataError, match="holds 1 image"):
        data.load_folder(str(tmp_path / "single"), "train")


def test_folder_train_and_val_subfolders_are_the_splits(tmp_path):
    px = np.zeros((6, 6, 3), np.uint8)
    for p in ("train/ant/1.png", "train/bee/2.png", "train/cat/3.png", "train/cat/4.png",
              "val/bee/5.png", "val/cat/6.png", "val/cat/7.png", "stray.png"):
        save_image(tmp_path / "d" / p, px)
    tr = data.load("folder", str(tmp_path / "d"), "train", 8)
    va = data.load("folder", str(tmp_path / "d"), "val", 8)
    assert len(tr) == 4 and tr.targets.tolist() == [0, 1, 2, 2] and tr.classes == ["ant", "bee", "cat"]
    assert len(va) == 3 and va.targets.tolist() == [1, 2, 2] and va.classes == ["ant", "bee", "cat"]  # train's numbers
    assert [int(va[i][1]) for i in range(3)] == [1, 2, 2] and va.labelled
    assert data.load_folder(str(tmp_path / "d"), "test").files == va.files
    save_image(tmp_path / "d" / "val" / "dog" / "8.png", px)
    with pytest.raises(data.DataError, match="class folders train/ lacks: dog") as e:
        data.load_folder(str(tmp_path / "d"), "val")
    assert "\n" not in str(e.value)


def test_read_images_takes_files_and_folders_of_any_size(tmp_path):
    from PIL import Image
    a = save_image(tmp_path / "a.png", np.full((30, 50, 3), 9, np.uint8))
    save_image(tmp_path / "more" / "b.jpg", np.full((64, 20, 3), 200, np.uint8))
    save_image(tmp_path / "more" / "deep" / "c.png", Image.fromarray(np.full((7, 9), 65535, np.uint16)))
    x, files = data.read_images(f"{a}, {tmp_path / 'more'}", 16)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.uint8
    assert [os.path.basename(f) for f in files] == ["a.png", "b.jpg", "c.png"]
    assert x[0].max() == 9 and abs(int(x[1].float().mean()) - 200) <= 2 and x[2].min() == 255
    with pytest.raises(data.DataError, match="no file or folder .*nothere.png"):
        data.read_images(f"{a},{tmp_path / 'nothere.png'}", 16)
    (tmp_path / "none").mkdir()
    with pytest.raises(data.DataError, match="no image files in the folder"):
        data.read_images(str(tmp_path / "none"), 16)


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


@pytest.fixture(scope="module")
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


def test_unlabelled_folder_trains_without_knn(photo_run):
    out, photos, said = photo_run
    assert any(line.startswith("data: no labels") for line in said.splitlines()), said
    assert "data: folder 16 train images" in said and "4 of its 20 images" in said
    evals = [r for r in map(json.loads, open(out / "log.jsonl")) if "zgap" in r]
    assert [r["step"] for r in evals] == [0, 2]
    for r in evals:
        assert "knn" not in r and np.isfinite(r["z_removed_mean"]) and np.isfinite(r["z_removed_-3"]) and "zusage" in r
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["config"]["dataset"] == "folder" and ck["step"] == 2 and ck["config"]["data_dir"] == str(photos)


def test_labelled_flat_folder_run_evaluates_knn(tmp_path, light_eval):
    """Class subfolders without train/ and val/: labels, a held-out part, and kNN in the evaluation."""
    rs = np.random.RandomState(1)
    for c, colour in (("red", 0), ("blue", 2)):
        for i in range(10):
            a = (rs.rand(20 + i, 24, 3) * 60).astype(np.uint8)
            a[..., colour] += 180
            save_image(tmp_path / "d" / c / f"{i}.png", a)
    out = tmp_path / "run"
    train.main([os.path.join(ROOT, "configs", "cifar10_cpu.py"), "--dataset=folder", f"--data_dir={tmp_path / 'd'}",
                "--image_size=32", f"--out_dir={out}", "--max_iters=1", "--eval_interval=1", "--eval_at_start=False",
                *TINY[:3], "--batch_size=8", *TINY[4:7], "--warmup_iters=1"])
    evals = [r for r in map(json.loads, open(out / "log.jsonl")) if "zgap" in r]
    assert [r["step"] for r in evals] == [1] and 0 <= evals[0]["knn"] <= 100


def sample_args(run, *more):
    return [f"--ckpt={run / 'ckpt.pt'}", "--steps=2", "--threads=1", f"--out_dir={run / 'own'}", *more]


def test_sample_reconstructs_your_images(photo_run, tmp_path, capsys):
    out, photos, _ = photo_run
    mine = save_image(tmp_path / "mine.png", (np.random.RandomState(3).rand(50, 70, 4) * 255).astype(np.uint8))
    res = sample.main(sample_args(out, "--mode=recon", f"--images={mine},{photos / 'album'},{photos / 'grey16.png'}"))
    assert res["images"].shape == (3, 3, 3, 32, 32)  # source / with z / z masked x 3 images
    assert all(np.isfinite(res["metrics"][k]["psnr"]) for k in ("z", "z_masked"))
    got = json.load(open(out / "own" / "recon.json"))
    assert got["n"] == 3 and got["step"] == 2 and "mine.png" in got["data"] and "album" in got["data"]
    assert (out / "own" / "recon.png").stat().st_size > 1000
    assert "data: 3 of your images" in capsys.readouterr().out


def test_sample_modes_on_your_images(photo_run):
    out, photos, _ = photo_run
    images = f"--images={photos / 'rotated.jpg'},{photos / 'rgba.png'},{photos / 'pal.gif'},{photos / 'grey.png'}"
    res = sample.main(sample_args(out, "--mode=interp", "--frames=2", images))
    assert res["frames"].shape == (2, 3, 32, 32) and (out / "own" / "interp.png").is_file()
    res = sample.main(sample_args(out, "--mode=mix", images))
    assert res["images"].shape[1] == 2  # 4 images: 2 (A, B) pairs
    res = sample.main(sample_args(out, "--mode=random", "--ws=2", images))
    assert res["images"].shape[:2] == (4, 3) and (out / "own" / "random.png").is_file()
    res = sample.main(sample_args(out, "--mode=directions", "--n_dirs=2", "--alphas=-1,1", images, "--index=2"))
    assert res["images"].shape[:2] == (2, 3)  # PC1, PC2 (no labels: no class direction) x (source + 2 steps)
    # the walked image is the third one given (pal.gif), not a test image
    mine = data.read_images(str(photos / "pal.gif"), 32)[0][0].float() / 127.5 - 1
    assert torch.allclose(res["images"][0, 0], mine) and (out / "own" / "directions.png").is_file()


def test_sample_refuses_too_few_or_missing_images(photo_run):
    out, photos, _ = photo_run
    with pytest.raises(data.DataError, match=r"images=.*mode='interp' reads 2 image\(s\).*but 1 was given") as e:
        sample.main(sample_args(out, "--mode=interp", f"--images={photos / '00.jpg'}"))
    assert "\n" not in str(e.value)
    with pytest.raises(data.DataError, match="images=.*mode='mix'"):
        sample.main(sample_args(out, "--mode=mix", f"--images={photos / '00.jpg'},{photos / '01.png'}", "--index=1"))
    with pytest.raises(data.DataError, match="no file or folder .*gone.png") as e:
        sample.main(sample_args(out, "--mode=recon", f"--images={photos / '00.jpg'},{photos / 'gone.png'}"))
    assert "\n" not in str(e.value)


def test_probe_of_an_unlabelled_folder_measures_only_zusage(photo_run):
    out, photos, _ = photo_run
    with pytest.raises(data.DataError, match="task='linear' needs labels") as e:
        probe.main([f"--ckpt={out / 'ckpt.pt'}", "--task=linear"])
    assert "\n" not in str(e.value)
    res = probe.main([f"--ckpt={out / 'ckpt.pt'}", "--task=zusage"])
    assert res["dataset"] == "folder" and (res["n_train"], res["n_test"]) == (16, 4) and res["step"] == 2
    assert np.isfinite(res["removed_mean"]) and (out / "probe_zusage_z.json").is_file()


def test_sample_directions_asks_for_more_directions_than_a_small_folder_holds(photo_run):
    """The run's held-out part is 4 images: 4 centred points span 3 directions, so n_dirs=6 draws those 3
    (an unlabelled folder has no class direction)."""
    out, photos, _ = photo_run
    res = sample.main(sample_args(out, "--mode=directions", "--n_dirs=6", "--alphas=1"))
    assert res["images"].shape[0] == len(res["directions"]) == 3
