"""The z-usage instrument (zusage.z_usage), the output parameterisations (eps | v | x0), the
z-projection init, and masking under z_norm with DiffSiam segments."""
import math

import pytest
import torch

import diffusion as D
import zusage
import train

from test_model import Z, inputs, make, randomize_zeros
from conftest import tiny_soda


class Oracle(torch.nn.Module):
    """z = the image itself; with z on, the exact eps of x_t for that image; with z masked, eps = 0
    (x0_hat = x_t / alpha). A decoder that takes everything from z."""
    n_sections = 1

    def encode(self, x, rays=None):
        return x.flatten(1)

    def denoise(self, x_t, logsnr, z, keep, rays=None):
        abar = torch.sigmoid(logsnr)[:, None, None, None]
        x_0 = z.view(x_t.shape) * keep[:, :1, None, None]
        eps = (x_t - abar.sqrt() * x_0) / (1 - abar).sqrt()
        return torch.where(keep[:, :1, None, None] > 0, eps, torch.zeros_like(eps))


def images(n=16, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 2 - 1).clamp(-1, 1)


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


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_output_parameterisations_are_read_as_eps(prediction):
    """A network that outputs the exact v (or x0) of x_t gives the exact eps through denoise, at
    every noise level; so the loss, guidance and samplers (which all use eps) work for each."""
    m = make(prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x_0, eps = images(4), torch.randn(4, 3, 16, 16, generator=g)
    logsnr = torch.tensor([-8.0, -3.0, 0.0, 6.0])
    abar = torch.sigmoid(logsnr)[:, None, None, None]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * x_0 + sigma * eps
    target = alpha * eps - sigma * x_0 if prediction == "v" else x_0
    m.unet.forward = lambda *a, **k: target
    torch.testing.assert_close(m.denoise(x_t, logsnr, torch.zeros(4, 32)), eps, atol=2e-4, rtol=1e-4)
    # the loss is then 0, and DDIM from any x_T lands on x_0 (the last step returns x0_hat)
    assert D.loss(m, x_0, x_0, lambda u: logsnr, u=torch.zeros(4), eps=eps).item() < 1e-6


def test_v_prediction_samples_with_the_shared_samplers():
    """DDIM with a network that outputs v for a fixed x_0 from whatever x_t it sees: x_0 comes back."""
    m = make(prediction="v")
    x_0 = images(2)

    def v_of(x_t, logsnr, z, *a, **k):  # guidance batches the conditional and unconditional halves
        x0 = x_0.repeat(len(x_t) // len(x_0), 1, 1, 1)
        abar = torch.sigmoid(logsnr.float())[:, None, None, None]
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0
    m.unet.forward = v_of
    out = D.ddim(m, torch.zeros(2, 32), x_0.shape, steps=5, generator=torch.Generator().manual_seed(0), w=2.0)
    torch.testing.assert_close(out, x_0, atol=1e-4, rtol=1e-4)


def test_unknown_prediction_is_refused():
    with pytest.raises(ValueError, match="prediction must be"):
        make(prediction="score")


def test_z_init_gives_the_encoder_a_gradient_at_step_zero():
    """Zero-init z projections start the encoder at exactly zero gradient (even with a non-zero
    decoder elsewhere); z_init > 0 does not."""
    grads = {}
    for z_init in (0.0, 0.5):
        m = make(randomized=False, z_init=z_init).train()
        for name, p in m.named_parameters():
            if "z_proj" not in name and torch.count_nonzero(p) == 0 and p.dim() > 1:
                torch.nn.init.normal_(p, std=0.05)
        x, logsnr, _ = inputs()
        m(x, logsnr, x, keep=torch.ones(len(x), m.n_sections)).pow(2).mean().backward()
        grads[z_init] = sum(p.grad.abs().sum().item() for p in m.encoder.parameters() if p.grad is not None)
        if z_init:
            w = m.unet.down[0].res.z_proj.weight
            assert w.std().item() == pytest.approx(z_init / math.sqrt(w.shape[1]), rel=0.3)
    assert grads[0.0] == 0.0 and grads[0.5] > 0


def test_masked_segments_have_no_influence_under_z_norm():
    """DiffSiam segments do not line up with the z_norm sections: a zeroed segment must still
    have no influence on the output (it leaked through the per-section statistics)."""
    torch.manual_seed(0)
    m = tiny_soda(z_dim=Z, image_size=16, z_norm=True, z_init=1.0, segments=3).eval()
    randomize_zeros(m, seed=100)
    x, logsnr, g = inputs()
    z = torch.randn(len(x), 32, generator=g)
    on = torch.ones(len(x), m.n_sections)
    seg = torch.tensor([[1.0, 0.0, 1.0]]).expand(len(x), -1)  # the middle third of z off: it straddles two sections
    off = m.keep_dims(on, seg)[0] == 0
    z2 = z.clone()
    z2[:, off] = torch.randn(len(x), int(off.sum()), generator=g) * 5
    with torch.no_grad():
        a, b = m.denoise(x, logsnr, z, on, seg_keep=seg), m.denoise(x, logsnr, z2, on, seg_keep=seg)
        assert torch.equal(a, b)
        assert not torch.allclose(m.denoise(x, logsnr, z2, on, seg_keep=torch.ones_like(seg)), a, atol=1e-4)


@pytest.mark.parametrize("flag", ["--batch_size=True", "--lr=True", "--z_init=False"])
def test_configurator_refuses_booleans_for_numbers(flag):
    with pytest.raises(train.ConfigError, match="must be"):
        train.configure([flag], train.DEFAULTS)


def test_z_bn_removes_what_every_image_shares():
    """z_bn standardises z over the batch in training: a direction shared by every image (most
    of z's energy at init) cannot reach the decoder; in eval the running statistics are used."""
    m = make(z_bn=True, z_init=1.0).train()
    x, logsnr, g = inputs(B=4)
    z = torch.randn(4, 32, generator=g)
    keep = torch.ones(4, m.n_sections)
    with torch.no_grad():
        a = m.denoise(x, logsnr, z, keep)
        torch.testing.assert_close(m.denoise(x, logsnr, z + 10 * torch.randn(1, 32, generator=g), keep), a,
                                   atol=1e-4, rtol=1e-4)
        m.eval()
        assert m.z_bn.running_mean.abs().sum() > 0  # the training passes updated the statistics
        assert not torch.allclose(m.denoise(x, logsnr, z + 10, keep), m.denoise(x, logsnr, z, keep), atol=1e-3)
