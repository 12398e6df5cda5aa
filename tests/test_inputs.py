"""Every input of every script is checked before any work: a bad value, file or combination is one
ConfigError / CheckpointError / DataError whose message is one line naming the key or the file, and
nothing is written (no out_dir, no JSON beside the checkpoint, no figure). Each script's main() is
called in-process on tiny checkpoints and data; one subprocess per script checks what a user sees:
one stderr line `error: ...` and a non-zero exit."""
import contextlib
import importlib.util
import io
import os
import re
import runpy
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import configurator
import data
import common
import nvs
import probe
import sample
import train
from test_train import base_args, cifar_dir  # noqa: F401 (cifar_dir: a fixture, 10 classes x 12 train / 3 test)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ERRORS = (configurator.ConfigError, common.CheckpointError, data.DataError)
pytestmark = pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")


def tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def save_model(path, **kw):
    """A checkpoint of a tiny random model, as train.py writes one (model, ema, config, step, ...)."""
    cfg = dict(train.DEFAULTS, **kw)
    torch.manual_seed(0)
    sd = common.build_model(common.model_args(cfg)).state_dict()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    common.save_checkpoint({"model": sd, "ema": sd, "config": cfg, "step": 0, "optimizer": {}, "rng": {},
                                "data_pos": {}}, path)
    return path


def write_cars(root, n=3, views=4):
    """cars3d_64.npz with 1 elevation x `views` azimuths: n - 1 train objects, 1 test object."""
    os.makedirs(root, exist_ok=True)
    rs = np.random.RandomState(0)
    np.savez(os.path.join(root, "cars3d_64.npz"), images=(rs.rand(n, 1, views, 64, 64, 3) * 255).astype(np.uint8),
             elevation_deg=np.array([0], np.float32), azimuth_deg=np.arange(views, dtype=np.float32) * 360 / views,
             object_names=np.array([f"car_{i}" for i in range(n)]), split=np.array(["train"] * (n - 1) + ["test"]))
    return root


class World:
    pass


@pytest.fixture(scope="module")
def w(tmp_path_factory, cifar_dir):  # noqa: F811
    """Tiny checkpoints and data, once for the module; every test checks that nothing under them changed."""
    root = str(tmp_path_factory.mktemp("inputs"))
    W = World()
    W.root, W.cifar = root, cifar_dir
    W.c10 = save_model(os.path.join(root, "c10", "ckpt.pt"), z_dim=16, data_dir=cifar_dir)
    W.cars = write_cars(os.path.join(root, "cars"))  # 4 views per object, 1 held-out object
    W.posed = save_model(os.path.join(root, "posed", "ckpt.pt"), dataset="cars3d", data_dir=W.cars, image_size=16,
                         ray_freqs=2, cond="xattn", n_tokens=4, z_dim=8)
    W.unposed = save_model(os.path.join(root, "unposed", "ckpt.pt"), dataset="cars3d", data_dir=W.cars, image_size=16,
                           z_dim=8)
    # CIFAR-10 folders with one image of another size (train and test), and one file that is no image
    W.badsize = os.path.join(root, "badsize")
    W.notimage = os.path.join(root, "notimage")
    for d in (W.badsize, W.notimage):
        for split in ("train", "test"):
            os.makedirs(os.path.join(d, split, "c0"))
            for i in range(3):
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(os.path.join(d, split, "c0", f"{i}.png"))
    for split in ("train", "test"):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(os.path.join(W.badsize, split, "c0", "z_big.png"))
        with open(os.path.join(W.notimage, split, "c0", "z_text.png"), "w") as f:
            f.write("not a PNG")
    W.npz = os.path.join(root, "npz")  # a dSprites without its keys, a Cars3D file that is text
    os.makedirs(W.npz)
    np.savez(os.path.join(W.npz, "dsprites_downsampled.npz"), x=np.zeros(2))
    with open(os.path.join(W.npz, "cars3d_64.npz"), "w") as f:
        f.write("not an archive")
    W.records = os.path.join(root, "records")  # torchvision's layout with its batch files missing
    os.makedirs(os.path.join(W.records, "cifar-10-batches-py"))
    W.text = os.path.join(root, "notes.txt")
    with open(W.text, "w") as f:
        f.write("lr = 0.1\n")
    W.png = os.path.join(W.badsize, "train", "c0", "0.png")
    W.plain = os.path.join(root, "plain.pt")  # a torch file, not a checkpoint
    torch.save({"weights": torch.ones(2)}, W.plain)
    W.noconfig = os.path.join(root, "noconfig.pt")  # config and ema, but not train.py's
    torch.save({"config": {"lr": 0.1}, "ema": {}}, W.noconfig)
    W.mismatch = os.path.join(root, "mismatch", "ckpt.pt")  # the c10 config, the posed model's weights
    os.makedirs(os.path.dirname(W.mismatch))
    ck, other = torch.load(W.c10, weights_only=True), torch.load(W.posed, weights_only=True)
    torch.save({**ck, "ema": other["ema"]}, W.mismatch)
    return W


def snapshot(*roots):
    out = {}
    for r in roots:
        for d, dirs, files in os.walk(r):
            out[d] = None
            for f in files:
                st = os.stat(os.path.join(d, f))
                out[os.path.join(d, f)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def refused(w, tmp_path):
    """refused(main, argv, match) -> the message: one of the three errors, one line matching
    `match` (the key or file it names), and nothing under the fixtures or tmp_path written."""
    def check(main, argv, match, kind=ERRORS):
        before = snapshot(w.root, w.cifar, str(tmp_path))
        with pytest.raises(ERRORS) as e:
            main([str(a) for a in argv])
        msg = str(e.value)
        assert isinstance(e.value, kind), f"{type(e.value).__name__}: {msg}"
        assert msg and "\n" not in msg and msg == msg.strip(), repr(msg)
        assert re.search(match, msg), f"{match!r} not in {msg!r}"
        after = snapshot(w.root, w.cifar, str(tmp_path))
        assert after == before, f"{argv} wrote {sorted(set(after) ^ set(before)) or 'into existing files'}"
        return msg
    return check


def one_line_error(cmd, *absent):
    """A script as a user runs it: stderr is one line `error: ...`, the exit non-zero, `absent` not made.
    train.py in a new interpreter; the others run their `__main__` block in this one (runpy), which
    is what `python script.py` runs, without another ~3 s interpreter start."""
    if cmd[0] == "train.py":
        r = subprocess.run([sys.executable] + cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
        rc, stderr = r.returncode, r.stderr
    else:
        argv, formatwarning, err = sys.argv, warnings.formatwarning, io.StringIO()
        sys.argv = [os.path.join(ROOT, cmd[0])] + cmd[1:]
        try:
            with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
                runpy.run_path(sys.argv[0], run_name="__main__")
        finally:
            sys.argv, warnings.formatwarning = argv, formatwarning
        code = e.value.code  # sys.exit("error: ...") prints its text to stderr and exits 1
        rc, stderr = (1, err.getvalue() + code + "\n") if isinstance(code, str) else (code, err.getvalue())
    lines = stderr.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    for p in absent:
        assert not os.path.exists(p), p
    return lines[0]


def unwritable(monkeypatch):
    """As a read-only directory behaves (tests may run as root, whom permissions do not stop)."""
    def mkdtemp(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(configurator.tempfile, "mkdtemp", mkdtemp)


# --- train.py ---------------------------------------------------------------------

def test_train_values(w, tmp_path, refused):
    out = tmp_path / "run"
    args = lambda **kw: base_args(w.cifar, kw.pop("out_dir", out), **{"n_val": 5, "batch_size": 4, "max_iters": 1,
                                                                      "z_dim": 16, **kw})
    for kw, match in [
        (dict(batch_size=0.5), "batch_size"),  # wrong type
        (dict(compile=1), "compile"),
        (dict(lr=0.0), r"lr=0\.0 .*> 0"),  # out of range
        (dict(max_iters=0), "max_iters=0"),
        (dict(beta2=1.0), "beta2"),
        (dict(crop_min=0.0), "crop_min"),
        (dict(image_size=12), "image_size=12"),
        (dict(p_uncond=1.5), "p_uncond"),
        (dict(lr="1e999"), "lr=inf"),  # not finite
        (dict(seed=2**40), "seed="),
        (dict(aug="nope"), "aug='nope'.*cropflip"),  # unknown choice
        (dict(dataset="mnist"), "dataset='mnist'"),
        (dict(cond="nope"), "cond='nope'"),
        (dict(encoder="huge"), "encoder='huge'"),
        (dict(cpu_bf16="maybe"), "cpu_bf16='maybe'"),
        (dict(device="gpu"), "device='gpu'"),
        (dict(device="cuda:7"), "device='cuda:7'"),
        (dict(schedule="nope"), "schedule='nope'"),
        (dict(compile=True, compile_backend="nope"), "compile_backend='nope'.*inductor"),
        (dict(out_dir=""), "out_dir='' is empty"),  # out_dir that cannot be made
        (dict(out_dir=w.text), "out_dir=.*is a file"),
        (dict(out_dir=os.path.join(w.text, "run")), "out_dir=.*cannot be created.*notes.txt"),
        (dict(data_dir=tmp_path / "nowhere"), "no CIFAR-10 found in .*nowhere"),  # data
        (dict(data_dir=w.badsize), r"z_big\.png' is 40x40.*one size"),
        (dict(data_dir=w.notimage), r"cannot read image file .*z_text\.png"),
        (dict(data_dir=w.records), "cifar-10-batches-py"),
        (dict(dataset="dsprites", image_size=64, data_dir=w.npz), r"dsprites_downsampled\.npz' has no imgs"),
        (dict(batch_size=1000), "global batch .*1000.*larger than the training set"),
        (dict(ray_freqs=2), "ray_freqs=2 .*dataset='cifar10' has no camera poses"),  # combinations
        (dict(dataset="cars3d", data_dir=w.cars, image_size=16), "ray_freqs"),
        (dict(dataset="cars3d", data_dir=w.cars, image_size=16, ray_freqs=2, k_max=4), "k_max=4 .*4 view\\(s\\).*another one, the target"),
        (dict(dataset="imagenet", data_dir=""), "dataset='imagenet' needs data_dir"),
        (dict(dataset="imagenet", views="class", data_dir=w.cifar), "views='class'"),
        (dict(simsiam_weight=0.5), "simsiam_weight"),
        (dict(pretrained=tmp_path / "none.pt"), "pretrained=.*none.pt"),
        (dict(pretrained=w.png), r"0\.png.*not a torch.save file"),
        (dict(pretrained=w.posed), "pretrained=.*cannot be the frozen denoiser"),
        (dict(init_from="resume"), r"no checkpoint at .*run/ckpt\.pt"),
        (dict(init_from="nope"), "init_from='nope'"),
    ] + ([(dict(device="mps"), "device='mps'.*no MPS")] if not torch.backends.mps.is_available() else []):
        refused(train.main, args(**kw), match)
    assert not out.exists()
    # an unknown key, a config file that is missing, a directory or not Python
    refused(train.main, args(bacth_size=3), "'batch_size'")
    refused(train.main, [tmp_path / "none.py"] + args(), "none.py' not found")
    refused(train.main, [w.root] + args(), "is a directory")
    refused(train.main, [w.png] + args(), r"0\.png")


def test_train_refuses_an_out_dir_it_would_overwrite_or_cannot_resume(w, tmp_path, refused):
    out = tmp_path / "run"
    out.mkdir()
    cfg = configurator.configure(base_args(w.cifar, out, n_val=5, batch_size=4, z_dim=16), train.DEFAULTS)
    torch.save({"config": cfg, "ema": {}, "step": 0}, out / "ckpt.pt")  # evaluated, not resumable: no model/optimizer
    args = lambda **kw: base_args(w.cifar, out, **{"n_val": 5, "batch_size": 4, "z_dim": 16, **kw})
    refused(train.main, args(), "already holds ckpt.pt.*--init_from=resume")
    refused(train.main, args(init_from="resume"), "cannot resume .*ckpt.pt: it holds no model/optimizer/step/rng")
    (out / "ckpt.pt").write_bytes(b"torn")
    refused(train.main, args(init_from="resume"), "corrupted")


def test_train_cli_one_line(w, tmp_path):
    out = tmp_path / "run"
    err = one_line_error(["train.py", f"--data_dir={w.badsize}", f"--out_dir={out}", "--threads=1"], out)
    assert "40x40" in err


# --- probe.py ---------------------------------------------------------------------

def test_probe_values(w, refused, monkeypatch):
    ck = f"--ckpt={w.c10}"
    for argv, match in [
        ([ck, "--task=nope"], "task='nope'.*'linear'"),
        ([ck, "--features=nope"], "features='nope'.*'pool'"),
        ([ck, "--split=train"], "split='train'"),
        ([ck, "--task=dci", "--dci_model=svm"], "dci_model='svm'"),
        ([ck, "--task=fewshot", "--episodes=0"], "episodes=0"),
        ([ck, "--val_frac=1.0"], "val_frac=1.0"),
        ([ck, "--n_images=-1"], "n_images=-1"),
        ([ck, "--unet_logsnr=1e999"], "unet_logsnr=inf"),
        ([ck, "--seed=99999999999999999999"], "seed="),
        ([ck, "--random=1"], "random"),
        ([ck, "--device=cuda:7"], "device='cuda:7'"),
        ([ck, "--dataset=imagenet"], "trained on cifar10: say where imagenet is with --data_dir"),
        ([ck, "--dataset=celeba"], "dataset='celeba' .*task='linear'.*'cifar10', 'folder', 'imagenet'"),
        ([ck, "--epsiodes=3"], "'episodes'"),
        ([ck, "--solver=adam"], "solver='adam'.*'sgd'"),
        ([ck, "--lin_epochs=ten"], "lin_epochs='ten'"),
        ([ck, "--lin_epochs=30,0.5"], "lin_epochs='30,0.5'.*whole numbers"),
        ([ck, "--batch=0"], "batch=0"),
        ([ck, "--num_workers=-1"], "num_workers=-1"),
        # checkpoints: missing, a directory, not a torch file, not a checkpoint, another model's
        ([f"--ckpt={w.root}/none.pt"], "no checkpoint at .*none.pt"),
        ([f"--ckpt={w.root}"], "is a directory, not a checkpoint file"),
        ([f"--ckpt={w.png}"], r"0\.png.*not a torch.save file"),
        ([f"--ckpt={w.text}"], r"notes\.txt.*not a torch.save file"),
        ([f"--ckpt={w.plain}"], r"plain\.pt.*no config/ema.*'weights'"),
        ([f"--ckpt={w.noconfig}"], r"noconfig\.pt.*not a train.py checkpoint.*dataset"),
        ([f"--ckpt={w.mismatch}"], r"mismatch/ckpt\.pt.*'ema' weights do not fit"),
        # combinations that cannot work
        ([ck, "--task=dci"], "trained on cifar10, and task='dci' reads dsprites or cars3d: pass --dataset=dsprites"),
        ([ck, "--task=dci", "--dataset=dsprites"], "trained on cifar10: say where dsprites is with --data_dir"),
        ([ck, "--task=dci", "--dataset=dsprites", f"--data_dir={w.root}"], "dSprites images are 64x64.*image_size is 32"),
        ([ck, "--task=multilabel"], "--data_dir"),
        ([ck, "--out=result.txt"], r"out=.result.txt. must be a .json file"),
        ([ck, f"--out={w.root}/nowhere/r.json"], "must be a .json file in an existing directory"),
        ([f"--ckpt={w.posed}", "--task=knn"], "trained on cars3d, and task='knn' reads cifar10"),
        ([f"--ckpt={w.posed}", "--task=knn", "--dataset=cifar10"], "camera rays .*task='knn'"),
        ([f"--ckpt={w.posed}", "--task=dci", "--features=unet"], "features='unet'"),
        # data
        ([ck, "--task=knn", f"--data_dir={w.badsize}"], r"z_big\.png' is 40x40"),
        ([ck, "--task=knn", f"--data_dir={w.root}/nowhere"], "no CIFAR-10 found in .*nowhere"),
        ([f"--ckpt={w.posed}", "--task=dci", f"--data_dir={w.root}/nowhere"], "no Cars3D at .*nowhere"),
    ]:
        refused(probe.main, argv, match)
    unwritable(monkeypatch)  # the JSON goes beside the checkpoint: its directory must take it
    refused(probe.main, [ck, "--task=knn"], "ckpt=.*c10/ckpt.pt.*cannot be written")


def test_probe_cli_one_line(w):
    assert "task='nope'" in one_line_error(["probe.py", f"--ckpt={w.c10}", "--task=nope"])


# --- sample.py --------------------------------------------------------------------

def test_sample_values(w, tmp_path, refused, monkeypatch):
    out = tmp_path / "samples"
    run = lambda *a, ckpt=w.c10: [f"--ckpt={ckpt}", f"--out_dir={out}", "--steps=1", "--device=cpu", "--n=4"] + list(a)
    for argv, match in [
        (run("--mode=nope"), "mode"),
        (run("--sampler=ddpn"), "'ddim'"),
        (run("--steps=0"), "steps=0"),
        (run("--frames=1"), "frames=1"),
        (run("--index=-1"), "index=-1"),
        (run("--guidance=1e999"), "guidance=inf"),
        (run("--mode=interp", "--invert_logsnr=20"), r"invert_logsnr=20\.0 .*\[-15, 15\)"),
        (run("--schedule=nope"), "schedule='nope'"),
        (run("--seed=99999999999999999999"), "seed="),
        (run("--mode=directions", "--alphas=a,b"), "alphas='a,b'"),
        (run("--mode=directions", "--alphas="), "alphas=''"),
        (run("--mode=random", "--ws=x"), "ws='x'"),
        (run("--mode=interp", "--sections=a-b"), "sections"),
        (run("--mode=interp", "--sections=3-1"), "sections='3-1'.*backwards"),
        (run("--mode=interp", "--sections=0,9"), "sections '0,9'.*4 sections"),  # what the model has
        (run("--mode=interp", "--index=29"), "index=29.*test images 29..30.*has 30"),  # what the data has
        (run("--mode=recon", "--n=40"), "index=0, n=40.*has 30"),
        (run("--mode=recon", "--index=100"), "index=100, n=4"),
        (run("--mode=mix", "--n_show=20"), "n_show=20"),
        (run("--mode=directions", "--attr=12"), "attr.*got 12"),
        (run(f"--data_dir={w.badsize}"), r"z_big\.png' is 40x40"),
        (run(f"--data_dir={w.root}/nowhere"), "no CIFAR-10 found"),
        (run(ckpt=w.posed), "reads cifar10.*'cars3d'"),  # checkpoints
        (run(ckpt=f"{w.root}/none.pt"), "no checkpoint at .*none.pt"),
        (run(ckpt=w.root), "is a directory"),
        (run(ckpt=w.text), r"notes\.txt.*not a torch.save file"),
        (run(ckpt=w.noconfig), r"noconfig\.pt.*not a train.py checkpoint"),
        (run(ckpt=w.mismatch), "weights do not fit"),
        ([f"--ckpt={w.c10}", f"--out_dir={w.text}"], "out_dir=.*is a file"),  # out_dir
        ([f"--ckpt={w.c10}", f"--out_dir={w.text}/samples"], "out_dir=.*cannot be created"),
    ]:
        refused(sample.main, argv, match)
    assert not out.exists()
    unwritable(monkeypatch)
    refused(sample.main, run(), "out_dir=.*cannot be written")
    refused(sample.main, [f"--ckpt={w.c10}", "--steps=1"], r"out_dir=.*c10/samples.*cannot be written")  # the default


def test_sample_cli_one_line(w):
    out = os.path.join(w.text, "samples")  # under a regular file
    assert "cannot be created" in one_line_error(["sample.py", f"--ckpt={w.c10}", f"--out_dir={out}"])


# --- nvs.py -----------------------------------------------------------------------

def test_nvs_values(w, tmp_path, refused, monkeypatch):
    out = tmp_path / "nvs"
    run = lambda *a, ckpt=w.posed: [f"--ckpt={ckpt}", f"--out_dir={out}", "--steps=1", "--device=cpu",
                                    "--n_targets=2", "--turntable_view=1", "--k=1"] + list(a)
    for argv, match in [
        (run("--k=0"), "k must be .*>= 1.*'0'"),
        (run("--k=a"), "k='a'"),
        (run("--k="), "k must be"),
        (run("--sampler=x"), "sampler"),
        (run("--n_targets=0"), "n_targets=0"),
        (run("--turntable_view=-1"), "turntable_view=-1"),
        (run("--guidance_z=1e999"), "guidance_z=inf"),
        (run("--schedule=nope"), "schedule='nope'"),
        (run("--k=4"), "k='4'.*4 views.*<= 3"),  # what the data has: 4 views of 1 held-out object
        (run("--k=1,5"), "k='1,5'.*<= 3"),
        (run("--n_targets=5"), "n_targets=5 .*<= 4"),
        (run("--turntable_object=1"), "turntable_object=1 .*1 held-out"),
        (run("--turntable_view=4"), "turntable_view=4 .*0..3"),
        (run(f"--data_dir={w.root}/nowhere"), "no Cars3D at .*nowhere"),
        (run(f"--data_dir={w.npz}"), r"cannot read .*cars3d_64\.npz' as an \.npz"),
        (run(ckpt=w.c10), "posed multi-view.*'cifar10'"),  # a model without poses
        (run(ckpt=w.unposed), "posed multi-view.*ray_freqs=0"),
        (run(ckpt=f"{w.root}/none.pt"), "no checkpoint at"),
        (run(ckpt=w.png), "not a torch.save file"),
        (run(f"--out_dir={w.text}/nvs"), "out_dir=.*cannot be created"),
    ]:
        refused(nvs.main, argv, match)
    assert not out.exists()
    unwritable(monkeypatch)  # nvs.json goes beside the checkpoint
    refused(nvs.main, run(), r"ckpt=.*posed/ckpt\.pt.*nvs\.json.*cannot be written")


def test_nvs_cli_one_line(w, tmp_path):
    out = tmp_path / "nvs"
    assert "posed multi-view" in one_line_error(["nvs.py", f"--ckpt={w.c10}", f"--out_dir={out}"], out)


# --- tools ------------------------------------------------------------------------

def test_loader_bench_arguments(monkeypatch, capsys):
    bench = tool("loader_bench")
    for args, match in [(["--n=x"], "argument --n: invalid int"), (["--n=0"], "--n=0"), (["--rounds=0"], "--rounds=0"),
                        (["--size=foo"], "--size='foo'"), (["--size=0x5"], "--size='0x5'"),
                        (["--batch=600"], "--batch=600 .*--n=500"), (["--nope"], "unrecognized arguments: --nope")]:
        monkeypatch.setattr(sys, "argv", ["loader_bench.py"] + args)
        with pytest.raises(SystemExit) as e:
            bench.main()
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and re.search(match, err[0]), err


def test_loader_bench_cli_one_line():
    assert "--size=" in one_line_error(["tools/loader_bench.py", "--size=big"])


def test_zusage_curve_inputs(w, tmp_path, refused):
    curve = tool("zusage_curve")
    run = tmp_path / "run"
    refused(lambda a: curve.main(*a), [run], "out_dir=.*is not a directory")
    run.mkdir()
    refused(lambda a: curve.main(*a), [run], "no kept checkpoints ckpt_<step>.pt.*--ckpt_keep=True")
    (run / "ckpt_000010.pt").write_bytes(open(w.c10, "rb").read())
    refused(lambda a: curve.main(*a), [run], r"cannot read .*log\.jsonl")
    (run / "log.jsonl").write_text('{"step": 10, "loss": 1.0}\nnot json\n')
    refused(lambda a: curve.main(*a), [run], r"log\.jsonl' line 2 is not a JSON record")
    (run / "log.jsonl").write_text('{"step": 10, "img_s": 5.0}\n')
    refused(lambda a: curve.main(*a), [run], r"no checkpoint at .*run/ckpt\.pt")
    assert sorted(os.listdir(run)) == ["ckpt_000010.pt", "log.jsonl"]


def test_schedules_path(w, tmp_path):
    sched = tool("schedules")
    assert sched.path_problem(str(tmp_path / "s.png")) == ""
    for path, match in [(tmp_path, "is a directory"), (tmp_path / "s.xyz", "must end in one of .*png"),
                        (tmp_path / "s", "must end in"), (tmp_path / "no" / "s.png", "no directory"),
                        (os.path.join(w.text, "s.png"), r"no directory .*notes\.txt")]:
        assert re.search(match, sched.path_problem(str(path)))
    err = one_line_error(["tools/schedules.py", os.path.join(w.text, "s.png")])
    assert "notes.txt" in err
    assert os.listdir(tmp_path) == []
