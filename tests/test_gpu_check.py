"""tools/gpu_check.sh --dry-run: the GPU check's code on the CPU at tiny sizes, so the one call a
GPU machine gets does not fail on a typo; and its per-item timeout."""
import importlib.util
import json
import os
import subprocess
import sys
import time

from test_kernels import other_kernel_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "tools", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


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
    assert isinstance(items["learn_linear_vs_random"]["pass"], bool) and items["learn_linear_vs_random"]["top1_random_init"] >= 0
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
