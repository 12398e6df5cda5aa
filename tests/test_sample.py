"""sample.py: slerp, section mixing, directions, and every mode end to end on a tiny random model
(CPU, a few sampler steps); on image folders: it reads only the images it shows, and takes your own
images in every mode. (PSNR and SSIM: tests/test_common.py.)"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data
import sample
import train
from conftest import save_image, unreadable_images

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny CIFAR-10 (ImageFolder, 10 classes x 3 test images) and a checkpoint of a tiny random
    model whose zero-initialised parameters (z modulations, last convs) are randomised, so that its
    samples depend on z."""
    root = tmp_path_factory.mktemp("sample")
    rs = np.random.RandomState(0)
    for split, n in (("train", 1), ("test", 3)):
        for c in range(10):
            d = root / "cifar" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rs.rand(32, 32, 3) * 60 + c * 19).astype(np.uint8)).save(d / f"{i}.png")
    cfg = dict(train.DEFAULTS, z_dim=32, data_dir=str(root / "cifar"))
    torch.manual_seed(0)
    net = common.build_model(common.model_args(cfg))
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    sd = net.state_dict()
    path = str(root / "ckpt.pt")
    common.save_checkpoint({"model": sd, "ema": sd, "config": cfg, "step": 0, "optimizer": {}, "rng": {},
                           "data_pos": {}}, path)
    return path


def run(ckpt, out, mode, **kw):
    args = dict(ckpt=ckpt, mode=mode, out_dir=str(out), steps=2, n=4, n_show=2, frames=3, n_dirs=2,
                batch=4, device="cpu")
    args.update(kw)
    return sample.main([f"--{k}={v}" for k, v in args.items()])


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and min(im.size) > 32


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_slerp_end_points_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    b = b * a.norm() / b.norm()  # equal norms
    assert torch.allclose(sample.slerp(a, b, 0.0), a, atol=1e-5)
    assert torch.allclose(sample.slerp(a, b, 1.0), b, atol=1e-5)
    mid = sample.slerp(a, b, 0.5)
    assert abs(mid.norm() / a.norm() - 1) < 1e-4
    assert (0.5 * a + 0.5 * b).norm() < 0.9 * a.norm()  # what lerp would have done: shrink
    assert torch.allclose(sample.slerp(a, a, 0.3), a, atol=1e-6)  # parallel inputs


# --- mixing ---------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_mix_latents_takes_sections_from_a(ckpt):
    net, _ = common.model_from_checkpoint(ckpt)
    z_a, z_b = torch.randn(2, 32), torch.randn(2, 32)
    S, dims = net.n_sections, net.unet.sec_dims
    assert torch.equal(sample.mix_latents(net, z_a, z_b, range(S)), z_a)
    assert torch.equal(sample.mix_latents(net, z_a, z_b, []), z_b)
    z = sample.mix_latents(net, z_a, z_b, [1])
    lo, hi = dims[0], dims[0] + dims[1]
    assert torch.equal(z[:, lo:hi], z_a[:, lo:hi])
    assert torch.equal(z[:, :lo], z_b[:, :lo]) and torch.equal(z[:, hi:], z_b[:, hi:])


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_masked_sections_of_b_leak_nothing_under_layerwise_guidance(ckpt):
    """Sections 0, 1 from A and the rest from B, decoded with only sections 0, 1 on and layer-wise
    guidance (w = 2, section 0 on in the unconditional branch too) == A's z decoded the same way:
    B's masked sections reach neither branch. Changing the kept sections or z_on_uncond shows."""
    net, _ = common.model_from_checkpoint(ckpt)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    S = net.n_sections
    z_on, z_on_uncond = torch.tensor([[1.0, 1, 0, 0]]), torch.tensor([[1.0, 0, 0, 0]])
    dec = lambda z, **kw: sample.D.ddim(net, z, (2, 3, 32, 32), steps=2, generator=torch.Generator().manual_seed(3),
                                        **{"w": 2.0, "z_on": z_on, "z_on_uncond": z_on_uncond, **kw})
    with torch.no_grad():
        z_a, z_b = net.encode(x[:2]), net.encode(x[2:])
        mixed = dec(sample.mix_latents(net, z_a, z_b, [0, 1]))
        plain = dec(z_a)
        other = dec(sample.mix_latents(net, z_a, z_b, [0]))  # B in kept section 1
        classic = dec(z_a, z_on_uncond=torch.zeros(1, S))  # section 0 off in the unconditional branch
    assert S == 4 and torch.allclose(mixed, plain, atol=1e-6)
    assert not torch.allclose(plain, other, atol=1e-3)  # a kept section of B would show
    assert not torch.allclose(plain, classic, atol=1e-3)  # z_on_uncond matters: layer-wise != classic CFG


# --- modes end to end -----------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_recon_metrics_and_baseline(ckpt, tmp_path, capsys):
    res = run(ckpt, tmp_path, "recon")
    out = capsys.readouterr().out
    assert_png(tmp_path / "recon.png")
    m = res["metrics"]
    assert all(np.isfinite(m[k]["psnr"]) and -1 < m[k]["ssim"] <= 1 for k in ("z", "z_masked"))
    assert m["z"] != m["z_masked"]  # the baseline is a different decode
    assert res["images"].shape == (3, 4, 3, 32, 32)
    assert "PSNR" in out and "z masked" in out and f"wrote {tmp_path / 'recon.png'}" in out


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_recon_is_deterministic_under_seed(ckpt, tmp_path):
    kw = dict(sampler="ddpm", guidance=2.0, n=2)
    a = run(ckpt, tmp_path / "a", "recon", **kw)
    b = run(ckpt, tmp_path / "b", "recon", **kw)
    c = run(ckpt, tmp_path / "c", "recon", seed=1, **kw)
    assert torch.equal(a["images"], b["images"]) and a["metrics"] == b["metrics"]
    assert not torch.equal(a["images"][1], c["images"][1])


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_interp_writes_png_and_gif_and_moves_only_chosen_sections(ckpt, tmp_path):
    res = run(ckpt, tmp_path, "interp", sections="0,1")
    assert_png(tmp_path / "interp.png")
    with open(tmp_path / "interp.gif", "rb") as f:
        assert f.read(6) in (b"GIF89a", b"GIF87a")
    with Image.open(tmp_path / "interp.gif") as im:
        assert im.n_frames == 2 * 3 - 2 and im.size == (128, 128)
    z, z_t, secs = res["z"], res["z_t"], 2 * 8  # sections 0 and 1: the first 16 dims (z_dim 32, 4 sections)
    assert torch.allclose(z_t[0], z[0]) and torch.allclose(z_t[-1, :secs], z[1, :secs])
    assert torch.equal(z_t[:, secs:], z[:1, secs:].expand(3, -1))  # the other sections stay A's
    assert res["frames"].shape == (3, 3, 32, 32)


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_directions_grid_walks_from_one_fixed_x_T(ckpt, tmp_path):
    res = run(ckpt, tmp_path, "directions", attr=2, alphas="-2,0,2")
    assert_png(tmp_path / "directions.png")
    grid = res["images"]  # (directions, 1 + alphas, 3, H, W)
    assert grid.shape == (3, 4, 3, 32, 32)
    assert torch.allclose(res["directions"].norm(dim=1), torch.ones(3), atol=1e-5)
    # alpha = 0 is the same z and x_T on every row; alpha != 0 moves away from it
    assert torch.allclose(grid[:, 2], grid[:1, 2].expand(3, -1, -1, -1), atol=1e-5)
    assert not torch.allclose(grid[:, 1], grid[:, 2], atol=1e-3)


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_pca_and_probe_directions_find_the_planted_axis():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(200, 6, generator=g)
    zs[:, 2] *= 10  # the dominant axis
    zs[:, 0] += 50  # a far-off mean, which PCA must not mistake for variance
    assert abs(sample.pca_directions(zs, 1)[0, 2].item()) > 0.99
    # the class shows equally in axes 4 and 5, but axis 5 is in units 100x larger: in z units the
    # probe's normal (the steepest way to change its logit) points along axis 4
    y = torch.arange(200) % 2 == 0
    zs[:, 4] += 2 * y.float()
    zs[:, 5] = 100 * (zs[:, 5] + 2 * y.float())
    d = sample.probe_direction(zs, y)
    assert d[4].item() > 0.95 and abs(d[5].item()) < 0.05


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_mix_grid_rows(ckpt, tmp_path):
    res = run(ckpt, tmp_path, "mix")
    assert_png(tmp_path / "mix.png")
    grid, labels = res["images"], res["labels"]
    assert grid.shape == (2 + 2 + 4 + 4 + 1, 2, 3, 32, 32) and len(labels) == len(grid)
    row = {label: i for i, label in enumerate(labels)}
    assert not torch.allclose(grid[row["A"]], grid[row["B"]], atol=1e-3)
    for s in (0, 3):  # one section of A is neither all of A nor none of it
        assert not torch.allclose(grid[row[f"only sec {s} of A"]], grid[row["unconditional"]], atol=1e-3)
        assert not torch.allclose(grid[row[f"only sec {s} of A"]], grid[row["A"]], atol=1e-3)
        assert not torch.allclose(grid[row[f"sec {s} from A, rest B"]], grid[row["B"]], atol=1e-3)


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_random_guidance_columns(ckpt, tmp_path):
    res = run(ckpt, tmp_path, "random", ws="1,3")
    assert_png(tmp_path / "random.png")
    grid = res["images"]  # (sources, source + uncond + ws, 3, H, W)
    assert grid.shape == (2, 4, 3, 32, 32)
    assert not torch.allclose(grid[:, 2], grid[:, 3], atol=1e-3)  # w changes the sample
    assert not torch.allclose(grid[:, 1], grid[:, 2], atol=1e-3)  # z changes the sample


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_config_errors(ckpt, tmp_path):
    with pytest.raises(train.ConfigError, match="mode"):
        run(ckpt, tmp_path, "bogus")
    with pytest.raises(train.ConfigError, match="sections"):
        run(ckpt, tmp_path, "interp", sections="0,7")
    with pytest.raises(train.ConfigError, match="'ddim'"):
        run(ckpt, tmp_path, "recon", sampler="ddpn")
    with pytest.raises(sample.data.DataError, match="test split has 30"):
        run(ckpt, tmp_path, "recon", n=40)


# --- image folders, and your own images -----------------------------------------------------------

def test_sample_reads_only_the_images_it_shows(imagenet_run, imagenet_dir, capsys, monkeypatch):
    reads = []
    real = data.FolderData.__getitem__
    monkeypatch.setattr(data.FolderData, "__getitem__", lambda self, i: reads.append(i) or real(self, i))
    res = sample.main([f"--ckpt={imagenet_run / 'ckpt.pt'}", "--mode=recon", "--n=4", "--index=10", "--steps=2",
                       "--threads=1", f"--out_dir={imagenet_run / 'samples'}"])
    assert reads == [10, 11, 12, 13]
    assert all(np.isfinite(res["metrics"][k]["psnr"]) for k in ("z", "z_masked"))
    got = json.load(open(imagenet_run / "samples" / "recon.json"))
    assert got["n"] == 4
    assert "data: 4 of the 80 images of the imagenet val/ or held-out part: " in capsys.readouterr().out
    reads.clear()
    res = sample.main([f"--ckpt={imagenet_run / 'ckpt.pt'}", "--mode=interp", "--index=40", "--steps=2", "--frames=3",
                       "--threads=1", f"--out_dir={imagenet_run / 'samples'}"])
    assert reads == [40, 41] and res["frames"].shape == (3, 3, 32, 32)
    with pytest.raises(data.DataError, match="the test split has 80"):
        sample.main([f"--ckpt={imagenet_run / 'ckpt.pt'}", "--mode=interp", "--index=79", "--steps=2"])


def test_sample_skips_your_unreadable_files_naming_each(ckpt, tmp_path):
    """--images: a folder of 2 readable images and 4 files that cannot be read (each kind): the 2 are shown,
    and each of the 4 is named in one warning (none readable: one line, tests/test_cli.py)."""
    for i in range(2):
        save_image(tmp_path / "mine" / f"{i}.png", np.full((20, 24, 3), 60 * i, np.uint8))
    bad = unreadable_images(tmp_path / "mine")
    with pytest.warns(UserWarning, match="cannot read image file") as said:
        res = run(ckpt, tmp_path / "out", "recon", images=tmp_path / "mine")
    assert res["images"].shape[1] == 2  # source / with z / z masked x the 2 readable images
    assert sorted(str(w.message).split("'")[1] for w in said if "cannot read" in str(w.message)) == sorted(bad)


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


def test_sample_directions_asks_for_more_directions_than_a_small_folder_holds(photo_run):
    """The run's held-out part is 4 images: 4 centred points span 3 directions, so n_dirs=6 draws those 3
    (an unlabelled folder has no class direction)."""
    out, photos, _ = photo_run
    res = sample.main(sample_args(out, "--mode=directions", "--n_dirs=6", "--alphas=1"))
    assert res["images"].shape[0] == len(res["directions"]) == 3
