"""nvs.py: end to end on a tiny posed model, its evaluation pairs and baselines, and the GPU NVS
configs building and running a forward."""
import math
import os
import re

import pytest
import torch
from PIL import Image

import common
import data
import multiview
import nvs
import train
from conftest import ROOT, labelled_views, mv_args

pytestmark = pytest.mark.usefixtures("light_eval")  # conftest.py: a lighter end-of-run evaluation


def test_nvs_end_to_end(cars_dir, tmp_path, capsys):
    """Table 3's conditioning (modulation and cross-attention, source and target poses dropped in
    training) trained, then nvs.py on unseen objects."""
    train.main(mv_args(cars_dir, tmp_path, max_iters=2, eval_interval=2, cond="mod+xattn", p_uncond_src_pose=0.5))
    assert os.path.isfile(tmp_path / "samples_000002.png")  # the eval grid of unseen objects
    res = nvs.main([f"--ckpt={tmp_path / 'ckpt.pt'}", "--steps=2", "--n_targets=3", "--batch=4", "--device=cpu",
                    "--turntable_view=1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("k1 psnr ") and " k2 psnr " in last
    assert re.search(r"\(6 pairs of 2 held-out objects, cars3d test split of .+; checkpoint .+ step 2\)$", last), last
    assert set(res) == {"k1", "k2"} and set(res["k1"]) >= {"psnr", "ssim", "nearest_source", "z_masked"}
    for r in res.values():
        assert math.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1
    with open(tmp_path / "nvs" / "nvs.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(tmp_path / "nvs" / "turntable.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 4  # the 4 azimuths of the source's ring
    assert os.path.isfile(tmp_path / "nvs.json")


def test_nvs_pairs_and_baselines():
    objs, tgts, srcs = nvs.eval_pairs(3, 7, 4, 2, seed=0)
    assert len(objs) == 12 and srcs.shape == (12, 2)
    assert not (srcs == tgts[:, None]).any() and (srcs[:, 0] != srcs[:, 1]).all()
    again = nvs.eval_pairs(3, 7, 4, 2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip((objs, tgts, srcs), again))
    cams = torch.stack([multiview.cars3d_camera(a, 0) for a in (0, 90, 180)])
    near = nvs.nearest_source(cams[None, [0, 2]].expand(2, -1, -1, -1),
                              torch.stack([cams[1], multiview.cars3d_camera(170, 0)]))
    assert near.tolist()[1] == 1  # 170 deg is nearest the 180 deg source
    ring = nvs.ring(torch.stack([multiview.cars3d_camera(a, e) for e in (0, 6) for a in (0, 90, 180, 270)]), 6)
    assert ring.tolist() == [6, 7, 4, 5]  # elevation 6's views, from azimuth 180 on


@pytest.mark.parametrize("cfg", ["cars3d.py", "nmr.py"])
def test_gpu_nvs_configs_build_and_run_a_forward(cfg):
    """The GPU configs (unmeasured here) at least build and run a 2-view posed forward on the CPU."""
    c = train.configure([os.path.join(ROOT, "configs", cfg)], train.DEFAULTS)
    torch.manual_seed(0)
    net = common.build_model(common.model_args(c))
    S = c["image_size"]
    mv = labelled_views(N=1, V=3, size=S)
    x_src, r_src, x_tgt, r_tgt = multiview.multiview_batch(mv, 2, data.Rng(0, 0, 1))
    with torch.no_grad():
        out = net(x_tgt, torch.zeros(1), x_src, rays_src=r_src, rays_tgt=r_tgt)
    assert out.shape == (1, 3, S, S) and torch.isfinite(out).all()
