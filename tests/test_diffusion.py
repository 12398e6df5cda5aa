"""Tests for diffusion.py: schedules, the forward process, samplers on exact (fake) denoisers,
DDIM inversion, guidance arithmetic, determinism, the loss under autocast. (The schedule plot of
tools/schedules.py: tests/test_tools.py.)"""
import math

import pytest
import torch

import diffusion as D
from conftest import Z, randomize_zeros, tiny_soda

SCHEDULES = ["linear", "cosine", "sigmoid", "inverted", "inverted_sigmoid", "inverted_linear", "inverted+cosine"]


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(encoder="tiny", unet="tiny", z_dim=Z, image_size=8)
    args.update(kw)
    return randomize_zeros(tiny_soda(**args).eval(), seed=seed + 100)


class PerfectEps(torch.nn.Module):
    """Returns the exact noise for a known clean image x0."""
    n_sections = 1

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def denoise(self, x_t, logsnr, z, z_on=None, rays_tgt=None, pose_on=None):
        abar = torch.sigmoid(logsnr.float())[:, None, None, None]
        return (x_t - abar.sqrt() * self.x0) / (1 - abar).sqrt()


class GaussianDenoiser(torch.nn.Module):
    """The exact (MMSE) denoiser for data x0 ~ N(0, s^2) i.i.d. per pixel."""
    n_sections = 1

    def __init__(self, s):
        super().__init__()
        self.s2 = s * s

    def denoise(self, x_t, logsnr, z, z_on=None, rays_tgt=None, pose_on=None):
        a = torch.sigmoid(logsnr.double())[:, None, None, None]
        x_t = x_t.double()
        x0_hat = a.sqrt() * self.s2 * x_t / (a * self.s2 + 1 - a)
        return ((x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()).float()


# -----------------------------------------------------------------------------
# 1. schedules

EXPECTED_ENDS = {  # logsnr at u = 0 and u = 1
    "linear": (D.LOGSNR_MAX, -10.05),  # DDPM betas: abar(1) = exp(-10.05)
    "cosine": (D.LOGSNR_MAX, D.LOGSNR_MIN),
    "sigmoid": (D.LOGSNR_MAX, D.LOGSNR_MIN),
    "inverted": (D.LOGSNR_MAX, D.LOGSNR_MIN),
    "inverted_sigmoid": (D.LOGSNR_MAX, D.LOGSNR_MIN),
    "inverted_linear": (D.LOGSNR_MAX, D.LOGSNR_MIN),
    "inverted+cosine": (D.LOGSNR_MAX, D.LOGSNR_MIN),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_monotone_finite_clipped(name):
    fn = D.get_schedule(name)
    u = torch.linspace(0, 1, 1001)
    l = fn(u)
    assert l.shape == u.shape and l.dtype == torch.float32
    assert torch.isfinite(l).all()
    assert (l >= D.LOGSNR_MIN).all() and (l <= D.LOGSNR_MAX).all()
    assert (l[1:] <= l[:-1]).all()  # non-increasing: u = 0 clean, u = 1 noise
    assert l[0] >= 5 and l[-1] <= -5
    lo_hi = EXPECTED_ENDS[name]
    assert abs(l[0].item() - lo_hi[0]) < 0.01 and abs(l[-1].item() - lo_hi[1]) < 0.01
    assert l[0] - l[-1] > 20  # spans a wide range, strictly decreasing overall
    # no flat middle: strictly decreasing on the interior
    mid = l[100:900]
    assert (mid[1:] < mid[:-1]).all()


def test_schedule_midpoints():
    u = torch.tensor([0.5])
    # cosine: abar(0.5) = cos^2(pi/4 * 1.008/1.008...) ~ 0.5 -> logsnr ~ 0
    assert abs(D.get_schedule("cosine")(u).item()) < 0.1
    # sigmoid with symmetric start/end: abar(0.5) = 0.5 exactly
    assert abs(D.get_schedule("sigmoid")(u).item()) < 1e-5
    # inverted at the middle also near 0 (the inverse of a near-symmetric S curve)
    assert abs(D.get_schedule("inverted")(u).item()) < 0.1
    # 'inverted' is an alias of 'inverted_cosine'
    grid = torch.linspace(0, 1, 101)
    assert torch.equal(D.get_schedule("inverted")(grid), D.get_schedule("inverted_cosine")(grid))


def test_schedule_unknown_name():
    for bad in ["cosin", "inverted_foo", "quadratic", "cosine+foo"]:
        with pytest.raises(ValueError):
            D.get_schedule(bad)


# -----------------------------------------------------------------------------
# 2. abar_inverted is the inverse function

@pytest.mark.parametrize("base", [D.abar_cosine, D.abar_sigmoid, D.abar_linear])
def test_abar_inverted_is_inverse(base):
    u = torch.linspace(0, 1, 513, dtype=torch.float64)[1:-1]
    if base is D.abar_linear:  # its range is [exp(-10.05), 1]
        u = u[u > base(torch.ones(1, dtype=torch.float64))]
    t = D.abar_inverted(u, base)
    assert ((t >= 0) & (t <= 1)).all()
    assert torch.allclose(base(t), u, atol=1e-5, rtol=0)
    # and the other way round
    s = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    assert torch.allclose(D.abar_inverted(base(s), base), s, atol=1e-5, rtol=0)


def test_base_schedules_decrease_from_one_to_zero():
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for base in (D.abar_cosine, D.abar_sigmoid):
        a = base(u)
        assert abs(a[0].item() - 1) < 1e-12 and a[-1].item() < 1e-6
        assert (a[1:] < a[:-1]).all()


# -----------------------------------------------------------------------------
# 3. inverted schedules favour medium noise

@pytest.mark.parametrize("inv,base", [("inverted", "cosine"), ("inverted_sigmoid", "sigmoid"),
                                      ("inverted_linear", "linear")])
def test_inverted_puts_mass_on_medium_noise(inv, base):
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    frac = lambda name: (D.get_schedule(name)(u).abs() < 2).float().mean().item()
    f_inv, f_base = frac(inv), frac(base)
    assert f_inv > f_base + 0.2, (f_inv, f_base)
    # in closed form for cosine: |logsnr| < 2 <=> abar in (sigmoid(-2), sigmoid(2)); under the
    # inverted schedule that is u in (base(sigmoid(2)), base(sigmoid(-2)))
    b = D.BASES[base]
    lo = b(torch.tensor([torch.sigmoid(torch.tensor(2.0)).item()], dtype=torch.float64)).item()
    hi = b(torch.tensor([torch.sigmoid(torch.tensor(-2.0)).item()], dtype=torch.float64)).item()
    assert abs(f_inv - (hi - lo)) < 0.01


def test_mixture_draws_each_schedule_half_the_time():
    """'a+b' under uniform u puts the mean of a's and b's mass in any log-SNR interval (checked
    against draws from each schedule), and a schedule mixed with itself is itself."""
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    inv, cos, mix = (D.get_schedule(n)(u) for n in ("inverted", "cosine", "inverted+cosine"))
    for lo, hi in [(-15, -4), (-4, -2), (-2, 2), (2, 15)]:
        frac = lambda l: ((l >= lo) & (l < hi)).float().mean().item()
        assert abs(frac(mix) - (frac(inv) + frac(cos)) / 2) < 0.006, (lo, hi)
    assert (cos < -4).float().mean() > 0.05 > (inv < -4).float().mean()  # the parts differ, so the mean tells
    grid = torch.linspace(0.01, 0.99, 99)
    assert torch.allclose(D.get_schedule("cosine+cosine")(grid), D.get_schedule("cosine")(grid), atol=2e-3)
    shifted = D.get_schedule("inverted+cosine", shift=-1.0)(grid)
    assert torch.allclose(shifted, D.get_schedule("inverted+cosine")(grid) - 1.0, atol=1e-5)


# -----------------------------------------------------------------------------
# 4. forward process

def test_q_sample_formula():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    logsnr = torch.tensor([-10.0, -1.0, 0.0, 7.0])
    x_t = D.q_sample(x0, logsnr, eps)
    for i, l in enumerate(logsnr.tolist()):
        abar = 1 / (1 + math.exp(-l))
        ref = math.sqrt(abar) * x0[i] + math.sqrt(1 - abar) * eps[i]
        assert torch.allclose(x_t[i], ref, atol=1e-6)
    # logsnr is log(abar / (1 - abar)): signal to noise ratio of x_t
    assert torch.allclose(x_t[2], (x0[2] + eps[2]) / math.sqrt(2), atol=1e-6)
    # variance preserving for unit-variance data
    big = torch.randn(200_000, 1, 1, 1, generator=g)
    v = D.q_sample(big, torch.full((200_000,), 0.3), torch.randn(200_000, 1, 1, 1, generator=g)).var()
    assert abs(v.item() - 1) < 0.02


# -----------------------------------------------------------------------------
# 5. a perfect noise predictor makes the samplers return x0

def _x0(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, 8, 8, generator=g) * 2 - 1


def test_ddpm_perfect_predictor_returns_x0():
    x0 = _x0()
    model = PerfectEps(x0)
    out = D.ddpm(model, torch.zeros(2, Z), x0.shape, steps=50,
                 generator=torch.Generator().manual_seed(1))
    assert out.shape == x0.shape
    assert torch.allclose(out, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize("schedule", ["cosine", "inverted", "linear"])
def test_ddim_perfect_predictor_returns_x0(schedule):
    x0 = _x0(seed=2)
    model = PerfectEps(x0)
    out = D.ddim(model, torch.zeros(2, Z), x0.shape, steps=20, schedule=schedule,
                 generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out, x0, atol=1e-4, rtol=0)


class SpyEps(torch.nn.Module):
    """eps_hat = 0.5 x_t + 0.1 (no denoiser: any fixed map will do); records every x_t it sees."""
    n_sections = 1

    def __init__(self):
        super().__init__()
        self.seen = []

    def denoise(self, x_t, logsnr, z, z_on=None, rays_tgt=None, pose_on=None):
        self.seen.append((x_t.clone(), logsnr.clone()))
        return 0.5 * x_t + 0.1


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_one_intermediate_sampler_step_matches_the_papers_update(eta):
    """The x_s that sample() feeds the model after step 2 of 3, against DDIM eq. 12 (eta = 0) and the
    DDPM posterior q(x_s | x_t, x0_hat), Ho et al. 2020 eq. 7 (eta = 1), in float64."""
    spy, shape = SpyEps(), (2, 3, 4, 4)
    D.sample(spy, torch.zeros(2, Z), shape, steps=3, eta=eta, clip=False, generator=torch.Generator().manual_seed(0))
    (x_t, l_t), (x_s, l_s) = spy.seen[1], spy.seen[2]
    x_t = x_t.double()
    a_t, a_s = torch.sigmoid(l_t[0].double()), torch.sigmoid(l_s[0].double())
    eps = 0.5 * x_t + 0.1
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if eta == 0:
        want = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
    else:
        g = torch.Generator().manual_seed(0)
        noise = [torch.randn(shape, generator=g) for _ in range(3)][2]  # x_T, the first step's noise, this one's
        alpha = a_t / a_s  # the one-step alpha_t of DDPM between the two levels; beta = 1 - alpha
        mean = a_s.sqrt() * (1 - alpha) / (1 - a_t) * x0 + alpha.sqrt() * (1 - a_s) / (1 - a_t) * x_t
        want = mean + ((1 - a_s) / (1 - a_t) * (1 - alpha)).sqrt() * noise.double()
    assert l_t[0] > l_s[0] - 10 and 0.01 < a_t < a_s < 0.99  # a real intermediate step
    torch.testing.assert_close(x_s.double(), want, rtol=1e-5, atol=1e-5)


def test_ddim_inversion_round_trips_on_a_real_unet():
    """DDIM-invert an image to log-SNR -6 with a small UNet, then DDIM back: the image returns, with
    the first-order error of the discretisation (4x the steps, ~1/4 of the error)."""
    torch.manual_seed(0)  # small random weights on the zero-initialised layers: a smooth eps network
    m = randomize_zeros(tiny_soda(z_dim=Z, image_size=8).eval(), std=0.003, seed=100)
    g = torch.Generator().manual_seed(0)
    x0, z = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, torch.randn(1, Z, generator=g)
    sched = D.get_schedule("cosine", logsnr_min=-6.0)
    errs = []
    for steps in (8, 32):
        x_T = D.ddim_invert(m, x0, z, steps=steps, schedule=sched)
        rec = D.ddim(m, z, x0.shape, steps=steps, schedule=sched, x_T=x_T, clip=False)
        errs.append((rec - x0).abs().max().item())
    assert (x_T - x0).abs().max() > 0.5  # x_T is far from the image ...
    assert errs[1] < 0.1 and errs[1] < 0.4 * errs[0], errs  # ... and 32 steps bring it back (measured 0.19, 0.062)


# -----------------------------------------------------------------------------
# 6. DDIM inversion round trip

def _roundtrip(steps, s=0.5):
    model = GaussianDenoiser(s)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 3, 8, 8, generator=g) * s
    z = torch.zeros(4, Z)
    x_T = D.ddim_invert(model, x0, z, steps=steps)
    rec = D.ddim(model, z, x0.shape, steps=steps, x_T=x_T, clip=False)
    return x0, x_T, (rec - x0).abs().max().item()


def test_ddim_inversion_roundtrip():
    x0, x_T, err200 = _roundtrip(200)
    _, _, err20 = _roundtrip(20)
    assert err200 < 0.05, err200
    assert err200 < err20, (err200, err20)
    assert err200 < 0.25 * err20, (err200, err20)  # first order: ~10x the steps, ~1/10 the error
    # x_T is (close to) unit-variance noise: for this Gaussian data the DDIM map is linear
    # x_T = x0 / s at logsnr = -15
    assert torch.allclose(x_T, x0 / 0.5, atol=0.05)


# -----------------------------------------------------------------------------
# 7. guidance arithmetic on a real tiny model

def _guidance_inputs(m, B=2, H=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(B, 3, H, H, generator=g)
    logsnr = torch.tensor([-2.0, 1.5])[:B]
    z = torch.randn(B, Z, generator=g)
    return x_t, logsnr, z, g


def test_guided_eps_classic_cfg():
    """One batched forward == two separate denoise calls combined: w ~ 1 cond, w = 0 uncond, w = 3."""
    m = tiny_model()
    x_t, logsnr, z, _ = _guidance_inputs(m)
    S = m.n_sections
    with torch.no_grad():
        cond = m.denoise(x_t, logsnr, z, torch.ones(2, S))
        uncond = m.denoise(x_t, logsnr, z, torch.zeros(2, S))
        assert (cond - uncond).abs().max() > 1e-4  # the guidance test is not vacuous
        # w == 1 exactly returns the conditional pass itself (a shortcut): test the batched
        # formula just off 1, where it must give the conditional output all the same
        g1 = D.guided_eps(m, x_t, logsnr, z, w=1.0 + 1e-6)
        g0 = D.guided_eps(m, x_t, logsnr, z, w=0.0)
        g3 = D.guided_eps(m, x_t, logsnr, z, w=3.0)
    assert g3.dtype == torch.float32 and g3.shape == x_t.shape
    assert torch.allclose(g1, cond, atol=1e-5)
    assert torch.allclose(g0, uncond, atol=1e-5)
    assert torch.allclose(g3, cond + 2.0 * (cond - uncond), atol=1e-5)


def test_guided_eps_layerwise():
    m = tiny_model()
    x_t, logsnr, z, _ = _guidance_inputs(m)
    S = m.n_sections
    z_on = torch.tensor([1.0, 1.0, 0.0, 1.0])
    z_on_uncond = torch.tensor([1.0, 0.0, 0.0, 0.0])
    with torch.no_grad():
        c = m.denoise(x_t, logsnr, z, z_on.expand(2, S))
        u = m.denoise(x_t, logsnr, z, z_on_uncond.expand(2, S))
        out = D.guided_eps(m, x_t, logsnr, z, w=3.0, z_on=z_on, z_on_uncond=z_on_uncond)
        classic = D.guided_eps(m, x_t, logsnr, z, w=3.0, z_on=z_on)
    assert torch.allclose(out, u + 3.0 * (c - u), atol=1e-5)
    assert (out - classic).abs().max() > 1e-4  # z_on_uncond is not ignored


def test_guided_eps_pose_three_branch():
    m = tiny_model(ray_freqs=1)
    x_t, logsnr, z, g = _guidance_inputs(m)
    rays = torch.randn(2, 6, 8, 8, generator=g)
    S = m.n_sections
    on, off = torch.ones(2, S), torch.zeros(2, S)
    with torch.no_grad():
        e00 = m.denoise(x_t, logsnr, z, off, rays, torch.zeros(2))
        e0r = m.denoise(x_t, logsnr, z, off, rays, torch.ones(2))
        ezr = m.denoise(x_t, logsnr, z, on, rays, torch.ones(2))
        assert (e0r - e00).abs().max() > 1e-4 and (ezr - e0r).abs().max() > 1e-4
        out = D.guided_eps(m, x_t, logsnr, z, w=3.0, rays_tgt=rays, w_pose=2.0)
        ref = e00 + 2.0 * (e0r - e00) + 3.0 * (ezr - e0r)
        assert torch.allclose(out, ref, atol=1e-5)
        # w_pose = 1: the pose is not guided, classic CFG with the rays on in both branches
        out1 = D.guided_eps(m, x_t, logsnr, z, w=3.0, rays_tgt=rays, w_pose=1.0)
        assert torch.allclose(out1, e0r + 3.0 * (ezr - e0r), atol=1e-5)
        # w = 1, w_pose = 2: only pose guidance
        out2 = D.guided_eps(m, x_t, logsnr, z, w=1.0, rays_tgt=rays, w_pose=2.0)
        assert torch.allclose(out2, e00 + 2.0 * (e0r - e00) + (ezr - e0r), atol=1e-5)


# -----------------------------------------------------------------------------
# 8. sampler determinism

def test_sampler_determinism():
    model = GaussianDenoiser(0.5)
    z, shape = torch.zeros(2, Z), (2, 3, 8, 8)
    run = lambda seed: D.ddpm(model, z, shape, steps=20, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    d1 = D.ddim(model, z, shape, steps=20, x_T=x_T)
    d2 = D.ddim(model, z, shape, steps=20, x_T=x_T.clone(),
                generator=torch.Generator().manual_seed(99))  # x_T given: the generator is unused
    assert torch.equal(d1, d2)
    # DDIM with a fixed generator and no x_T is deterministic as well
    e1 = D.ddim(model, z, shape, steps=20, generator=torch.Generator().manual_seed(7))
    e2 = D.ddim(model, z, shape, steps=20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(e1, e2)


def _gaussian_sampler_std(steps, s, eta):
    """The std of sample()'s output for data N(0, s^2) and its exact denoiser, in closed form: every
    step is linear, x_s = A x_t + sigma z with sigma from DDIM eq. 16, and the last step returns
    x_0_hat(x_t). Float64 scalars, written from the DDIM paper, not from diffusion.py."""
    a = torch.sigmoid(D.get_schedule("cosine")(torch.linspace(1, 0, steps + 1)).double()).tolist()
    v = 1.0  # x_T ~ N(0, I)
    for i in range(steps):
        at, as_ = a[i], a[i + 1]
        c = math.sqrt(at) * s * s / (at * s * s + 1 - at)  # x_0_hat = c x_t
        k = (1 - math.sqrt(at) * c) / math.sqrt(1 - at)  # eps_hat = k x_t
        if i == steps - 1:
            return math.sqrt(c * c * v)
        sig2 = eta ** 2 * (1 - as_) / (1 - at) * (1 - at / as_)
        A = math.sqrt(as_) * c + math.sqrt(max(1 - as_ - sig2, 0.0)) * k
        v = A * A * v + sig2


@pytest.mark.parametrize("sampler,eta", [(D.ddpm, 1.0), (D.ddim, 0.0)])
@pytest.mark.parametrize("steps", [5, 10])
def test_sampler_output_variance_gaussian(sampler, eta, steps):
    # few steps, so the ancestral noise (sigma) matters: DDPM and DDIM give clearly different stds
    # (e.g. 0.171 vs 0.183 at 5 steps), and a wrong sigma formula moves it by > 10%
    s = 0.3
    out = sampler(GaussianDenoiser(s), torch.zeros(256, Z), (256, 3, 8, 8), steps=steps, clip=False,
                  generator=torch.Generator().manual_seed(0))
    ref = _gaussian_sampler_std(steps, s, eta)
    assert abs(out.std().item() / ref - 1) < 0.02, (out.std().item(), ref)
    assert abs(out.mean().item()) < 0.01
    assert abs(_gaussian_sampler_std(steps, s, 1.0) / _gaussian_sampler_std(steps, s, 0.0) - 1) > 0.05


def test_ddpm_many_steps_approaches_data_std():
    s = 0.3
    out = D.ddpm(GaussianDenoiser(s), torch.zeros(64, Z), (64, 3, 8, 8), steps=100, clip=False,
                 generator=torch.Generator().manual_seed(0))
    assert abs(out.std().item() - s) < 0.03, out.std().item()


def test_ddim_with_real_model_shapes():
    m = tiny_model()
    z = torch.randn(2, Z, generator=torch.Generator().manual_seed(0))
    out = D.ddim(m, z, (2, 3, 8, 8), steps=3, generator=torch.Generator().manual_seed(0), w=2.0)
    assert out.shape == (2, 3, 8, 8)
    assert torch.isfinite(out).all() and out.abs().max() <= 1.0  # clip=True by default


# -----------------------------------------------------------------------------
# 9. loss

def test_loss_finite_fp32():
    m = tiny_model().train()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    sched = D.get_schedule("inverted")
    torch.manual_seed(0)
    l = D.loss(m, x, x, sched)
    assert l.dim() == 0 and l.dtype == torch.float32 and torch.isfinite(l)
    assert 0.1 < l.item() < 10
    l.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        lb = D.loss(m, x, x, sched)
    assert lb.dim() == 0 and lb.dtype == torch.float32 and torch.isfinite(lb)
    assert abs(lb.item() - l.item()) < 0.05 * l.item()  # bf16 forward, same objective


def test_loss_zero_model_is_noise_variance():
    # a model that predicts eps = 0 has loss E[eps^2] = 1 whatever the schedule
    class Zero(torch.nn.Module):
        def forward(self, x_t, logsnr, x_src, **kw):
            return torch.zeros_like(x_t)

    x = torch.zeros(64, 3, 8, 8)
    torch.manual_seed(0)
    l = D.loss(Zero(), x, x, D.get_schedule("cosine"))
    assert abs(l.item() - 1) < 0.03

    # a model that returns the true eps has loss 0: checks that the target really is eps
    class Oracle(torch.nn.Module):
        def forward(self, x_t, logsnr, x_src, **kw):
            abar = torch.sigmoid(logsnr)[:, None, None, None]
            return (x_t - abar.sqrt() * x_src) / (1 - abar).sqrt()

    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.manual_seed(0)
    assert D.loss(Oracle(), x, x, D.get_schedule("cosine")).item() < 1e-6


def test_loss_with_given_u_and_eps():
    # explicit u and eps: the model sees logsnr = schedule(u) and x_t = q_sample(x, logsnr, eps)
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x_t, logsnr, x_src, **kw):
            seen.update(x_t=x_t, logsnr=logsnr, x_src=x_src, kw=kw)
            return 0.5 * torch.ones_like(x_t)

    g = torch.Generator().manual_seed(2)
    x_src, x_tgt = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    u, eps = torch.tensor([0.1, 0.5, 0.9]), torch.randn(3, 3, 4, 4, generator=g)
    sched = D.get_schedule("cosine")
    z_on = torch.ones(3, 1)
    l = D.loss(Spy(), x_src, x_tgt, sched, u=u, eps=eps, z_on=z_on)
    assert torch.equal(seen["logsnr"], sched(u))
    assert torch.allclose(seen["x_t"], D.q_sample(x_tgt, sched(u), eps), atol=1e-6)
    assert seen["x_src"] is x_src and seen["kw"]["z_on"] is z_on
    assert abs(l.item() - ((0.5 - eps) ** 2).mean().item()) < 1e-6


def test_v_weighting_is_eps_mse_over_abar():
    class Zero(torch.nn.Module):
        def forward(self, x_t, logsnr, x_src, **k):
            return torch.zeros_like(x_t)
    x = torch.randn(3, 3, 4, 4)
    u, eps = torch.tensor([0.2, 0.5, 0.8]), torch.randn(3, 3, 4, 4)
    sched = D.get_schedule("cosine")
    plain = D.loss(Zero(), x, x, sched, u=u, eps=eps)
    v = D.loss(Zero(), x, x, sched, u=u, eps=eps, weighting="v")
    per_image = eps.pow(2).mean(dim=(1, 2, 3))
    abar = torch.sigmoid(sched(u))
    torch.testing.assert_close(plain, per_image.mean())
    torch.testing.assert_close(v, (per_image / abar).mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        D.loss(Zero(), x, x, sched, u=u, eps=eps, weighting="x0")


def test_logsnr_shift_moves_the_schedule():
    u = torch.linspace(0.05, 0.95, 19)
    base, shifted = D.get_schedule("inverted")(u), D.get_schedule("inverted", shift=-2.0)(u)
    torch.testing.assert_close(shifted, base - 2.0)


def test_logsnr_min_stops_the_noisy_end_and_nothing_else():
    u = torch.linspace(0, 1, 101)
    full, short = D.get_schedule("cosine")(u), D.get_schedule("cosine", logsnr_min=-6.0)(u)
    assert full.min() == D.LOGSNR_MIN and short.min() == -6.0
    assert torch.equal(short[full >= -6.0], full[full >= -6.0])


def test_inverted_cosine_matches_its_closed_form():
    """abar_inv(u) = (2(1+s)/pi) arccos(sqrt(c0 u)) - s with c0 = cos^2(pi s / (2(1+s))), s = 0.008:
    the bisection agrees to 1e-12, and the schedule's log-SNR is its logit (float32)."""
    s = 0.008
    u = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    c0 = math.cos(math.pi * s / (2 * (1 + s))) ** 2
    closed = 2 * (1 + s) / math.pi * torch.arccos((c0 * u).sqrt()) - s
    assert (D.abar_inverted(u, D.abar_cosine) - closed).abs().max() < 1e-12
    logsnr = D.get_schedule("inverted")(u.float())
    torch.testing.assert_close(logsnr, (closed / (1 - closed)).log().float(), rtol=1e-5, atol=1e-5)
