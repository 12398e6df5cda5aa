"""probe.py: multi-label / few-shot / DCI on synthetic features with known answers, the checkpoint
read on the CPU, the command line end to end on tiny random-init checkpoints, the U-Net features,
and the streaming probe of image-folder runs with its feature cache. (The linear probe and kNN
themselves: tests/test_solvers.py.)"""
import gc
import json
import os
import re
import sys
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data
import probe
import solvers
import train
from conftest import DSPRITES, blobs, save_image, unreadable_images


# --- multi-label ----------------------------------------------------------------------------------

def test_mean_f1_hand_computed():
    target = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    pred = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 1, 0]])
    # attr 0: TP 1 FP 1 FN 1 -> 2/4; attr 1: TP 2 FP 1 FN 0 -> 4/5; attr 2: TP 0 FN 1 -> 0
    assert probe.mean_f1(pred, target) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert probe.f1_per_attribute(target, target).tolist() == [1.0, 1.0, 1.0]
    assert probe.f1_per_attribute(torch.zeros(4, 1), torch.zeros(4, 1)).tolist() == [0.0]  # as scikit-learn


def test_multilabel_probe_separable():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(900, 16, generator=g)
    s = x @ torch.randn(16, 6, generator=g)
    Y = (s > s.quantile(0.8, dim=0)).long()  # 6 attributes, each a half-space holding 20% of the images
    res = probe.multilabel_probe(x[:600], Y[:600], x[600:750], Y[600:750], x[750:], Y[750:], wds=(1e-5, 1e-3))
    assert res["f1"] > 90
    res = probe.multilabel_probe(x[:600], Y[:600].roll(1, 0), x[600:750], Y[600:750], x[750:], Y[750:], wds=(1e-5,))
    assert res["f1"] < 45  # rows shuffled against features (predicting all positive: 33)


# --- few-shot -------------------------------------------------------------------------------------

def test_episode_sampler_counts_no_overlap_deterministic():
    y = torch.cat([torch.full((n,), c) for c, n in enumerate([30, 22, 40, 10, 25, 26, 21])])  # class 3 too small
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    ways, shots, queries, E = 5, 5, 15, 300
    sup, qry = probe.sample_episodes(y, E, ways, shots, queries, seed=1)
    assert sup.shape == (E, ways * shots) and qry.shape == (E, ways * queries)
    for s, q in zip(sup.tolist(), qry.tolist()):
        assert len(set(s) | set(q)) == len(s) + len(q)  # distinct, so no support image is a query
    ys, yq = y[sup].view(E, ways, shots), y[qry].view(E, ways, queries)
    assert (ys == ys[:, :, :1]).all() and (yq == ys[:, :, :1]).all()  # class-major blocks agree
    assert all(len(set(r)) == ways for r in ys[:, :, 0].tolist())  # distinct classes
    assert (y[sup] != 3).all() and (y[qry] != 3).all()
    assert len(y[sup].unique()) == 6  # every eligible class turns up
    assert torch.equal(sup, probe.sample_episodes(y, E, ways, shots, queries, seed=1)[0])
    assert not torch.equal(sup, probe.sample_episodes(y, E, ways, shots, queries, seed=2)[0])
    with pytest.raises(data.DataError, match="5 classes"):
        probe.sample_episodes(y, E, ways, 10, queries)  # only 30 and 40 have >= 25


def test_fewshot_separable_features_high_random_features_chance():
    f, y = blobs(40, 10, 32, 1.5, seed=0)
    res = probe.fewshot_probe(f, y, n_episodes=100, shots=(1, 5))
    assert res["1shot"] > 90 and res["5shot"] > 95
    assert 0 < res["1shot_ci95"] < 3
    noise = torch.randn(f.shape, generator=torch.Generator().manual_seed(3))
    res = probe.fewshot_probe(noise, y, n_episodes=100, shots=(5,))
    assert abs(res["5shot"] - 20) < 5  # 5-way chance


# --- DCI ------------------------------------------------------------------------------------------

def needs_sklearn(model):
    return pytest.param(model, marks=pytest.mark.skipif(
        model == "gbt" and not probe_has_sklearn(), reason="scikit-learn is optional and not installed"))


def probe_has_sklearn():
    try:
        import sklearn  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("model", [needs_sklearn("logreg"), needs_sklearn("gbt")])
def test_dci_identity_code_high_rotation_low(model):
    g = torch.Generator().manual_seed(0)
    n = 3000 if model == "logreg" else 1200  # the trees are slower
    y = (torch.rand(n, 4, generator=g) * torch.tensor([3, 4, 5, 4])).long()
    codes = y.float() + 0.01 * torch.randn(y.shape, generator=g)
    tr, te = slice(0, 2 * n // 3), slice(2 * n // 3, n)
    ident = probe.dci(codes[tr], y[tr], codes[te], y[te], model=model)
    assert ident["D"] > 0.9 and ident["C"] > 0.9 and ident["I"] > 0.95
    assert ident["R"].shape == (4, 4) and torch.allclose(ident["R"].sum(0), torch.ones(4))
    Q = torch.linalg.qr(torch.randn(4, 4, generator=g))[0]
    rot = probe.dci((codes @ Q)[tr], y[tr], (codes @ Q)[te], y[te], model=model)
    assert rot["D"] < 0.5 and rot["D"] < ident["D"] - 0.4
    assert rot["I"] > 0.9  # the same information, only mixed


def test_dci_gbt_is_disentanglement_libs():
    """The 'gbt' variant against disentanglement_lib's _compute_dci written out directly with
    scikit-learn and scipy (importance = |feature_importances_|, entropies with 1e-11 added)."""
    pytest.importorskip("sklearn")
    from scipy.stats import entropy
    from sklearn.ensemble import GradientBoostingClassifier
    rs = np.random.RandomState(0)
    y = rs.randint(0, 3, size=(400, 3))
    codes = np.concatenate([y[:, :2] + 0.3 * rs.randn(400, 2), (y[:, 1:2] + y[:, 2:3]) + 0.3 * rs.randn(400, 1),
                            rs.randn(400, 1)], 1).astype(np.float32)  # 4 codes, one of them mixed, one noise
    imp, acc = np.zeros((4, 3)), []
    for j in range(3):
        m = GradientBoostingClassifier(random_state=0).fit(codes[:300], y[:300, j])
        imp[:, j] = np.abs(m.feature_importances_)
        acc.append(np.mean(m.predict(codes[300:]) == y[300:, j]))
    per_code = 1.0 - entropy(imp.T + 1e-11, base=3)
    D = np.sum(per_code * imp.sum(1) / imp.sum())
    C = np.mean(1.0 - entropy(imp + 1e-11, base=4))
    ours = probe.dci(torch.from_numpy(codes[:300]), torch.from_numpy(y[:300]), torch.from_numpy(codes[300:]),
                     torch.from_numpy(y[300:]), model="gbt")
    assert ours["D"] == pytest.approx(D, abs=1e-6) and ours["C"] == pytest.approx(C, abs=1e-6)
    assert ours["I"] == pytest.approx(np.mean(acc), abs=1e-9)
    assert np.allclose(ours["R"].numpy(), imp, atol=1e-6)
    assert 0.2 < D < 0.95  # a case where the answer is not trivially 0 or 1


def test_dci_gbt_without_sklearn_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.ensemble", None)  # import fails as if not installed
    y = torch.randint(0, 2, (20, 2))
    with pytest.raises(train.ConfigError, match="pip install scikit-learn"):
        probe.dci(y.float(), y, y.float(), y, model="gbt")


# --- command line ---------------------------------------------------------------------------------

def make_ckpt(path, image_size):
    cfg = dict(train.DEFAULTS, image_size=image_size, z_dim=16, dataset="cifar10", data_dir="nowhere")
    torch.manual_seed(0)
    torch.save({"config": cfg, "ema": common.build_model(common.model_args(cfg)).state_dict(), "step": 0}, path)
    return str(path)


def last_line(capsys):
    """The figures of probe.py's last line; the rest of it must say what they measured: features
    (and solver), the image counts, the data read and the checkpoint's step."""
    line = capsys.readouterr().out.strip().splitlines()[-1]
    figures, what = line.split(" (", 1)
    assert re.fullmatch(r"(z|pool|unet)( random-init)?(, solver \w+)?; [\d,]+ train / [\d,]+ (test|val) images of "
                        r".+; .+ step \d+\)", what), line
    return figures


def test_checkpoint_is_read_on_the_cpu_and_only_the_network_moves(tmp_path, monkeypatch):
    """probe.py and model_from_checkpoint (sample.py, nvs.py) read the checkpoint on the CPU and move
    only the network to the device ('meta' stands in for a GPU): the training weights and AdamW's
    moments never go there, and the checkpoint's tensors are freed once the network holds its weights."""
    cfg = dict(train.DEFAULTS, image_size=16, z_dim=8, dataset="cifar10", data_dir="nowhere")
    net = common.build_model(common.model_args(cfg))
    params = list(net.parameters())  # AdamW's state_dict, written out (torch.optim's first use costs 2 s of imports)
    state = {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
             for i, p in enumerate(params)}
    adamw = {"state": state, "param_groups": [{"lr": 1e-4, "params": list(range(len(params)))}]}
    path = str(tmp_path / "ck.pt")
    torch.save({"config": cfg, "model": net.state_dict(), "ema": net.state_dict(), "optimizer": adamw, "step": 1}, path)
    real_read = common.load_checkpoint
    for mod in (probe, common):
        reads, moments, built = [], [], []

        def read(path, device="cpu"):
            reads.append(device)
            ck = real_read(path, device)
            moments.extend(weakref.ref(t) for st in ck["optimizer"]["state"].values() for t in st.values())
            return ck
        monkeypatch.setattr(mod, "load_checkpoint", read)
        if mod is probe:
            monkeypatch.setattr(probe, "check_device", lambda dev: None)  # 'meta' is no device a user names
            monkeypatch.setattr(probe, "model_of", lambda *a: built.append(common.model_of(*a)) or built[-1])
            # a check against the checkpoint's config fails once it is read: err keeps the frames, as a
            # run still going would, and they must not hold the checkpoint any more
            with pytest.raises(train.ConfigError, match="task='dci' reads") as err:
                probe.main([f"--ckpt={path}", "--task=dci", "--device=meta"])
            gc.collect()
            assert moments and not any(m() for m in moments), "the checkpoint is held by a failed check"
            del err
            # every check passes: the network goes to the device, then the data is read (there is none)
            with pytest.raises(data.DataError, match="no CIFAR-10 found") as err:
                probe.main([f"--ckpt={path}", "--task=knn", "--device=meta"])
            assert reads == ["cpu", "cpu"] and len(built) == 2
            built.pop(0)
            reads.pop()
        else:
            built.append(common.model_from_checkpoint(path, "meta")[0])
        assert reads == ["cpu"]
        assert {p.device.type for p in built[0].parameters()} == {"meta"}
        gc.collect()
        assert moments and not any(m() for m in moments), mod.__name__  # freed, not kept
        monkeypatch.undo()


@pytest.mark.filterwarnings("ignore:.*partial copy")
def test_cli_fewshot_multilabel_dci(tmp_path, capsys, celeba_dir):
    cifar = tmp_path / "cifar"
    rs = np.random.RandomState(0)
    for split, n in (("train", 2), ("test", 25)):
        for c in range(6):
            (cifar / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                img = (rs.rand(32, 32, 3) * 60 + c * 35).astype(np.uint8)
                Image.fromarray(img).save(cifar / split / f"c{c}" / f"{i}.png")
    ck32 = make_ckpt(tmp_path / "ck32.pt", 32)
    probe.main([f"--ckpt={ck32}", "--task=fewshot", "--episodes=20", f"--data_dir={cifar}", "--features=z"])
    acc = r"\d+\.\d\d\+-\d+\.\d\d"
    assert re.fullmatch(f"fewshot 1shot {acc} 5shot {acc} 10shot {acc}", last_line(capsys))
    assert json.load(open(tmp_path / "probe_fewshot_z.json"))["episodes"] == 20

    probe.main([f"--ckpt={ck32}", "--task=knn", f"--data_dir={cifar}", "--features=unet"])
    assert re.fullmatch(r"knn top1 [\d.]+ top5 [\d.]+", last_line(capsys))
    assert json.load(open(tmp_path / "probe_knn_unet.json"))["features"] == "unet"

    probe.main([f"--ckpt={ck32}", "--task=multilabel", "--dataset=celeba", f"--data_dir={celeba_dir[0]}"])
    assert re.fullmatch(r"multilabel f1 [\d.]+", last_line(capsys))
    assert len(json.load(open(tmp_path / "probe_multilabel_z.json"))["f1_per_attribute"]) == 40  # z: the default
    with pytest.raises(data.DataError, match="celeba"):
        probe.main([f"--ckpt={ck32}", "--task=multilabel", "--dataset=celeba", f"--data_dir={tmp_path}"])
    with pytest.raises(train.ConfigError, match="trained on cifar10, and task='dci' reads dsprites or cars3d"):
        probe.main([f"--ckpt={ck32}", "--task=dci"])  # never a silent stand-in dataset
    with pytest.raises(train.ConfigError, match="--data_dir"):
        probe.main([f"--ckpt={ck32}", "--task=dci", "--dataset=dsprites"])

    ck64 = make_ckpt(tmp_path / "ck64.pt", 64)
    probe.main([f"--ckpt={ck64}", "--task=dci", "--dataset=dsprites", "--n_images=40", f"--data_dir={DSPRITES}",
                "--features=z"])
    assert re.fullmatch(r"dci D [\d.]+ C [\d.]+ I [\d.]+", last_line(capsys))
    res = json.load(open(tmp_path / "probe_dci_z.json"))
    assert np.array(res["importance"]).shape == (16, 5) and res["n_train"] == 40
    assert os.path.getsize(tmp_path / "probe_dci_z.png") > 1000


@pytest.mark.parametrize("model", [needs_sklearn("logreg"), needs_sklearn("gbt")])
def test_cli_dci_on_cars3d_posed_checkpoint(tmp_path, capsys, model):
    from conftest import write_cars3d
    write_cars3d(tmp_path)
    cfg = dict(train.DEFAULTS, image_size=16, z_dim=8, dataset="cars3d", data_dir=str(tmp_path), ray_freqs=2)
    torch.manual_seed(0)
    torch.save({"config": cfg, "ema": common.build_model(common.model_args(cfg)).state_dict(), "step": 0},
               tmp_path / "ck.pt")
    probe.main([f"--ckpt={tmp_path / 'ck.pt'}", "--task=dci", "--features=z", f"--dci_model={model}"])
    assert re.fullmatch(r"dci D [\d.]+ C [\d.]+ I [\d.]+", last_line(capsys))
    res = json.load(open(tmp_path / f"probe_dci{'_gbt' if model == 'gbt' else ''}_z.json"))
    assert res["factors"] == ["elevation", "azimuth", "object"] and np.array(res["importance"]).shape == (8, 3)
    assert res["dataset"] == "cars3d" and res["dci_model"] == model and res["n_train"] == 22


def test_unet_features_see_the_image_not_z():
    """The unconditional baseline's features: the pooled middle block (C channels) of the denoiser
    over a lightly noised image; z plays no part (it is masked), the image does."""
    cfg = dict(train.DEFAULTS, z_dim=16)
    torch.manual_seed(0)
    net = common.build_model(common.model_args(cfg)).eval()
    with torch.no_grad():
        for p in net.parameters():  # randomise the zero-initialised z modulations too
            if not p.any():
                p.normal_(0, 0.1)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    # as probe.py streams them: batches of 4, one generator for the noise of the whole pass
    feats = lambda: solvers.stream_features(probe.unet_features(net, logsnr=4.0), (x, torch.zeros(6)), "cpu", 4)[0]
    f = feats()
    assert f.shape == (6, net.unet.mid[-1].res.conv2.out_channels)
    assert torch.equal(f, feats())  # fixed noise: deterministic
    assert (f[0] - f[1]).abs().max() > 1e-4  # different images, different features
    real_denoise = net.denoise
    g = torch.Generator().manual_seed(1)
    with_z = lambda x_t, ls, z, z_on: real_denoise(x_t, ls, torch.randn(z.shape, generator=g), z_on)
    net.denoise = with_z  # another z, under the z_on unet_features passes: nothing changes (masked)
    assert torch.equal(f, feats())
    net.denoise = lambda x_t, ls, z, z_on: with_z(x_t, ls, z, torch.ones_like(z_on))
    assert (f - feats()).abs().max() > 1e-3  # unmasked, z would show


# --- image folders: the streaming probe and its cache, an unlabelled folder -----------------------

def test_streaming_probe_of_a_folder_run_and_its_cache(imagenet_run, capsys, monkeypatch):
    """The val folder, never CIFAR-10 (80 images, not 1,017); features extracted once, then read from
    the cache by the next probe; the extraction goes through DataLoader workers when asked."""
    ck = f"--ckpt={imagenet_run / 'ckpt.pt'}"
    res = probe.main([ck, "--task=linear", "--num_workers=2"])
    assert res["dataset"] == "imagenet" and res["features"] == "z" and (res["n_train"], res["n_test"]) == (240, 80)
    assert 0 <= res["top1"] <= res["top5"] <= 100 and res["solver"] == "lbfgs" and res["wd"] in solvers.LINEAR_WDS
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


def test_probe_skips_unreadable_files_naming_each(imagenet_run, tmp_path):
    """A folder (train/ and val/, 2 classes) with a file of each unreadable kind in train/ and a JPEG cut
    short in val/: the probe measures the readable images alone, through a DataLoader worker, and names
    each unreadable file in one warning."""
    for split, n in (("train", 4), ("val", 3)):
        for c in ("a", "b"):
            for i in range(n):
                grey = np.full((36, 32, 3), 40 * i + 100 * (c == "b"), np.uint8)
                save_image(tmp_path / "d" / split / c / f"{i}.png", grey)
    bad = unreadable_images(tmp_path / "d" / "train" / "a") + [str(tmp_path / "d" / "val" / "b" / "9.jpg")]
    (tmp_path / "d" / "val" / "b" / "9.jpg").write_bytes(b"\xff\xd8\xff")  # a JPEG's first bytes only
    with pytest.warns(UserWarning, match="cannot read image file") as said:
        res = probe.main([f"--ckpt={imagenet_run / 'ckpt.pt'}", "--task=knn", f"--data_dir={tmp_path / 'd'}",
                          "--cache=False", "--num_workers=1", f"--out={tmp_path / 'knn.json'}"])
    assert (res["n_train"], res["n_test"]) == (8, 6) and 0 <= res["top1"] <= 100
    assert sorted(str(w.message).split("'")[1] for w in said if "cannot read" in str(w.message)) == sorted(bad)


def test_probe_of_an_unlabelled_folder_measures_only_zusage(photo_run):
    out, photos, _ = photo_run
    with pytest.raises(data.DataError, match="task='linear' needs labels") as e:
        probe.main([f"--ckpt={out / 'ckpt.pt'}", "--task=linear"])
    assert "\n" not in str(e.value)
    res = probe.main([f"--ckpt={out / 'ckpt.pt'}", "--task=zusage"])
    assert res["dataset"] == "folder" and (res["n_train"], res["n_test"]) == (16, 4) and res["step"] == 2
    assert np.isfinite(res["removed_mean"]) and (out / "probe_zusage_z.json").is_file()
