"""The command-line contract of train.py, probe.py, sample.py and nvs.py: every input is checked
before any work, and a bad value, file or combination is one ConfigError / CheckpointError /
DataError whose message is one line naming the key or the file, with nothing written (no out_dir, no
JSON beside the checkpoint, no figure). Each script's main() is called in-process on tiny checkpoints
and data (conftest.py's w and refused); one run per script checks what a user sees: one stderr line
`error: ...` and a non-zero exit. Also config-file mistakes naming the file and line, and a second
train.py into a live run's out_dir refused (the run lock)."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import configurator
import nvs
import probe
import runtime
import sample
import train
from conftest import ROOT, base_args, one_line_error, state, unreadable_images


# --- train.py -------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, match", [
    ("--batch_size=0", "batch_size=0"), ("--max_iters=0", "max_iters=0"), ("--lr=0", "lr=0.0"),
    ("--lr=nan", "lr=nan"), ("--p_uncond=1.5", "p_uncond=1.5"), ("--crop_min=0", "crop_min=0.0"),
    ("--image_size=30", "multiple of 8"), ("--views=foo", "views='foo'"), ("--aug=foo", "aug='foo'"),
    ("--cond=foo", "cond='foo'"), ("--agg=foo", "agg='foo'"), ("--schedule=foo", "schedule='foo'"),
    ("--prediction=eps2", "prediction='eps2'"), ("--weighting=x", "weighting='x'"),
    ("--dataset=mnist", "dataset='mnist'"),
    ("--encoder=huge", "encoder='huge'"), ("--unet=huge", "unet='huge'"), ("--device=tpu", "device='tpu'"),
    ("--dataset=cars3d", "needs data_dir"), ("--pretrained=/no/such.pt", "pretrained='/no/such.pt'"),
    ("--init_from=latest", "init_from='latest'"), ("--batch_size=1.5", "batch_size"),
    ("--bottleneck=False", "the model cannot be built"),
])
def test_bad_value_is_refused_before_any_work(tmp_path, flag, match):
    out = tmp_path / "out"
    with pytest.raises(train.ConfigError, match=match) as e:
        train.main([f"--out_dir={out}", flag])
    assert "\n" not in str(e.value) and not out.exists()


def unwritable(monkeypatch):
    """As a read-only directory behaves (tests may run as root, whom permissions do not stop)."""
    def mkdtemp(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(configurator.tempfile, "mkdtemp", mkdtemp)


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_train_values(w, tmp_path, refused):
    out = tmp_path / "run"
    args = lambda **kw: base_args(w.cifar, kw.pop("out_dir", out), **{"n_val": 5, "batch_size": 4, "max_iters": 1,
                                                                      "z_dim": 16, **kw})
    for kw, match in [
        (dict(batch_size=0.5), "batch_size"),  # wrong type
        (dict(compile=1), "compile"),
        (dict(lr=0.0), r"lr=0\.0 .*> 0"),  # out of range
        (dict(max_iters=0), "max_iters=0"),
        (dict(ckpt_keep_last=0), "ckpt_keep_last=0"),
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
        (dict(dataset="cars3d", data_dir=w.cars, image_size=16, ray_freqs=2, k_max=4),
         "k_max=4 .*4 view\\(s\\).*another one, the target"),
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


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
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


def one_line(cmd, match):
    r = subprocess.run([sys.executable] + cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(err) == 1 and err[0].startswith("error:") and match in err[0], r.stderr[-2000:]


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_train_cli_one_line(w, tmp_path):
    out = tmp_path / "run"
    err = one_line_error(["train.py", f"--data_dir={w.badsize}", f"--out_dir={out}", "--threads=1"], out)
    assert "40x40" in err


@pytest.mark.usefixtures("light_eval")
def test_missing_data_dir_gives_one_line(tmp_path):
    one_line(["train.py", f"--data_dir={tmp_path / 'nope'}", f"--out_dir={tmp_path / 'o'}"],
                   "no CIFAR-10 found")


@pytest.mark.usefixtures("light_eval")
def test_wrong_image_size_gives_one_line(cifar_dir, tmp_path):
    one_line(["train.py", f"--data_dir={cifar_dir}", "--image_size=64", f"--out_dir={tmp_path}"],
                   "32x32")


def test_config_file_mistakes_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("lr = 1e-3\nbatch_size = = 3\n")
    one_line(["train.py", str(bad), f"--out_dir={tmp_path / 'o'}"], f"config file '{bad}', line 2")
    bad.write_text("lr = 1e-3\n\nz_dim = zdim * 2\n")
    with pytest.raises(train.ConfigError, match="line 3: NameError"):
        train.configure([str(bad)], train.DEFAULTS)
    assert not (tmp_path / "o").exists()
    assert "episodes=0" in one_line_error(["probe.py", "--episodes=0"])  # their __main__, in this process
    assert "schedule='cosin'" in one_line_error(["sample.py", "--schedule=cosin"])


# --- probe.py -------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
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
        ([ck, "--task=dci", "--dataset=dsprites", f"--data_dir={w.root}"],
         "dSprites images are 64x64.*image_size is 32"),
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


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_probe_cli_one_line(w):
    assert "task='nope'" in one_line_error(["probe.py", f"--ckpt={w.c10}", "--task=nope"])


@pytest.mark.usefixtures("light_eval")
def test_corrupted_checkpoint_gives_one_line(tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(train.CheckpointError, match="corrupted"):
        train.load_checkpoint(str(bad))
    one_line(["probe.py", f"--ckpt={bad}"], "corrupted")


# --- sample.py ------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
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


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_sample_cli_one_line(w):
    out = os.path.join(w.text, "samples")  # under a regular file
    assert "cannot be created" in one_line_error(["sample.py", f"--ckpt={w.c10}", f"--out_dir={out}"])


def test_sample_of_images_none_readable_is_one_line(w, tmp_path):
    unreadable_images(tmp_path / "mine")
    out = tmp_path / "own"
    err = one_line_error(["sample.py", f"--ckpt={w.c10}", "--mode=recon", f"--images={tmp_path / 'mine'}",
                          f"--out_dir={out}", "--steps=1"], out)
    assert "images=" in err and "not one of its 4 image files can be read (cannot read image file" in err


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_cli_missing_checkpoint_is_one_line(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={tmp_path / 'none.pt'}"], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: no checkpoint at {str(tmp_path / 'none.pt')!r}"]


# --- nvs.py ---------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
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


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_nvs_cli_one_line(w, tmp_path):
    out = tmp_path / "nvs"
    assert "posed multi-view" in one_line_error(["nvs.py", f"--ckpt={w.c10}", f"--out_dir={out}"], out)


# --- two runs into one out_dir: the run lock ------------------------------------------------------

def test_a_second_run_into_a_live_out_dir_is_refused(cifar_dir, tmp_path):
    """A live run holds out_dir/run.lock (its pid) from its first write: a second train.py into the
    same out_dir (scratch with --overwrite, or a resume) is refused in one line and touches nothing;
    the first run's log and checkpoint come out whole; a lock whose process is gone is stale. And a
    warning (a partial CIFAR-10 copy) is one plain line, without our file names or source."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py"] + base_args(cifar_dir, out, max_iters=12, ckpt_interval=6),
                             cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = out / "run.lock"
    for _ in range(600):  # its first write, after data and model are set up
        if lock.exists() and lock.read_text().strip() or first.poll() is not None:
            break
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second could meet it"
    assert lock.read_text().strip() == str(first.pid)
    for kw in (dict(overwrite=True), dict(init_from="resume")):
        with pytest.raises(train.ConfigError, match=rf"in use by a live run \(pid {first.pid}"):
            train.main(base_args(cifar_dir, out, max_iters=2, **kw))
    assert first.poll() is None, "the second run was refused after the first had finished"
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, 13)) and state(out / "ckpt.pt")["step"] == 12
    assert not lock.exists()  # released at the end
    warning = [line for line in stderr.splitlines() if "partial copy" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: CIFAR-10 train: found 120 of 50,000"), stderr[-2000:]
    assert "data.py" not in stderr and "load_cifar10(" not in stderr  # no file name, no source line
    # a stale lock: its process has ended
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(str(gone.pid))
    assert runtime.lock_holder(str(out)) is None
    path = runtime.take_lock(str(out))
    assert lock.read_text() == str(os.getpid())
    runtime.release_lock(path)
    assert not lock.exists()
