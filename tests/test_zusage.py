"""zusage.py: the z-usage instrument (zusage.z_usage) is exactly 0% for a decoder that ignores z and
>99.9% for an oracle that passes x0 through z, with fixed noise and any batch size."""
import pytest
import torch

import zusage
from conftest import images, make


class Oracle(torch.nn.Module):
    """z = the image itself; with z on, the exact eps of x_t for that image; with z masked, eps = 0
    (x0_hat = x_t / alpha). A decoder that takes everything from z."""
    n_sections = 1

    def encode(self, x, rays=None):
        return x.flatten(1)

    def denoise(self, x_t, logsnr, z, z_on, rays=None):
        abar = torch.sigmoid(logsnr)[:, None, None, None]
        x_0 = z.view(x_t.shape) * z_on[:, :1, None, None]
        eps = (x_t - abar.sqrt() * x_0) / (1 - abar).sqrt()
        return torch.where(z_on[:, :1, None, None] > 0, eps, torch.zeros_like(eps))


def test_z_usage_is_zero_for_a_decoder_that_ignores_z():
    m = make(randomized=False)  # zero-init z projections: the output cannot depend on z
    for name, p in m.named_parameters():  # but a real, non-trivial denoiser everywhere else
        if "z_proj" not in name and torch.count_nonzero(p) == 0 and p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    res = zusage.z_usage(m, images(), batch=5)
    assert len(res["removed"]) == len(zusage.ZUSAGE_LOGSNRS)
    assert all(r == 0.0 for r in res["removed"]), res["removed"]
    assert res["mse_z"] == res["mse_masked"] and res["mse_z"][0] > 0


def test_z_usage_is_all_for_an_oracle_that_passes_x0_through_z():
    x = images()
    res = zusage.z_usage(Oracle(), x)
    assert all(r > 99.9 for r in res["removed"]), res["removed"]
    assert res["removed_at_-3"] > 99.9 and res["removed_mean"] > 99.9 and res["worse_than_grey"] == []
    # the reference lines: a grey image scores E[x0^2], each image's mean colour its variance
    assert res["grey"] == pytest.approx(x.pow(2).mean().item())
    assert res["mean_colour"] < res["grey"]
    assert "removed by z" in zusage.z_usage_table(res)


def test_z_usage_uses_fixed_noise_and_batches_consistently():
    m = make()
    x = images(10)
    a, b = zusage.z_usage(m, x, seed=3, batch=4), zusage.z_usage(m, x, seed=3, batch=10)
    for k in ("mse_z", "mse_masked"):
        assert a[k] == pytest.approx(b[k], rel=1e-5)
    assert zusage.z_usage(m, x, seed=4)["mse_z"] != a["mse_z"]
