"""bench.py: the training step, the data pipeline and DDIM sampling timed on synthetic images."""
import json
import os

import pytest

import bench
from configurator import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--iters=2", "--warmup=1", "--sample_steps=2", "--sample_n=4", "--threads=1"]


def test_bench_on_a_training_config(tmp_path):
    """The teaching config file, as a user names it: its model and step keys are read, its data and
    run keys skipped; no data directory and no checkpoint are touched."""
    res = bench.main([os.path.join(ROOT, "configs", "cifar10_cpu.py"), f"--out_dir={tmp_path}"] + TINY)
    assert res["train_img_s"] > 0 and res["data_img_s"] > 0 and res["sample_s"] > 0 and res["gflop_per_img"] > 0
    assert (res["encoder"], res["unet"]) == ("tiny", "tiny")
    assert json.load(open(tmp_path / "bench.json"))["train_img_s"] == res["train_img_s"]
    assert sorted(os.listdir(tmp_path)) == ["bench.json"]


@pytest.mark.parametrize("flags, match", [
    (["--max_iters=5"], "unknown config key 'max_iters'"),  # flags stay strict: a training key is not a benchmark's
    (["--ray_freqs=2"], "ray_freqs=2: the benchmark's synthetic images have no camera poses"),
    (["--iters=0"], "iters=0 is out of range"),
    (["--encoder=nope"], "encoder='nope' is not allowed"),
])
def test_bench_refuses_in_one_line(tmp_path, flags, match):
    with pytest.raises(ConfigError, match=match):
        bench.main([f"--out_dir={tmp_path}"] + TINY + flags)


def test_bench_keys_train_py_has_too_take_its_defaults():
    """bench.py times train.py's own step (training.py); the keys they share start where train.py's do,
    so the benchmark measures what a run does unless a flag says otherwise (out_dir aside)."""
    import train
    shared = (set(bench.DEFAULTS) & set(train.DEFAULTS)) - {"out_dir"}
    assert {"fused_adamw", "lr", "enc_lr_mult", "ema_halflife_kimg", "grad_clip", "views", "aug"} <= shared
    assert {k: bench.DEFAULTS[k] for k in shared} == {k: train.DEFAULTS[k] for k in shared}
