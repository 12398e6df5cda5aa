"""runtime.py: whether this CPU computes in bf16 natively (read from /proc/cpuinfo), and the
cpu_bf16 setting. The out_dir lock (runtime.lock_holder, take_lock, release_lock) is tested from
the command line, in tests/test_cli.py's test_a_second_run_into_a_live_out_dir_is_refused."""
import os

import pytest

import runtime
import train
from conftest import ROOT


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


def test_an_older_torch_than_requirements_allow_is_refused_in_one_line(monkeypatch, tmp_path):
    for version in ("2.6.0", "2.6.0+cu124", "2.14.1+cu130", "3.0.0a0"):
        runtime.check_torch(version)
    older = r"torch 2\.5\.1\+cu121 is older than this code needs \(2\.6 or newer\)"
    with pytest.raises(runtime.ConfigError, match=older):
        runtime.check_torch("2.5.1+cu121")
    floor = ".".join(map(str, runtime.TORCH_MIN))
    assert any(line.startswith(f"torch>={floor}") for line in open(os.path.join(ROOT, "requirements.txt")))
    monkeypatch.setattr(runtime.torch, "__version__", "2.1.2")
    with pytest.raises(runtime.ConfigError, match="torch 2.1.2 is older"):
        train.main([f"--out_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())
