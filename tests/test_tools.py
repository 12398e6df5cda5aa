"""tools/: the GPU check's dry run on the CPU (tools/gpu_check.sh --dry-run: its code at tiny sizes,
so that the one call a GPU machine gets does not fail on a typo) and its per-item timeout; the
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

def test_dry_run_reports_every_item(tmp_path):
    # under the second CPU kernel set (tests/test_kernels.py): its items compare the same switches as
    # tests/test_train.py, which runs them under this CPU's own kernels, so both sets are checked
    kernels = os.environ.get("ATEN_CPU_CAPABILITY") or other_kernel_set()
    # PYTHON: this interpreter (the suite's venv, activated or not), not the first python on PATH
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", ATEN_CPU_CAPABILITY=kernels,
               PYTHON=sys.executable)
    r = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    items = s["items"]
    assert list(items) == list(gpu_check.ITEMS) and s["run"]["dry_run"] and s["run"]["children"][0]["rc"] == 0
    for name, res in items.items():
        assert res["pass"] in (True, False) or res["pass"] is None and res["skipped"], (name, res)
    # on the CPU the correctness items hold (tests/test_train.py measures the same switches)
    for name in ("bf16_vs_fp32", "compile_vs_eager", "channels_last_vs_nchw", "fused_adamw_vs_looped",
                 "samplers_deterministic", "resume_2_plus_2"):
        assert items[name]["pass"] is True, (name, items[name])
    assert items["resume_2_plus_2"]["bit_exact"] and not items["bf16_vs_fp32"]["bit_exact"]
    assert 0 < items["bf16_vs_fp32"]["loss_rel_diff"] < items["bf16_vs_fp32"]["loss_rel_step"]
    assert items["torchrun_vs_plain"]["pass"] is None  # CUDA only
    for name in gpu_check.ITEMS:
        if name.startswith("speed_"):
            assert items[name]["pass"] and items[name]["train_img_s"] > 0 and items[name]["sample_img_steps_s"] > 0
    assert items["speed_bf16_autocast"]["x_all_off"] > 0
    # learning: it ran; whether 4 steps beat random init is a measurement, not a requirement here
    assert items["learn_train"]["pass"] and items["learn_train"]["max_iters"] == 4
    learn = items["learn_linear_vs_random"]
    assert isinstance(learn["pass"], bool) and learn["top1_random_init"] >= 0
    assert len(items["learn_zusage"]["removed"]) == 8
    for png in ("learn_samples.png", "learn_zusage.png", "learn_curves.png"):
        assert (tmp_path / png).stat().st_size > 1000


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
