"""train.py, data.py and the checkpoint helpers: config strictness, a smoke run, bit-exact resume,
DDP (2 gloo processes) == 1 process, atomic checkpoints, and one-line errors."""
import ast
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import data  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402

SHARED_CIFAR = os.path.join(ROOT, "..", "shared", "data")

pytestmark = pytest.mark.usefixtures("light_eval")  # conftest.py: a lighter end-of-run evaluation


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    """A tiny CIFAR-10 in ImageFolder layout: 10 classes x 12 train / 3 test PNGs, 32x32."""
    root = tmp_path_factory.mktemp("cifar")
    rs = np.random.RandomState(0)
    for split, n in (("train", 12), ("test", 3)):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = (rs.rand(32, 32, 3) * 60 + c * 19).astype(np.uint8)  # class-dependent colour
                Image.fromarray(img).save(d / f"{i}.png")
    return str(root)


def base_args(cifar_dir, out_dir, **kw):
    args = dict(out_dir=str(out_dir), data_dir=cifar_dir, n_val=20, batch_size=8, max_iters=4,
                warmup_iters=2, log_interval=1, eval_interval=0, ckpt_interval=100, eval_at_start=False,
                sample_steps=2, z_dim=32, p_mask_layer=0.3, p_uncond=0.2, aug="simclr", threads=1,
                cpu_bf16="false")  # fp32 unless a test asks: 'auto' would depend on the machine's CPU
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def run_train(argv):
    with pytest.warns(UserWarning, match="partial copy"):
        train.main(argv)


def state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def random_image_folder(root, per_class, h, w, ext, classes=("c0", "c1")):
    """An ImageNet-style folder of random images: root/train|val/<class>/<i>.<ext>, h x w pixels."""
    rs = np.random.RandomState(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray((rs.rand(h, w, 3) * 255).astype(np.uint8)).save(root / split / c / f"{i}.{ext}")
    return root


# --- configuration ------------------------------------------------------------

def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(train.ConfigError, match="'batch_size'"):
        train.configure(["--bacth_size=3"], {"batch_size": 1, "lr": 0.1})
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("lr = 0.5\nlearning_rate = 3\n")
    with pytest.raises(train.ConfigError, match="learning_rate"):
        train.configure([str(cfg_file)], {"batch_size": 1, "lr": 0.1})


def test_cli_override_keeps_type(tmp_path):
    d = {"batch_size": 1, "lr": 0.1, "compile": False, "out_dir": "out"}
    cfg_file = tmp_path / "c.py"
    cfg_file.write_text("batch_size = 7\nout_dir = 'x'\n")
    cfg = train.configure([str(cfg_file), "--lr=1", "--compile=True", "--out_dir=out/run1"], d)
    assert cfg == {"batch_size": 7, "lr": 1.0, "compile": True, "out_dir": "out/run1"}
    assert isinstance(cfg["lr"], float)
    with pytest.raises(train.ConfigError, match="batch_size"):
        train.configure(["--batch_size=0.5"], d)
    with pytest.raises(train.ConfigError, match="compile"):
        train.configure(["--compile=1"], d)


def test_every_config_file_sets_only_known_keys():
    defaults = train.DEFAULTS
    configs = os.path.join(ROOT, "configs")
    names = sorted(os.path.relpath(os.path.join(d, f), configs) for d, _, fs in os.walk(configs)
                   for f in fs if f.endswith(".py"))
    for want in ("cifar10_cpu.py", "cifar10.py", "imagenet.py", "cars3d_cpu.py", "ablations/no_bottleneck.py"):
        assert want in names
    every = sorted(os.path.relpath(os.path.join(d, f), configs) for d, _, fs in os.walk(configs) for f in fs)
    assert every == names, "configs/ holds config files only (programs live in tools/)"
    for f in names:
        tree = ast.parse(open(os.path.join(configs, f)).read())
        assert all(isinstance(node, ast.Assign) for node in tree.body), f"{f}: a config is assignments only"
        train.configure([os.path.join(configs, f)], defaults)


# --- data ----------------------------------------------------------------------

def test_shared_cifar_records_load_with_a_count_warning():
    if not os.path.isdir(os.path.join(SHARED_CIFAR, "cifar-10-batches-py")):
        pytest.skip("../shared/data not beside the checkout")
    with pytest.warns(UserWarning, match="found 5,170 of 50,000"):
        x, y, classes = data.load_cifar10(SHARED_CIFAR, "train", n_val=0)
    assert x.shape == (5170, 3, 32, 32) and x.dtype == torch.uint8 and len(classes) == 10
    assert set(y.tolist()) == set(range(10))


def test_val_split_is_fixed_and_disjoint(cifar_dir):
    with pytest.warns(UserWarning):
        xa, _, _ = data.load_cifar10(cifar_dir, "train", n_val=20, seed=0)
        xv, _, _ = data.load_cifar10(cifar_dir, "val", n_val=20, seed=0)
        xv2, _, _ = data.load_cifar10(cifar_dir, "val", n_val=20, seed=0)
    assert len(xa) == 100 and len(xv) == 20 and torch.equal(xv, xv2)
    flat = lambda t: {bytes(r.numpy().tobytes()) for r in t}
    assert not flat(xa) & flat(xv)


def test_views_are_deterministic_and_distinct():
    x = (torch.rand(6, 3, 32, 32) * 255).to(torch.uint8)
    a = data.make_views(x, "augment", "randaugment", data.Rng(0, 5, 6))
    b = data.make_views(x, "augment", "randaugment", data.Rng(0, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], a[1])  # novel views differ
    src, tgt = data.make_views(x, "identical", "cropflip", data.Rng(0, 5, 6))
    assert torch.equal(src, tgt) and src.min() >= -1 and src.max() <= 1
    # the rows of a global batch are the same numbers whichever process draws them
    full = data.Rng(0, 3, 8).rand(2)
    assert torch.equal(data.Rng(0, 3, 8, slice(4, 8)).rand(2), full[4:8])


def test_loader_batches_split_a_step_into_its_micro_steps():
    """The DataLoader's index batches for 2 micro-steps of 8 rows are the halves of one batch of 16,
    step after step, across an epoch boundary, from any start step."""
    one = list(data.StepBatches(50, 16, [slice(0, 16)], 0, 1, 5))
    two = list(data.StepBatches(50, 16, [slice(0, 8), slice(8, 16)], 0, 1, 5))
    assert len(two) == 8 and two == [half for b in one for half in (b[:8], b[8:])]


def test_crops_keep_their_aspect_in_the_original_picture():
    """A whole image squashed to a square (aspect = width / height) is cropped so that the crop's
    pixel aspect in the original picture is the drawn ratio r, as RandomResizedCrop's; its area
    fraction is the drawn one; aspect=None is the square image's crop, bit for bit."""
    aspect = torch.tensor([0.5, 1.0, 2.0, 4 / 3] * 4)
    theta = data.crop_flip_theta(data.Rng(0, 1, 16), scale=(0.25, 0.5), aspect=aspect)
    rng = data.Rng(0, 1, 16)
    area, logr = 0.25 + 0.25 * rng.rand(), math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rng.rand()
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]  # fractions of the square's width and height
    fits = (w < 1) & (h < 1)
    assert fits.sum() >= 12
    torch.testing.assert_close((w * aspect / h)[fits], logr.exp()[fits])  # pixel width / height in the picture
    torch.testing.assert_close((w * h)[fits], area[fits])
    assert torch.equal(data.crop_flip_theta(data.Rng(0, 1, 16)), data.crop_flip_theta(data.Rng(0, 1, 16), aspect=None))


def test_folder_training_views_come_from_the_whole_picture(tmp_path):
    """A 96 x 48 picture, red in its left sixth: the centre crop (evaluation) never shows the red, the
    training views (whole picture at decode_size, cropped to image_size on the device) do."""
    img = np.zeros((48, 96, 3), np.uint8)
    img[:, :, 2] = 255
    img[:, :16] = (255, 0, 0)
    (tmp_path / "c").mkdir()
    Image.fromarray(img).save(tmp_path / "c" / "a.png")
    ds = data.FolderData(str(tmp_path), 32)
    centre, _ = ds[0]
    assert centre.shape == (3, 32, 32) and centre[0].max() < 30  # no red in the centre crop
    size = data.decode_size(32, 0.25)
    whole, y, aspect = ds.whole_images(size)[0]
    assert size == 64 and whole.shape == (3, 64, 64) and aspect == 2.0 and y == -1  # one class folder: no labels
    x = whole[None].expand(64, -1, -1, -1)
    views = data.augment(x, "cropflip", data.Rng(0, 0, 64), 0.25, torch.full((64,), 2.0), 32)
    assert views.shape == (64, 3, 32, 32)
    red = (views[:, 0] > 0.9) & (views[:, 2] < 0.1)
    assert red.flatten(1).any(1).float().mean() > 0.2  # many views reach the left border


# --- training ------------------------------------------------------------------

@pytest.mark.full_eval
def test_smoke_three_steps(cifar_dir, tmp_path):
    run_train(base_args(cifar_dir, tmp_path, max_iters=3))
    ck = state(tmp_path / "ckpt.pt")
    assert ck["step"] == 3 and ck["config"]["max_iters"] == 3
    assert set(ck) >= {"model", "ema", "optimizer", "rng", "data_pos", "config", "model_args"}
    net = M.SODA(M.SODAConfig(**ck["model_args"]))  # nanoGPT's GPT(GPTConfig(**checkpoint['model_args']))
    net.load_state_dict(ck["ema"])  # strict
    old = {k: v for k, v in ck.items() if k != "model_args"}  # as checkpoints were written before model_args
    torch.save(old, tmp_path / "old.pt")
    again = common.model_from_checkpoint(str(tmp_path / "old.pt"))[0]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(ck["model"]["unet.out.2.weight"], torch.zeros_like(ck["model"]["unet.out.2.weight"]))
    logs = (tmp_path / "log.jsonl").read_text().splitlines()
    assert any('"loss"' in l for l in logs) and any('"knn"' in l for l in logs)
    assert os.path.isfile(tmp_path / "samples_000003.png")


def full_and_killed_then_resumed(run, args, out, monkeypatch):
    """run(args(out / 'full')) for 4 steps; then a run killed right after its step-2 checkpoint and
    resumed to step 4 in out / 'split'. -> the two final checkpoints."""
    run(args(out / "full"))
    real_save = train.save_checkpoint

    def save_then_die(obj, path):
        real_save(obj, path)
        if obj["step"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(args(out / "split", ckpt_interval=2))
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    run(args(out / "split", init_from="resume"))
    return state(out / "full" / "ckpt.pt"), state(out / "split" / "ckpt.pt")


@pytest.mark.numerics
def test_resume_is_bit_exact(cifar_dir, tmp_path, monkeypatch):
    """Killed after step 2 and resumed == 4 steps in one go; 50 training images at batch 16 are 3 steps
    an epoch, so the resumed run ends epoch 0 and starts epoch 1 (a new shuffle) as the full run did."""
    args = lambda out, **kw: base_args(cifar_dir, out, batch_size=16, n_val=70, **kw)
    a, b = full_and_killed_then_resumed(run_train, args, tmp_path, monkeypatch)
    assert a["step"] == b["step"] == 4
    assert a["data_pos"] == b["data_pos"] and (a["data_pos"]["epoch"], a["data_pos"]["batch"]) == (1, 1)
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k])


def free_port():
    """A TCP port nothing listens on now (the OS picks it), so two suites can run side by side."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moved_apart(a, b, key="model"):
    """||a - b|| / ||a - init||: how far two runs' weights (or EMA weights) are apart, as a fraction
    of how far training moved them (both from the seed's init)."""
    torch.manual_seed(a["config"]["seed"])
    init = common.build_model(common.model_args(a["config"])).state_dict()
    w = [n for n, p in a[key].items() if p.is_floating_point() and n in init]
    diff = sum((a[key][n] - b[key][n]).double().pow(2).sum() for n in w).sqrt()
    return (diff / sum((a[key][n] - init[n]).double().pow(2).sum() for n in w).sqrt()).item()


# Switches that change only float rounding, judged as tools/gpu_check.py judges them, by bounds set
# between what rounding does and what the smallest bug does, measured on several kernel sets
# (ATEN_CPU_CAPABILITY=avx512 / avx2 / default on an Intel Xeon; fused AdamW on an AMD EPYC). Adam divides each
# gradient entry by its own RMS, so entries whose gradient is rounding noise (conv1 behind a
# zero-initialised conv2 at step 0) take a full lr step either way: the weights drift apart far more
# than the loss does, by an amount the kernels decide. Rounding measured loss <= 4e-6 and weights
# <= 5.4e-4 of the distance trained; beta2 0.995 instead of 0.99 gives 5.8e-4 and 4.3e-2.
ROUNDING_LOSS_RTOL, ROUNDING_MOVED = 5e-5, 5e-3


# DDP: the two runs sum the same per-image gradients in another order (two half-batch means, then
# gloo's all-reduce average): rounding, judged by the bounds above. The weights alone would hide a
# world-size scaling bug (Adam's normalised update nearly cancels it), so the AdamW moments are
# compared too: a gradient off by a factor of 2 moves exp_avg by 100% and exp_avg_sq by 300%, while
# rounding moved them by at most 6e-6 of each tensor's largest entry (lr 1e-3, 3 steps).
MOMENT_TOL = 5e-5


def assert_same_training_state(a, b, moment_tol=MOMENT_TOL):
    """Model, EMA and AdamW moments of two checkpoints agree to float32 rounding (tolerances above)."""
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert moved_apart(a, b, key) < ROUNDING_MOVED, key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 10
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq"):  # exp_avg_sq sees the gradient's scale
            scale = sa[i][k].abs().max().item()  # moments span many decades: the tolerance is per tensor
            torch.testing.assert_close(sb[i][k], sa[i][k], rtol=1e-5, atol=moment_tol * scale,
                                       msg=lambda m: f"optimizer state {i} {k}: {m}")


# the DDP comparison's run (also tests/test_kernels.py's): 3 steps at lr 1e-3, layer masking, two augmented views
DDP_COMMON = dict(max_iters=3, p_mask_layer=0.3, aug="simclr", views="augment", lr=1e-3, warmup_iters=1,
                  grad_clip=0.0, z_bn=True, prediction="v", weighting="v")


@pytest.mark.numerics
@pytest.mark.multiprocess
def test_ddp_two_processes_equal_one(cifar_dir, tmp_path):
    """2 gloo processes x batch 4 == 1 process x batch 8: weights, EMA and AdamW moments to float
    rounding. Both arms are new processes under the second CPU kernel set (tests/test_kernels.py),
    so that CI runs this comparison on kernels other than the ones the suite's other comparisons use."""
    from test_kernels import other_kernel_set
    kernels = os.environ.get("ATEN_CPU_CAPABILITY") or other_kernel_set()
    env = dict(os.environ, ATEN_CPU_CAPABILITY=kernels, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    # no gradient clipping: at these first steps the gradient norm is above 1, and clipping it to 1
    # would hide a gradient scale bug in the moments too (measured: loss x world size then passes)
    # z_bn: batch statistics of z, all-reduced over the ranks (the teaching config's recipe, with v)
    one = [sys.executable, "train.py"] + base_args(cifar_dir, tmp_path / "one", batch_size=8, **DDP_COMMON)
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "train.py"] + base_args(cifar_dir, tmp_path / "two", batch_size=4, **DDP_COMMON)
    runs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for cmd in (one, two)]  # side by side: one core each
    for r in runs:
        _, err = r.communicate(timeout=300)
        assert r.returncode == 0, f"under ATEN_CPU_CAPABILITY={kernels}:\n" + err[-3000:]
    a, b = state(tmp_path / "one" / "ckpt.pt"), state(tmp_path / "two" / "ckpt.pt")
    assert_same_training_state(a, b)
    torch.manual_seed(0)
    init = common.build_model(common.model_args(a["config"])).state_dict()
    moved = sum(not torch.allclose(init[n], a["model"][n]) for n in init)
    assert moved > 10  # the runs trained: the comparison is not between two untouched inits


def test_interrupted_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    good = {"config": {"a": 1}, "ema": {"w": torch.ones(3)}, "step": 1}
    train.save_checkpoint(good, path)

    def dying_save(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # killed in the middle of the write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint({"config": {}, "ema": {}, "step": 2}, path)
    monkeypatch.undo()
    ck = train.load_checkpoint(path)
    assert ck["step"] == 1 and torch.equal(ck["ema"]["w"], torch.ones(3))


def one_line_error(cmd, match):
    r = subprocess.run([sys.executable] + cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0
    assert len(err) == 1 and err[0].startswith("error:") and match in err[0], r.stderr[-2000:]


def test_corrupted_checkpoint_gives_one_line(tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(train.CheckpointError, match="corrupted"):
        train.load_checkpoint(str(bad))
    one_line_error(["probe.py", f"--ckpt={bad}"], "corrupted")


def test_missing_data_dir_gives_one_line(tmp_path):
    one_line_error(["train.py", f"--data_dir={tmp_path / 'nope'}", f"--out_dir={tmp_path / 'o'}"],
                   "no CIFAR-10 found")


def test_wrong_image_size_gives_one_line(cifar_dir, tmp_path):
    one_line_error(["train.py", f"--data_dir={cifar_dir}", "--image_size=64", f"--out_dir={tmp_path}"],
                   "32x32")


def test_imagenet_config_builds_and_steps(tmp_path, monkeypatch):
    """configs/imagenet.py at its real model size, one step at batch 2 and 32x32 on the CPU; the
    ~2.4 GB checkpoint is recorded in memory instead of written."""
    root = random_image_folder(tmp_path / "imagenet", 2, 80, 96, "JPEG", classes=("n00", "n01"))
    saved = []
    monkeypatch.setattr(train, "save_checkpoint", lambda obj, path: saved.append(obj))
    monkeypatch.setattr(train, "evaluate_and_log", lambda run, it: None)  # a folder run's evaluation: tests/test_folders.py
    argv = [os.path.join(ROOT, "configs", "imagenet.py"), f"--data_dir={root}", f"--out_dir={tmp_path / 'o'}",
            "--image_size=32", "--batch_size=2", "--max_iters=1", "--num_workers=0", "--compile=False",
            "--eval_at_start=False", "--threads=1"]
    train.main(argv)
    (ck,) = saved
    assert ck["step"] == 1 and ck["config"]["encoder"] == "resnet50x2" and ck["config"]["z_dim"] == 2048
    n_enc = sum(v.numel() for k, v in ck["model"].items() if k.startswith("encoder."))
    n_dec = sum(v.numel() for k, v in ck["model"].items() if k.startswith("unet."))
    # ResNet-50x2 trunk 93.9M + a 4096 -> 2048 bottleneck 8.4M; the 'imagenet' UNet, ~40M with its
    # 2048-d z projections (Table 1: a 36M decoder)
    assert abs(n_enc - 102.3e6) < 0.5e6 and 36e6 < n_dec < 50e6, (n_enc, n_dec)
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_non_finite_loss_stops_naming_the_step(cifar_dir, tmp_path, monkeypatch):
    real_loss = train.D.loss

    def loss_nan_at_step_2(model, *a, **k):
        out = real_loss(model, *a, **k)
        loss_nan_at_step_2.calls += 1
        return out * float("nan") if loss_nan_at_step_2.calls == 3 else out
    loss_nan_at_step_2.calls = 0
    monkeypatch.setattr(train.D, "loss", loss_nan_at_step_2)
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 2"):
        run_train(base_args(cifar_dir, tmp_path, max_iters=4, log_interval=4, ckpt_interval=1))
    assert train.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 2  # the last good one stays


def losses_and_checkpoint(cifar_dir, out, **kw):
    """3 steps at lr 1e-2 (the zero-initialised output has moved by the later steps) -> (loss per
    step from log.jsonl, the checkpoint)."""
    run_train(base_args(cifar_dir, out, max_iters=3, lr=1e-2, warmup_iters=1, **kw))
    logs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    return torch.tensor([r["loss"] for r in logs if "loss" in r]), state(out / "ckpt.pt")


@pytest.fixture(scope="module")
def eager_fp32(cifar_dir, tmp_path_factory):
    """The reference for the GPU switches: eager, fp32, NCHW."""
    return losses_and_checkpoint(cifar_dir, tmp_path_factory.mktemp("eager"))


@pytest.mark.numerics
def test_compiled_step_equals_eager(cifar_dir, tmp_path, eager_fp32):
    """torch.compile (aot_eager: the same graph capture, no C++ build) gives eager's losses and weights."""
    loss_e, ck_e = eager_fp32
    loss_c, ck_c = losses_and_checkpoint(cifar_dir, tmp_path, compile=True, compile_backend="aot_eager")
    assert not any(k.startswith("_orig_mod") for k in ck_c["model"])  # the uncompiled module's names
    # aot_eager runs eager's kernels on the captured graph: measured bit-identical losses and weights
    # on every kernel set; a decomposition that reorders a sum is rounding, judged as channels_last is
    torch.testing.assert_close(loss_c, loss_e, rtol=ROUNDING_LOSS_RTOL, atol=0)
    assert moved_apart(ck_e, ck_c) < ROUNDING_MOVED


@pytest.mark.numerics
@pytest.mark.parametrize("switch", [dict(channels_last=True), dict(fused_adamw=False)], ids=["channels_last", "looped_adamw"])
def test_rounding_switch_equals_the_reference(cifar_dir, tmp_path, eager_fp32, switch):
    """channels_last (NHWC convolutions), and AdamW as a loop over parameters instead of the fused
    kernel, give the reference's losses and weights to float32 rounding."""
    loss_e, ck_e = eager_fp32
    loss_s, ck_s = losses_and_checkpoint(cifar_dir, tmp_path, **switch)
    torch.testing.assert_close(loss_s, loss_e, rtol=ROUNDING_LOSS_RTOL, atol=0)
    assert moved_apart(ck_e, ck_s) < ROUNDING_MOVED


@pytest.mark.numerics
def test_cpu_bf16_autocast_is_close_to_fp32(cifar_dir, tmp_path, eager_fp32):
    """CPU bf16 autocast (the stand-in for CUDA bf16) changes the losses, by less than 0.3%."""
    loss_e, _ = eager_fp32
    run_train(base_args(cifar_dir, tmp_path, max_iters=3, lr=1e-2, warmup_iters=1, cpu_bf16="true"))
    loss_b = torch.tensor([json.loads(l)["loss"] for l in (tmp_path / "log.jsonl").read_text().splitlines()
                           if '"loss"' in l])
    # bf16 keeps 8 mantissa bits (0.4% per rounding), but the loss is fp32 over many bf16 outputs:
    # measured 1.4e-4 and 3.4e-4 relative at steps 2 and 3 (step 1 is exact: the output starts at
    # zero); 3e-3 is ~10x that, while a step at lr 1e-2 changes the loss by ~10%
    assert not torch.equal(loss_b, loss_e)  # autocast took effect
    torch.testing.assert_close(loss_b, loss_e, rtol=3e-3, atol=0)


@pytest.mark.slow
def test_inductor_compile_bf16_channels_last(cifar_dir, tmp_path):
    """The full stand-in (inductor's C++ build, ~150 s on 2 cores): compile + CPU bf16 + channels_last."""
    run_train(base_args(cifar_dir, tmp_path, max_iters=2, compile=True, cpu_bf16="true", channels_last=True))
    ck = state(tmp_path / "ckpt.pt")
    assert ck["step"] == 2 and not any(k.startswith("_orig_mod") for k in ck["model"])
    log = [l for l in (tmp_path / "log.jsonl").read_text().splitlines() if '"loss"' in l]
    assert log and all("NaN" not in l for l in log)


# --- any number of processes: gradient accumulation, resume by the global batch, preemption -----

ACCUM_COMMON = dict(DDP_COMMON, z_bn=False, max_iters=3)  # z_bn's statistics are per micro-step: off here


@pytest.mark.numerics
def test_grad_accum_equals_one_big_batch(cifar_dir, tmp_path):
    """1 x 16 == 1 x 8 x 2 micro-steps == 1 x 4 x 4: the same rows, views, noise levels and noise in
    every step (drawn for the global batch, then sliced), the micro-steps' gradients summed; to float
    rounding, by the DDP comparison's bounds (a gradient off by the number of micro-steps moves the
    AdamW moments by 100% or more)."""
    ref = None
    for bs, acc in ((16, 1), (8, 2), (4, 4)):
        out = tmp_path / f"{bs}x{acc}"
        run_train(base_args(cifar_dir, out, batch_size=bs, grad_accum=acc, **ACCUM_COMMON))
        ck = state(out / "ckpt.pt")
        assert ck["batch"] == {"world": 1, "batch_size": bs, "grad_accum": acc} and ck["step"] == 3
        if ref is None:
            ref = ck
        else:
            assert_same_training_state(ref, ck)
    # and a real difference is seen: the same 16 images at batch 8 (another split, not another batch)
    # would pass, so compare with a run that sees only half of them
    run_train(base_args(cifar_dir, tmp_path / "half", batch_size=8, **ACCUM_COMMON))
    assert moved_apart(ref, state(tmp_path / "half" / "ckpt.pt")) > 100 * ROUNDING_MOVED


# What would block the CPU until a GPU catches up, seen on the CPU: a Python number read from a tensor
# (.item(), int(), bool(), .tolist()), a tensor made from Python data (a host-to-device copy), and the
# ops whose output size depends on the data or that check their result on the host.
HOST_SYNCS = {"aten._local_scalar_dense.default", "aten.lift_fresh.default", "aten.lift_fresh_copy.default",
              "aten.nonzero.default", "aten.masked_select.default", "aten.bincount.default",
              "aten._unique2.default", "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor",
              "aten._linalg_check_errors.default"}


def host_syncs(fn):
    """fn() under a dispatch mode that records every HOST_SYNCS op (and indexing by a boolean mask,
    a nonzero in disguise) -> the list of them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) in HOST_SYNCS or str(func) == "aten.index.Tensor" and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                seen.append(str(func))
            return func(*args, **(kwargs or {}))
    seen = []
    with Record():
        fn()
    return seen


@pytest.mark.parametrize("kw", [dict(), dict(aug="randaugment", views="class", grad_accum=2, batch_size=4),
                                dict(z_bn=True, prediction="v", weighting="v", views="identical", aug="cropflip",
                                     grad_clip=0.0)],
                         ids=["simclr", "randaugment_class_accum", "teaching"])
def test_train_step_never_waits_for_the_device(cifar_dir, tmp_path, kw):
    """No operation in train_step (the second step: the first builds the epoch's order) would make
    the CPU wait for a GPU: constants are made once per device, the colour jitter's inverse once, the
    inverted schedule is in closed form. The check sees what it looks for (a .item() is caught)."""
    cfg = train.configure(base_args(cifar_dir, tmp_path, schedule="inverted", **kw), train.DEFAULTS)
    train.validate(cfg)
    with pytest.warns(UserWarning, match="partial copy"):
        run = train.setup(cfg)
    train.train_step(run, 0)
    assert host_syncs(lambda: train.train_step(run, 1)) == []
    assert host_syncs(lambda: train.train_step(run, 2).item()) == ["aten._local_scalar_dense.default"]


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


def test_resume_keeps_the_global_batch_on_another_split(cifar_dir, tmp_path, monkeypatch):
    """A run of 1 x 16 resumed as 1 x 8 x 2 (as 8 GPUs continue on 4 with grad_accum=2): the same
    data order and random numbers, so it ends where 4 steps of 1 x 16 end, to rounding."""
    args = lambda out, **kw: base_args(cifar_dir, out, batch_size=16, n_val=70, **dict(ACCUM_COMMON, max_iters=4),
                                       **kw)
    full = tmp_path / "full"
    run_train(args(full))
    split = tmp_path / "split"
    run_train(base_args(cifar_dir, split, batch_size=16, n_val=70, **dict(ACCUM_COMMON, max_iters=2)))
    run_train(base_args(cifar_dir, split, batch_size=8, grad_accum=2, n_val=70, init_from="resume",
                        **dict(ACCUM_COMMON, max_iters=4)))
    a, b = state(full / "ckpt.pt"), state(split / "ckpt.pt")
    assert b["batch"]["grad_accum"] == 2 and a["data_pos"] == b["data_pos"]
    assert_same_training_state(a, b)


def torchrun(args, nproc=2, **popen):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                             f"--master_port={free_port()}"] + args, cwd=ROOT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), **popen)


@pytest.mark.numerics
@pytest.mark.multiprocess
def test_torchrun_sigterm_saves_and_resumes_on_another_process_count(cifar_dir, tmp_path):
    """2 processes x batch 4 x 2 micro-steps, compiled (aot_eager) with z_bn (all-reduced in forward
    and backward), evaluated at the start, a checkpoint every step; once the first is written,
    SIGTERM to the launcher (torchrun passes it on) between log steps: every process stops after the
    same step, rank 0 saves, all exit in seconds, with no deprecation warning. Resumed on 1 process x batch 8 x 2 (the global batch kept: z_bn's micro-steps
    hold the same rows), it ends where an uninterrupted 1 x 8 x 2 run ends, to rounding."""
    common = dict(DDP_COMMON, z_bn=True, decay_lr=False, log_interval=400, n_val=20)
    out = tmp_path / "two"
    p = torchrun(["train.py"] + base_args(cifar_dir, out, **dict(common, batch_size=4, grad_accum=2, max_iters=1000,
                 compile=True, compile_backend="aot_eager", eval_at_start=True, ckpt_interval=1)),
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while not (out / "ckpt.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # a step trained and saved (written atomically: it exists whole or not at all)
    t = time.time()
    p.send_signal(signal.SIGTERM)
    printed, _ = p.communicate(timeout=60)
    seconds = time.time() - t
    stopped = re.search(r"stopped by SIGTERM after step (\d+);", printed)
    assert stopped, printed[-3000:]
    assert seconds < 25 and "deprecated" not in printed, printed[-3000:]
    k = int(stopped.group(1))
    assert k >= 1 and '"step": 0' in (out / "log.jsonl").read_text()  # trained, evaluated at the start
    ck = state(out / "ckpt.pt")
    assert ck["step"] == k and ck["batch"] == {"world": 2, "batch_size": 4, "grad_accum": 2}
    # one step more. The moments' bound is looser than the 3-step comparisons': rounding grows with the
    # steps, and compiled 2-process steps against eager ones measured 6.9e-5 of a tensor's largest entry
    # after 4-5 steps (one element of 73,728), where a gradient off by 2 moves them by 100%
    run_train(base_args(cifar_dir, out, **dict(common, batch_size=8, grad_accum=2, max_iters=k + 1,
                                                init_from="resume")))
    run_train(base_args(cifar_dir, tmp_path / "one", **dict(common, batch_size=8, grad_accum=2, max_iters=k + 1)))
    assert_same_training_state(state(tmp_path / "one" / "ckpt.pt"), state(out / "ckpt.pt"), moment_tol=5e-4)


NAN_ON_RANK_1 = """
import os, runpy, sys, time
sys.path.insert(0, {root!r})
import data, diffusion
real, calls = diffusion.loss, [0]
def loss(*a, **k):  # rank 1 alone: a NaN loss at step 2 (its third call)
    calls[0] += 1
    out = real(*a, **k)
    return out * float("nan") if os.environ["RANK"] == "1" and calls[0] == 3 else out
diffusion.loss = loss
real_load = data.load
def load(*a, **k):  # when each process reads (or would download) its data
    with open({loads!r}, "a") as f:
        f.write(f"{{os.environ['LOCAL_RANK']}} start {{time.time()}}\\n")
    time.sleep(0.5)
    out = real_load(*a, **k)
    with open({loads!r}, "a") as f:
        f.write(f"{{os.environ['LOCAL_RANK']}} end {{time.time()}}\\n")
    return out
data.load = load
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.mark.multiprocess
def test_a_nan_on_one_process_stops_every_process_before_a_save(cifar_dir, tmp_path):
    """A non-finite loss on rank 1 only, in step 2 (0-based) of a run that saves after every step: both
    processes stop with one error line before saving it, and the checkpoint after steps 0 and 1 stays.
    And the data (a download, where there is one) is read by local rank 0 first, by the other after it."""
    script, loads = tmp_path / "nan_on_rank_1.py", tmp_path / "loads.txt"
    script.write_text(NAN_ON_RANK_1.format(root=ROOT, train=os.path.join(ROOT, "train.py"), loads=str(loads)))
    out = tmp_path / "run"
    p = torchrun([str(script)] + base_args(cifar_dir, out, max_iters=4, log_interval=100, ckpt_interval=1, batch_size=4),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    printed, err = p.communicate(timeout=180)
    assert p.returncode != 0
    assert err.count("error: non-finite loss or gradient at step 2; stopping.") == 1, err[-3000:]
    assert state(out / "ckpt.pt")["step"] == 2
    times = {}
    for line in loads.read_text().splitlines():
        rank, what, t = line.split()
        times.setdefault((rank, what), []).append(float(t))
    assert max(times[("0", "end")]) < min(times[("1", "start")]), loads.read_text()


@pytest.mark.multiprocess
def test_sigterm_to_the_process_group_with_loader_workers_saves(tmp_path):
    """An image-folder run with DataLoader workers, SIGTERM to its whole process group (as torchrun's
    and SLURM's stop reaches every process of a job): the workers ignore it, the run saves after the
    step it is in and exits cleanly, its workers with it."""
    root = random_image_folder(tmp_path / "folder", 8, 40, 48, "png")
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--dataset=imagenet", f"--data_dir={root}", f"--out_dir={out}", "--batch_size=4",
           "--max_iters=100000", "--log_interval=400", "--ckpt_interval=1", "--eval_interval=0", "--eval_at_start=False",
           "--num_workers=1", "--z_dim=32", "--threads=1", "--cpu_bf16=false"]
    p = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGTERM)
    printed, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and re.search(r"stopped by SIGTERM after step \d+;", printed), printed[-3000:]
    assert state(out / "ckpt.pt")["step"] >= 1


def test_a_checkpoint_without_its_split_resumes_by_its_batch_size(cifar_dir, tmp_path):
    """A checkpoint written before the split was recorded (no 'batch'): its batch_size without
    accumulation continues it, as before; another global batch is refused naming it."""
    out = tmp_path / "run"
    run_train(base_args(cifar_dir, out, max_iters=1))
    ck = state(out / "ckpt.pt")
    del ck["batch"]
    train.save_checkpoint(ck, str(out / "ckpt.pt"))
    with pytest.raises(train.ConfigError, match=r"global batch of 8 \(1 process x batch_size=8"):
        train.main(base_args(cifar_dir, out, init_from="resume", max_iters=2, batch_size=4))
    run_train(base_args(cifar_dir, out, init_from="resume", max_iters=2))
    assert state(out / "ckpt.pt")["step"] == 2
