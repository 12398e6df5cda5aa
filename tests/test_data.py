"""data.py: CIFAR-10 (the search order, the download, the records, the held-out split), views and
batches (deterministic per seed and step, split across micro-steps, crops in the original picture's
aspect, the Gaussian augmentation), any folder of images (modes, EXIF, labels, splits), CelebA and
dSprites; files that cannot be read; DataLoader workers fitted to the cores."""
import math
import os
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import CELEBA_ATTRS, DSPRITES, ROOT, SHARED_DATA, save_image, unreadable_images, write_celeba

SHARED_CIFAR = SHARED_DATA  # ../shared/data: the CIFAR-10 records (cifar-10-batches-py/)


# --- CIFAR-10: where it is found, its records, its held-out split ---------------------------------

def fake_cifar_records(root, n=20):
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    rs = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({"data": rs.randint(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": list(rs.randint(0, 10, n))}, f)
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_search_order(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert data.find_cifar10("mine") == ("mine", "data_dir", False)
    path, why, dl = data.find_cifar10("")
    assert (path, dl) == ("data/cifar10", True) and "download" in why
    fake_cifar_records(tmp_path / "shared" / "data" / "cifar10-subset")
    assert data.find_cifar10("")[::2] == ("../shared/data/cifar10-subset", False)
    fake_cifar_records(work / "data" / "cifar10")
    assert data.find_cifar10("")[::2] == ("data/cifar10", False)


def test_download_into_data_cifar10(tmp_path, monkeypatch):
    """No ./data/cifar10, no ../shared: the search ends in a torchvision download (mocked: no network)."""
    import torchvision
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda self: fake_cifar_records(self.root))
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity",
                        lambda self: os.path.isdir(os.path.join(self.root, self.base_folder)))
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_load_meta",  # its md5 check would fail on fake files
                        lambda self: setattr(self, "classes", [f"c{i}" for i in range(10)]))
    path, _, dl = data.find_cifar10("")
    with pytest.warns(UserWarning, match="found 20 of 10,000 images"):
        x, y, classes = data.load_cifar10(path, "test", dl)
    assert x.shape == (20, 3, 32, 32) and os.path.isfile(tmp_path / "data/cifar10/cifar-10-batches-py/test_batch")

    def offline(self):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(data.DataError, match="could not download CIFAR-10 to 'elsewhere'") as e:
        data.load_cifar10("elsewhere", "test", True)
    assert "\n" not in str(e.value)


@pytest.mark.usefixtures("light_eval")
def test_shared_cifar_records_load_with_a_count_warning():
    if not os.path.isdir(os.path.join(SHARED_CIFAR, "cifar-10-batches-py")):
        pytest.skip("../shared/data not beside the checkout")
    with pytest.warns(UserWarning, match="found 5,170 of 50,000"):
        x, y, classes = data.load_cifar10(SHARED_CIFAR, "train", n_val=0)
    assert x.shape == (5170, 3, 32, 32) and x.dtype == torch.uint8 and len(classes) == 10
    assert set(y.tolist()) == set(range(10))


@pytest.mark.usefixtures("light_eval")
def test_val_split_is_fixed_and_disjoint(cifar_dir):
    with pytest.warns(UserWarning):
        xa, _, _ = data.load_cifar10(cifar_dir, "train", n_val=20, seed=0)
        xv, _, _ = data.load_cifar10(cifar_dir, "val", n_val=20, seed=0)
        xv2, _, _ = data.load_cifar10(cifar_dir, "val", n_val=20, seed=0)
    assert len(xa) == 100 and len(xv) == 20 and torch.equal(xv, xv2)
    flat = lambda t: {bytes(r.numpy().tobytes()) for r in t}
    assert not flat(xa) & flat(xv)


def test_unreadable_image_names_the_file(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / split / "cat" / "0.png")
    (tmp_path / "train" / "cat" / "1.png").write_bytes(b"not a png")
    with pytest.raises(data.DataError, match="1.png.*remove or replace it") as e:  # in memory: every file must read
        data.load_cifar10(str(tmp_path), "train", n_val=0)
    assert "\n" not in str(e.value)


# --- views and batches ----------------------------------------------------------------------------

@pytest.mark.usefixtures("light_eval")
def test_views_are_deterministic_and_distinct():
    x = (torch.rand(6, 3, 32, 32) * 255).to(torch.uint8)
    a = data.make_views(x, "augment", "randaugment", data.Rng(0, 5, 6))
    b = data.make_views(x, "augment", "randaugment", data.Rng(0, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], a[1])  # novel views differ
    src, tgt = data.make_views(x, "identical", "cropflip", data.Rng(0, 5, 6))
    assert torch.equal(src, tgt) and src.min() >= -1 and src.max() <= 1
    d_src, d_tgt = data.make_views(x, "distort", "cropflip", data.Rng(0, 5, 6))  # the same crop, recoloured
    rng = data.Rng(0, 5, 6)
    crop = data.augment(x, "cropflip", rng)
    assert torch.equal(d_tgt, crop * 2 - 1) and torch.equal(d_src, data.color_jitter(crop, rng) * 2 - 1)
    assert not torch.allclose(d_src, d_tgt)
    # the rows of a global batch are the same numbers whichever process draws them
    full = data.Rng(0, 3, 8).rand(2)
    assert torch.equal(data.Rng(0, 3, 8, slice(4, 8)).rand(2), full[4:8])


@pytest.mark.usefixtures("light_eval")
def test_loader_batches_split_a_step_into_its_micro_steps():
    """The DataLoader's index batches for 2 micro-steps of 8 rows are the halves of one batch of 16,
    step after step, across an epoch boundary, from any start step."""
    one = list(data.StepBatches(50, 16, [slice(0, 16)], 0, 1, 5))
    two = list(data.StepBatches(50, 16, [slice(0, 8), slice(8, 16)], 0, 1, 5))
    assert len(two) == 8 and two == [half for b in one for half in (b[:8], b[8:])]


@pytest.mark.usefixtures("light_eval")
def test_crops_keep_their_aspect_in_the_original_picture():
    """A whole image squashed to a square (aspect = width / height) is cropped so that the crop's
    pixel aspect in the original picture is the drawn ratio r, as RandomResizedCrop's; its area
    fraction is the drawn one; aspect=None is the square image's crop, bit for bit."""
    aspect = torch.tensor([0.5, 1.0, 2.0, 4 / 3] * 4)
    theta = data.crop_flip_theta(data.Rng(0, 1, 16), scale=(0.25, 0.5), aspect=aspect)
    rng = data.Rng(0, 1, 16)
    area, logr = 0.25 + 0.25 * rng.rand(), math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rng.rand()
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]  # fractions of the square's width and height
    fits = (w < 1) & (h < 1)
    assert fits.sum() >= 12
    torch.testing.assert_close((w * aspect / h)[fits], logr.exp()[fits])  # pixel width / height in the picture
    torch.testing.assert_close((w * h)[fits], area[fits])
    assert torch.equal(data.crop_flip_theta(data.Rng(0, 1, 16)), data.crop_flip_theta(data.Rng(0, 1, 16), aspect=None))


@pytest.mark.usefixtures("light_eval")
def test_folder_training_views_come_from_the_whole_picture(tmp_path):
    """A 96 x 48 picture, red in its left sixth: the centre crop (evaluation) never shows the red, the
    training views (whole picture at decode_size, cropped to image_size on the device) do."""
    img = np.zeros((48, 96, 3), np.uint8)
    img[:, :, 2] = 255
    img[:, :16] = (255, 0, 0)
    (tmp_path / "c").mkdir()
    Image.fromarray(img).save(tmp_path / "c" / "a.png")
    ds = data.FolderData(str(tmp_path), 32)
    centre, _, bad = ds[0]
    assert centre.shape == (3, 32, 32) and centre[0].max() < 30  # no red in the centre crop
    size = data.decode_size(32, 0.25)
    whole, y, aspect, bad = ds.whole_images(size)[0]
    assert size == 64 and whole.shape == (3, 64, 64) and aspect == 2.0 and y == -1  # one class folder: no labels
    assert bad == ""  # the file read
    x = whole[None].expand(64, -1, -1, -1)
    views = data.augment(x, "cropflip", data.Rng(0, 0, 64), 0.25, torch.full((64,), 2.0), 32)
    assert views.shape == (64, 3, 32, 32)
    red = (views[:, 0] > 0.9) & (views[:, 2] < 0.1)
    assert red.flatten(1).any(1).float().mean() > 0.2  # many views reach the left border


def test_gaussian_augmentation_flips_and_adds_noise():
    x = torch.linspace(0, 1, 8).repeat(64, 3, 8, 1)  # (64, 3, 8, 8), brighter to the right
    out = data.augment(x, "gaussian", data.Rng(0, 0, 64))
    flipped = (out[:, :, :, 0] > out[:, :, :, -1]).float().mean((1, 2)) > 0.5
    assert 0.25 < flipped.float().mean() < 0.75  # about half the images flipped
    back = torch.where(flipped[:, None, None, None], out.flip(-1), out)
    inside = (x > 0.3) & (x < 0.7)  # away from the clipping at 0 and 1
    assert abs((back - x)[inside].std().item() - data.GAUSSIAN_STD) < 0.01
    assert torch.equal(out, data.augment(x, "gaussian", data.Rng(0, 0, 64)))  # a function of (seed, step)


# --- any folder of images (dataset='folder'), any image mode, and your own images -----------------

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
    with pytest.raises(data.DataError, match="1 of the 1 image files tried cannot be read.*broken.jpg"):
        data.FolderData(str(tmp_path), 8)  # a folder of it alone: refused when made


def test_unreadable_files_are_replaced_by_the_next_readable_one(tmp_path, monkeypatch):
    """Two classes: a/ holds a JPEG cut short, a text file named .png, an empty file and a PNG over PIL's
    decompression-bomb limit, between readable PNGs; b/ a multi-page TIFF (read as its first page) and a
    PNG between once and twice the limit (read, without PIL's warning). Each unreadable file stands in
    as the next one that reads, with its label, and names itself; after the last file comes the first."""
    colour = lambda v: np.full((8, 8, 3), v, np.uint8)
    save_image(tmp_path / "a" / "0.png", colour(10))
    bad = unreadable_images(tmp_path / "a", prefix="1")
    save_image(tmp_path / "a" / "2.png", colour(20))
    save_image(tmp_path / "a" / "3.png", colour(25))
    (tmp_path / "b").mkdir()
    pages = [Image.fromarray(colour(v)) for v in (30, 200)]
    pages[0].save(tmp_path / "b" / "tiff.tif", save_all=True, append_images=pages[1:])
    save_image(tmp_path / "b" / "z_big.png", np.full((50, 50, 3), 40, np.uint8))
    (tmp_path / "b" / "z_cut.png").write_bytes((tmp_path / "a" / "2.png").read_bytes()[:30])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # z_big.png's 2,500 pixels: over the limit, not twice over
    ds = data.FolderData(str(tmp_path), 8)
    names = [os.path.basename(f) for f in ds.files]
    assert names == ["0.png", "1bomb.png", "1cut.jpg", "1empty.jpg", "1text.png", "2.png", "3.png", "tiff.tif",
                     "z_big.png", "z_cut.png"]  # half unreadable: not refused (test below)
    with warnings.catch_warnings(record=True) as said:  # the filters in place: what a user would see
        items = [ds[i] for i in range(len(ds))]
    assert not said  # no DecompressionBombWarning
    colours = [int(x[0, 0, 0]) for x, _, _ in items]
    assert colours == [10, 20, 20, 20, 20, 20, 25, 30, 40, 10]  # the next readable one; z_cut.png: the first
    assert [y for _, y, _ in items] == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0]  # the label of the image given
    for (_, _, msg), name in zip(items, names):
        assert (msg == "") == (name in ("0.png", "2.png", "3.png", "tiff.tif", "z_big.png")), (name, msg)
        assert not msg or re.fullmatch(rf"cannot read image file '.*{name}' \([A-Za-z]+Error: .*\)", msg), msg
    assert "DecompressionBombError" in items[1][2] and "truncated" in items[2][2]
    assert [int(ds[2][0][0, 0, 0]) for _ in range(2)] == [20, 20] and ds.whole_images(8)[4][3] == items[4][2]
    assert sorted(bad) == sorted(os.path.join(tmp_path, "a", n) for n in names[1:5])


def test_a_mostly_unreadable_split_is_refused_when_made(tmp_path):
    """More than half of the files tried (all of a split of <= 64) unreadable: one line naming one, before
    any image is used; exactly half is still a split to train on."""
    for i in range(4):
        save_image(tmp_path / "half" / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
    unreadable_images(tmp_path / "half")
    assert len(data.FolderData(str(tmp_path / "half"), 8)) == 8
    os.remove(tmp_path / "half" / "0.png")
    with pytest.raises(data.DataError, match=r"half': 4 of the 7 image files tried cannot be read, e\.g\. cannot "
                                             r"read image file .*bomb\.png.*is it the right folder") as e:
        data.FolderData(str(tmp_path / "half"), 8)
    assert "\n" not in str(e.value)


def test_read_images_skips_unreadable_files_naming_each(tmp_path):
    save_image(tmp_path / "mine" / "a.png", np.full((10, 12, 3), 7, np.uint8))
    bad = unreadable_images(tmp_path / "mine")
    with pytest.warns(UserWarning) as said:
        x, files = data.read_images(str(tmp_path / "mine"), 8)
    assert x.shape == (1, 3, 8, 8) and files == [str(tmp_path / "mine" / "a.png")]
    assert sorted(str(w.message).split("'")[1] for w in said) == sorted(bad)
    assert all(str(w.message).endswith(": skipped") for w in said)
    os.remove(tmp_path / "mine" / "a.png")
    with pytest.raises(data.DataError, match="images=.*not one of its 4 image files can be read") as e:
        data.read_images(str(tmp_path / "mine"), 8)
    assert "\n" not in str(e.value)


def test_workers_fit_the_cores_this_process_may_use(monkeypatch):
    """num_workers is capped at the cores of this process's affinity, shared by torchrun's processes on
    the node; a DataLoader with the workers it gives draws no warning from torch."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data.fit_workers(3) == (3, "") and data.fit_workers(0) == (0, "")
    n, line = data.fit_workers(8)
    assert n == 4 and line == "data: 4 DataLoader workers, not num_workers=8: this process may use 4 CPU cores"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert data.fit_workers(8)[0] == 1 and data.fit_workers(0) == (0, "")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert data.fit_workers(2)[0] == 1  # at least one
    monkeypatch.undo()
    loader = torch.utils.data.DataLoader(list(range(4)), num_workers=data.fit_workers(64)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.check_worker_number_rationality()  # what torch runs when the workers start


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
    x, y, _ = tr[0]
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


# --- CelebA and dSprites --------------------------------------------------------------------------

def test_celeba_fixture_round_trip(celeba_dir):
    root, colours, partition, attrs = celeba_dir
    for split, code in (("train", 0), ("val", 1), ("test", 2)):
        x, a, names = data.load_celeba(root, split, image_size=32)
        rows = [i for i, p in enumerate(partition) if p == code]
        assert x.shape == (len(rows), 3, 32, 32) and x.dtype == torch.uint8
        assert names == CELEBA_ATTRS
        assert a.tolist() == attrs[rows].astype(int).tolist()
        mean_colour = x.float().mean(dim=(2, 3))
        assert (mean_colour - torch.tensor([colours[i] for i in rows]).float()).abs().max() < 4  # JPEG loss only
    assert len(data.load_celeba(root, "train", 16, n=2)[0]) == 2


def test_celeba_missing_files_name_the_path_and_layout(tmp_path, celeba_dir):
    with pytest.raises(data.DataError, match=r"list_attr_celeba\.txt.*img_align_celeba/\*\.jpg"):
        (tmp_path / "celeba" / "img_align_celeba").mkdir(parents=True)
        data.load_celeba(str(tmp_path), "train")
    root = tmp_path / "other"
    write_celeba(root, [(0, 0, 0)] * 2, [0, 0])
    os.remove(root / "celeba" / "img_align_celeba" / "000002.jpg")
    with pytest.raises(data.DataError, match="000002.jpg"):
        data.load_celeba(str(root), "train")


def test_load_dsprites_splits():
    xte, cte = data.load_dsprites(DSPRITES, "test")
    xtr, ctr = data.load_dsprites(DSPRITES, "train", n_val=500)
    assert xte.shape == (4608, 3, 64, 64) and xte.dtype == torch.uint8 and len(ctr) == 46080 - 4608 - 500
    assert set(xte[:50].unique().tolist()) == {0, 255} and torch.equal(xte[:, 0], xte[:, 2])
    assert cte.shape == (4608, 5) and cte.max(0).values.tolist() == [2, 5, 9, 15, 15]
    key = lambda c: set((c * torch.tensor([2560 * 6, 2560, 256, 16, 1])).sum(1).tolist())  # factors -> grid index
    assert len(key(cte)) == 4608 and not key(cte) & key(ctr)
    mass = xte[:, 0].float() / 255  # (N, 64, 64): each image agrees with its factors
    cx = (mass.sum(1) * torch.arange(64.0)).sum(1) / mass.sum((1, 2))
    cy = (mass.sum(2) * torch.arange(64.0)).sum(1) / mass.sum((1, 2))
    corr = lambda a, b: torch.corrcoef(torch.stack([a, b.float()]))[0, 1]
    assert corr(cx, cte[:, 3]) > 0.95 and corr(cy, cte[:, 4]) > 0.95 and corr(mass.sum((1, 2)), cte[:, 1]) > 0.8
    x5, c5 = data.load_dsprites(DSPRITES, "test", n=5)
    assert torch.equal(x5, xte[:5]) and torch.equal(c5, cte[:5])
    with pytest.raises(data.DataError, match="dsprites_downsampled.npz"):
        data.load_dsprites(ROOT, "test")
