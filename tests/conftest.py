import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One intra-op thread: these tests use tiny tensors, and with more threads a busy 2-core machine
# (e.g. a training run alongside) makes OpenMP spin and the suite ~10x slower.
torch.set_num_threads(1)


def tiny_soda(**kw):
    """SODA (DiffSiam where a DiffSiamConfig field is given) of the tiny presets, with no training
    dropout of z or pose unless asked for: tests that draw it say so."""
    import dataclasses

    import diffsiam
    import model as M
    kw = {"p_mask_layer": 0.0, "p_uncond": 0.0, "p_uncond_pose": 0.0, **kw}
    if set(kw) - {f.name for f in dataclasses.fields(M.SODAConfig)}:
        return diffsiam.DiffSiam(diffsiam.DiffSiamConfig(**kw))
    return M.SODA(M.SODAConfig(**kw))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (e.g. the full inductor compile, ~150 s on 2 cores)")
    parser.addoption("--multiprocess", action="store_true", default=False,
                     help="also run tests marked multiprocess (torchrun with 2 gloo processes, ~60 s on 2 cores; "
                          ".ci/run runs them after the suite)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test, skipped unless pytest is given --runslow")
    config.addinivalue_line("markers", "numerics: compares two code paths to float rounding; tests/test_kernels.py "
                            "runs these again under a second CPU kernel set")
    config.addinivalue_line("markers", "multiprocess: starts torchrun (2 gloo processes); skipped unless pytest is "
                            "given --multiprocess")
    config.addinivalue_line("markers", "full_eval: keep train.main's full end-of-run evaluation (see light_eval)")


# the longest tests start first, so that with two processes the others fill the time around them
# (longest-first scheduling) instead of one long test starting last and running alone
LONGEST_FIRST = ("test_gpu_check.py::test_dry_run_reports_every_item",
                 "test_train.py::test_torchrun_sigterm_saves_and_resumes_on_another_process_count",
                 "test_train.py::test_ddp_two_processes_equal_one",
                 "test_train.py::test_compiled_step_equals_eager", "test_train.py::test_imagenet_config_builds_and_steps")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("/")[-1], len(rank)))  # stable: the rest keep their order
    for marker, option in (("slow", "--runslow"), ("multiprocess", "--multiprocess")):
        if not config.getoption(option):
            skip = pytest.mark.skip(reason=f"{marker}: run with {option}")
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip)


def lighten_eval(mp):
    """The real zusage.z_usage on 2 noise levels and 8 images, and no z-usage figure (see light_eval)."""
    import zusage

    real = zusage.z_usage

    def z_usage(model, x_0, logsnrs=None, **kw):
        n = min(8, len(x_0))
        kw = {k: v[:n] if isinstance(v, torch.Tensor) and len(v) == len(x_0) else v for k, v in kw.items()}
        return real(model, x_0[:n], logsnrs=(-3.0, 0.0), **kw)

    mp.setattr(zusage, "z_usage", z_usage)
    mp.setattr(zusage, "plot_z_usage", lambda res, path, title="": path)


@pytest.fixture
def light_eval(request, monkeypatch):
    """train.main evaluates at the end of every run; for these tiny runs that costs ~1.6 s, most of
    it the z-usage curve (8 noise levels) and its matplotlib figure, which only the smoke test reads.
    Modules that use this fixture get the real zusage.z_usage on 2 levels and 8 images, and no
    figure; a test marked full_eval keeps the real evaluation."""
    if "full_eval" not in request.keywords:
        lighten_eval(monkeypatch)
