"""
SODA (Hudson et al., "SODA: Bottleneck Diffusion Models for Representation Learning", CVPR 2024):
an encoder E squeezes a source view x' into a compact latent z = E(x') (§3.2), and a UNet denoiser
D(x_t, logsnr, z), modulated layer by layer by z (§3.1, §3.2.1), denoises a related target view.
Read top to bottom: the encoder, the UNet, then SODA and its config (SODAConfig). The loss and the
samplers are in diffusion.py; the thesis' DiffSiam variant extends SODA in diffsiam.py.

The classes are the paper's model. What we added and measured is kept apart, one block each marked
"Measured" that names the docs page that measured it: z_bn's after the UNet, the others (z_norm,
prediction, z_init, coords, top_skips, attention in bf16 on a CPU) at the end of the file. Each
is off by default, and the paper's classes reach it only at lines commented "measured".
This file imports no other project file.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def group_norm(ch):
    # GroupNorm everywhere, the encoder included: no batch statistics, so a DDP run equals one
    # process, train equals eval, and z is a function of its own image only.
    groups = min(32, ch // 4)
    while ch % groups:  # the largest group count <= 32 that divides ch
        groups -= 1
    return nn.GroupNorm(groups, ch)


def zero_(module):
    # zero-init (DiT adaLN-Zero / ADM): an untrained block is the identity, an untrained
    # modulation ignores z (§3.1)
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# -----------------------------------------------------------------------------
# Encoder: a ResNet, global average pool, then the linear bottleneck to z (§3.2)

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.norm1 = group_norm(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.norm2 = group_norm(cout)
        nn.init.zeros_(self.norm2.weight)  # residual branch starts at zero (Goyal et al. 2017)
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), group_norm(cout))

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.skip(x) + self.norm2(self.conv2(h)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.norm1 = group_norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.norm2 = group_norm(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.norm3 = group_norm(cout)
        nn.init.zeros_(self.norm3.weight)
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), group_norm(cout))

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(x)))
        h = F.relu(self.norm2(self.conv2(h)))
        return F.relu(self.skip(x) + self.norm3(self.conv3(h)))


class Encoder(nn.Module):
    """E(x') = z. A ResNet of `widths`/`depths`, pooled, then a linear bottleneck to z_dim.
    bottleneck=False is the paper's "w/o bottleneck" ablation (Table 1): z is the whole final
    feature map, one feat_dim token per position (z_dim = spatial_tokens * feat_dim), for cond='xattn'."""

    def __init__(self, z_dim, block="basic", widths=(64, 128, 256, 512), depths=(2, 2, 2, 2),
                 in_ch=3, image_size=32, bottleneck=True):
        super().__init__()
        Block = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        w0 = widths[0]
        if image_size <= 64:  # CIFAR stem: 3x3 stride 1, no max-pool
            self.stem = nn.Sequential(nn.Conv2d(in_ch, w0, 3, 1, 1, bias=False), group_norm(w0), nn.ReLU())
        else:  # ImageNet stem: 7x7 stride 2 + max-pool
            self.stem = nn.Sequential(nn.Conv2d(in_ch, w0, 7, 2, 3, bias=False), group_norm(w0), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        stages, cin = [], w0
        for i, (w, d) in enumerate(zip(widths, depths)):
            for j in range(d):
                stages.append(Block(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w * Block.expansion
        self.stages = nn.Sequential(*stages)
        self.feat_dim = cin
        side = image_size // (1 if image_size <= 64 else 4) // 2 ** (len(widths) - 1)
        self.spatial_tokens = side * side  # positions of the final feature map
        self.bottleneck = nn.Linear(cin, z_dim) if bottleneck else None  # the compact latent (§3.2)

    def forward_features(self, x):
        h = self.stages(self.stem(x))  # (B, feat_dim, h, w)
        pooled = h.mean(dim=(2, 3))  # (B, feat_dim)
        if self.bottleneck is None:  # no bottleneck: every position's features, (B, h * w * feat_dim)
            return pooled, h.permute(0, 2, 3, 1).flatten(1)
        return pooled, self.bottleneck(pooled)

    def forward(self, x):
        return self.forward_features(x)[1]


class Aggregator(nn.Module):
    """k view latents -> one z (§3.3 "Cardinality"): mean, or a 2-layer transformer read out by a
    learned token."""

    def __init__(self, z_dim, kind="mean", n_heads=4, n_layers=2):
        super().__init__()
        self.kind = kind
        if kind == "transformer":
            self.token = nn.Parameter(torch.zeros(1, 1, z_dim))
            layer = nn.TransformerEncoderLayer(z_dim, n_heads, 2 * z_dim, dropout=0.0,
                                               batch_first=True, norm_first=True)
            self.net = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        elif kind != "mean":
            raise ValueError(f"agg must be 'mean' or 'transformer', got {kind!r}")

    def forward(self, zs):  # (B, k, z_dim) -> (B, z_dim)
        if self.kind == "mean":
            return zs.mean(dim=1)
        tokens = torch.cat([self.token.expand(zs.shape[0], -1, -1), zs], dim=1)
        return self.net(tokens)[:, 0]


# -----------------------------------------------------------------------------
# UNet decoder (ADM/DDPM style), conditioned on log-SNR and modulated by z

def sinusoidal(x, dim, min_freq=1e-3):
    # (B,) -> (B, dim): frequencies from 1 down to min_freq; used on log-SNR in [-15, 15]
    half = dim // 2
    freqs = torch.exp(-math.log(1 / min_freq) * torch.arange(half, device=x.device) / half)
    angles = x.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def modulate(h, s, b):
    """h (1 + s) + b: each channel scaled and shifted, s and b (B, C, 1, 1): a step of AdaGN (§3.1),
    DiT's modulate."""
    return h * (1 + s) + b


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice. The second norm is AdaGN on the noise level, then scaled and
    shifted by the block's z section: h = GN(h)(1 + s_t) + b_t ; h = h(1 + s_z) + b_z (§3.1)."""

    def __init__(self, cin, cout, emb_dim, z_sec_dim=0, dropout=0.0, z_init=0.0):
        super().__init__()
        self.norm1 = group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.emb_proj = nn.Linear(emb_dim, 2 * cout)  # (s_t, b_t)
        self.z_proj = None
        if z_sec_dim:  # (s_z, b_z) = Linear(z_i), zero-initialised: the untrained block ignores z
            self.z_proj = zero_(nn.Linear(z_sec_dim, 2 * cout))
            init_z_projection(self.z_proj, z_init)  # measured: z_init
        self.norm2 = group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(cout, cout, 3, 1, 1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb, z_sec=None):
        h = self.conv1(F.silu(self.norm1(x)))
        s_t, b_t = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        # AdaGN on the noise level, h = modulate(GN(h), s_t, b_t) (§3.1), then z's layer modulation,
        # h = modulate(h, s_z, b_z) (§3.2.1). Both scale and shift each channel, so the steps are taken
        # on the map GN(h) -> GN(h) scale + shift, which then reads h once (measured: docs/speed.md)
        scale, shift = 1 + s_t, b_t
        if self.z_proj is not None:
            s_z, b_z = self.z_proj(z_sec)[:, :, None, None].chunk(2, dim=1)
            scale, shift = scale * (1 + s_z), modulate(shift, s_z, b_z)
        h = torch.addcmul(shift, self.norm2(h), scale)  # GN(h) scale + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Self-attention over the pixels, or cross-attention from the pixels to z's tokens when a
    context is given (§3.3 "Cross Attention"). Output projection zero-initialised."""

    def __init__(self, ch, n_heads=4, ctx_dim=None):
        super().__init__()
        self.n_heads = n_heads
        self.norm = group_norm(ch)
        self.q = nn.Linear(ch, ch)
        self.kv = nn.Linear(ctx_dim or ch, 2 * ch)
        self.proj = zero_(nn.Linear(ch, ch))

    def forward(self, x, ctx=None):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q = self.q(h)
        k, v = self.kv(h if ctx is None else ctx).chunk(2, dim=-1)
        q, k, v = (t.reshape(B, -1, self.n_heads, C // self.n_heads).transpose(1, 2)
                   for t in (q, k, v))  # (B, nh, T, hs)
        if q.is_cuda or q.dtype == torch.float32:
            h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hs)) v, (B, nh, T, hs)
        else:  # measured: bf16 on a CPU
            h = cpu_attention(q, k, v)
        h = self.proj(h.transpose(1, 2).reshape(B, H * W, C))  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class UNetBlock(nn.Module):
    """One block of the UNet: a ResBlock, then self-attention and cross-attention where asked.
    `section` says which part of z modulates it: down level i and up level i share section i,
    the middle block gets the last one (§3.2.1)."""

    def __init__(self, cin, cout, emb_dim, section, z_sec_dim, attn, xattn_dim, dropout, z_init=0.0):
        super().__init__()
        self.section = section
        self.res = ResBlock(cin, cout, emb_dim, z_sec_dim, dropout, z_init)
        self.attn = Attention(cout) if attn else None
        self.xattn = Attention(cout, ctx_dim=xattn_dim) if (attn and xattn_dim) else None

    def forward(self, h, emb, z_secs, tokens):
        h = self.res(h, emb, z_secs[self.section])
        if self.attn is not None:
            h = self.attn(h)
        if self.xattn is not None:
            h = self.xattn(h, tokens)
        return h


class UNet(nn.Module):
    """D(x_t, logsnr, z): m resolution levels down, a middle, m levels up, skip connections.
    cond='mod': z split into m+1 sections, one per level pair + the middle (AdaGN, §3.2.1);
    cond='xattn': z split into n_tokens tokens, cross-attention at the attention resolutions;
    cond='mod+xattn': both, "cross attention with feature modulation" (§3.3, Table 3's NVS model):
    the m+1 sections modulate, the n_tokens tokens are attended to, masking acts on the sections;
    cond='emb': z only added to the noise-level embedding (the "w/o layer modulation" ablation)."""

    def __init__(self, z_dim, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,),
                 dropout=0.0, image_size=32, in_ch=3, out_ch=3, cond="mod", n_tokens=8, z_init=0.0,
                 top_skips=True):
        super().__init__()
        m = len(ch_mult)
        self.cond = cond
        self.n_sections = {"mod": m + 1, "xattn": n_tokens, "mod+xattn": m + 1, "emb": 1}[cond]
        emb_dim = 4 * ch
        self.emb = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        sec_dims = [t.numel() for t in torch.arange(z_dim).tensor_split(self.n_sections)]
        if cond in ("mod", "mod+xattn"):
            z_secs = sec_dims
        else:
            z_secs = [0] * (m + 1)
        if cond in ("xattn", "mod+xattn"):
            self.tok_dims = [t.numel() for t in torch.arange(z_dim).tensor_split(n_tokens)]
            tok_dim = max(self.tok_dims)  # tokens may differ by one: pad to the widest
            self.tok_dim = tok_dim
            self.tok_pos = nn.Parameter(torch.randn(1, n_tokens, tok_dim) * 0.02)
        if cond == "emb":
            self.z_emb = zero_(nn.Linear(z_dim, emb_dim))
        xattn_dim = self.tok_dim if cond in ("xattn", "mod+xattn") else None
        step = lambda cin, cout, lvl, attn: UNetBlock(cin, cout, emb_dim, lvl, z_secs[lvl], attn, xattn_dim,
                                                      dropout, z_init)
        self.conv_in = nn.Conv2d(in_ch, ch, 3, 1, 1)
        self.down, skip_chs, c, res = nn.ModuleList(), [ch], ch, image_size
        for i, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(step(c, ch * mult, i, res in attn_res))
                c = ch * mult
                skip_chs.append(c)
            if i < m - 1:
                self.down.append(nn.Conv2d(c, c, 3, 2, 1))  # downsample
                skip_chs.append(c)
                res //= 2
        self.use_skip = up_skips(m, num_res_blocks, top_skips)  # each up step reads its skip; measured: top_skips
        use = iter(self.use_skip)
        self.mid = nn.ModuleList([step(c, c, m, True), step(c, c, m, False)])  # ADM: res-attn-res
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                skip_c = skip_chs.pop()
                self.up.append(step(c + (skip_c if next(use) else 0), ch * mult, i, res in attn_res))
                c = ch * mult
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, 1, 1)))
                res *= 2
        self.out = nn.Sequential(group_norm(c), nn.SiLU(), zero_(nn.Conv2d(c, out_ch, 3, 1, 1)))
        self.ch, self.sec_dims, self.m = ch, sec_dims, m

    def conditioning(self, logsnr, z):
        """-> (noise-level embedding, z's sections for the modulated steps, z's tokens for
        cross-attention): what every step of the UNet reads besides its input."""
        emb = self.emb(sinusoidal(logsnr, self.ch))
        z_secs, tokens = [None] * (self.m + 1), None
        if self.cond in ("mod", "mod+xattn"):
            z_secs = list(z.split(self.sec_dims, dim=1))
        if self.cond in ("xattn", "mod+xattn"):
            tokens = torch.stack([F.pad(t, (0, self.tok_dim - t.shape[1]))
                                  for t in z.split(self.tok_dims, dim=1)], dim=1)  # (B, n, tok_dim)
            tokens = tokens + self.tok_pos
        if self.cond == "emb":
            emb = emb + self.z_emb(z)
        return emb, z_secs, tokens

    def down_path(self, x, emb, z_secs, tokens):
        """-> the activations the up path's skip connections read, the deepest last."""
        h = self.conv_in(x)
        skips = [h]
        for blk in self.down:
            h = blk(h, emb, z_secs, tokens) if isinstance(blk, UNetBlock) else blk(h)
            skips.append(h)
        return skips

    def up_path(self, skips, emb, z_secs, tokens):
        """The middle block, then the up levels, each step reading its skip -> the output."""
        hs, use = list(skips), iter(self.use_skip)
        h = hs[-1]
        for blk in self.mid:
            h = blk(h, emb, z_secs, tokens)
        for blk in self.up:
            if isinstance(blk, UNetBlock):
                skip = hs.pop()
                h = blk(torch.cat([h, skip], dim=1) if next(use) else h, emb, z_secs, tokens)
            else:
                h = blk(h)
        return self.out(h)

    def forward(self, x, logsnr, z):
        """-> the network's output (B, out_ch, H, W) for noisy x at noise level logsnr, given z."""
        cond = self.conditioning(logsnr, z)
        return self.up_path(self.down_path(x, *cond), *cond)


# -----------------------------------------------------------------------------
# Measured: z_bn (docs/zusage.md). Each dim of z standardised over the batch on its way into the
# decoder (running statistics in eval). At init most of z's energy is one direction shared by every
# image (pooled ReLU features); a per-image norm keeps it, batch statistics remove it, so the decoder
# reads what differs between images (kNN of z 26.4 -> 35.0 at the same z-usage). The statistics are
# the global batch's under DDP. SODA.decoder_latent applies it.

class BatchStandardize(nn.Module):
    """Each dim of z to zero mean and unit variance over the batch in training, running statistics
    in eval (BatchNorm without the affine part). Under DDP the sums are all-reduced (with their
    gradient) over the ranks, so the statistics are the global batch's and a DDP run equals one
    process. The buffers carry BatchNorm1d's names. sync=False keeps the statistics to this
    process's batch (the copy monitor.count_flops counts issues no collective)."""

    def __init__(self, dim, momentum=0.01, eps=1e-5):
        super().__init__()
        self.momentum, self.eps, self.sync = momentum, eps, True
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, z):
        z = z.float()
        if not self.training:
            return (z - self.running_mean) / (self.running_var + self.eps).sqrt()
        sums = torch.stack([z.sum(0), z.pow(2).sum(0)])  # (2, dim)
        n = z.shape[0]
        if self.sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = AllReduceSum.apply(sums)
            n *= torch.distributed.get_world_size()
        mean = sums[0] / n
        var = (sums[1] / n - mean ** 2).clamp(min=0)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / max(n - 1, 1), self.momentum)
            self.num_batches_tracked += 1
        return (z - mean) / (var + self.eps).sqrt()


class AllReduceSum(torch.autograd.Function):
    """x summed over the processes, with its gradient: every process's output depends on every
    process's x, so the backward sums the outputs' gradients over the processes too. Written out
    rather than taken from the functional all-reduce's own autograd, which older torch releases
    lack (there the gradient would silently stay this process's). The functional collectives
    (not the in-place ones) keep it traceable by torch.compile."""

    @staticmethod
    def forward(ctx, x):
        return all_reduce_sum(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad)


def all_reduce_sum(x):
    from torch.distributed import _functional_collectives as collectives
    return collectives.wait_tensor(collectives.all_reduce(x, "sum", torch.distributed.group.WORLD))


# -----------------------------------------------------------------------------
# What the networks see besides the image: each pixel's camera ray for posed views (§3.3
# "Perspective", the multi-view data in multiview.py)

def ray_embed(rays, n_freqs):
    # (B, 6, H, W) ray origins + directions -> (B, 6 + 12 n_freqs, H, W), NeRF-style positional
    # encoding of every pixel's ray (§3.3 "Perspective")
    out = [rays]
    for k in range(n_freqs):
        out += [torch.sin(2**k * math.pi * rays), torch.cos(2**k * math.pi * rays)]
    return torch.cat(out, dim=1)


def ray_channels(n_freqs):
    return 6 + 12 * n_freqs if n_freqs > 0 else 0


# -----------------------------------------------------------------------------
# SODA: the config, then encoder + bottleneck + aggregation + modulated denoiser

# the encoder's and the UNet's sizes by name (SODAConfig.encoder, SODAConfig.unet)
PRESETS = {
    "encoder": {
        "tiny": dict(block="basic", widths=(32, 64, 128), depths=(1, 1, 1)),
        "small": dict(block="basic", widths=(32, 64, 128, 256), depths=(1, 1, 1, 1)),
        "resnet18": dict(block="basic", widths=(64, 128, 256, 512), depths=(2, 2, 2, 2)),
        "resnet50": dict(block="bottleneck", widths=(64, 128, 256, 512), depths=(3, 4, 6, 3)),
        "resnet50x2": dict(block="bottleneck", widths=(128, 256, 512, 1024), depths=(3, 4, 6, 3)),
    },
    "unet": {
        "tiny": dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=(8,)),
        "small": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=(8,)),
        # DDPM's CIFAR-10 net
        "cifar": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,), dropout=0.1),
        # ~40M (Table 1: a 36M decoder)
        "imagenet": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16, 8), dropout=0.1),
    },
}


@dataclass
class SODAConfig:
    """Every argument of the model: the paper's, then the additions we measured, each defaulting to
    the paper's model. A checkpoint stores it as `model_args`; SODA(SODAConfig(**model_args))."""
    # the paper's model (§3)
    encoder: str = "tiny"  # PRESETS["encoder"] name: the ResNet E (§3.2)
    unet: str = "tiny"  # PRESETS["unet"] name: the denoiser D (§3.1)
    z_dim: int = 128  # the compact latent z (§3.2)
    image_size: int = 32
    cond: str = "mod"  # how D reads z: 'mod' (layer modulation, §3.2.1) | 'xattn' (cross-attention) |
    # 'mod+xattn' (both, §3.3) | 'emb' (z added to the noise embedding: the "w/o layer modulation" ablation)
    n_tokens: int = 8  # z's tokens for cross-attention
    agg: str = "mean"  # k source views' latents -> one z: 'mean' | 'transformer' (§3.3 "Cardinality")
    ray_freqs: int = 0  # posed views: frequencies of each pixel's ray embedding (§3.3 "Perspective"); 0: no poses
    p_mask_layer: float = 0.1  # training: each section of z zeroed with this probability (layer masking, §3.2.1)
    p_uncond: float = 0.1  # training: all of z zeroed (classifier-free guidance dropout, §3.2.1)
    p_uncond_pose: float = 0.1  # training: the target's rays zeroed, apart from z (§3.3 "Guidance")
    bottleneck: bool = True  # False: "w/o bottleneck" (Table 1), z is the encoder's whole feature map
    # additions, measured in docs/ (zusage.md, dci.md, reconstruction.md); the defaults are the paper's model
    z_norm: bool = False  # True: each section of z layer-normalised before it modulates (unit scale per layer)
    z_bn: bool = False  # True: z standardised over the batch on its way to D: what differs between images
    prediction: str = "eps"  # D outputs 'eps' (the paper) | 'v' (Salimans & Ho 2022: conditioned at high noise) | 'x0'
    z_init: float = 0.0  # z projections' init: 0 = zero (untrained D ignores z); > 0: N(0, z_init^2 / fan_in)
    coords: bool = False  # True: pixel-coordinate channels for both networks (where position is a factor)
    top_skips: bool = True  # False: no skips at the full-resolution up level (detail must pass where z modulates)


class SODA(nn.Module):
    """eps_hat = D(x_t, logsnr, z = E(x')). `z_on` (B, n_sections) of 0/1 switches sections of z
    off (zeroed: eps(x_t | 0) is the unconditional model, §3.2.1); `pose_on` (B,) does the same
    for the target rays. During training, forward() draws that dropout unless given."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        for kind, name in (("encoder", c.encoder), ("unet", c.unet)):
            if name not in PRESETS[kind]:
                raise ValueError(f"unknown {kind} preset {name!r}; choose from {sorted(PRESETS[kind])}")
        check_prediction(c.prediction)  # measured: prediction
        self.ray_freqs, self.z_norm, self.prediction, self.coords = c.ray_freqs, c.z_norm, c.prediction, c.coords
        self.p_mask_layer, self.p_uncond, self.p_uncond_pose = c.p_mask_layer, c.p_uncond, c.p_uncond_pose
        # RGB, then the rays (§3.3 "Perspective"), for both networks; measured: the pixel coordinates
        in_ch = 3 + ray_channels(c.ray_freqs) + (2 if c.coords else 0)
        self.encoder = Encoder(c.z_dim, in_ch=in_ch, image_size=c.image_size, bottleneck=c.bottleneck,
                               **PRESETS["encoder"][c.encoder])
        if not c.bottleneck:  # z = the feature map: the decoder must read it as one token per position
            n, ch = self.encoder.spatial_tokens, self.encoder.feat_dim
            if c.cond != "xattn" or c.n_tokens != n or c.z_dim != n * ch:
                raise ValueError(f"bottleneck=False passes the {n} positions x {ch} features of the encoder's "
                                 f"map: set cond='xattn', n_tokens={n}, z_dim={n * ch}")
        self.agg = Aggregator(c.z_dim, c.agg)
        self.unet = UNet(c.z_dim, image_size=c.image_size, in_ch=in_ch, cond=c.cond, n_tokens=c.n_tokens,
                         z_init=c.z_init, top_skips=c.top_skips, **PRESETS["unet"][c.unet])
        self.n_sections, self.z_dim = self.unet.n_sections, c.z_dim
        self.z_bn = BatchStandardize(c.z_dim) if c.z_bn else None  # measured: z_bn

    def network_input(self, x, rays=None, pose_on=None):
        """x and, side by side, the ray embedding of its view (zeroed where pose_on is 0: no pose):
        what the encoder reads of a source view and the UNet of x_t."""
        if self.ray_freqs:
            r = ray_embed(rays, self.ray_freqs)
            if pose_on is not None:
                r = r * pose_on.to(r.dtype)[:, None, None, None]
            x = torch.cat([x, r], dim=1)
        return with_coords(x) if self.coords else x  # measured: coords

    def encode_features(self, x_src, rays_src=None, pose_on=None):
        """One view per image: (B, C, H, W) -> (pooled (B, feat_dim), z (B, z_dim)), for probes."""
        return self.encoder.forward_features(self.network_input(x_src, rays_src, pose_on))

    def encode(self, x_src, rays_src=None, pose_on=None):
        """(B, C, H, W) or k views (B, k, C, H, W) -> z (B, z_dim). pose_on (B,) or (B, k) of 0/1:
        the source views whose pose the encoder sees (training: source-pose dropout, §3.3)."""
        if x_src.dim() == 4 and self.agg.kind == "mean":
            return self.encode_features(x_src, rays_src, pose_on)[1]
        if x_src.dim() == 4:
            x_src = x_src[:, None]
            rays_src = rays_src[:, None] if rays_src is not None else None
            pose_on = pose_on[:, None] if pose_on is not None else None
        B, k = x_src.shape[:2]
        flat = lambda t: None if t is None else t.flatten(0, 1)  # (B*k, C, H, W)
        zs = self.encode_features(flat(x_src), flat(rays_src), flat(pose_on))[1]
        return self.agg(zs.view(B, k, -1))

    def mask_z(self, z, z_on):
        """on (B, P) of 0/1: z cut into P near-equal parts (P = n_sections: the layer sections;
        P = z_dim: any mask), each zeroed where on is 0."""
        # the same cut as unet.sec_dims (tensor_split): the first r parts have q + 1 dims, the rest q;
        # each dim's part computed on z's device (a training step never waits for the host)
        q, r = divmod(z.shape[1], z_on.shape[1])
        dim = torch.arange(z.shape[1], device=z.device)
        part = torch.where(dim < r * (q + 1), dim // (q + 1), r + (dim - r * (q + 1)) // max(q, 1))
        return z * z_on.to(z.dtype)[:, part]

    def decoder_latent(self, z, z_on=None):
        """z as the decoder reads it: the sections where z_on is 0 zeroed (§3.2.1)."""
        if self.z_bn is not None:  # measured: z_bn, over the whole z, before the mask
            z = self.z_bn(z)
        if z_on is not None:
            z = self.mask_z(z, z_on)
        if self.z_norm:  # measured: z_norm, after the mask (a masked part stays out of the statistics)
            z = normalise_sections(z, self.unet.sec_dims)
            z = z if z_on is None else self.mask_z(z, z_on)  # a part smaller than a section is zero again
        return z

    def denoise(self, x_t, logsnr, z, z_on=None, rays_tgt=None, pose_on=None):
        """eps_hat = D(x_t, logsnr, z) for noisy targets x_t at noise level logsnr (B,), given a latent z."""
        z = self.decoder_latent(z, z_on)
        out = self.unet(self.network_input(x_t, rays_tgt, pose_on), logsnr, z)
        return to_eps(out, x_t, logsnr, self.prediction)  # the paper's D outputs eps; measured: v, x0

    def draw_z_on(self, rand):
        """Training dropout of z (§3.2.1): each section off with p_mask_layer (layer masking), all
        of z off with p_uncond (classifier-free guidance dropout). rand(*shape) -> uniform (B, *shape)."""
        z_on = (rand(self.n_sections) >= self.p_mask_layer).float()
        return z_on * (rand(1) >= self.p_uncond).float()

    def draw_pose_on(self, rand):
        """Pose dropout, independent of the latent's (§3.3 "Guidance")."""
        return (rand() >= self.p_uncond_pose).float()

    def training_masks(self, x_t, z_on=None, pose_on=None):
        """In training, the dropout of z and of the target pose, drawn here where not given."""
        rand = lambda *shape: torch.rand(x_t.shape[0], *shape, device=x_t.device)
        if self.training and z_on is None:
            z_on = self.draw_z_on(rand)
        if self.training and pose_on is None and self.ray_freqs:
            pose_on = self.draw_pose_on(rand)
        return z_on, pose_on

    def forward(self, x_t, logsnr, x_src, z_on=None, rays_src=None, rays_tgt=None, pose_on=None,
                src_pose_on=None):
        """Training forward (§3.2): encode the source view(s), draw the dropout of z and the target
        pose, denoise."""
        z = self.encode(x_src, rays_src, src_pose_on)
        z_on, pose_on = self.training_masks(x_t, z_on, pose_on)
        return self.denoise(x_t, logsnr, z, z_on, rays_tgt, pose_on)


# -----------------------------------------------------------------------------
# Measured additions. Each is the paper's model at its default and is reached from the classes
# above only at lines commented "measured"; z_bn's block (BatchStandardize) follows the UNet.

# Measured: bf16 attention on a CPU (docs/speed.md). PyTorch's CPU SDPA kernel took 16 ms per
# backward call at head size 8 in bf16, the plain product ~3 ms: the bf16 step went 178 -> 210 img/s.

def cpu_attention(q, k, v):
    """softmax(q k^T / sqrt(hs)) v as plain products, the softmax in fp32: (B, nh, T, hs) each."""
    att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, nh, T, T)
    return att.float().softmax(dim=-1).to(v.dtype) @ v  # (B, nh, T, hs)


# Measured: z_init (docs/zusage.md). A zero-initialised z projection starts the encoder at exactly
# zero gradient; z_init > 0 draws its weights N(0, z_init^2 / fan_in) instead, so z reaches the loss
# from the first step (the paper writes z_s GN(h) + z_b and does not say). Screened: z-usage 8.2 ->
# 9.0% at log-SNR -3, the probe within noise.

def init_z_projection(linear, z_init):
    """The z projection's weights N(0, z_init^2 / fan_in) where z_init > 0 (its bias stays zero)."""
    if z_init > 0:
        nn.init.normal_(linear.weight, std=z_init / math.sqrt(linear.in_features))


# Measured: top_skips (docs/zusage.md). top_skips=False: the UNet's full-resolution up level gets no
# skips, so fine detail must come up through the coarser levels, where z modulates (a decoder that
# cannot copy x_t's top level). Screened: z removes 18.0% at log-SNR -3 against 16.7%, probe 39.2 vs 41.6.

def up_skips(m, num_res_blocks, top_skips=True):
    """Whether each up step of a UNet of m levels (num_res_blocks + 1 steps a level, the coarsest
    first) reads its skip connection: every one (the paper); top_skips=False: none at full resolution."""
    return [top_skips or i > 0 for i in reversed(range(m)) for _ in range(num_res_blocks + 1)]


# Measured: z_norm, in the teaching config that docs/zusage.md's screens build on (README's recipe
# table); no page screens it alone. Each section of z layer-normalised before it modulates: every
# layer reads its section at unit scale, whatever the encoder's scale.

def normalise_sections(z, sec_dims):
    """z (B, z_dim) cut into sections of sec_dims dims, each layer-normalised."""
    return torch.cat([F.layer_norm(t, t.shape[1:]) for t in z.split(sec_dims, dim=1)], dim=1)


# Measured: coords (docs/dci.md). Convolutions and global pooling cannot tell where a pattern is;
# where position is a factor of the data (dSprites' x and y), the encoder must be told it to put it
# in z, and the decoder to draw from it. With them x and y are decodable from z even at random init
# (logreg I 0.55 / 0.68 against 0.07 / 0.06).

def with_coords(x):
    """x (B, C, H, W) and two more channels: each pixel's x and y, -1..1 left to right and top to
    bottom (CoordConv, Liu et al. 2018)."""
    B, _, H, W = x.shape
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, H, device=x.device), torch.linspace(-1, 1, W, device=x.device),
                            indexing="ij")
    return torch.cat([x, torch.stack([xs, ys]).to(x.dtype).expand(B, -1, -1, -1)], dim=1)


# Measured: prediction (docs/zusage.md). What the UNet outputs, read as eps (what the loss and the
# samplers use). With an eps output, x0_hat = (x_t - sigma eps_hat) / alpha, so an eps error d is an
# x0 error d sigma / alpha (x54 at log-SNR -8: the noisy end, where only z can tell the decoder the
# image). A v output (Salimans & Ho 2022) is well conditioned at every noise level: z-usage at
# log-SNR -3 2.5 -> 8.2%, its x0-MSE at -8 1.105 -> 0.318.

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction):
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be 'eps', 'v' or 'x0', got {prediction!r}")


def to_eps(out, x_t, logsnr, prediction):
    """The UNet's output read as eps. 'eps': as is. 'v': v = alpha eps - sigma x_0, so eps = sigma x_t
    + alpha v (an error d in v is an error alpha d in eps and sigma d in x_0). 'x0': eps = (x_t - alpha
    x_0) / sigma. In fp32."""
    if prediction == "eps":
        return out
    abar = torch.sigmoid(logsnr.float())[:, None, None, None]
    alpha, sigma, out, x_t = abar.sqrt(), (1 - abar).sqrt(), out.float(), x_t.float()
    if prediction == "v":
        return sigma * x_t + alpha * out
    return (x_t - alpha * out) / sigma
