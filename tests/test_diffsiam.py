"""DiffSiam (thesis ch. 3, SPEC §8): the SimSiam loss and its stop-gradient, the segment schedule,
the reduction to plain SODA, and a DiffSiam run end to end."""
import pytest
import torch

import diffusion as D
import model as M
import train
from test_train import base_args, cifar_dir, run_train, state  # noqa: F401  (cifar_dir: a fixture)


def test_negative_cosine_is_minus_one_and_stops_the_gradient():
    p = torch.randn(5, 16, requires_grad=True)
    h = (p.detach() * 3.0).requires_grad_(True)  # same directions, another scale
    loss = M.negative_cosine(p, h)
    assert torch.allclose(loss, torch.tensor(-1.0), atol=1e-6)
    loss.backward()
    assert h.grad is None  # stop-gradient: nothing flows into the target branch
    assert p.grad is not None


def test_simsiam_loss_gradients_reach_both_views_through_the_predictor_branch():
    torch.manual_seed(0)
    m = M.build("tiny", "tiny", z_dim=32, image_size=8, simsiam_dim=16)
    z1, z2 = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    loss = m.simsiam_loss(z1, z2)
    assert -1 <= loss.item() <= 1
    loss.backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0  # each view is the online branch once


@pytest.mark.parametrize("n", [1, 4, 64])
def test_hierarchical_mask_activates_exactly_the_first_k(n):
    k = torch.arange(1, n + 1)
    u = (k - 0.5) / n  # the middle of level k
    hier = D.segment_keep(u, n, "hierarchical")
    seq = D.segment_keep(u, n, "sequential")
    for row, kk in enumerate(k.tolist()):
        assert hier[row].tolist() == [1.0] * kk + [0.0] * (n - kk)
        assert seq[row].tolist() == [0.0] * (kk - 1) + [1.0] + [0.0] * (n - kk)
    assert D.segment_keep(torch.tensor([0.0, 1.0]), n).sum(1).tolist() == [1.0, float(n)]  # ends: 1 and all
    with pytest.raises(ValueError, match="segment_mode"):
        D.segment_keep(u, n, "random")


def test_mask_z_on_segments_zeroes_their_dims():
    m = M.build("tiny", "tiny", z_dim=12, image_size=8)
    z = torch.arange(1.0, 13.0)[None]
    out = m.mask_z(z, torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 1.0]]))  # 6 segments of 2 dims
    assert out.tolist() == [[1, 2, 0, 0, 5, 6, 0, 0, 9, 10, 11, 12]]


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


@pytest.mark.filterwarnings("ignore:.*partial copy")
def test_diffsiam_trains_and_its_heads_learn(cifar_dir, tmp_path):
    run_train(base_args(cifar_dir, tmp_path, max_iters=3, segments=8, simsiam_weight=1.0, simsiam_dim=32,
                        views="augment"))
    ck = state(tmp_path / "ckpt.pt")
    init = train.build_model(ck["config"]).state_dict()
    assert "predictor.0.weight" in ck["model"] and "projector.0.weight" in ck["model"]
    assert not torch.equal(init["predictor.0.weight"], ck["model"]["predictor.0.weight"])
    with pytest.raises(train.ConfigError, match="segments"):
        train.main(base_args(cifar_dir, tmp_path / "bad", simsiam_weight=1.0))


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
