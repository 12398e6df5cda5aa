"""
Diffusion for SODA: noise schedules (incl. the inverted one), the training loss, DDPM/DDIM
samplers, DDIM inversion and (layer-wise) classifier-free guidance. No model code: every function
takes the model as an argument and calls only `model(...)`, `model.encode(...)` and
`model.denoise(...)` (see model.SODA).

Notation (paper §3.1, DDPM): x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, logsnr = log(abar / (1 - abar)).
Time is u in [0, 1]: u = 0 is clean, u = 1 is pure noise. A schedule maps u -> logsnr, and
abar = sigmoid(logsnr). The network sees logsnr, never u, so training and sampling schedules
may differ. All the math here runs in fp32 (fp64 inside the schedules).
"""
import math

import torch
import torch.nn.functional as F

LOGSNR_MIN, LOGSNR_MAX = -15.0, 15.0  # clip: abar in [3e-7, 1 - 3e-7]


# -----------------------------------------------------------------------------
# Schedules: abar(u), decreasing from 1 to 0

def abar_linear(u, beta_0=1e-4, beta_1=0.02, T=1000):
    # DDPM's linear betas in continuous time: abar = prod(1 - beta) ~ exp(-integral of beta)
    return torch.exp(-T * (beta_0 * u + 0.5 * (beta_1 - beta_0) * u**2))


def abar_cosine(u, s=0.008):
    # Nichol & Dhariwal 2021
    f = lambda v: torch.cos((v + s) / (1 + s) * math.pi / 2) ** 2
    return f(u) / f(torch.zeros_like(u))


def abar_sigmoid(u, start=-3.0, end=3.0, tau=1.0):
    # Jabri et al. 2022 / Chen 2023
    sig = lambda v: torch.sigmoid(torch.as_tensor(v, dtype=u.dtype) / tau)
    return (sig(end) - sig(u * (end - start) + start)) / (sig(end) - sig(start))


BASES = {"linear": abar_linear, "cosine": abar_cosine, "sigmoid": abar_sigmoid}


# Each base's inverse function in closed form: t in [0, 1] with base(t) = y (y outside the base's
# range gives the nearer end). Arithmetic on the device only: a training step never waits for the host.

def inverse_linear(y, beta_0=1e-4, beta_1=0.02, T=1000):
    # T (beta_0 t + (beta_1 - beta_0) t^2 / 2) = -log y, the positive root of the quadratic
    a = 0.5 * (beta_1 - beta_0)
    return ((beta_0**2 - 4 * a * y.log() / T).sqrt() - beta_0) / (2 * a)


def inverse_cosine(y, s=0.008):
    # cos^2((t + s) / (1 + s) pi / 2) = y cos^2(s / (1 + s) pi / 2)
    c0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return 2 * (1 + s) / math.pi * torch.arccos((c0 * y).sqrt()) - s


def inverse_sigmoid(y, start=-3.0, end=3.0, tau=1.0):
    # sigmoid((t (end - start) + start) / tau) = sig(end) - y (sig(end) - sig(start))
    sig_s, sig_e = 1 / (1 + math.exp(-start / tau)), 1 / (1 + math.exp(-end / tau))
    return (tau * torch.logit(sig_e - y * (sig_e - sig_s)) - start) / (end - start)


INVERSES = {abar_linear: inverse_linear, abar_cosine: inverse_cosine, abar_sigmoid: inverse_sigmoid}


def invert_decreasing(fn, y, iters=60):
    """The t in [0, 1] with fn(t) = y, for a decreasing fn, by bisection (the smallest such t where
    fn is flat, e.g. clipped): for functions with no closed-form inverse (a mixture's table, once)."""
    lo, hi = torch.zeros_like(y), torch.ones_like(y)
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = fn(mid) > y
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def abar_inverted(u, base=abar_cosine):
    """The inverse function of a base S-shaped schedule: abar_inv = base^{-1} (§3.4, Fig. 3).
    The base is steep in the middle and flat at the ends, so its inverse is flat in the middle and
    steep at the ends: uniform u then lands mostly on medium noise levels. In closed form
    (INVERSES)."""
    return INVERSES[base](u.clamp(0, 1)).clamp(0, 1)


def mixture(fns, n=4001):
    """An equal mixture of schedules (u -> logsnr functions), as one monotone schedule. Under uniform
    u, schedule i puts a fraction u_i(l) = fn_i^{-1}(l) of its draws at log-SNR >= l; the mixture's
    fraction is their mean, tabulated on a log-SNR grid (once, by bisection) and inverted by linear
    interpolation, the table copied to each device once. So uniform u draws each schedule's noise
    levels half the time, and u = 0 is still clean, 1 noise."""
    grid = torch.linspace(LOGSNR_MAX, LOGSNR_MIN, n, dtype=torch.float64)
    u_grid = sum(invert_decreasing(lambda u: fn(u).double(), grid) for fn in fns) / len(fns)
    tables = {}

    def logsnr_fn(u):
        if u.device not in tables:
            tables[u.device] = u_grid.to(u.device), grid.to(u.device)
        ug, g = tables[u.device]
        u = u.double().clamp(0, 1)
        i = torch.searchsorted(ug, u).clamp(1, n - 1)  # ug[i - 1] <= u <= ug[i]
        frac = ((u - ug[i - 1]) / (ug[i] - ug[i - 1]).clamp_min(1e-12)).clamp(0, 1)
        return g[i - 1] + (g[i] - g[i - 1]) * frac
    return logsnr_fn


def get_schedule(name, shift=0.0, logsnr_min=LOGSNR_MIN):
    """name -> function u -> logsnr. 'linear' | 'cosine' | 'sigmoid' | 'inverted' (= inverted
    cosine) | 'inverted_<base>', or an equal mixture of those joined by '+' ('inverted+cosine': the
    inverted schedule's medium noise levels and cosine's high ones). shift adds a constant to logsnr
    (negative: noisier), as the shifted schedules of Hoogeboom et al. 2023 ("simple diffusion").
    logsnr_min > LOGSNR_MIN stops the noisy end early: DDIM inversion to log-SNR -15 keeps the
    image at sqrt(abar) = 5e-4 of x_T, and the first sampling step divides by that, so a round trip
    only works from a less noisy end."""
    if name == "inverted":
        name = "inverted_cosine"
    if "+" in name:
        raw = mixture([get_schedule(part) for part in name.split("+")])
    else:
        if name.startswith("inverted_") and name[9:] in BASES:
            base = BASES[name[9:]]
            abar_fn = lambda u: abar_inverted(u, base)
        elif name in BASES:
            abar_fn = BASES[name]
        else:
            raise ValueError(f"unknown schedule {name!r}: use one of {sorted(BASES)} or 'inverted[_<base>]', "
                             "or several joined by '+'")

        def raw(u):  # logit(abar), in fp64
            abar = abar_fn(u.double()).clamp(1e-20, 1 - 1e-16)
            return abar.log() - (-abar).log1p()
    return lambda u: (raw(u) + shift).clamp(logsnr_min, LOGSNR_MAX).float()


def q_sample(x_0, logsnr, eps):
    """x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps, with abar = sigmoid(logsnr) (the forward process)."""
    abar = torch.sigmoid(logsnr.float())[:, None, None, None]
    return abar.sqrt() * x_0 + (1 - abar).sqrt() * eps


def x0_from_eps(x_t, abar, eps):
    """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar): the forward process solved for x_0, the clean
    image an eps prediction implies."""
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def loss(model, x_src, x_tgt, schedule, u=None, eps=None, weighting="eps", **cond):
    """The eps-MSE of §3.4 on the target view x_tgt, the model conditioned on the source view x_src.
    u ~ U[0, 1] (the schedule decides which noise levels that means) and eps ~ N(0, I) are drawn
    here unless given (train.py gives them, to make DDP and resume exact). The model may run in
    bf16 under autocast; the noise and the loss are fp32. weighting='v' scales each image's
    eps-MSE by 1 / abar = (1 + SNR) / SNR, the v-prediction loss (Salimans & Ho 2022): more weight
    on high noise, where the decoder must lean on z."""
    B = x_tgt.shape[0]
    u = torch.rand(B, device=x_tgt.device) if u is None else u
    eps = torch.randn_like(x_tgt, dtype=torch.float32) if eps is None else eps.float()
    logsnr = schedule(u)
    x_t = q_sample(x_tgt.float(), logsnr, eps)
    return eps_mse(model(x_t, logsnr, x_src, **cond), eps, logsnr, weighting)


def eps_mse(eps_hat, eps, logsnr, weighting="eps"):
    """The loss of an eps prediction, in fp32: the plain eps-MSE (the paper), or weighting='v', each
    image's eps-MSE times 1 / abar = 1 + exp(-logsnr)."""
    if weighting == "eps":
        return F.mse_loss(eps_hat.float(), eps)
    if weighting == "v":
        per_image = (eps_hat.float() - eps).pow(2).mean(dim=(1, 2, 3))
        return (per_image * (1 + torch.exp(-logsnr))).mean()
    raise ValueError(f"weighting must be 'eps' or 'v', got {weighting!r}")


# -----------------------------------------------------------------------------
# Guidance (§3.2.1, §3.3): one batched forward for the conditional and unconditional halves

def guided_eps(model, x_t, logsnr, z, w=1.0, z_on=None, z_on_uncond=None, rays_tgt=None, w_pose=1.0):
    """eps = eps(x | masked z) + w (eps(x | z) - eps(x | masked z)).
    z_on: the sections to condition on (default all); z_on_uncond: the sections left on in the
    unconditional branch (default none: classic CFG; any subset: layer-wise guidance).
    With rays and w_pose != 1, pose is guided separately:
    eps = eps(0, 0) + w_pose (eps(0, r) - eps(0, 0)) + w (eps(z, r) - eps(0, r))."""
    B, S = x_t.shape[0], model.n_sections
    ones = torch.ones(B, S, device=x_t.device)
    z_on = ones if z_on is None else z_on.to(ones).expand(B, S)
    z_on_uncond = 0 * ones if z_on_uncond is None else z_on_uncond.to(ones).expand(B, S)
    guide_pose = rays_tgt is not None and w_pose != 1.0
    if w == 1.0 and not guide_pose:  # no guidance: the conditional pass alone
        return model.denoise(x_t, logsnr, z, z_on, rays_tgt).float()
    keeps, pose = [z_on, z_on_uncond], [1.0, 1.0]
    if guide_pose:  # a third branch with neither latent nor target pose
        keeps, pose = keeps + [z_on_uncond], pose + [0.0]
    n = len(keeps)
    eps = model.denoise(x_t.repeat(n, 1, 1, 1), logsnr.repeat(n), z.repeat(n, 1), torch.cat(keeps),
                        None if rays_tgt is None else rays_tgt.repeat(n, 1, 1, 1),
                        torch.tensor(pose, device=x_t.device).repeat_interleave(B)).float()
    eps = eps.chunk(n)
    if guide_pose:
        return eps[2] + w_pose * (eps[1] - eps[2]) + w * (eps[0] - eps[1])
    return eps[1] + w * (eps[0] - eps[1])


# -----------------------------------------------------------------------------
# Samplers

def _grid(steps, schedule, device):
    # u from 1 (noise) to 0 (clean) in `steps` equal steps -> logsnr (steps + 1,)
    return schedule(torch.linspace(1.0, 0.0, steps + 1, device=device))


@torch.no_grad()
def sample(model, z, shape, steps=50, eta=0.0, schedule="cosine", generator=None, x_T=None,
           clip=True, progress=False, **guidance):
    """DDIM (Song et al. 2021, eq. 12) with stochasticity eta; eta=1 is DDPM's ancestral sampler
    (the posterior q(x_s | x_t, x_0_hat) of Ho et al. 2020; DDIM eq. 16). The paper samples with
    DDPM (§3.4). z: the latent (B, z_dim) from model.encode; guidance kwargs go to guided_eps.
    Deterministic given `generator` (and x_T)."""
    schedule = get_schedule(schedule) if isinstance(schedule, str) else schedule
    device = z.device
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.float()
    logsnrs = _grid(steps, schedule, device)
    it = range(steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="sampling", leave=False)
    for i in it:
        lt, ls = logsnrs[i], logsnrs[i + 1]  # from noise level t to the less noisy s
        abar_t, abar_s = torch.sigmoid(lt), torch.sigmoid(ls)
        eps = guided_eps(model, x, lt.expand(shape[0]), z, **guidance)
        x_0 = x0_from_eps(x, abar_t, eps)
        if clip:
            x_0 = x_0.clamp(-1, 1)
            eps = (x - abar_t.sqrt() * x_0) / (1 - abar_t).sqrt()  # keep eps consistent with x_0
        if i == steps - 1:
            return x_0
        sigma = eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).sqrt()
        x = abar_s.sqrt() * x_0 + (1 - abar_s - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x = x + sigma * torch.randn(shape, generator=generator, device=device)
    return x


SAMPLERS = {"ddpm": 1.0, "ddim": 0.0}  # a sampler's name -> its eta in sample()


def ddpm(model, z, shape, steps=1000, **kw):
    """DDPM ancestral sampling (the paper's sampler, §3.4)."""
    return sample(model, z, shape, steps=steps, eta=1.0, **kw)


def ddim(model, z, shape, steps=50, **kw):
    """Deterministic DDIM sampling (eta = 0)."""
    return sample(model, z, shape, steps=steps, eta=0.0, **kw)


@torch.no_grad()
def ddim_invert(model, x_0, z, steps=50, schedule="cosine", progress=False, **guidance):
    """Run deterministic DDIM backwards, x_0 -> x_T, so that ddim(..., x_T=x_T) gives x_0 back
    (used for interpolation and editing, §4.3). Ends at u = 1, where ddim starts."""
    schedule = get_schedule(schedule) if isinstance(schedule, str) else schedule
    logsnrs = _grid(steps, schedule, x_0.device).flip(0)  # clean -> noise
    x = x_0.float()
    it = range(steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="inverting", leave=False)
    for i in it:
        ls, lt = logsnrs[i], logsnrs[i + 1]  # from the less noisy s to the noisier t
        abar_s, abar_t = torch.sigmoid(ls), torch.sigmoid(lt)
        eps = guided_eps(model, x, ls.expand(x.shape[0]), z, **guidance)
        x_0_hat = x0_from_eps(x, abar_s, eps)
        x = abar_t.sqrt() * x_0_hat + (1 - abar_t).sqrt() * eps
    return x

