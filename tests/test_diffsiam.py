"""DiffSiam (thesis ch. 3, diffsiam.py): the SimSiam loss and its stop-gradient, the segment schedule,
the reduction to plain SODA, a DiffSiam run end to end, and masked segments under z_norm."""
import pytest
import torch

import diffsiam
import diffusion as D
import common
import model as M
import train
from conftest import Z, base_args, inputs, randomize_zeros, run_train, state, tiny_soda


@pytest.mark.usefixtures("light_eval")
def test_negative_cosine_is_minus_one_and_stops_the_gradient():
    p = torch.randn(5, 16, requires_grad=True)
    h = (p.detach() * 3.0).requires_grad_(True)  # same directions, another scale
    loss = diffsiam.negative_cosine(p, h)
    assert torch.allclose(loss, torch.tensor(-1.0), atol=1e-6)
    loss.backward()
    assert h.grad is None  # stop-gradient: nothing flows into the target branch
    assert p.grad is not None


@pytest.mark.usefixtures("light_eval")
def test_simsiam_loss_gradients_reach_both_views_through_the_predictor_branch():
    torch.manual_seed(0)
    m = tiny_soda(z_dim=32, image_size=8, simsiam_dim=16)
    z1, z2 = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    loss = m.simsiam_loss(z1, z2)
    assert -1 <= loss.item() <= 1
    loss.backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0  # each view is the online branch once


@pytest.mark.usefixtures("light_eval")
@pytest.mark.parametrize("n", [1, 4, 64])
def test_hierarchical_mask_activates_exactly_the_first_k(n):
    k = torch.arange(1, n + 1)
    u = (k - 0.5) / n  # the middle of level k
    hier = diffsiam.segments_switched_on(u, n, "hierarchical")
    seq = diffsiam.segments_switched_on(u, n, "sequential")
    for row, kk in enumerate(k.tolist()):
        assert hier[row].tolist() == [1.0] * kk + [0.0] * (n - kk)
        assert seq[row].tolist() == [0.0] * (kk - 1) + [1.0] + [0.0] * (n - kk)
    ends = diffsiam.segments_switched_on(torch.tensor([0.0, 1.0]), n).sum(1).tolist()
    assert ends == [1.0, float(n)]  # 1 and all
    with pytest.raises(ValueError, match="segment_mode"):
        diffsiam.segments_switched_on(u, n, "random")


@pytest.mark.usefixtures("light_eval")
def test_mask_z_on_segments_zeroes_their_dims():
    m = tiny_soda(z_dim=12, image_size=8)
    z = torch.arange(1.0, 13.0)[None]
    out = m.mask_z(z, torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 1.0]]))  # 6 segments of 2 dims
    assert out.tolist() == [[1, 2, 0, 0, 5, 6, 0, 0, 9, 10, 11, 12]]


@pytest.mark.usefixtures("light_eval")
@pytest.mark.filterwarnings("ignore:.*partial copy")
def test_one_segment_and_no_simsiam_is_plain_soda(cifar_dir, tmp_path):
    """segments=1 runs DiffSiam's masking path with a single always-on segment; with the SimSiam
    weight 0 it must train exactly plain SODA (same seed, bit-identical weights)."""
    run_train(base_args(cifar_dir, tmp_path / "soda", max_iters=3))
    run_train(base_args(cifar_dir, tmp_path / "ds", max_iters=3, segments=1, simsiam_weight=0.0))
    a, b = state(tmp_path / "soda" / "ckpt.pt"), state(tmp_path / "ds" / "ckpt.pt")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


@pytest.mark.usefixtures("light_eval")
@pytest.mark.filterwarnings("ignore:.*partial copy")
def test_diffsiam_trains_and_its_heads_learn(cifar_dir, tmp_path):
    run_train(base_args(cifar_dir, tmp_path, max_iters=3, segments=8, simsiam_weight=1.0, simsiam_dim=32,
                        views="augment"))
    ck = state(tmp_path / "ckpt.pt")
    init = common.build_model(common.model_args(ck["config"])).state_dict()
    assert "predictor.0.weight" in ck["model"] and "projector.0.weight" in ck["model"]
    assert not torch.equal(init["predictor.0.weight"], ck["model"]["predictor.0.weight"])
    with pytest.raises(train.ConfigError, match="segments"):
        train.main(base_args(cifar_dir, tmp_path / "bad", simsiam_weight=1.0))


@pytest.mark.usefixtures("light_eval")
@pytest.mark.filterwarnings("ignore:.*partial copy")
def test_counterfactual_interpolation_on_segments(cifar_dir, tmp_path):
    """sample.py interp on a DiffSiam model moves only the chosen segments of z from A to B."""
    import sample
    run_train(base_args(cifar_dir, tmp_path, max_iters=1, segments=8, simsiam_weight=1.0, simsiam_dim=32))
    args = [f"--ckpt={tmp_path / 'ckpt.pt'}", "--mode=interp", "--steps=2", "--frames=3", "--device=cpu",
            f"--out_dir={tmp_path / 's'}"]
    res = sample.main(args + ["--sections=0,1"])
    z, z_t = res["z"], res["z_t"]
    moved = (z_t[-1] - z[0]).abs() > 0
    assert moved[:8].any() and not moved[8:].any()  # segments 0, 1 = dims 0..7 of 32 move, the rest stay A's
    assert torch.allclose(z_t[-1][:8], z[1][:8])
    with pytest.raises(train.ConfigError, match="8 segments"):
        sample.main(args + ["--sections=8"])
    rows = sample.main(args + ["--sections=0-1;4-7"])  # thesis Fig. 4.1: one row per group of segments
    z_t = rows["z_t"].view(2, 3, 32)
    assert torch.equal(z_t[0, -1, :8], z[1, :8]) and torch.equal(z_t[0, -1, 8:], z[0, 8:])
    assert torch.equal(z_t[1, -1, 16:], z[1, 16:]) and torch.equal(z_t[1, -1, :16], z[0, :16])
    assert torch.equal(rows["frames"][:3], res["frames"])  # the same x_T and z give the same frames


# --- the samplers follow the segment schedule ------------------------------------

@pytest.mark.usefixtures("light_eval")
@pytest.mark.parametrize("name,shift", [("inverted", 0.0), ("cosine", -2.0)])
def test_segment_schedule_recovers_the_training_level(name, shift):
    """At the logsnr that training drew at noise position u, samplers switch on the same segments."""
    n = 16
    sched = D.get_schedule(name, shift)
    u = (torch.arange(1, n + 1) - 0.5) / n  # the middle of each level
    logsnr = sched(u)
    inner = (logsnr > D.LOGSNR_MIN) & (logsnr < D.LOGSNR_MAX)  # clipped ends are flat: no unique u
    got = diffsiam.segment_schedule(n, "hierarchical", sched)(logsnr)
    assert torch.equal(got[inner], diffsiam.segments_switched_on(u, n, "hierarchical")[inner])
    assert inner.sum() >= n // 2


@pytest.mark.usefixtures("light_eval")
def test_ddim_conditions_each_step_on_the_trained_segments(monkeypatch):
    """A DiffSiam model trained on the cosine schedule: each DDIM step reaches SODA's denoise with
    the segments training used at that step's noise level, in both guidance branches."""
    n, keeps = 4, []
    torch.manual_seed(0)
    net = tiny_soda(z_dim=8, image_size=8, segments=n, schedule="cosine").eval()
    assert net.n_sections == 4  # 2 dims of z a section, 2 a segment

    def record(self, x_t, logsnr, z, z_on=None, rays_tgt=None, pose_on=None):
        keeps.append((logsnr[0].item(), z_on.clone()))
        return torch.zeros_like(x_t)
    monkeypatch.setattr(M.SODA, "denoise", record)
    sched = D.get_schedule("cosine")
    D.ddim(net, torch.ones(3, 8), (3, 3, 8, 8), steps=8, schedule=sched, w=2.0)  # guided: 2 branches a step
    assert len(keeps) == 8
    for logsnr, z_on in keeps:
        cond, uncond = z_on.chunk(2)
        u = D.invert_decreasing(sched, torch.tensor([logsnr]))
        k = int(diffsiam.segments_switched_on(u, n).sum())  # segments on at this level: the first 2k of z's 8 dims
        assert cond.tolist() == [[1.0] * (2 * k) + [0.0] * (8 - 2 * k)] * 3
        assert uncond.sum() == 0
    ks = [int(z_on.chunk(2)[0][0].sum()) for _, z_on in keeps]
    assert ks[0] == 8 and ks[-1] == 2 and ks == sorted(ks, reverse=True)  # all at the noisy end, one near clean


# --- PDAE: a frozen pre-trained denoiser + a trainable gradient estimator ---------

def _pdae(seed=0):
    torch.manual_seed(seed)
    return tiny_soda(z_dim=32, image_size=8, pdae=True)


@pytest.mark.usefixtures("light_eval")
def test_pdae_starts_as_the_frozen_denoiser_and_only_the_estimator_learns():
    net = _pdae()
    for p in net.frozen.parameters():  # a "pre-trained" denoiser: random, non-zero output
        torch.nn.init.normal_(p, std=0.05)
    assert net.unet.down is None and net.unet.conv_in is None  # G is the decoder half only
    x, logsnr, z = torch.randn(4, 3, 8, 8), torch.randn(4), torch.randn(4, 32)
    eps = net.denoise(x, logsnr, z)
    assert torch.allclose(eps, net.frozen(x, logsnr, torch.zeros_like(z)))  # G zero-init: eps_theta itself
    net.train()
    assert not net.frozen.training  # no dropout in the frozen model
    loss = D.loss(net, x, x, D.get_schedule("cosine"))
    loss.backward()
    assert all(p.grad is None for p in net.frozen.parameters())
    assert net.unet.out[2].weight.grad.abs().sum() > 0  # G's zero-init output gets a gradient first


@pytest.mark.usefixtures("light_eval")
def test_pdae_correction_is_the_guidance_shift():
    """eps_hat = eps_theta - sqrt(1 - abar) G, so G is a score: a gradient of log p(z | x_t)."""
    net = _pdae()
    for p in net.unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, z = torch.randn(2, 3, 8, 8), torch.randn(2, 32)
    logsnr = torch.tensor([-3.0, 3.0])
    cond = net.frozen.conditioning(logsnr, torch.zeros_like(z))
    skips = net.frozen.down_path(x, *cond)
    eps_theta = net.frozen.up_path(skips, *cond)
    assert torch.equal(eps_theta, net.frozen(x, logsnr, torch.zeros_like(z)))
    G = net.unet.up_path(skips, *net.unet.conditioning(logsnr, z))
    want = eps_theta - torch.sigmoid(-logsnr).sqrt()[:, None, None, None] * G
    assert torch.allclose(net.denoise(x, logsnr, z), want, atol=1e-6)
    assert G.abs().sum() > 0


@pytest.mark.usefixtures("light_eval")
@pytest.mark.filterwarnings("ignore:.*partial copy")
def test_pdae_training_keeps_the_pretrained_denoiser(cifar_dir, tmp_path):
    run_train(base_args(cifar_dir, tmp_path / "dm", max_iters=2, p_uncond=1.0))  # the "pre-trained" DM
    dm = state(tmp_path / "dm" / "ckpt.pt")["ema"]
    run_train(base_args(cifar_dir, tmp_path / "ds", max_iters=3, segments=8, simsiam_weight=1.0, simsiam_dim=32,
                        pretrained=str(tmp_path / "dm" / "ckpt.pt")))
    ck = state(tmp_path / "ds" / "ckpt.pt")
    for name, v in dm.items():
        if name.startswith("unet."):
            assert torch.equal(ck["model"]["frozen." + name[5:]], v), name  # loaded and never trained
    init = common.build_model(common.model_args(ck["config"])).state_dict()
    assert not torch.equal(init["encoder.stem.0.weight"], ck["model"]["encoder.stem.0.weight"])
    net, _ = common.model_from_checkpoint(str(tmp_path / "ds" / "ckpt.pt"))  # no need for the DM file now
    assert net.frozen is not None
    with pytest.raises(train.ConfigError, match="z_dim=32"):
        train.main(base_args(cifar_dir, tmp_path / "bad", z_dim=64, pretrained=str(tmp_path / "dm" / "ckpt.pt")))


# --- masking under z_norm -------------------------------------------------------

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
    off = m.dims_on(on, seg)[0] == 0
    z2 = z.clone()
    z2[:, off] = torch.randn(len(x), int(off.sum()), generator=g) * 5
    with torch.no_grad():
        a, b = m.denoise(x, logsnr, z, on, segments_on=seg), m.denoise(x, logsnr, z2, on, segments_on=seg)
        assert torch.equal(a, b)
        assert not torch.allclose(m.denoise(x, logsnr, z2, on, segments_on=torch.ones_like(seg)), a, atol=1e-4)
