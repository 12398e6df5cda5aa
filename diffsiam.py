"""
DiffSiam, the thesis' variant of SODA, beside it rather than inside it: z in hierarchical segments
that the noise level switches on, SimSiam heads on the encoder of two augmented views, and
optionally PDAE's decoder (a frozen pre-trained denoiser plus a trainable gradient estimator).
Thesis: "DiffSiam" §3 (segments §3.2, §4.3.1; SimSiam eq. 3.9-3.12; PDAE eq. 3.8, Fig. 3.1).

DiffSiam is a model.SODA: the samplers (diffusion.py) and the z-usage instrument (zusage.py) call its
denoise() as they call SODA's, and it switches on, at each noise level, the segments that
training used there. This file imports model.py and diffusion.py only.
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import diffusion as D
import model as M


def segments_switched_on(u, n, mode="hierarchical"):
    """DiffSiam's segment schedule (thesis §3.2, §4.3.1): at noise position u in [0, 1] (more noise,
    more lost attributes) level k = ceil(u n) in 1..n; 'hierarchical' switches on segments 1..k
    (z_bar_k = [z_1..z_k, 0..]), 'sequential' only segment k. -> (B, n) of 0/1."""
    k = (u * n).ceil().clamp(1, n).long()  # (B,)
    idx = torch.arange(1, n + 1, device=u.device)[None]
    if mode == "hierarchical":
        return (idx <= k[:, None]).float()
    if mode == "sequential":
        return (idx == k[:, None]).float()
    raise ValueError(f"segment_mode must be 'hierarchical' or 'sequential', got {mode!r}")


def segment_schedule(n, mode, schedule):
    """The segment schedule for samplers: logsnr (B,) -> (B, n) of 0/1, the segments that training
    switched on at that noise level (segments_switched_on at the u where the training `schedule` gives
    this logsnr). A sampler that conditions on every segment at every step asks the decoder for
    something it never saw at low noise (thesis Alg. 2 can: its k is drawn apart from t)."""
    return lambda logsnr: segments_switched_on(D.invert_decreasing(schedule, logsnr.float()), n, mode)


class MLP(nn.Sequential):
    """Linear - BatchNorm - ReLU - Linear (+ BatchNorm): SimSiam's heads. BatchNorm here, unlike the
    encoder: SimSiam collapses without it (Chen & He 2021, Table 5), and so did our LayerNorm heads
    (every image's z within cosine 0.9999 of the others after a CPU teaching run)."""

    def __init__(self, cin, hidden, cout, out_norm=False):
        layers = [nn.Linear(cin, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, cout)]
        super().__init__(*layers, *([nn.BatchNorm1d(cout, affine=False)] if out_norm else []))


def negative_cosine(p, h):
    """SimSiam's D(p, h) = -cos(p, stopgrad(h)), averaged over the batch: -1 when aligned; no
    gradient reaches h (Chen & He 2021)."""
    return -(F.normalize(p, dim=1) * F.normalize(h.detach(), dim=1)).sum(dim=1).mean()


@dataclass
class DiffSiamConfig(M.SODAConfig):
    """SODAConfig and the thesis' three changes, each off by default."""
    segments: int = 0  # > 0: z cut into this many segments that the noise level switches on (thesis §3.2)
    segment_mode: str = "hierarchical"  # 'hierarchical': segments 1..k on at level k | 'sequential': only k (§4.3.1)
    schedule: str = "inverted"  # the training noise schedule: which segments training used at each noise level
    logsnr_shift: float = 0.0  # ... and its log-SNR shift
    simsiam_dim: int = 0  # > 0: SimSiam projector (this wide) and predictor heads on z (thesis eq. 3.9-3.12)
    pdae: bool = False  # True: the decoder is a frozen pre-trained denoiser + a trained gradient estimator (eq. 3.8)


class DiffSiam(M.SODA):
    """SODA with the thesis' three changes, each optional:
    segments > 0: z cut into that many segments; the noise level u uses the first ceil(u n)
      ('hierarchical') or only the ceil(u n)-th ('sequential'), in training and in every sampler;
    simsiam_dim > 0: SimSiam projector and predictor heads on z of two augmented views;
    pdae=True: the decoder is a frozen pre-trained denoiser eps_theta (train.py loads it) plus a
      trainable gradient estimator G, the UNet's up path reading the frozen down path's features.
    schedule, logsnr_shift: the training noise schedule, which tells the samplers which segments
    training used at each noise level."""

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.segments, self.segment_mode = c.segments, c.segment_mode
        self.segments_at = segment_schedule(c.segments, c.segment_mode, D.get_schedule(c.schedule, c.logsnr_shift)) \
            if c.segments else None
        if c.simsiam_dim:  # built after SODA's modules, so the encoder and UNet initialise as in plain SODA
            self.projector = MLP(self.z_dim, c.simsiam_dim, c.simsiam_dim, out_norm=True)
            self.predictor = MLP(c.simsiam_dim, c.simsiam_dim // 4, c.simsiam_dim)
        self.frozen = None
        if c.pdae:  # PDAE (Zhang et al. 2022), DiffSiam's decoder (thesis §3.2): eps_theta, a UNet of
            # SODA's shape (train.py loads its weights), read with z = 0 (its unconditional mode); G is
            # this model's UNet without its down path, for which it reads eps_theta's
            self.frozen = copy.deepcopy(self.unet).requires_grad_(False)
            self.unet.conv_in = self.unet.down = None

    def train(self, mode=True):
        super().train(mode)
        if self.frozen is not None:  # a frozen denoiser stays in eval mode (no dropout)
            self.frozen.eval()
        return self

    def dims_on(self, z_on, segments_on):
        """A section mask z_on (B, P) and a segment mask (B or 1, segments) -> one 0/1 per dim of z
        (B, z_dim): the two cut z differently, so they combine dim by dim."""
        ones = torch.ones(z_on.shape[0], self.z_dim, device=z_on.device)
        return self.mask_z(ones, z_on) * self.mask_z(ones, segments_on)

    def simsiam_loss(self, z1, z2):
        """Symmetrised SimSiam loss on two views' latents: D(pred(proj(z1)), proj(z2)) / 2 + the
        same with the views swapped, the targets behind a stop-gradient (thesis eq. 3.9)."""
        h1, h2 = self.projector(z1), self.projector(z2)
        return 0.5 * (negative_cosine(self.predictor(h1), h2) + negative_cosine(self.predictor(h2), h1))

    def denoise(self, x_t, logsnr, z, z_on=None, rays_tgt=None, pose_on=None, segments_on=None):
        """SODA's denoise, with only the segments on that the noise level uses: segments_on (B, segments)
        where given (training: from u), else the segment schedule at logsnr (the samplers)."""
        if self.segments:
            z_on = torch.ones(len(z), self.n_sections, device=z.device) if z_on is None else z_on
            z_on = self.dims_on(z_on, self.segments_at(logsnr) if segments_on is None else segments_on)
        if self.frozen is None:
            return super().denoise(x_t, logsnr, z, z_on, rays_tgt, pose_on)
        # PDAE: eps_hat = eps_theta(x_t) - sqrt(1 - abar) G(x_t, z), G ~ grad_x_t log p(z | x_t), the
        # classifier-guidance shift of the frozen model's eps (thesis eq. 3.8); G's up path reads
        # the frozen down path's features, so only it and the encoder learn.
        z = self.decoder_latent(z, z_on)
        x_in = self.network_input(x_t, rays_tgt, pose_on)
        with torch.no_grad():
            cond = self.frozen.conditioning(logsnr, torch.zeros_like(z))
            skips = self.frozen.down_path(x_in, *cond)
            eps_theta = M.to_eps(self.frozen.up_path(skips, *cond), x_t, logsnr, self.prediction)
        G = self.unet.up_path(skips, *self.unet.conditioning(logsnr, z))
        return eps_theta - torch.sigmoid(-logsnr.float()).sqrt().to(G.dtype)[:, None, None, None] * G

    def forward(self, x_t, logsnr, x_src, z_on=None, rays_src=None, rays_tgt=None, pose_on=None,
                src_pose_on=None, segments_on=None, x_pair=None):
        """SODA's training forward; with x_pair (the other augmented view) -> (eps_hat, the SimSiam
        loss of the two views' latents): one forward, so DDP sees every parameter used once."""
        z = self.encode(x_src, rays_src, src_pose_on)
        z_on, pose_on = self.training_masks(x_t, z_on, pose_on)
        eps_hat = self.denoise(x_t, logsnr, z, z_on, rays_tgt, pose_on, segments_on)
        if x_pair is None:
            return eps_hat
        return eps_hat, self.simsiam_loss(z, self.encode(x_pair))


def loss(model, x_src, x_tgt, schedule, u, eps, x_pair, simsiam_weight, weighting="eps", **cond):
    """DiffSiam's training loss (thesis eq. 3.12): diffusion.loss's denoising loss on the target
    view plus simsiam_weight times the SimSiam loss of the two augmented views' latents."""
    logsnr = schedule(u)
    x_t = D.q_sample(x_tgt.float(), logsnr, eps.float())
    eps_hat, simsiam = model(x_t, logsnr, x_src, x_pair=x_pair, **cond)
    return D.eps_mse(eps_hat, eps.float(), logsnr, weighting) + simsiam_weight * simsiam


def check_pretrained(old, new):
    """PDAE: a checkpoint's model_args `old` against this model's `new` -> what stops its EMA UNet
    from being the frozen denoiser ('' if nothing)."""
    keys = ("unet", "z_dim", "image_size", "cond", "n_tokens", "ray_freqs", "prediction", "coords", "top_skips")
    diff = [f"{k}={old[k]!r} (here {new[k]!r})" for k in keys if old[k] != new[k]]
    if diff:
        return f"its {', '.join(diff)}"
    return "it is itself a PDAE model" if old.get("pdae") else ""


def load_frozen(net, ema):
    """The EMA UNet of a checkpoint (its 'ema' state dict) becomes net.frozen."""
    net.frozen.load_state_dict({k[5:]: v for k, v in ema.items() if k.startswith("unet.")})

