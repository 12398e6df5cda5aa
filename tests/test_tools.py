"""tools/: the GPU check's dry run on the CPU (tools/gpu_check.sh --dry-run: its code at tiny sizes,
so that the one call a GPU machine gets does not fail on a typo), without the data folder and then
the items that need it, its options, its per-item timeout and its killing of a process group; the
arguments of tools/loader_bench.py, tools/zusage_curve.py and tools/schedules.py, refused in one
line; the schedule figure."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, one_line_error
from test_kernels import other_kernel_set


def tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_check = tool("gpu_check")


# --- tools/gpu_check.py ---------------------------------------------------------------------------

def dry_run(out, *args, timeout=300):
    """`bash tools/gpu_check.sh OUT --dry-run ARGS` -> summary.json. Under the second CPU kernel set
    (tests/test_kernels.py): the correctness items compare the same switches as tests/test_train.py,
    which runs them under this CPU's own kernels, so both sets are checked."""
    kernels = os.environ.get("ATEN_CPU_CAPABILITY") or other_kernel_set()
    # PYTHON: this interpreter (the suite's venv, activated or not), not the first python3 on PATH
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", ATEN_CPU_CAPABILITY=kernels,
               PYTHON=sys.executable)
    r = subprocess.run(["bash", "tools/gpu_check.sh", str(out), "--dry-run", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


def test_dry_run_without_data_runs_every_other_item(tmp_path):
    # the acceptance of a box that has only the repository: the data items skipped with why, all others pass
    s = dry_run(tmp_path, "--data_dir=/nonexistent")
    items = s["items"]
    assert list(items) == list(gpu_check.ITEMS) and s["run"]["dry_run"] and s["run"]["children"][0]["rc"] == 0
    assert s["run"]["data_found"] is False and s["run"]["torch"] and "cuda" in s["run"]
    for name in gpu_check.NEEDS_DATA:
        assert items[name]["pass"] is None and "no CIFAR-10 at /nonexistent" in items[name]["skipped"], items[name]
        assert "data/cifar10-subset" in items[name]["skipped"] and "--data_dir" in items[name]["skipped"]
    by_design = {"imagenet_train_b64": "batch 128 fits", "torchrun_vs_plain": "CUDA only",
                 "torchrun_2gpu_compile_zbn": "dry run"}
    for name, why in by_design.items():
        assert items[name]["pass"] is None and why in items[name]["skipped"], (name, items[name])
    for name in set(gpu_check.ITEMS) - set(gpu_check.NEEDS_DATA) - set(by_design):
        assert items[name]["pass"] is True, (name, items[name])
    # on the CPU the correctness items hold (tests/test_train.py measures the same switches)
    assert items["resume_2_plus_2"]["bit_exact"] and not items["bf16_vs_fp32"]["bit_exact"]
    assert 0 < items["bf16_vs_fp32"]["loss_rel_diff"] < items["bf16_vs_fp32"]["loss_rel_step"]
    for name in gpu_check.ITEMS:
        if name.startswith("speed_"):
            assert items[name]["train_img_s"] > 0 and items[name]["sample_img_steps_s"] > 0
    assert items["speed_bf16_autocast"]["x_all_off"] > 0 and items["speed_config"]["x_config_eager"] > 0
    # the ImageNet path under torchrun (gloo here), its loader's workers and what the wrapper measured
    im = items["imagenet_train_b128"]
    assert im["backend"] == "gloo" and im["loader_workers"] == 2 and len(im["losses"]) == 3, im
    for k in ("img_s_with_loader", "img_s_step_alone", "loader_img_s", "peak_mem_gb", "first_interval_s", "eval_s",
              "ckpt_gb"):
        assert im[k] > 0, (k, im)
    assert (tmp_path / "imagenet_jpegs" / "train").is_dir() and (tmp_path / "logs" / "imagenet_train_b128.log").exists()


def test_dry_run_items_that_need_data(tmp_path):
    # --only: the four items the first dry run skipped, here on the generated stand-in for the subset
    s = dry_run(tmp_path, "--only=learn_zusage,learn_linear_vs_random,folder_imagenet_path", timeout=240)
    items = s["items"]
    assert list(items) == list(gpu_check.NEEDS_DATA) and s["run"]["data_found"] is True
    # learning: it ran; whether 4 steps beat random init is a measurement, not a requirement here
    assert items["learn_train"]["pass"] and items["learn_train"]["max_iters"] == 4
    linear = items["learn_linear_vs_random"]
    assert isinstance(linear["pass"], bool) and linear["top1_random_init"] >= 0
    assert len(items["learn_zusage"]["removed"]) == 8
    assert items["folder_imagenet_path"]["pass"] and items["folder_imagenet_path"]["knn_read_cache"]
    for png in ("learn_samples.png", "learn_zusage.png", "learn_curves.png", "folder_curves.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_options_and_what_an_item_builds_on(capsys):
    assert gpu_check.selection(["learn_zusage"]) == ["learn_train", "learn_zusage"]
    assert gpu_check.selection(["imagenet_train_b64", "bf16_vs_fp32"]) == \
        ["imagenet_train_b128", "imagenet_train_b64", "eager_fp32_reference", "bf16_vs_fp32"]
    assert gpu_check.selection([]) == list(gpu_check.ITEMS)
    out, dry, child, opts, only = gpu_check.parse(["o", "--dry-run", "--data_dir=d", "--only=learn_train"])
    assert dry and not child and opts["data_dir"] == os.path.abspath("d") and only == ["learn_train"]
    for argv, match in [(["o", "--data-dir=d"], "unknown option --data-dir"), (["o", "--dryrun"], "unknown option"),
                        (["o", "--only=nope"], "no item 'nope'"), ([], "one OUT_DIR")]:
        with pytest.raises(SystemExit, match=match):
            gpu_check.parse(argv)


def test_a_command_over_its_time_is_killed_with_its_process_group(tmp_path):
    # as a torchrun past its limit: the launcher and every worker it started, so none keeps the GPU
    pid_file = tmp_path / "worker.pid"
    cmd = ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]
    t = time.time()
    with pytest.raises(gpu_check.Timeout):
        gpu_check.run_group(str(tmp_path), cmd, 1.5, str(tmp_path / "logs" / "slow.log"))
    assert time.time() - t < 5
    worker = int(pid_file.read_text())
    for _ in range(50):  # gone, or a zombie waiting for its new parent to reap it
        state = open(f"/proc/{worker}/stat").read().split()[2] if os.path.exists(f"/proc/{worker}") else "gone"
        if state in ("gone", "Z"):
            break
        time.sleep(0.1)
    assert state in ("gone", "Z"), state
    assert json.loads((tmp_path / "summary.json").read_text())["run"]["group"] is None


def test_an_item_over_its_time_fails_and_the_next_runs(tmp_path):
    t = time.time()
    res = gpu_check.item(str(tmp_path), "slow", 1, lambda: time.sleep(5) or {"pass": True})
    assert time.time() - t < 3 and res["pass"] is False and "Timeout" in res["error"]
    assert gpu_check.item(str(tmp_path), "next", 5, lambda: {"pass": True, "x": 1})["pass"] is True
    again = gpu_check.item(str(tmp_path), "next", 5, lambda: {"pass": False})  # already done: not run again
    assert again["x"] == 1
    s = json.loads((tmp_path / "summary.json").read_text())
    assert set(s["items"]) == {"slow", "next"} and s["run"]["current"] == "next"


# --- tools/loader_bench.py, tools/zusage_curve.py, tools/schedules.py -----------------------------

@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
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


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_loader_bench_cli_one_line():
    assert "--size=" in one_line_error(["tools/loader_bench.py", "--size=big"])


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
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


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
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


def test_plot_schedules_writes_png(tmp_path):
    """tools/schedules.py, the figure of docs/schedules.png."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("schedules", os.path.join(ROOT, "tools", "schedules.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path = tmp_path / "s.png"
    tool.plot_schedules(path, n=20_000)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000


@pytest.mark.filterwarnings("ignore:.*partial copy:UserWarning")
def test_contrastive_yardstick_trains_and_probe_measures_it(cifar_dir, tmp_path):
    """tools/contrastive.py on the tiny CIFAR-10 with the teaching config's keys: 3 SimCLR steps, a
    checkpoint marked as contrastive whose encoder moved from train.py's init of the same config and
    whose other weights did not; probe.py measures it (linear, kNN: a finite top-1); --minutes stops
    at the first step past the time; a second run into the same out_dir is refused in one line."""
    import math

    import torch

    import common
    import configurator
    import probe
    clr = tool("contrastive")
    out = tmp_path / "clr"
    args = [os.path.join(ROOT, "configs", "cifar10_cpu.py"), f"--data_dir={cifar_dir}", "--n_val=20", "--z_dim=32",
            "--batch_size=16", "--threads=1", "--cpu_bf16=false", "--log_interval=2"]
    stats = clr.main(args + ["--steps=3", f"--out_dir={out}"])
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["trained_by"] == "contrastive" and ck["step"] == stats["steps"] == 3
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [2, 3]
    torch.manual_seed(ck["config"]["seed"])
    init = common.build_model(ck["model_args"]).state_dict()
    moved = {k for k in init if not torch.equal(init[k], ck["ema"][k])}
    assert moved and all(k.startswith("encoder.") for k in moved), sorted(moved)
    for task in ("linear", "knn"):
        res = probe.main([f"--ckpt={out / 'ckpt.pt'}", f"--task={task}", "--num_workers=0"])
        assert math.isfinite(res["top1"]) and res["step"] == 3
    assert clr.main(args + ["--minutes=0.0001", f"--out_dir={tmp_path / 'timed'}"])["steps"] == 1
    with pytest.raises(configurator.ConfigError, match="already holds ckpt.pt"):
        clr.main(args + ["--steps=3", f"--out_dir={out}"])


def test_yardstick_queues_runs_probes_and_tables_mean_and_sd(tmp_path, capsys, monkeypatch):
    """tools/yardstick.py with its commands faked (no training): SODA's minutes are its log's intervals'
    images over their img/s; SimCLR is given the first recipe's minutes at the same steps and seed and
    tabled with its own clock; a run stopped short of its steps is not 'done', gets no probe and no
    SimCLR beside it; the table has mean +- sd over seeds, yardstick.json and the plot are written;
    an unknown argument, recipe or a boolean other than True/False is refused in one line."""
    ys = tool("yardstick")
    calls = []

    def fake_sh(cmd, log):  # what train.py, contrastive.py and probe.py would write
        calls.append(cmd)
        flags = dict(c[2:].split("=", 1) for c in cmd if c.startswith("--"))
        if cmd[1] == "probe.py":
            seed = int(flags["ckpt"].split("-s")[-1][0])
            top1 = 39.0 if "random" in flags else 40.0 + seed + (flags["features"] == "pool")
            open(flags["out"], "w").write(json.dumps({"top1": top1 + 5 * ("simclr-" in flags["ckpt"])}))
        elif cmd[1] == "train.py":
            seed, steps = int(flags["seed"]), int(flags["max_iters"])
            last = steps if seed < 2 else steps // 2  # seed 2: stopped by a signal, exit 0
            recs = [{"step": k, "loss": 1.0, "img_s": 64.0 / (1 + seed)} for k in range(20, last + 1, 20)]
            open(os.path.join(flags["out_dir"], "log.jsonl"), "w").write("".join(json.dumps(r) + "\n" for r in recs))
        else:
            seconds = 60 * float(flags["minutes"]) + 0.5
            open(os.path.join(flags["out_dir"], "log.jsonl"), "w").write(json.dumps({"step": 7, "seconds": seconds}))
        return True

    monkeypatch.setattr(ys, "sh", fake_sh)
    ys.main(["--steps=40", "--seeds=0,1,2", "--recipes=identical", "--jobs=2", f"--out={tmp_path}"])
    table = capsys.readouterr().out
    # seed 0: 40 steps x 64 images at 64 img/s = 40 s; seed 1 at 32 img/s: 80 s
    assert "| identical | 40 | 1.00 +- 0.47 | 40.50 +- 0.71 | 41.50 +- 0.71 | 2 |" in table, table
    assert "| simclr | 40 | 1.01 +- 0.47 | 45.50 +- 0.71 | 46.50 +- 0.71 | 2 |" in table, table
    assert "| random init | - | - | 39.00 | 39.00 |" in table
    assert "stopped at step 20 of 40" in table and "no SimCLR run beside" in table
    budgets = sorted(float(dict(c[2:].split("=", 1) for c in cmd if c.startswith("--"))["minutes"])
                     for cmd in calls if cmd[1] == "tools/contrastive.py")
    assert [round(b, 4) for b in budgets] == [0.6667, 1.3333]  # the first recipe's minutes, seeds 0 and 1
    assert not (tmp_path / "identical-40-s2" / "done").exists()
    assert not list((tmp_path / "identical-40-s2").glob("probe_*"))
    saved = json.load(open(tmp_path / "yardstick.json"))
    assert saved["table"]["simclr"]["40"]["z"] == [45.0, 46.0]
    assert (tmp_path / "yardstick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    n = len(calls)  # a second call trains and probes nothing new but the stopped run
    ys.main(["--steps=40", "--seeds=0,1,2", "--recipes=identical", f"--out={tmp_path}"])
    assert [c[1] for c in calls[n:]] == ["train.py"]
    ys.main(["--steps=40", "--seeds=0,1,2", "--recipes=identical", "--plot_only=True", f"--out={tmp_path}"])
    assert len(calls) == n + 1
    for bad in ("--recipes=nope", "--stepz=3", "--plot_only=true", "--steps=x"):
        with pytest.raises(SystemExit, match="usage: python tools/yardstick.py"):
            ys.main([bad])
