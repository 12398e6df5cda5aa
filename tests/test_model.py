"""Tests for model.py: shapes, zero-init, layer masking, multi-view aggregation, rays, training-time
dropout of z, a short overfitting run, the output parameterisations (eps | v | x0), the z-projection
init and z_bn."""
import math

import pytest
import torch
import torch.nn.functional as F

import diffusion
import diffusion as D
import model as M
from conftest import Z, images, inputs, make, randomize_zeros, tiny_soda


def randomize(params, std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def maxdiff(a, b):
    return (a - b).abs().max().item()


# -----------------------------------------------------------------------------
# 1. shapes and sizes

@pytest.mark.parametrize("name", list(M.PRESETS["encoder"]))
def test_encoder_presets_shapes(name):
    torch.manual_seed(0)
    enc = M.Encoder(Z, image_size=32, **M.PRESETS["encoder"][name]).eval()
    expected_feat = {"basic": 1, "bottleneck": 4}[M.PRESETS["encoder"][name]["block"]] * \
        M.PRESETS["encoder"][name]["widths"][-1]
    assert enc.feat_dim == expected_feat
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = enc(x)
        pooled, z2 = enc.forward_features(x)
    assert z.shape == (2, Z)
    assert pooled.shape == (2, expected_feat)
    assert z2.shape == (2, Z)
    assert torch.allclose(z, z2)
    assert torch.isfinite(z).all()
    # z is a linear map of the pooled features
    assert torch.allclose(enc.bottleneck(pooled), z, atol=1e-5)
    # no batch statistics: each image's z is its own
    with torch.no_grad():
        z_single = enc(x[:1])
    assert torch.allclose(z_single, z[:1], atol=1e-5)


def test_encoder_param_counts_match_resnets():
    # the ResNet trunks (without the fc) are the standard sizes: 11.2M, 23.5M, 94M
    expected = {"resnet18": 11.18e6, "resnet50": 23.5e6, "resnet50x2": 93.9e6}
    for name, n in expected.items():
        with torch.device("meta"):  # sizes only, no init cost
            enc = M.Encoder(Z, image_size=32, **M.PRESETS["encoder"][name])
        trunk = sum(p.numel() for n_, p in enc.named_parameters() if not n_.startswith("bottleneck"))
        assert abs(trunk - n) / n < 0.02, (name, trunk)


def test_soda_encode_features_shapes():
    m = make()
    x, _, _ = inputs()
    with torch.no_grad():
        pooled, z = m.encode_features(x)
        z_enc = m.encode(x)
    assert pooled.shape == (2, m.encoder.feat_dim) == (2, 128)
    assert z.shape == (2, Z)
    assert torch.allclose(z, z_enc)


@pytest.mark.parametrize("unet", ["tiny", "small"])
@pytest.mark.parametrize("H", [16, 32])
def test_soda_forward_shape(unet, H):
    m = make(unet=unet, image_size=H)
    x, logsnr, g = inputs(H=H)
    x_src = torch.randn(2, 3, H, H, generator=g)
    with torch.no_grad():
        out = m(x, logsnr, x_src)
    assert out.shape == (2, 3, H, H)
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0  # randomized: the output is not the zero-init zero


def test_fresh_model_outputs_zero():
    # zero-init output conv: an untrained denoiser predicts eps = 0
    m = make(randomized=False)
    x, logsnr, g = inputs()
    with torch.no_grad():
        out = m(x, logsnr, torch.randn(2, 3, 16, 16, generator=g))
    assert torch.count_nonzero(out) == 0


def test_cifar_unet_param_count():
    with torch.device("meta"):
        unet = M.UNet(128, image_size=32, **M.PRESETS["unet"]["cifar"])
    n = sum(p.numel() for p in unet.parameters())
    assert 30e6 < n < 45e6, n


# -----------------------------------------------------------------------------
# 2. conditioning kinds

@pytest.mark.parametrize("cond,n_sec", [("mod", 4), ("xattn", 4), ("emb", 1)])
def test_cond_kinds(cond, n_sec):
    m = make(cond=cond, n_tokens=4)
    expected = {"mod": len(M.PRESETS["unet"]["tiny"]["ch_mult"]) + 1, "xattn": 4, "emb": 1}[cond]
    assert n_sec == expected
    assert m.n_sections == m.unet.n_sections == expected
    assert len(m.unet.sec_dims) == expected and sum(m.unet.sec_dims) == Z
    x, logsnr, g = inputs()
    z = torch.randn(2, Z, generator=g)
    with torch.no_grad():
        out = m.denoise(x, logsnr, z)
        out_k = m.denoise(x, logsnr, z, z_on=torch.ones(2, expected))
        out2 = m.denoise(x, logsnr, torch.randn(2, Z, generator=g))
    assert out.shape == (2, 3, 16, 16)
    assert torch.allclose(out, out_k)
    assert maxdiff(out, out2) > 1e-4  # every kind of conditioning actually uses z


def test_mask_z_zeroes_sections():
    m = make(randomized=False)
    z = torch.arange(1, Z + 1, dtype=torch.float32)[None].repeat(2, 1)
    z_on = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)
    zm = m.mask_z(z, z_on)
    bounds = torch.tensor([0] + m.unet.sec_dims).cumsum(0)
    for b in range(2):
        for s in range(4):
            seg = zm[b, bounds[s]:bounds[s + 1]]
            ref = z[b, bounds[s]:bounds[s + 1]] * z_on[b, s]
            assert torch.equal(seg, ref)


# -----------------------------------------------------------------------------
# 3. zero-init modulation

@pytest.mark.parametrize("cond", ["mod", "xattn"])
def test_zero_init_modulation_ignores_z(cond):
    torch.manual_seed(0)
    m = tiny_soda(z_dim=Z, image_size=16, cond=cond, n_tokens=4).eval()
    z_path = ["z_proj"] if cond == "mod" else [".xattn.proj"]
    # every zero-init parameter made random (output conv, ResBlock conv2, self-attn proj, norm
    # biases...) EXCEPT the z pathway
    randomize_zeros(m, skip=z_path, seed=3)
    assert torch.count_nonzero(m.unet.out[-1].weight) > 0
    z_params = [p for n, p in m.named_parameters() if any(s in n for s in z_path)]
    assert len(z_params) > 0 and all(torch.count_nonzero(p) == 0 for p in z_params)
    x, logsnr, g = inputs()
    z1, z2 = torch.randn(2, Z, generator=g), torch.randn(2, Z, generator=g)
    with torch.no_grad():
        o1, o2 = m.denoise(x, logsnr, z1), m.denoise(x, logsnr, z2)
    assert o1.abs().max() > 1e-3
    assert torch.equal(o1, o2)
    # now the z pathway too: z matters
    randomize(z_params, std=0.05, seed=4)
    with torch.no_grad():
        o1, o2 = m.denoise(x, logsnr, z1), m.denoise(x, logsnr, z2)
    assert maxdiff(o1, o2) > 1e-4


# -----------------------------------------------------------------------------
# 4. layer masking

def _sections(m):
    b = torch.tensor([0] + m.unet.sec_dims).cumsum(0).tolist()
    return [slice(b[i], b[i + 1]) for i in range(len(m.unet.sec_dims))]


@pytest.mark.parametrize("cond", ["mod", "xattn"])
def test_masking_section_removes_only_its_influence(cond):
    m = make(cond=cond, n_tokens=4)
    secs = _sections(m)
    S = len(secs)
    x, logsnr, g = inputs()
    z = torch.randn(2, Z, generator=g)
    with torch.no_grad():
        full = m.denoise(x, logsnr, z)
        for j in range(S):
            z_on = torch.ones(2, S)
            z_on[:, j] = 0
            base = m.denoise(x, logsnr, z, z_on=z_on)
            assert maxdiff(base, full) > 1e-5  # masking j does something
            zj = z.clone()
            zj[:, secs[j]] = torch.randn(2, secs[j].stop - secs[j].start, generator=g) * 3
            assert torch.equal(m.denoise(x, logsnr, zj, z_on=z_on), base)
            for i in range(S):
                if i == j:
                    continue
                zi = z.clone()
                zi[:, secs[i]] = torch.randn(2, secs[i].stop - secs[i].start, generator=g) * 3
                assert maxdiff(m.denoise(x, logsnr, zi, z_on=z_on), base) > 1e-5, (j, i)
        # z_on all zeros: z has no influence at all
        zero = torch.zeros(2, S)
        a = m.denoise(x, logsnr, z, z_on=zero)
        b = m.denoise(x, logsnr, torch.randn(2, Z, generator=g) * 3, z_on=zero)
        assert torch.equal(a, b)
        assert torch.equal(a, m.denoise(x, logsnr, torch.zeros(2, Z)))


def test_keep_is_per_sample():
    m = make()
    x, logsnr, g = inputs()
    z = torch.randn(2, Z, generator=g)
    z_on = torch.tensor([[1.0] * 4, [0.0] * 4])
    with torch.no_grad():
        mixed = m.denoise(x, logsnr, z, z_on=z_on)
        on = m.denoise(x, logsnr, z)
        off = m.denoise(x, logsnr, z, z_on=torch.zeros(2, 4))
    assert torch.allclose(mixed[0], on[0], atol=1e-6)
    assert torch.allclose(mixed[1], off[1], atol=1e-6)
    assert maxdiff(on[1], off[1]) > 1e-5


# -----------------------------------------------------------------------------
# 5. multi-view aggregation

def test_multiview_mean():
    m = make(agg="mean")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 3, 16, 16, generator=g)
    with torch.no_grad():
        z = m.encode(x)
        per_view = torch.stack([m.encode(x[:, v]) for v in range(3)], dim=1)
    assert z.shape == (2, Z)
    assert torch.allclose(z, per_view.mean(1), atol=1e-5)
    assert maxdiff(per_view[:, 0], per_view[:, 1]) > 1e-4  # the views do differ


def test_multiview_transformer_permutation_invariant():
    m = make(agg="transformer")
    randomize([m.agg.token], std=0.5, seed=7)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 3, 16, 16, generator=g)
    with torch.no_grad():
        z = m.encode(x)
        z_perm = m.encode(x[:, [2, 0, 3, 1]])
        z_other = m.encode(torch.cat([x[:, :3], torch.randn(2, 1, 3, 16, 16, generator=g)], 1))
        z_single = m.encode(x[:, 0])  # a single view (B, C, H, W) goes through the aggregator too
        z_one_view = m.encode(x[:, :1])
    assert z.shape == (2, Z)
    assert torch.isfinite(z).all()
    assert torch.allclose(z, z_perm, atol=1e-5)
    assert maxdiff(z, z_other) > 1e-4  # depends on every view
    assert z_single.shape == (2, Z)
    assert torch.allclose(z_single, z_one_view, atol=1e-6)


def test_aggregator_rejects_unknown_kind():
    with pytest.raises(ValueError):
        M.Aggregator(Z, "max")


# -----------------------------------------------------------------------------
# 6. rays

def test_ray_embed_channels():
    g = torch.Generator().manual_seed(0)
    rays = torch.randn(2, 6, 4, 4, generator=g)
    for n in (1, 2, 3):
        e = M.ray_embed(rays, n)
        assert e.shape[1] == M.ray_channels(n) == 6 + 12 * n
        assert torch.equal(e[:, :6], rays)
        assert torch.allclose(e[:, 6:12], torch.sin(torch.pi * rays), atol=1e-6)
    assert M.ray_channels(0) == 0


def test_rays_shapes_and_pose_on():
    m = make(ray_freqs=2)
    g = torch.Generator().manual_seed(8)
    B, H = 2, 16
    x_src, x_t = torch.randn(B, 3, H, H, generator=g), torch.randn(B, 3, H, H, generator=g)
    rays_src, rays_a, rays_b = (torch.randn(B, 6, H, H, generator=g) for _ in range(3))
    logsnr = torch.tensor([-1.0, 2.0])
    with torch.no_grad():
        z = m.encode(x_src, rays_src)
        z_other_rays = m.encode(x_src, rays_b)
        pooled, z2 = m.encode_features(x_src, rays_src)
        out_a = m.denoise(x_t, logsnr, z, rays_tgt=rays_a)
        out_b = m.denoise(x_t, logsnr, z, rays_tgt=rays_b)
        off = torch.zeros(B)
        out_a0 = m.denoise(x_t, logsnr, z, rays_tgt=rays_a, pose_on=off)
        out_b0 = m.denoise(x_t, logsnr, z, rays_tgt=rays_b, pose_on=off)
        fwd = m(x_t, logsnr, x_src, rays_src=rays_src, rays_tgt=rays_a)
    assert z.shape == (B, Z) and z2.shape == (B, Z) and pooled.shape == (B, 128)
    assert maxdiff(z, z_other_rays) > 1e-5  # the encoder sees the source rays
    assert out_a.shape == (B, 3, H, H)
    assert maxdiff(out_a, out_b) > 1e-5  # the denoiser sees the target rays
    assert torch.equal(out_a0, out_b0)  # ... unless pose is dropped
    assert torch.allclose(fwd, out_a, atol=1e-6)


def test_coords_channels_and_shapes():
    x = torch.zeros(2, 3, 4, 6)
    c = M.with_coords(x)
    assert c.shape == (2, 5, 4, 6) and torch.equal(c[:, :3], x)
    assert torch.equal(c[0, 3, 0], torch.linspace(-1, 1, 6)) and torch.equal(c[0, 4, :, 0], torch.linspace(-1, 1, 4))
    m = make(coords=True)
    assert m.encoder.stem[0].in_channels == 5 and m.unet.conv_in.in_channels == 5
    x_t, logsnr, g = inputs()
    with torch.no_grad():
        out = m(x_t, logsnr, torch.randn(2, 3, 16, 16, generator=g))
    assert out.shape == (2, 3, 16, 16)


def test_coords_make_position_decodable_at_init():
    # One white 4x4 square on black at a random place; ridge regression of its column from the
    # random-init encoder's pooled features, R^2 on held-out images: global pooling of convolutions
    # cannot say where the square is; with the coordinate channels it can (dSprites' x and y).
    g = torch.Generator().manual_seed(0)
    n, H = 192, 16
    pos = torch.randint(0, H - 4, (n, 2), generator=g)
    x = -torch.ones(n, 3, H, H)
    for i, (r, c) in enumerate(pos.tolist()):
        x[i, :, r:r + 4, c:c + 4] = 1

    def r2(m):
        with torch.no_grad():
            f = torch.cat([m.encode_features(x)[0], torch.ones(n, 1)], 1)
        y, tr, te = pos[:, 1].float(), slice(0, 128), slice(128, n)
        w = torch.linalg.solve(f[tr].T @ f[tr] + 1e-3 * torch.eye(f.shape[1]), f[tr].T @ y[tr])
        return 1 - (y[te] - f[te] @ w).pow(2).mean() / y[te].var(unbiased=False)

    assert r2(make(coords=True, randomized=False)) > 0.8  # measured 0.96
    assert r2(make(randomized=False)) < 0.3  # measured -0.07


# -----------------------------------------------------------------------------
# 7. training-time dropout of z

def _train_pair(**kw):
    m = make(**kw).train()  # tiny presets: no dropout, GroupNorm only, so train == eval numerics
    g = torch.Generator().manual_seed(9)
    x_t, x_src = torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)
    logsnr = torch.tensor([-3.0, 0.0, 4.0])
    return m, x_t, x_src, logsnr


def test_train_p_uncond_one_is_unconditional():
    m, x_t, x_src, logsnr = _train_pair(p_uncond=1.0)
    with torch.no_grad():
        out = m(x_t, logsnr, x_src)
        z = m.encode(x_src)
        uncond = m.denoise(x_t, logsnr, z, z_on=torch.zeros(3, m.n_sections))
        cond = m.denoise(x_t, logsnr, z, z_on=torch.ones(3, m.n_sections))
    assert maxdiff(uncond, cond) > 1e-5
    assert torch.allclose(out, uncond, atol=1e-6)


def test_train_no_dropout_is_conditional():
    m, x_t, x_src, logsnr = _train_pair(p_uncond=0.0, p_mask_layer=0.0)
    with torch.no_grad():
        out = m(x_t, logsnr, x_src)
        z = m.encode(x_src)
        cond = m.denoise(x_t, logsnr, z, z_on=torch.ones(3, m.n_sections))
        uncond = m.denoise(x_t, logsnr, z, z_on=torch.zeros(3, m.n_sections))
    assert maxdiff(uncond, cond) > 1e-5
    assert torch.allclose(out, cond, atol=1e-6)


def test_train_dropout_rates():
    # the z_on masks forward() draws have the asked-for statistics
    m = make(p_mask_layer=0.3, p_uncond=0.5).train()
    seen = {}

    def fake_denoise(x_t, logsnr, z, z_on=None, rays_tgt=None, pose_on=None):
        seen["z_on"] = z_on
        return torch.zeros_like(x_t)

    m.denoise = fake_denoise
    torch.manual_seed(0)
    B = 2000
    m(torch.zeros(B, 3, 8, 8), torch.zeros(B), torch.zeros(B, 3, 8, 8))
    z_on = seen["z_on"]
    assert z_on.shape == (B, m.n_sections)
    assert set(z_on.unique().tolist()) <= {0.0, 1.0}
    all_off = (z_on.sum(1) == 0).float().mean().item()
    # P(all off) = p_uncond + (1 - p_uncond) p_mask^S
    expect = 0.5 + 0.5 * 0.3 ** m.n_sections
    assert abs(all_off - expect) < 0.05
    rows_on = z_on[z_on.sum(1) > 0]  # rows not dropped wholesale: each section kept w.p. 0.7
    assert abs(rows_on.mean().item() - 0.7 / (1 - 0.3 ** m.n_sections)) < 0.05
    # eval mode: no dropout drawn
    m.eval()
    m(torch.zeros(2, 3, 8, 8), torch.zeros(2), torch.zeros(2, 3, 8, 8))
    assert seen["z_on"] is None


# -----------------------------------------------------------------------------
# 8. a few optimisation steps lower the loss

def test_few_adam_steps_lower_loss():
    torch.manual_seed(0)
    m = tiny_soda(z_dim=Z, image_size=16).train()
    g = torch.Generator().manual_seed(1)
    x = F.interpolate(torch.rand(8, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear",
                      align_corners=False)
    sched = diffusion.get_schedule("cosine")
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)

    def objective():
        torch.manual_seed(123)  # same u and eps every call: a fixed objective
        return diffusion.loss(m, x, x, sched)

    first = objective()
    assert abs(first.item() - 1.0) < 0.3  # zero-init output: loss = E[eps^2] ~ 1
    for _ in range(30):
        opt.zero_grad()
        l = objective()
        l.backward()
        opt.step()
    with torch.no_grad():
        final = objective().item()
    assert final < 0.8 * first.item(), (first.item(), final)


def test_z_norm_keeps_masking_exact_and_scales_z():
    """z_norm normalises each section of z before masking: a masked section still has no
    influence, and the decoder sees the same thing for z and 10 z (unit scale)."""
    m = make(z_norm=True)
    secs = _sections(m)
    x, logsnr, g = inputs()
    z = torch.randn(2, Z, generator=g)
    z_on = torch.ones(2, len(secs))
    z_on[:, 0] = 0
    with torch.no_grad():
        a = m.denoise(x, logsnr, z, z_on)
        z2 = z.clone()
        z2[:, secs[0]] = torch.randn(2, secs[0].stop - secs[0].start, generator=g)
        torch.testing.assert_close(m.denoise(x, logsnr, z2, z_on), a)
        torch.testing.assert_close(m.denoise(x, logsnr, 10 * z, z_on), a, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(m.denoise(x, logsnr, z, torch.ones_like(z_on)), a, atol=1e-4)


def test_no_bottleneck_passes_the_feature_map_as_tokens():
    """The "w/o bottleneck" ablation: z is the encoder's final map, one token per position; the
    config must say so (cond='xattn', n_tokens, z_dim), with an error naming the right values."""
    m = tiny_soda(z_dim=64 * 128, cond="xattn", n_tokens=64, bottleneck=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled, z = m.encode_features(x)
        h = m.encoder.stages(m.encoder.stem(x))  # (2, 128, 8, 8)
        out = m(x, torch.zeros(2), x)
    assert torch.equal(z.view(2, 8, 8, 128).permute(0, 3, 1, 2), h)
    assert torch.allclose(pooled, h.mean(dim=(2, 3)))
    assert out.shape == x.shape and m.unet.sec_dims == [128] * 64
    with pytest.raises(ValueError, match="n_tokens=64, z_dim=8192"):
        tiny_soda(z_dim=128, cond="xattn", n_tokens=8, bottleneck=False)


@pytest.mark.parametrize("top_skips", [True, False])
def test_top_skips_false_cuts_the_full_resolution_skips_only(top_skips):
    """With top_skips=False the output ignores the down path's full-resolution activations (the
    skips at image_size) and still reads the coarser ones; with the default it reads both."""
    m = make(top_skips=top_skips)
    x, logsnr, g = inputs()
    z = torch.randn(2, Z, generator=g)
    with torch.no_grad():
        cond = m.unet.conditioning(logsnr, z)
        skips = m.unet.down_path(x, *cond)
        out = m.unet.up_path(skips, *cond)
        assert torch.equal(out, m.unet(x, logsnr, z))
        for full_res in (True, False):
            poked = [s + 1.0 if (s.shape[-1] == 16) == full_res else s for s in skips]
            changed = not torch.allclose(m.unet.up_path(poked, *cond), out)
            assert changed == (top_skips or not full_res), (full_res, changed)
    n_params = lambda net: sum(p.numel() for p in net.unet.parameters())
    assert (n_params(m) == n_params(make())) == top_skips  # no concatenation: narrower full-res up blocks


def test_each_z_section_drives_its_down_and_up_level_and_the_last_the_middle():
    """Changing only section i of z changes the z input of exactly the ResBlocks of down level i and
    up level i (same resolution, image_size / 2^i); the last section only the middle blocks (§3.2.1)."""
    m = make(image_size=16)  # tiny: 3 levels (16, 8, 4 px) + the middle, 4 sections
    seen = []
    for part in ("down", "mid", "up"):
        for blk in getattr(m.unet, part):
            if isinstance(blk, M.UNetBlock):
                blk.res.register_forward_hook(
                    lambda mod, inp, out, part=part: seen.append((part, inp[0].shape[-1], inp[2])))
    x, logsnr, g = inputs()
    z = torch.randn(2, Z, generator=g)
    z_on = torch.ones(2, m.n_sections)
    with torch.no_grad():
        m.denoise(x, logsnr, z, z_on)
        base, seen[:] = list(seen), []
        lo = 0
        for i, d in enumerate(m.unet.sec_dims):
            z2 = z.clone()
            z2[:, lo:lo + d] += 1.0
            lo += d
            m.denoise(x, logsnr, z2, z_on)
            changed = {(part, res) for (part, res, a), (_, _, b) in zip(base, seen) if not torch.equal(a, b)}
            seen[:] = []
            want = {("mid", 4)} if i == m.unet.m else {("down", 16 >> i), ("up", 16 >> i)}
            assert changed == want, (i, changed)


def test_folded_adagn_equals_the_papers_two_steps():
    """ResBlock folds h = GN(h)(1 + s_t) + b_t ; h = h(1 + s_z) + b_z into one pass over h (§3.1):
    the two steps written out as the paper does give the block's output."""
    torch.manual_seed(0)
    blk = M.ResBlock(8, 16, emb_dim=12, z_sec_dim=5, z_init=1.0).eval()
    for p in blk.parameters():  # no zero-initialised layer left: every term counts
        torch.nn.init.normal_(p, std=0.3)
    x, emb, z = torch.randn(3, 8, 6, 6), torch.randn(3, 12), torch.randn(3, 5)
    s_t, b_t = blk.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
    s_z, b_z = blk.z_proj(z)[:, :, None, None].chunk(2, dim=1)
    h = blk.norm2(blk.conv1(F.silu(blk.norm1(x)))) * (1 + s_t) + b_t  # AdaGN on the noise level
    h = h * (1 + s_z) + b_z  # then z's scale and shift
    two_step = blk.skip(x) + blk.conv2(F.silu(h))
    torch.testing.assert_close(blk(x, emb, z), two_step, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(blk(x, emb, z), blk(x, emb, torch.zeros_like(z)), atol=1e-3)  # z modulates


def test_mod_plus_xattn_reads_z_through_both_paths():
    """cond='mod+xattn' (Table 3's NVS model): the sections modulate and the tokens are attended to;
    with either path cut, z still reaches the output through the other; masking acts on sections."""
    m = make(cond="mod+xattn", n_tokens=4)
    assert m.n_sections == 4 and any(s.xattn is not None for s in m.unet.modules() if isinstance(s, M.UNetBlock))
    x, logsnr, g = inputs()
    z1, z2 = torch.randn(2, Z, generator=g), torch.randn(2, Z, generator=g)
    with torch.no_grad():
        assert maxdiff(m.denoise(x, logsnr, z1), m.denoise(x, logsnr, z2)) > 1e-4
        for cut in ("z_proj", "xattn.proj"):  # zero one path's output projections
            m2 = make(cond="mod+xattn", n_tokens=4)
            for name, p in m2.named_parameters():
                if cut in name:
                    p.zero_()
            assert maxdiff(m2.denoise(x, logsnr, z1), m2.denoise(x, logsnr, z2)) > 1e-4, cut
        off = torch.zeros(2, m.n_sections)
        assert torch.equal(m.denoise(x, logsnr, z1, off), m.denoise(x, logsnr, z2, off))  # all masked: z-free


def test_source_pose_dropout_removes_the_source_rays():
    """src_pose_on=0 on a source view: the encoder sees no ray embedding (zeros), not the rays of 0."""
    m = make(ray_freqs=2)
    x, _, g = inputs()
    rays = torch.randn(2, 6, 16, 16, generator=g)
    with torch.no_grad():
        z_off = m.encode(x, rays, pose_on=torch.tensor([0.0, 1.0]))
        z_on = m.encode(x, rays)
        blank = torch.cat([x, torch.zeros(2, M.ray_channels(2), 16, 16)], dim=1)
        assert torch.allclose(z_off[0], m.encoder(blank)[0], atol=1e-6)
        assert torch.equal(z_off[1], z_on[1]) and maxdiff(z_off[0], z_on[0]) > 1e-4
        views = m.encode(x[:, None].repeat(1, 2, 1, 1, 1), rays[:, None].repeat(1, 2, 1, 1, 1),
                         pose_on=torch.tensor([[0.0, 1.0], [1.0, 1.0]]))  # k = 2 views, one pose dropped
        assert views.shape == (2, Z)


def test_config_defaults_are_the_training_defaults():
    """SODAConfig's fields are train.py's model keys, with the same defaults: a model built from the
    dataclass alone is the one `python train.py` trains."""
    import dataclasses

    import train
    for f in dataclasses.fields(M.SODAConfig):
        assert train.DEFAULTS[f.name] == f.default, f.name


def test_config_refuses_unknown_presets_and_outputs():
    for kw, match in ((dict(encoder="nope"), "unknown encoder preset 'nope'"),
                      (dict(unet="nope"), "unknown unet preset"), (dict(prediction="score"), "prediction must be")):
        with pytest.raises(ValueError, match=match):
            M.SODA(M.SODAConfig(**kw))


# -----------------------------------------------------------------------------
# 9. output parameterisations (eps | v | x0), the z-projection init, z_bn

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
        m(x, logsnr, x, z_on=torch.ones(len(x), m.n_sections)).pow(2).mean().backward()
        grads[z_init] = sum(p.grad.abs().sum().item() for p in m.encoder.parameters() if p.grad is not None)
        if z_init:
            w = m.unet.down[0].res.z_proj.weight
            assert w.std().item() == pytest.approx(z_init / math.sqrt(w.shape[1]), rel=0.3)
    assert grads[0.0] == 0.0 and grads[0.5] > 0


def test_z_bn_removes_what_every_image_shares():
    """z_bn standardises z over the batch in training: a direction shared by every image (most
    of z's energy at init) cannot reach the decoder; in eval the running statistics are used."""
    m = make(z_bn=True, z_init=1.0).train()
    x, logsnr, g = inputs(B=4)
    z = torch.randn(4, 32, generator=g)
    z_on = torch.ones(4, m.n_sections)
    with torch.no_grad():
        a = m.denoise(x, logsnr, z, z_on)
        torch.testing.assert_close(m.denoise(x, logsnr, z + 10 * torch.randn(1, 32, generator=g), z_on), a,
                                   atol=1e-4, rtol=1e-4)
        m.eval()
        assert m.z_bn.running_mean.abs().sum() > 0  # the training passes updated the statistics
        assert not torch.allclose(m.denoise(x, logsnr, z + 10, z_on), m.denoise(x, logsnr, z, z_on), atol=1e-3)


def z_bn_gradient(rank, world, init_file, z, weights, out):
    """One process of z_bn_gradient's test: its rows of z through BatchStandardize (statistics summed
    over the processes), a weighted sum as the loss, backward -> its rows' gradient, saved to out."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = slice(rank * len(z) // world, (rank + 1) * len(z) // world)
    mine = z[rows].clone().requires_grad_()
    (M.BatchStandardize(z.shape[1]).train()(mine) * weights[rows]).sum().backward()
    torch.save(mine.grad, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_z_bn_gradient_over_two_processes_equals_one_process(tmp_path):
    """z_bn's all-reduce with the backward written out (model.AllReduceSum, the path on every
    supported torch): 2 gloo processes with 3 rows each give every row the gradient one process
    gets on all 6. Without the backward's all-reduce (each process's gradient through its own sums
    only) the gradients differ by a multiple of their size."""
    g = torch.Generator().manual_seed(0)
    z, weights = torch.randn(6, 5, generator=g) * 3 + 1, torch.randn(6, 5, generator=g)
    one = z.clone().requires_grad_()
    (M.BatchStandardize(5).train()(one) * weights).sum().backward()
    out = tmp_path / "grad"
    torch.multiprocessing.spawn(z_bn_gradient, args=(2, str(tmp_path / "init"), z, weights, str(out)), nprocs=2)
    two = torch.cat([torch.load(f"{out}.{r}", weights_only=True) for r in range(2)])
    torch.testing.assert_close(two, one.grad, atol=1e-5, rtol=1e-4)
    # what a forward-only all-reduce would give: this process's rows' own contribution alone
    local = z[:3].clone().requires_grad_()
    sums = torch.stack([local.sum(0), local.pow(2).sum(0)])
    full = torch.stack([z.sum(0), z.pow(2).sum(0)])
    sums = sums + (full - sums).detach()  # the other process's sums as constants
    mean, var = sums[0] / 6, (sums[1] / 6 - (sums[0] / 6) ** 2)
    (((local - mean) / (var + 1e-5).sqrt()) * weights[:3]).sum().backward()
    assert (local.grad - one.grad[:3]).abs().max() > 0.1 * one.grad[:3].abs().max()
