"""monitor.py: a run's evaluation (kNN, z-gap, z-usage, grids, curves) on an image-folder run, and
the FLOP count of a step."""
import json

import numpy as np
import pytest
import torch

import common
import train
from conftest import base_args


def test_a_folder_run_evaluates_like_a_cifar_run(imagenet_run):
    log = [json.loads(line) for line in open(imagenet_run / "log.jsonl")]
    evals = [r for r in log if "knn" in r]
    assert [r["step"] for r in evals] == [0, 12, 24]
    for r in evals:
        assert 0 <= r["knn"] <= 100 and np.isfinite(r["zgap"]) and np.isfinite(r["z_removed_mean"])
    for name in ("curves.png", "samples_000000.png", "samples_000024.png"):
        assert (imagenet_run / name).stat().st_size > 1000, name
    ck = torch.load(imagenet_run / "ckpt.pt", weights_only=True)
    assert ck["config"]["dataset"] == "imagenet" and ck["step"] == 24


@pytest.mark.usefixtures("light_eval")
def test_flops_are_counted_on_a_copy_that_touches_nothing(cifar_dir, tmp_path):
    """The FLOP count runs on a meta-device copy: the same count as a real forward and backward of the
    model, with no change to the model's weights, z_bn statistics or gradients, nor to the global RNG;
    z_bn's all-reduce is off in the copy (a collective on one process hangs the others)."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = train.configure(base_args(cifar_dir, tmp_path, z_bn=True), train.DEFAULTS)
    torch.manual_seed(0)
    net = common.build_model(common.model_args(cfg)).train()
    before, rng = {k: v.clone() for k, v in net.state_dict().items()}, torch.get_rng_state()
    flops = train.count_flops(lambda: common.build_model(common.model_args(cfg)), 32)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    counter = FlopCounterMode(display=False)
    x = torch.randn(2, 3, 32, 32)
    # attention as matrix products, as on the meta device (the CPU's fused kernel has no FLOP formula)
    with counter, torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        net(x, torch.zeros(2), x).float().sum().backward()
    assert flops == counter.get_total_flops() / 2 > 1e8
