"""sample.py: metrics against hand cases, slerp, section mixing, and every mode end to end on a tiny
random model (CPU, a few sampler steps)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import sample
import train

pytestmark = pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
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


# --- metrics ----------------------------------------------------------------------

def test_psnr_known_cases():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    assert torch.isinf(common.psnr(x, x)).all()
    # a constant offset of 0.1 everywhere: MSE = 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB
    assert torch.allclose(common.psnr(x, x + 0.1), torch.full((3,), 20.0), atol=1e-4)
    # per image: an offset of 0.01 on the second image only -> 40 dB there
    y = x.clone()
    y[1] += 0.01
    assert torch.isinf(common.psnr(x, y)[0]) and abs(common.psnr(x, y)[1].item() - 40.0) < 1e-3


def test_ssim_identical_is_one_and_noise_lowers_it():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(common.ssim(x, x), torch.ones(2), atol=1e-6)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    s = common.ssim(x, noisy)
    assert (s < 0.9).all() and torch.allclose(s, common.ssim(noisy, x), atol=1e-6)


def test_ssim_constant_shift_matches_hand_formula():
    # x constant a_c in channel c, y = x + d: every window has mu_x = a, mu_y = a + d and no variance,
    # so SSIM = (2 a (a + d) + C1) / (a^2 + (a + d)^2 + C1) per channel; the image's SSIM is their mean
    C1 = 0.01**2
    a, d = torch.tensor([0.2, 0.4, 0.7]), 0.1
    x = a[None, :, None, None].expand(1, 3, 24, 24)
    hand = ((2 * a * (a + d) + C1) / (a**2 + (a + d) ** 2 + C1)).mean()
    assert abs(common.ssim(x, x + d).item() - hand.item()) < 1e-6
    # the Gaussian window is normalised: a window that sums to 2 would give a different number
    assert abs(common.gaussian_window().sum().item() - 1) < 1e-12


def test_ssim_one_bright_pixel_matches_hand_formula():
    # x = m everywhere, y = x with one pixel raised by d, far enough from the border that all 11 x 11
    # windows over it are valid. The window with weight w = g_u g_v on that pixel sees mu_x = m,
    # mu_y = m + d w, var_x = cov = 0, var_y = d^2 w (1 - w), so its SSIM is
    # (2 m (m + d w) + C1) / (m^2 + (m + d w)^2 + C1) * C2 / (d^2 w (1 - w) + C2); every other window
    # gives 1. This case checks C2 and the window's width (sigma 1.5), which a constant image cannot.
    C1, C2, m, d = 0.01**2, 0.03**2, 0.5, 0.4
    r = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-r**2 / (2 * 1.5**2))
    w = (g / g.sum())[:, None] * (g / g.sum())[None, :]  # (11, 11)
    per_window = (2 * m * (m + d * w) + C1) / (m**2 + (m + d * w) ** 2 + C1) * C2 / (d**2 * w * (1 - w) + C2)
    n = 22 * 22  # valid positions of a 32x32 image
    hand = (n - 121 + per_window.sum().item()) / n
    x = torch.full((1, 3, 32, 32), m)
    y = x.clone()
    y[:, :, 16, 16] += d
    assert abs(common.ssim(x, y).item() - hand) < 1e-6 and hand < 0.99


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


# --- mixing ---------------------------------------------------------------------------

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


def test_masked_sections_of_b_leak_nothing_under_layerwise_guidance(ckpt):
    """Sections 0, 1 from A and the rest from B, decoded with only sections 0, 1 on and layer-wise
    guidance (w = 2, section 0 on in the unconditional branch too) == A's z decoded the same way:
    B's masked sections reach neither branch. Changing the kept sections or keep_uncond shows."""
    net, _ = common.model_from_checkpoint(ckpt)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    S = net.n_sections
    keep, keep_uncond = torch.tensor([[1.0, 1, 0, 0]]), torch.tensor([[1.0, 0, 0, 0]])
    dec = lambda z, **kw: sample.D.ddim(net, z, (2, 3, 32, 32), steps=2, generator=torch.Generator().manual_seed(3),
                                        **{"w": 2.0, "keep": keep, "keep_uncond": keep_uncond, **kw})
    with torch.no_grad():
        z_a, z_b = net.encode(x[:2]), net.encode(x[2:])
        mixed = dec(sample.mix_latents(net, z_a, z_b, [0, 1]))
        plain = dec(z_a)
        other = dec(sample.mix_latents(net, z_a, z_b, [0]))  # B in kept section 1
        classic = dec(z_a, keep_uncond=torch.zeros(1, S))  # section 0 off in the unconditional branch
    assert S == 4 and torch.allclose(mixed, plain, atol=1e-6)
    assert not torch.allclose(plain, other, atol=1e-3)  # a kept section of B would show
    assert not torch.allclose(plain, classic, atol=1e-3)  # keep_uncond matters: layer-wise != classic CFG


# --- modes end to end -------------------------------------------------------------------

def test_recon_metrics_and_baseline(ckpt, tmp_path, capsys):
    res = run(ckpt, tmp_path, "recon")
    out = capsys.readouterr().out
    assert_png(tmp_path / "recon.png")
    m = res["metrics"]
    assert all(np.isfinite(m[k]["psnr"]) and -1 < m[k]["ssim"] <= 1 for k in ("z", "z_masked"))
    assert m["z"] != m["z_masked"]  # the baseline is a different decode
    assert res["images"].shape == (3, 4, 3, 32, 32)
    assert "PSNR" in out and "z masked" in out and f"wrote {tmp_path / 'recon.png'}" in out


def test_recon_is_deterministic_under_seed(ckpt, tmp_path):
    kw = dict(sampler="ddpm", guidance=2.0, n=2)
    a = run(ckpt, tmp_path / "a", "recon", **kw)
    b = run(ckpt, tmp_path / "b", "recon", **kw)
    c = run(ckpt, tmp_path / "c", "recon", seed=1, **kw)
    assert torch.equal(a["images"], b["images"]) and a["metrics"] == b["metrics"]
    assert not torch.equal(a["images"][1], c["images"][1])


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


def test_directions_grid_walks_from_one_fixed_x_T(ckpt, tmp_path):
    res = run(ckpt, tmp_path, "directions", attr=2, alphas="-2,0,2")
    assert_png(tmp_path / "directions.png")
    grid = res["images"]  # (directions, 1 + alphas, 3, H, W)
    assert grid.shape == (3, 4, 3, 32, 32)
    assert torch.allclose(res["directions"].norm(dim=1), torch.ones(3), atol=1e-5)
    # alpha = 0 is the same z and x_T on every row; alpha != 0 moves away from it
    assert torch.allclose(grid[:, 2], grid[:1, 2].expand(3, -1, -1, -1), atol=1e-5)
    assert not torch.allclose(grid[:, 1], grid[:, 2], atol=1e-3)


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


def test_random_guidance_columns(ckpt, tmp_path):
    res = run(ckpt, tmp_path, "random", ws="1,3")
    assert_png(tmp_path / "random.png")
    grid = res["images"]  # (sources, source + uncond + ws, 3, H, W)
    assert grid.shape == (2, 4, 3, 32, 32)
    assert not torch.allclose(grid[:, 2], grid[:, 3], atol=1e-3)  # w changes the sample
    assert not torch.allclose(grid[:, 1], grid[:, 2], atol=1e-3)  # z changes the sample


def test_config_errors(ckpt, tmp_path):
    with pytest.raises(train.ConfigError, match="mode"):
        run(ckpt, tmp_path, "bogus")
    with pytest.raises(train.ConfigError, match="sections"):
        run(ckpt, tmp_path, "interp", sections="0,7")
    with pytest.raises(train.ConfigError, match="'ddim'"):
        run(ckpt, tmp_path, "recon", sampler="ddpn")
    with pytest.raises(sample.data.DataError, match="test split has 30"):
        run(ckpt, tmp_path, "recon", n=40)


def test_cli_missing_checkpoint_is_one_line(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'none.pt'}"], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f"error: no checkpoint at {str(tmp_path / 'none.pt')!r}"]
