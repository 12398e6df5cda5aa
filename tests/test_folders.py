"""The code paths of the paper's big datasets, on real images: the CIFAR-10 PNG subset laid out as
an ImageNet folder (train/ and val/ links) through train.py --dataset=imagenet, its evaluation,
probe.py's streaming probe with its feature cache, kNN and sample.py; CelebA trained from a fixture
in its public layout, then probe.py --task=multilabel and sample.py on it."""
import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import evaluation  # noqa: E402
import probe  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from conftest import lighten_eval  # noqa: E402
from test_probe import write_celeba  # noqa: E402

CIFAR_PNG = os.path.join(ROOT, "..", "shared", "data", "cifar10-subset")
TINY = ["--encoder=tiny", "--unet=tiny", "--z_dim=32", "--batch_size=16", "--num_workers=0", "--threads=1",
        "--sample_steps=2", "--warmup_iters=1", "--log_interval=12"]


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    """The first 24 train and 8 test PNGs of each CIFAR-10 class, linked as DATA_DIR/train and /val."""
    if not os.path.isdir(CIFAR_PNG):
        pytest.skip(f"no CIFAR-10 PNGs at {CIFAR_PNG}")
    root = tmp_path_factory.mktemp("imagenet")
    for split, name, n in (("train", "train", 24), ("test", "val", 8)):
        for c in sorted(os.listdir(os.path.join(CIFAR_PNG, split))):
            os.makedirs(root / name / c)
            for f in sorted(os.listdir(os.path.join(CIFAR_PNG, split, c)))[:n]:
                os.symlink(os.path.abspath(os.path.join(CIFAR_PNG, split, c, f)), root / name / c / f)
    return root


@pytest.fixture(scope="module")
def imagenet_run(imagenet_dir, tmp_path_factory):
    """24 steps of train.py --dataset=imagenet at 32 px, evaluated at steps 0, 12 and 24 on a fixed
    part of the folders (FOLDER_EVAL made small: 120 train, 40 val images; z-usage on 2 noise levels)."""
    out = tmp_path_factory.mktemp("imagenet_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluation, "FOLDER_EVAL", (120, 40))
        lighten_eval(mp)
        train.main(["--dataset=imagenet", f"--data_dir={imagenet_dir}", "--image_size=32", f"--out_dir={out}",
                    "--max_iters=24", "--eval_interval=12", *TINY])
    return out


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


def test_streaming_probe_of_a_folder_run_and_its_cache(imagenet_run, capsys, monkeypatch):
    """The val folder, never CIFAR-10 (80 images, not 1,017); features extracted once, then read from
    the cache by the next probe; the extraction goes through DataLoader workers when asked."""
    ck = f"--ckpt={imagenet_run / 'ckpt.pt'}"
    res = probe.main([ck, "--task=linear", "--num_workers=2"])
    assert res["dataset"] == "imagenet" and res["features"] == "z" and (res["n_train"], res["n_test"]) == (240, 80)
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["solver"] == "sgd" and res["epochs"] in probe.EPOCHS
    assert set(res["extract_img_s"]) == {"train", "test"}
    cached = sorted(os.listdir(imagenet_run / "features"))
    assert len(cached) == 2 and all(f.startswith("imagenet_") for f in cached)
    out = capsys.readouterr().out
    assert "imagenet train z features: 240 images" in out and "linear top1" in out
    extracted = []
    monkeypatch.setattr(probe, "stream_features", lambda *a, **k: extracted.append(1))
    knn = probe.main([ck, "--task=knn"])  # the same features: read, not extracted
    assert not extracted and knn["extract_img_s"] == {} and 0 <= knn["top1"] <= knn["top5"] <= 100
    assert "features: read" in capsys.readouterr().out
    monkeypatch.undo()
    pool = probe.main([ck, "--task=knn", "--features=pool", "--cache=False"])  # other features: extracted
    assert set(pool["extract_img_s"]) == {"train", "test"} and len(os.listdir(imagenet_run / "features")) == 2


def test_probe_refuses_another_dataset_unless_asked(imagenet_run):
    ck = f"--ckpt={imagenet_run / 'ckpt.pt'}"
    with pytest.raises(probe.ConfigError, match="probed on its test split"):
        probe.main([ck, "--split=val"])
    with pytest.raises(probe.ConfigError, match="augments a training set held in memory"):
        probe.main([ck, "--probe_aug=1"])
    # a folder without train/ and val/ (the run's own PNGs) is a folder of images, but without class subfolders
    with pytest.raises(data.DataError, match="task='linear' needs labels.*task='zusage' measures"):
        probe.main([ck, f"--data_dir={imagenet_run}"])
    empty = imagenet_run / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(data.DataError, match="no image files in"):
        probe.main([ck, f"--data_dir={empty}"])


def test_sample_reads_only_the_images_it_shows(imagenet_run, imagenet_dir, capsys, monkeypatch):
    reads = []
    real = data.FolderData.__getitem__
    monkeypatch.setattr(data.FolderData, "__getitem__", lambda self, i: reads.append(i) or real(self, i))
    res = sample.main([f"--ckpt={imagenet_run / 'ckpt.pt'}", "--mode=recon", "--n=4", "--index=10", "--steps=2",
                       "--threads=1", f"--out_dir={imagenet_run / 'samples'}"])
    assert reads == [10, 11, 12, 13]
    assert all(np.isfinite(res["metrics"][k]["psnr"]) for k in ("z", "z_masked"))
    got = json.load(open(imagenet_run / "samples" / "recon.json"))
    assert got["n"] == 4 and "data: 4 of the 80 images of the imagenet val/ or held-out part: " in capsys.readouterr().out
    reads.clear()
    res = sample.main([f"--ckpt={imagenet_run / 'ckpt.pt'}", "--mode=interp", "--index=40", "--steps=2", "--frames=3",
                       "--threads=1", f"--out_dir={imagenet_run / 'samples'}"])
    assert reads == [40, 41] and res["frames"].shape == (3, 3, 32, 32)
    with pytest.raises(data.DataError, match="the test split has 80"):
        sample.main([f"--ckpt={imagenet_run / 'ckpt.pt'}", "--mode=interp", "--index=79", "--steps=2"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sgd_probe_agrees_with_lbfgs(seed):
    """The mini-batch probe against the full-batch L-BFGS probe on the same features: 10 overlapping
    Gaussian classes in 32 dimensions of unequal scales (3,000 train / 2,000 test, a hard problem:
    ~55% top-1), each probe choosing its own weight decay (and epochs) on the same held-out rows.
    Within 0.5 points, at three seeds (docs/probe.md: eight)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(10, 32, generator=g) * 0.3
    y = torch.randint(0, 10, (5000,), generator=g)
    f = (mu[y] + torch.randn(5000, 32, generator=g)) * torch.rand(32, generator=g) * 3
    ftr, fte, ytr, yte = f[:3000].half(), f[3000:].half(), y[:3000], y[3000:]
    a = probe.linear_probe(ftr, ytr, fte, yte, 10, solver="sgd")
    b = probe.linear_probe(ftr, ytr, fte, yte, 10, solver="lbfgs")
    assert 40 < b["top1"] < 70, b  # neither trivial nor hopeless
    assert abs(a["top1"] - b["top1"]) <= 0.5 and abs(a["top5"] - b["top5"]) <= 0.5, (a, b)


def test_knn_streams_over_chunks_of_references():
    g = torch.Generator().manual_seed(0)
    ftr, fte = torch.randn(700, 16, generator=g), torch.randn(300, 16, generator=g)
    ytr, yte = torch.randint(0, 5, (700,), generator=g), torch.randint(0, 5, (300,), generator=g)
    whole = evaluation.knn_accuracy(ftr, ytr, fte, yte, top5=True)
    assert evaluation.knn_accuracy(ftr.half(), ytr, fte.half(), yte, chunk=64, top5=True) == pytest.approx(whole, abs=0.34)
    assert evaluation.knn_accuracy(ftr, ytr, fte, yte, chunk=64, top5=True) == whole


def test_gaussian_augmentation_flips_and_adds_noise():
    x = torch.linspace(0, 1, 8).repeat(64, 3, 8, 1)  # (64, 3, 8, 8), brighter to the right
    out = data.augment(x, "gaussian", data.Rng(0, 0, 64))
    flipped = (out[:, :, :, 0] > out[:, :, :, -1]).float().mean((1, 2)) > 0.5
    assert 0.25 < flipped.float().mean() < 0.75  # about half the images flipped
    back = torch.where(flipped[:, None, None, None], out.flip(-1), out)
    inside = (x > 0.3) & (x < 0.7)  # away from the clipping at 0 and 1
    assert abs((back - x)[inside].std().item() - data.GAUSSIAN_STD) < 0.01
    assert torch.equal(out, data.augment(x, "gaussian", data.Rng(0, 0, 64)))  # a function of (seed, step)


def test_celeba_trains_probes_and_samples(tmp_path, capsys, light_eval):
    """configs/celeba.py on a fixture in CelebA's public layout (at 32 px, tiny nets): train.py reads
    the official partition through DataLoader workers and evaluates without kNN (40 attributes, not a
    class); probe.py --task=multilabel and sample.py --mode=directions --attr=... run on the result."""
    colours = [(10 * i, 200 - 8 * i, 60 + 5 * i) for i in range(24)]
    write_celeba(tmp_path, colours, [0] * 16 + [1] * 4 + [2] * 4)
    out = tmp_path / "run"
    train.main([os.path.join(ROOT, "configs", "celeba.py"), f"--data_dir={tmp_path}", f"--out_dir={out}",
                "--image_size=32", "--max_iters=4", "--eval_interval=4", "--compile=False", "--channels_last=False",
                *TINY[:3], "--batch_size=8", *TINY[4:], "--warmup_iters=1"])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    evals = [r for r in log if "zgap" in r]
    assert [r["step"] for r in evals] == [0, 4] and not any("knn" in r for r in evals)
    res = probe.main([f"--ckpt={out / 'ckpt.pt'}", "--task=multilabel"])
    assert res["dataset"] == "celeba" and (res["n_train"], res["n_test"]) == (16, 4) and len(res["f1_per_attribute"]) == 40
    got = sample.main([f"--ckpt={out / 'ckpt.pt'}", "--mode=directions", "--attr=2", "--steps=2", "--alphas=-1,1",
                       "--n_dirs=2", "--threads=1"])
    assert got["images"].shape[:2] == (3, 3)  # PC1, PC2 and the attribute's probe direction x (source + 2 steps)
    assert "data: 4 of the 4 images of the celeba test partition" in capsys.readouterr().out
