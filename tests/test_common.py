"""common.py: checkpoints (written atomically; older checkpoints still load) and the image metrics
PSNR and SSIM against hand cases.
tests/fixtures/state_dict_keys.json holds, for each model variant, the state-dict names and shapes
its checkpoints hold: a checkpoint of any of them loads strictly."""
import json
import os

import pytest
import torch

import common
import train
from conftest import ROOT


# --- checkpoints ----------------------------------------------------------------------------------

@pytest.mark.usefixtures("light_eval")
def test_interrupted_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    good = {"config": {"a": 1}, "ema": {"w": torch.ones(3)}, "step": 1}
    train.save_checkpoint(good, path)

    def dying_save(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # killed in the middle of the write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint({"config": {}, "ema": {}, "step": 2}, path)
    monkeypatch.undo()
    ck = train.load_checkpoint(path)
    assert ck["step"] == 1 and torch.equal(ck["ema"]["w"], torch.ones(3))


BEFORE = json.load(open(os.path.join(ROOT, "tests", "fixtures", "state_dict_keys.json")))


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_state_dict_names_and_shapes_are_unchanged(name, tmp_path):
    cfg = dict(train.DEFAULTS, **BEFORE[name]["config"])
    with torch.device("meta"):
        net = common.build_model(common.model_args(cfg))
    now = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert sorted(now) == sorted(BEFORE[name]["state_dict"])  # load_state_dict(strict=True) takes the old files


def test_an_old_checkpoint_dict_loads_into_the_new_model():
    """The same tensors, saved under the old names, load strictly (the DiffSiam + PDAE variant: the
    one whose classes moved)."""
    cfg = dict(train.DEFAULTS, **BEFORE["pdae"]["config"])
    torch.manual_seed(0)
    net = common.build_model(common.model_args(cfg))
    old = {k: torch.full(shape, 0.5) for k, shape in BEFORE["pdae"]["state_dict"]}
    net.load_state_dict(old)  # strict: every name and shape must match
    assert torch.equal(net.state_dict()["frozen.out.2.weight"], old["frozen.out.2.weight"])


# --- metrics --------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_psnr_known_cases():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    assert torch.isinf(common.psnr(x, x)).all()
    # a constant offset of 0.1 everywhere: MSE = 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB
    assert torch.allclose(common.psnr(x, x + 0.1), torch.full((3,), 20.0), atol=1e-4)
    # per image: an offset of 0.01 on the second image only -> 40 dB there
    y = x.clone()
    y[1] += 0.01
    assert torch.isinf(common.psnr(x, y)[0]) and abs(common.psnr(x, y)[1].item() - 40.0) < 1e-3


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_ssim_identical_is_one_and_noise_lowers_it():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(common.ssim(x, x), torch.ones(2), atol=1e-6)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    s = common.ssim(x, noisy)
    assert (s < 0.9).all() and torch.allclose(s, common.ssim(noisy, x), atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
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


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
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
