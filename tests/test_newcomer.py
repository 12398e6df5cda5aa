"""A newcomer's machine: CPU autocast chosen from the CPU's flags, CIFAR-10 found by a
search order (or downloaded), readable progress / grids / curves, every bad input one line before
anything is written, resume refusing keys that change the run, and Ctrl-C / SIGTERM stopping with a
checkpoint that resumes bit-exactly."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from test_train import ROOT, base_args, cifar_dir, run_train, state  # noqa: F401  (cifar_dir: a fixture)
import data  # noqa: E402
from test_inputs import one_line_error  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402


# --- cpu_bf16='auto' ---------------------------------------------------------------

@pytest.mark.parametrize("machine, line, native", [
    ("x86_64", "flags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni", True),
    ("x86_64", "flags\t\t: fpu sse amx_tile amx_bf16", True),
    ("x86_64", "flags\t\t: fpu sse avx2 avx512f", False),
    ("aarch64", "Features\t: fp asimd sve bf16 i8mm", True),
    ("aarch64", "Features\t: fp asimd", False),
])
def test_native_bf16_is_read_from_cpuinfo(tmp_path, machine, line, native):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\n{line}\n\n")
    ok, why = runtime.cpu_native_bf16(str(info), machine)
    assert ok == native
    assert (why.startswith(("avx512_bf16", "amx_bf16", "bf16")) if native else why.startswith("no native bf16"))
    assert runtime.cpu_native_bf16(str(tmp_path / "none"), "x86_64")[0] is False  # no /proc/cpuinfo: fp32


def test_cpu_bf16_setting(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: (True, "avx512_bf16 in /proc/cpuinfo"))
    assert runtime.cpu_autocast("auto") == (True, "avx512_bf16 in /proc/cpuinfo")
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: (False, "no native bf16: mocked"))
    assert runtime.cpu_autocast("auto")[0] is False
    assert runtime.cpu_autocast("True")[0] is True and runtime.cpu_autocast("false")[0] is False
    with pytest.raises(train.ConfigError, match="cpu_bf16='maybe'.*'auto', 'true', 'false'"):
        train.validate(dict(train.DEFAULTS, cpu_bf16="maybe"))


def test_no_config_forces_cpu_bf16():
    configs = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "configs")) for f in fs if f.endswith(".py")]
    for path in configs:
        assert train.configure([path], train.DEFAULTS)["cpu_bf16"] == "auto", path


# --- finding CIFAR-10 ----------------------------------------------------------------

def fake_cifar_records(root, n=20):
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    rs = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({"data": rs.randint(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rs.randint(0, 10, n))}, f)
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_search_order(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert data.find_cifar10("mine") == ("mine", "data_dir", False)
    path, why, dl = data.find_cifar10("")
    assert (path, dl) == ("data/cifar10", True) and "download" in why
    fake_cifar_records(tmp_path / "shared" / "data" / "cifar10-subset")
    assert data.find_cifar10("")[::2] == ("../shared/data/cifar10-subset", False)
    fake_cifar_records(work / "data" / "cifar10")
    assert data.find_cifar10("")[::2] == ("data/cifar10", False)


def test_download_into_data_cifar10(tmp_path, monkeypatch):
    """No ./data/cifar10, no ../shared: the search ends in a torchvision download (mocked: no network)."""
    import torchvision
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda self: fake_cifar_records(self.root))
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity",
                        lambda self: os.path.isdir(os.path.join(self.root, self.base_folder)))
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_load_meta",  # its md5 check would fail on fake files
                        lambda self: setattr(self, "classes", [f"c{i}" for i in range(10)]))
    path, _, dl = data.find_cifar10("")
    with pytest.warns(UserWarning, match="found 20 of 10,000 images"):
        x, y, classes = data.load_cifar10(path, "test", dl)
    assert x.shape == (20, 3, 32, 32) and os.path.isfile(tmp_path / "data/cifar10/cifar-10-batches-py/test_batch")

    def offline(self):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(data.DataError, match="could not download CIFAR-10 to 'elsewhere'") as e:
        data.load_cifar10("elsewhere", "test", True)
    assert "\n" not in str(e.value)


def test_unreadable_image_names_the_file(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / split / "cat" / "0.png")
    (tmp_path / "train" / "cat" / "1.png").write_bytes(b"not a png")
    with pytest.raises(data.DataError, match="1.png") as e:
        data.load_cifar10(str(tmp_path), "train", n_val=0)
    assert "\n" not in str(e.value)
    with pytest.raises(data.DataError, match="1.png"):
        data.FolderData(str(tmp_path / "train"), 32)[1]


# --- bad inputs: one line, nothing written --------------------------------------------

@pytest.mark.parametrize("flag, match", [
    ("--batch_size=0", "batch_size=0"), ("--max_iters=0", "max_iters=0"), ("--lr=0", "lr=0.0"),
    ("--lr=nan", "lr=nan"), ("--p_uncond=1.5", "p_uncond=1.5"), ("--crop_min=0", "crop_min=0.0"),
    ("--image_size=30", "multiple of 8"), ("--views=foo", "views='foo'"), ("--aug=foo", "aug='foo'"),
    ("--cond=foo", "cond='foo'"), ("--agg=foo", "agg='foo'"), ("--schedule=foo", "schedule='foo'"),
    ("--prediction=eps2", "prediction='eps2'"), ("--weighting=x", "weighting='x'"), ("--dataset=mnist", "dataset='mnist'"),
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


def one_line(cmd, match):
    r = subprocess.run([sys.executable] + cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(err) == 1 and err[0].startswith("error:") and match in err[0], r.stderr[-2000:]


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


# --- a run: progress lines, grid, curves; resume refusals; overwrite ---------------------

def test_run_resume_rules_and_overwrite(cifar_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_native_bf16", lambda: (False, "no native bf16: mocked"))
    out = tmp_path / "run"
    run_train(base_args(cifar_dir, out, max_iters=2, eval_interval=2, cpu_bf16="auto"))
    printed = capsys.readouterr()
    assert "CPU autocast: fp32 (no native bf16: mocked)" in printed.out
    assert "step 1/2 | loss" in printed.out and "img/s | elapsed 00:00:" in printed.out
    assert "\r" not in printed.err + printed.out  # not a terminal: no bar updates
    grid = Image.open(out / "samples_000002.png")
    assert grid.size == (3 * (96 + 2) + 2, 8 * (96 + 2) + 2 + 14)  # 8 rows of source | target | sample
    assert os.path.getsize(out / "curves.png") > 5000
    log = (out / "log.jsonl").read_text()

    # a scratch run into it: refused, nothing touched
    with pytest.raises(train.ConfigError, match="already holds ckpt.pt.*--init_from=resume.*--overwrite=True"):
        train.main(base_args(cifar_dir, out, max_iters=2))
    assert (out / "log.jsonl").read_text() == log
    # a resume that changes the model or the data order: refused, naming old and new values
    with pytest.raises(train.ConfigError, match=r"with seed=0 \(now 1\)"):
        train.main(base_args(cifar_dir, out, init_from="resume", batch_size=4, seed=1))
    # another global batch: refused, naming both and a split that keeps it
    with pytest.raises(train.ConfigError, match=r"global batch of 8 \(1 process x batch_size=8 x grad_accum=1\), "
                       r"this run's is 4 \(1 process x batch_size=4 x grad_accum=1\).*--batch_size=4 --grad_accum=2"):
        train.main(base_args(cifar_dir, out, init_from="resume", batch_size=4))
    with pytest.raises(train.ConfigError, match="z_dim=32 \\(now 64\\)"):
        train.main(base_args(cifar_dir, out, init_from="resume", z_dim=64))
    # keys that may change: how long, how often, where to log
    train.main(base_args(cifar_dir, out, init_from="resume", max_iters=3, log_interval=3, eval_interval=0,
                         ckpt_interval=3, threads=1, num_workers=0, sample_steps=3))
    assert state(out / "ckpt.pt")["step"] == 3
    run_train(base_args(cifar_dir, out, max_iters=1, overwrite=True))
    assert state(out / "ckpt.pt")["step"] == 1 and '"step": 2' not in (out / "log.jsonl").read_text()


# --- Ctrl-C / SIGTERM -------------------------------------------------------------------

@pytest.fixture(scope="module")
def four_steps(cifar_dir, tmp_path_factory):
    """The uninterrupted run the signal tests resume against."""
    out = tmp_path_factory.mktemp("full")
    with pytest.warns(UserWarning, match="partial copy"):
        train.main(base_args(cifar_dir, out))
    return state(out / "ckpt.pt")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_with_a_checkpoint_that_resumes_bit_exactly(cifar_dir, tmp_path, monkeypatch, capsys, sig,
                                                                  four_steps):
    args = lambda out, **kw: base_args(cifar_dir, out, **kw)
    before = signal.getsignal(sig)
    real_loss = train.D.loss

    def loss_then_signal(*a, **k):  # the signal arrives in the middle of step 1
        loss_then_signal.calls += 1
        if loss_then_signal.calls == 2:
            os.kill(os.getpid(), sig)
        return real_loss(*a, **k)
    loss_then_signal.calls = 0
    monkeypatch.setattr(train.D, "loss", loss_then_signal)
    run_train(args(tmp_path / "split"))
    monkeypatch.undo()
    assert state(tmp_path / "split" / "ckpt.pt")["step"] == 2  # step 1 finished, then saved and stopped
    assert f"stopped by {sig.name} after step 2" in capsys.readouterr().out
    assert signal.getsignal(sig) is before  # the handlers are restored
    run_train(args(tmp_path / "split", init_from="resume"))
    a, b = four_steps, state(tmp_path / "split" / "ckpt.pt")
    assert a["step"] == b["step"] == 4
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after the signal and resume"


# --- two runs into one out_dir ------------------------------------------------------------

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
