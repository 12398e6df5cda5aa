"""
The GPU check: in one call on one CUDA GPU (<= 8 minutes) everything a CPU cannot verify; with
--dry-run the same code on the CPU at tiny sizes (tests/test_tools.py).

    bash tools/gpu_check.sh OUT_DIR               # one CUDA GPU, ../shared/data/cifar10-subset
    bash tools/gpu_check.sh OUT_DIR --dry-run     # CPU, tiny models, a 120-image fixture in OUT_DIR

Three groups of items, in one child process (so the compile bench and the learning run reuse graphs
compiled before them); every item has its own alarm, and the child is killed at the budget's end.
A child killed or crashed inside an item fails that item, and a fresh child runs the rest.
OUT_DIR/summary.json is rewritten after every item, so a run cut short still reports what it did:
  correctness  bf16 autocast vs fp32, torch.compile vs eager, channels_last vs NCHW, fused vs
               looped AdamW (each alone against eager fp32, 4 steps of train.py), DDIM / DDPM under
               a torch.Generator, resume 2 + 2 == 4 steps, torchrun (1 process, nccl) == a plain run,
               grad_accum 2 == a batch twice the size, and where two GPUs are there, torchrun on both
               with compile and z_bn (skipped on one GPU)
  speed        bench.py per switch against all-off (as tools/bench.sh, one round):
               train img/s, MFU, peak memory, DDIM img-steps/s; then configs/imagenet.py as the 8-GPU
               command runs it (128 px, bf16, compile, channels_last) at batch 128, 64 and 32 per GPU:
               peak memory, img/s, MFU (an out-of-memory batch is a failed item that says so)
  learning     configs/cifar10.py for ~150 s (max_iters from the img/s just measured), then
               probe.py --task=linear against --random=True, and --task=zusage; PNGs copied here;
               the ImageNet folder path (the CIFAR-10 PNGs as train/ and val/): train.py
               --dataset=imagenet 60 steps, the streaming linear probe and kNN, extraction img/s
Every item is {"pass": true | false | null (skipped, with why), ...what was measured..., "tol", "why"}.
"""
import contextlib
import glob
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "..", "shared", "data", "cifar10-subset")
# child processes and their hard limits (GPU, seconds); speed and learning share one, so the learning
# run reuses the graph compiled for the bench of the same config (~1 minute less)
GROUPS = {"correctness": 200, "speed,learning": 400}
BUDGET = 470  # the whole GPU check, seconds; the learning run gets what is left, at most TRAIN_S
TRAIN_S = 90  # the learning run's training time, if the budget allows
LEARN_REST_S = 150  # what the learning group needs besides training: final eval, 3 probes, the PNGs, the folder path
ITEMS = ("bf16_vs_fp32", "compile_vs_eager", "channels_last_vs_nchw", "fused_adamw_vs_looped", "samplers_deterministic",
         "resume_2_plus_2", "torchrun_vs_plain", "grad_accum_vs_big_batch", "torchrun_2gpu_compile_zbn",
         "speed_all_off", "speed_bf16_autocast", "speed_fused_adamw", "speed_channels_last", "speed_compile",
         "speed_config",
         "imagenet_b128", "imagenet_b64", "imagenet_b32", "learn_train", "learn_linear_vs_random", "learn_zusage",
         "folder_imagenet_path")
CORRECTNESS = ITEMS[:ITEMS.index("speed_all_off")]
# the switches, as tools/bench.sh spells them: each alone on top of "all off"
OFF = ["--cpu_bf16=false", "--dtype=float32", "--compile=False", "--channels_last=False", "--fused_adamw=False"]
SWITCHES = {"bf16_autocast": ["--cpu_bf16=true", "--dtype=bfloat16"], "fused_adamw": ["--fused_adamw=True"],
            "channels_last": ["--channels_last=True"], "compile": ["--compile=True"]}
# --dry-run: the sizes differ, the code path does not. torch.compile's graph capture with the 'eager'
# backend: 'aot_eager' (+ AOT autograd, compared with eager in tests/test_train.py) takes 23 of the
# dry run's 56 s, 'eager' 8; on CUDA the backend is the config's (inductor)
TINY = ["--encoder=tiny", "--unet=tiny", "--z_dim=32", "--batch_size=8", "--n_val=20", "--threads=1",
        "--compile_backend=eager"]
TINY_BENCH = [a for a in TINY if not a.startswith("--n_val")]  # bench.py has no data split


# -----------------------------------------------------------------------------
# summary.json, written after every item

def summary(out):
    path = os.path.join(out, "summary.json")
    return json.load(open(path)) if os.path.exists(path) else {"run": {}, "items": {}}


def record(out, name, res):
    """One item's result (or, for name 'run', facts about the run) into summary.json, atomically."""
    s = summary(out)
    if name == "run":
        s["run"].update(res)
    else:
        s["items"][name] = res
    path = os.path.join(out, "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(s, f, indent=1)
    os.replace(path + ".tmp", path)


class Timeout(Exception):
    pass


def item(out, name, seconds, fn):
    """fn() -> dict with 'pass', recorded under `name`; an exception or more than `seconds` is
    recorded as a failure, and the next item runs. SIGALRM fires between Python calls; a hang
    inside one is the parent's to end (main: it kills this process and starts the rest afresh).
    An item already in summary.json (a process before this one did it) is not run again."""
    done = summary(out)["items"]
    if name in done:
        return done[name]
    record(out, "run", {"current": name, "current_until": time.time() + seconds})

    def on_alarm(*_):
        raise Timeout(f"over its {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    t = time.time()
    try:
        res = fn()
    except Exception as e:
        msg = (str(e).strip().splitlines() or [""])[-1][:300]
        res = {"pass": False, "error": f"{type(e).__name__}: {msg}"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    res["seconds"] = round(time.time() - t, 1)
    verdict = {True: "pass", False: "FAIL", None: "skipped"}[res["pass"]]
    print(f"{name}: {verdict} {json.dumps(res)[:300]}", flush=True)
    record(out, name, res)
    return res


# -----------------------------------------------------------------------------
# correctness: train.py runs of 4 steps, compared through their logs and checkpoints

def losses(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def compare(a_dir, b_dir):
    """Two runs of the same config -> how far apart: losses (max relative difference), model
    weights (max |a - b| and ||a - b|| / ||a - init||: the difference as a fraction of how far
    training moved the weights), and whether model, EMA and AdamW moments are bit-identical."""
    import torch
    import common
    la, lb = losses(a_dir), losses(b_dir)
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), map_location="cpu", weights_only=True) for d in (a_dir, b_dir))
    torch.manual_seed(a["config"]["seed"])  # train.py's init, rebuilt
    init = common.build_model(common.model_args(a["config"])).state_dict()
    w = [n for n, p in a["model"].items() if p.is_floating_point()]
    diff = math.sqrt(sum((a["model"][n] - b["model"][n]).double().pow(2).sum().item() for n in w))
    moved = math.sqrt(sum((a["model"][n] - init[n]).double().pow(2).sum().item() for n in w))
    moments = [(sa[k], sb[k]) for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
               for k in ("exp_avg", "exp_avg_sq")]
    same = all(torch.equal(a[k][n], b[k][n]) for k in ("model", "ema") for n in a[k]) and \
        all(torch.equal(x, y) for x, y in moments)
    return {"bit_exact": same and la == lb, "loss_a": la, "loss_b": lb,
            "loss_rel_diff": max(abs(x - y) / abs(x) for x, y in zip(la, lb)) if len(la) == len(lb) else None,
            "loss_rel_step": max(abs(x - y) / abs(x) for x, y in zip(la, la[1:])),  # the scale: what one step does
            "weight_max_abs_diff": max((a["model"][n] - b["model"][n]).abs().max().item() for n in w),
            "weight_rel_diff": diff / max(moved, 1e-30), "steps": (a["step"], b["step"])}


def judge(res, loss_tol, weight_tol, why, must_differ=False):
    """pass: the same number of steps, losses and weights within the tolerances (weight_tol None:
    the weights are reported, not judged) and, for a switch that changes the arithmetic, not
    bit-identical (it took effect)."""
    ok = res["steps"][0] == res["steps"][1] and res["loss_rel_diff"] is not None and \
        res["loss_rel_diff"] <= loss_tol and (weight_tol is None or res["weight_rel_diff"] <= weight_tol)
    if must_differ:
        ok = ok and not res["bit_exact"]
    return {"pass": bool(ok), **res, "tol": {"loss_rel": loss_tol, "weight_rel": weight_tol}, "why": why}


def load_cifar_once():
    """data.load_cifar10, memoised in this process: ~12 runs and probes would otherwise spend
    ~30 s decoding the same 5,085 PNGs again."""
    import data
    real, cached = data.load_cifar10, {}

    def load_once(*a, **k):
        key = repr((a, sorted(k.items())))
        if key not in cached:
            cached[key] = real(*a, **k)
        x, y, classes = cached[key]
        return x.clone(), y.clone(), classes
    data.load_cifar10 = load_once


@contextlib.contextmanager
def light_eval():
    """The correctness runs check training, not the end-of-run evaluation (the learning run does
    that in full): as tests/conftest.py's light_eval, z-usage on 2 noise levels and 8 images, no figures."""
    import torch
    import monitor
    import zusage
    real = zusage.z_usage, zusage.plot_z_usage, monitor.plot_curves

    def z_usage(model, x_0, logsnrs=None, **kw):
        kw = {k: v[:8] if torch.is_tensor(v) and len(v) == len(x_0) else v for k, v in kw.items()}
        return real[0](model, x_0[:8], logsnrs=(-3.0, 0.0), **kw)
    zusage.z_usage, zusage.plot_z_usage = z_usage, lambda res, path, title="": path
    monitor.plot_curves = lambda out_dir: None
    try:
        yield
    finally:
        zusage.z_usage, zusage.plot_z_usage, monitor.plot_curves = real


@contextlib.contextmanager
def no_dropout():
    """The UNet presets' dropout set to 0 for the correctness runs: under inductor, and for a
    channels_last tensor, dropout draws other masks than eager NCHW from the same seed; that is
    not an error, and it would hide the arithmetic these runs compare. (The bench and the learning
    run keep the presets as they are.)"""
    import model as M
    real = {k: v["dropout"] for k, v in M.PRESETS["unet"].items() if "dropout" in v}
    for k in real:
        M.PRESETS["unet"][k]["dropout"] = 0.0
    try:
        yield
    finally:
        for k, v in real.items():
            M.PRESETS["unet"][k]["dropout"] = v


def check_args(out, dry):
    """train.py's arguments for the 4-step correctness runs: configs/cifar10.py, all switches off.
    lr 1e-2 from warm-up step 1: the zero-initialised output moves, so a wrong op shows in the loss;
    warm-up 4 keeps the lr of steps 1-4 independent of max_iters (the resume runs 2, then 4)."""
    return [os.path.join(ROOT, "configs", "cifar10.py"), f"--data_dir={data_dir(out, dry)}", "--download=False",
            "--max_iters=4", "--warmup_iters=4", "--lr=1e-2", "--log_interval=1", "--eval_interval=0",
            "--ckpt_interval=100", "--eval_at_start=False", "--sample_steps=4"] + (TINY if dry else []) + OFF


def run_script(script, argv):
    """`python SCRIPT ARGV`, run in this process (one interpreter for every run: no start-up per
    run, graphs compiled once): the script's own command-line entry, so this check depends on what a
    user types, not on its functions. Its one-line error (sys.exit) becomes a RuntimeError."""
    import runpy
    saved = sys.argv
    sys.argv = [os.path.join(ROOT, script)] + list(argv)
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise RuntimeError(str(e.code)) from None
    finally:
        sys.argv = saved


def run_steps(out, dry, name, *flags):
    """A correctness run in this process -> its out_dir."""
    d = os.path.join(out, "runs", name)
    run_script("train.py", check_args(out, dry) + [f"--out_dir={d}", *flags])
    return d


def correctness(out, dry):
    import torch
    import common
    import diffusion as D
    cuda = torch.cuda.is_available() and not dry
    run = lambda name, *flags: run_steps(out, dry, name, *flags)
    ref = run("eager_fp32", "--overwrite=True")
    # Tolerances for the switches that change only float rounding (compile, channels_last, fused
    # AdamW), set between what rounding does and what the smallest bug does, both measured with this
    # check's own 4-step dry run on three kernel sets (ATEN_CPU_CAPABILITY=avx512 / avx2 / default,
    # on an Intel Xeon; an AMD EPYC with AVX2 only gave fused AdamW 1.45e-4), never on one CPU alone:
    #   rounding: loss_rel_diff <= 4e-6, weight_rel_diff <= 5.4e-4 (channels_last; fused AdamW
    #     0.9e-4 .. 1.9e-4 across the kernel sets). Adam divides each gradient entry by its own RMS,
    #     so an entry whose gradient is mostly rounding (behind a zero-initialised conv at step 1)
    #     takes a full lr step in a direction rounding picks: the weights move apart far more than
    #     the loss, and by an amount the CPU's kernels decide.
    #   the smallest bug tried: beta2 0.995 instead of 0.99 gives loss 5.8e-4, weights 4.3e-2; an
    #     lr 1% off gives 1.4e-3, 1.2e-1.
    # The bounds sit near the geometric middle of the two, ~10x from each. On CUDA the 'fp32'
    # reference runs convolutions and matmuls in TF32 (train.py allows it) and cudnn.benchmark may
    # pick other kernels per run, so the GPU bounds are looser; the measured figures are written
    # beside every verdict.
    loss_tol, weight_tol = (1e-3, 1e-2) if cuda else (5e-5, 5e-3)
    item(out, "bf16_vs_fp32", 120, lambda: judge(
        compare(ref, run("bf16", "--overwrite=True", *SWITCHES["bf16_autocast"])), 1e-2, None,
        "bf16 keeps 8 mantissa bits: the CPU dry run measured 1.6e-3 in the loss on the avx512, avx2 and default "
        "kernel sets; a wrong op moves the loss by ~10% a step. Weights not judged: Adam turns bf16's gradient "
        "rounding into full steps where a gradient is small (CPU dry run: 21-22% of the distance trained). Must "
        "not be bit-identical (autocast took effect)",
        must_differ=True))
    item(out, "compile_vs_eager", 240, lambda: judge(
        compare(ref, run("compile", "--overwrite=True", *SWITCHES["compile"])), loss_tol, weight_tol,
        "inductor fuses and reorders reductions: float rounding only" +
        ("" if cuda else " (dry run: dynamo's capture, eager backend)")))
    item(out, "channels_last_vs_nchw", 120, lambda: judge(
        compare(ref, run("channels_last", "--overwrite=True", *SWITCHES["channels_last"])), loss_tol,
        10 * weight_tol if cuda else weight_tol,
        "other conv kernels, other summation order; Adam turns rounding-noise gradients into full steps, so the "
        "weights get more room than the loss (bounds above)"))
    item(out, "fused_adamw_vs_looped", 120, lambda: judge(
        compare(ref, run("fused_adamw", "--overwrite=True", *SWITCHES["fused_adamw"])), loss_tol, weight_tol,
        "the same AdamW update in one kernel: float rounding only, which Adam carries into the weights as "
        "channels_last's does"))

    def samplers():
        net, _ = common.model_from_checkpoint(os.path.join(ref, "ckpt.pt"), "cuda" if cuda else "cpu")
        dev = next(net.parameters()).device
        x = torch.rand(4 if dry else 16, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev) * 2 - 1
        res = {"pass": True}
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):  # as the eval grid
            z = net.encode(x)
            for name, fn, steps in (("ddim", D.ddim, 2 if dry else 10), ("ddpm", D.ddpm, 3 if dry else 20)):
                a, b, c = (fn(net, z, x.shape, steps=steps, generator=torch.Generator(dev).manual_seed(s))
                           for s in (1, 1, 2))
                res[f"{name}_same_seed_max_diff"] = (a - b).abs().max().item()
                res[f"{name}_other_seed_max_diff"] = (a - c).abs().max().item()
                res["pass"] &= res[f"{name}_same_seed_max_diff"] <= 1e-5 < res[f"{name}_other_seed_max_diff"]
        return {**res, "tol": 1e-5, "why": "same Generator seed -> the same images (CUDA: same kernels in one "
                "process); another seed -> other images"}
    item(out, "samplers_deterministic", 60, samplers)

    def resume():
        split = run("split", "--overwrite=True", "--max_iters=2")
        run("split", "--init_from=resume")
        return judge(compare(ref, split), 0.0 if not cuda else 1e-4, 0.0 if not cuda else 1e-3,
                     "checkpoint holds weights, EMA, AdamW, RNG and data position: bit-exact on the CPU; on CUDA "
                     "cudnn.benchmark may choose other (equally exact) kernels in the resumed process, and some "
                     "backward kernels sum in a nondeterministic order, so rounding-level differences are allowed")
    item(out, "resume_2_plus_2", 120, resume)


def torchrun_train(out, dry, name, nproc, *flags, env=None, timeout=150):
    """`torchrun --nproc_per_node=NPROC train.py` (on a free port) with the correctness runs' arguments
    and flags -> (the finished process, its out_dir)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = os.path.join(out, "runs", name)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "train.py"] + check_args(out, dry) + [f"--out_dir={d}", "--overwrite=True", *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env), d


def ddp_check(out, dry):
    """torchrun, 1 process, against a plain run in this process; with the presets' dropout: rank 0
    of 1 draws the plain run's masks (a micro-step seeds dropout by step and slot, the same slots)."""
    import torch
    cuda = torch.cuda.is_available() and not dry

    def torchrun():
        if dry:  # ~12 s of two more interpreters; tests/test_train.py runs 2 gloo processes against 1
            return {"pass": None, "skipped": "dry run: torchrun is run on CUDA only (nccl); the gloo path is "
                    "tests/test_train.py::test_ddp_two_processes_equal_one"}
        ref = run_steps(out, dry, "plain", "--overwrite=True")
        r, d = torchrun_train(out, dry, "torchrun", 1, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if r.returncode:
            return {"pass": False, "error": r.stderr.strip()[-600:]}
        return judge(compare(ref, d), 1e-4 if cuda else 0.0, 1e-3 if cuda else 0.0,
                     f"DDP over 1 process ({'nccl' if cuda else 'gloo'}) averages one gradient: the plain run's "
                     "arithmetic; on CUDA kernel choice and atomics may differ between processes")
    item(out, "torchrun_vs_plain", 170, torchrun)

    def accum():
        # z_bn standardises each micro-step's rows (its statistics are per micro-batch): off for this
        # comparison; the presets' dropout is off too (its masks are drawn per micro-batch of batch_size rows)
        b = 4 if dry else 256
        with no_dropout():
            big = run_steps(out, dry, "batch_2x", "--overwrite=True", "--z_bn=False", f"--batch_size={2 * b}")
            acc = run_steps(out, dry, "accum_2", "--overwrite=True", "--z_bn=False", f"--batch_size={b}",
                            "--grad_accum=2")
        tol = (1e-3, 1e-2) if cuda else (5e-5, 5e-3)
        return judge(compare(big, acc), *tol, f"{b} x 2 micro-steps sum the gradients of the same {2 * b} rows, views "
                     "and noise as one batch of 2b: float rounding only (the correctness bounds)")
    item(out, "grad_accum_vs_big_batch", 120, accum)

    def two_gpus():
        if dry or torch.cuda.device_count() < 2:
            return {"pass": None, "skipped": "one GPU here" if not dry else "dry run: tests/test_train.py runs 2 gloo "
                    "processes with compile and z_bn (--multiprocess)"}
        t = time.time()
        r, d = torchrun_train(out, dry, "torchrun_2gpu", 2, "--compile=True", "--z_bn=True", "--batch_size=128",
                              "--eval_interval=4", timeout=200)
        if r.returncode:
            return {"pass": False, "error": r.stderr.strip()[-600:]}
        loss = losses(d)
        return {"pass": len(loss) == 4 and all(map(math.isfinite, loss)) and "deprecated" not in r.stderr,
                "losses": loss, "seconds_with_compile": round(time.time() - t, 1),
                "why": "2 processes, nccl, compiled, z_bn all-reduced in forward and backward: 4 steps, an "
                       "evaluation on rank 0 and a checkpoint, no hang and no deprecation warning"}
    item(out, "torchrun_2gpu_compile_zbn", 220, two_gpus)


# -----------------------------------------------------------------------------
# speed: bench.py per switch (synthetic images), as tools/bench.sh does it

def speed(out, dry):
    import gc
    import torch
    base = [os.path.join(ROOT, "configs", "cifar10.py")] + \
        (TINY_BENCH + ["--iters=2", "--warmup=1", "--sample_steps=2", "--sample_n=4"] if dry else
         ["--iters=10", "--warmup=3"])  # warm-up: compilation happens in the first step
    settings = {"all_off": OFF, **{k: OFF + v for k, v in SWITCHES.items()}, "config": []}
    for name, flags in settings.items():
        def bench(name=name, flags=flags):
            cuda = torch.cuda.is_available()
            left = torch.cuda.memory_allocated() / 2**30 if cuda else None  # counted in peak_mem_gb too
            run_script("bench.py", base + flags + [f"--out_dir={os.path.join(out, 'bench', name)}"])
            with open(os.path.join(out, "bench", name, "bench.json")) as f:
                res = json.load(f)
            off = summary(out)["items"].get("speed_all_off", {}).get("train_img_s")
            x = res["train_img_s"] / off if off else None
            return {"pass": res["train_img_s"] > 0 and res["sample_s"] > 0, "x_all_off": x,
                    **{k: res[k] for k in ("train_img_s", "mfu", "peak_mem_gb", "sample_s", "sample_img_steps_s",
                                           "data_img_s", "device", "batch_size")}, "mem_at_start_gb": left}
        gc.collect()  # the models of the runs before, before this one measures its peak memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        item(out, f"speed_{name}", 200 if name in ("compile", "config") else 60, bench)
    imagenet(out, dry)


def imagenet(out, dry):
    """configs/imagenet.py as the 8-GPU command runs it, one GPU's share: 128 px, bf16, compile,
    channels_last, at batch 128 (the config's), 64 and 32; compiled once for 128, then once more
    with a dynamic batch (dynamo's automatic dynamic shapes) for the other two."""
    import gc
    import torch
    for b in (128, 64, 32):
        def bench(b=b):
            d = os.path.join(out, "bench", f"imagenet_b{b}")
            argv = [os.path.join(ROOT, "configs", "imagenet.py"), f"--out_dir={d}", "--iters=5", "--warmup=2",
                    "--sample_n=8", "--sample_steps=4"] + \
                (TINY_BENCH + ["--image_size=32", f"--batch_size={b // 32}", "--z_dim=64"] if dry
                 else [f"--batch_size={b}"])
            try:
                run_script("bench.py", argv)
            except torch.cuda.OutOfMemoryError as e:
                return {"pass": False, "oom": True, "batch_size": b, "error": str(e).splitlines()[0][:300]}
            with open(os.path.join(d, "bench.json")) as f:
                res = json.load(f)
            return {"pass": res["train_img_s"] > 0, **{k: res[k] for k in ("train_img_s", "mfu", "peak_mem_gb",
                    "gflop_per_img", "sample_s", "device", "batch_size", "compile", "channels_last", "dtype")},
                    "why": "one GPU's share of torchrun --nproc_per_node=8 train.py configs/imagenet.py: does batch "
                           f"{b} fit, how fast (8 GPUs x 128 is the paper's 1,024)"}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        item(out, f"imagenet_b{b}", {128: 200, 64: 120, 32: 60}[b], bench)


# -----------------------------------------------------------------------------
# learning: the config as it is, for the time the budget leaves; probes; the PNGs

def probe(out, name, *argv):
    """`python probe.py ARGV` (as run_script runs train.py) -> the result it writes to OUT/learn/NAME.json."""
    path = os.path.join(out, "learn", f"{name}.json")
    run_script("probe.py", [*argv, f"--out={path}"])
    with open(path) as f:
        return json.load(f)


def learning(out, dry, deadline):
    d = os.path.join(out, "learn")
    bench = summary(out)["items"].get("speed_config", {})
    train_s = max(20.0, min(TRAIN_S, deadline - time.time() - LEARN_REST_S))
    if dry:
        iters = 4
    elif bench.get("train_img_s"):  # the img/s the bench just measured for this config (its compiled graph is reused)
        iters = max(100, int(train_s * bench["train_img_s"] / bench["batch_size"]))
    else:
        iters = 1000
    argv = [os.path.join(ROOT, "configs", "cifar10.py"), f"--data_dir={data_dir(out, dry)}", "--download=False",
            f"--out_dir={d}", "--overwrite=True", f"--max_iters={iters}", f"--warmup_iters={max(1, iters // 10)}",
            "--eval_interval=0", f"--ckpt_interval={max(1, iters // 4)}", "--eval_at_start=False",
            f"--log_interval={max(1, iters // 20)}"] + (TINY + ["--sample_steps=4"] if dry else [])

    def run_train():
        t = time.time()
        run_script("train.py", argv)
        log = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
        loss = [r["loss"] for r in log if "loss" in r]
        ev = [r for r in log if "zgap" in r][-1]
        for src, dst in ((f"samples_{iters:06d}.png", "learn_samples.png"), ("zusage.png", "learn_zusage_eval.png"),
                         ("curves.png", "learn_curves.png")):
            shutil.copyfile(os.path.join(d, src), os.path.join(out, dst))
        # 4 dry-run steps of a v-weighted loss are noise (the loss depends on the drawn noise levels):
        # there the run only has to finish with finite losses; on the GPU it has to learn
        return {"pass": all(map(math.isfinite, loss)) and (dry or loss[-1] < loss[0]), "max_iters": iters,
                "wall_s": round(time.time() - t, 1), "loss_first": loss[0], "loss_last": loss[-1],
                "img_s": [r["img_s"] for r in log if "img_s" in r][-1],
                "mfu": [r.get("mfu") for r in log if "loss" in r][-1],
                "knn": ev.get("knn"), "zgap": ev["zgap"], "grid": "learn_samples.png"}
    # a run cut short by its alarm (a compile the bench did not leave behind: ~1 min) still leaves the
    # checkpoint of its last quarter for the probes
    item(out, "learn_train", int(train_s) + 150, run_train)
    ckpt = os.path.join(d, "ckpt.pt")

    def linear():
        a = probe(out, "probe_linear", f"--ckpt={ckpt}", "--task=linear")
        b = probe(out, "probe_linear_random", f"--ckpt={ckpt}", "--task=linear", "--random=True")
        return {"pass": a["top1"] > b["top1"], "top1": a["top1"], "top1_random_init": b["top1"],
                "top5": a["top5"], "top5_random_init": b["top5"], "why": "pass: above the same encoder at random init"}
    item(out, "learn_linear_vs_random", 90, linear)

    def zusage():
        r = probe(out, "probe_zusage", f"--ckpt={ckpt}", "--task=zusage")
        shutil.copyfile(r["plot"], os.path.join(out, "learn_zusage.png"))
        return {"pass": r["removed_mean"] > 0, "removed_at_-3": r["removed_at_-3"], "removed_mean": r["removed_mean"],
                "removed": r["removed"], "logsnr": r["logsnr"], "plot": "learn_zusage.png",
                "why": "pass: z lowers the decoder's x0 error on average over log-SNR -6..+2"}
    item(out, "learn_zusage", 60, zusage)
    folder_path(out, dry)


def folder_path(out, dry):
    """The ImageNet code path on real images: the CIFAR-10 PNGs laid out as an ImageNet folder
    (train/ and val/ links), train.py --dataset=imagenet for a few dozen steps (its evaluation reads
    the folder), then probe.py's streaming linear probe (features extracted and cached) and kNN (read
    from that cache): extraction img/s and each probe's seconds."""
    root = os.path.join(out, "folder_imagenet")
    os.makedirs(root, exist_ok=True)
    for split, name in (("train", "train"), ("test", "val")):
        if not os.path.exists(os.path.join(root, name)):
            os.symlink(os.path.abspath(os.path.join(data_dir(out, dry), split)), os.path.join(root, name))
    d, iters, workers = os.path.join(out, "folder_run"), 4 if dry else 60, "0" if dry else "8"
    argv = ["--dataset=imagenet", f"--data_dir={root}", "--image_size=32", f"--out_dir={d}", "--overwrite=True",
            f"--max_iters={iters}", f"--eval_interval={iters if dry else iters // 2}", "--warmup_iters=1",
            f"--log_interval={iters // 4}",
            f"--num_workers={workers}", "--sample_steps=4"] + (TINY if dry else ["--batch_size=64"])

    def run():
        t = time.time()
        run_script("train.py", argv)
        train_s = time.time() - t
        log = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
        evs = [r for r in log if "knn" in r]
        ck = f"--ckpt={os.path.join(d, 'ckpt.pt')}"
        lin = probe(out, "folder_linear", ck, "--task=linear", f"--num_workers={workers}")
        knn = probe(out, "folder_knn", ck, "--task=knn", f"--num_workers={workers}")
        shutil.copyfile(os.path.join(d, "curves.png"), os.path.join(out, "folder_curves.png"))
        cached = knn["extract_img_s"] == {}  # the kNN read the features the linear probe extracted
        return {"pass": len(evs) == (2 if dry else 3) and cached and (dry or lin["top1"] > 10), "max_iters": iters,
                "train_s": round(train_s, 1),
                "knn_in_training": [r["knn"] for r in evs], "z_removed_mean": [r["z_removed_mean"] for r in evs],
                "eval_s": [r["eval_s"] for r in evs],
                "extract_img_s": lin["extract_img_s"], "linear_s": lin["task_s"], "knn_s": knn["task_s"],
                "knn_read_cache": cached, "linear_top1": lin["top1"], "linear_top5": lin["top5"],
                "knn_top1": knn["top1"],
                "curves": "folder_curves.png",
                "why": "pass: the run evaluates at start, middle and end (the dry run: start and end); the kNN reads "
                       "the linear probe's cached features; on the GPU the linear probe is above chance (10%)"}
    item(out, "folder_imagenet_path", 60 if dry else 120, run)


# -----------------------------------------------------------------------------

def data_dir(out, dry):
    """The GPU run reads the shared CIFAR-10 subset; the dry run a 10-class x 12 + 3 PNG fixture."""
    if not dry:
        return DATA
    root = os.path.join(out, "fixture_cifar")
    if not os.path.isdir(root):
        import numpy as np
        from PIL import Image
        rs = np.random.RandomState(0)
        for split, n in (("train", 12), ("test", 3)):
            for c in range(10):
                os.makedirs(os.path.join(root, split, f"class{c}"))
                for i in range(n):
                    img = (rs.rand(32, 32, 3) * 60 + c * 19).astype(np.uint8)  # class-dependent colour
                    Image.fromarray(img).save(os.path.join(root, split, f"class{c}", f"{i}.png"))
    return root


def run_child(out, dry, deadline, grace=30):
    """The three groups in one child process (the learning run and the compile bench then reuse
    graphs compiled before them), in a process group of its own. Killed, with its torchrun children, at
    the deadline, or when an item is `grace` s past its own limit (its alarm could not fire: a hang
    inside a C call). -> its return code, or 'killed'."""
    cmd = [sys.executable, os.path.abspath(__file__), out, "--child", f"--deadline={deadline}"] + \
        (["--dry-run"] if dry else [])
    p = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    while True:
        try:
            return p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            until = summary(out)["run"].get("current_until") or math.inf
            if time.time() > min(deadline, until + grace):
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return "killed"


def main(argv):
    dry = "--dry-run" in argv
    args = [a for a in argv if not a.startswith("--")]
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    if len(args) != 1:
        sys.exit("usage: bash tools/gpu_check.sh OUT_DIR [--dry-run]")
    out = os.path.abspath(args[0])
    if "--child" in argv:  # the groups; each skips the items a killed process before it finished
        import warnings
        import torch
        warnings.filterwarnings("ignore", message=".*partial copy")  # the shared subset is one
        if dry:
            torch.set_num_threads(1)
        if not dry and not torch.cuda.is_available():
            sys.exit("error: no CUDA device here; on a CPU run the dry run: bash tools/gpu_check.sh OUT_DIR --dry-run")
        record(out, "run", {"torch": torch.__version__, "device": "cpu (dry run: tiny sizes)" if dry else
                            f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPUs"})
        load_cifar_once()
        if not all(k in summary(out)["items"] for k in CORRECTNESS):
            with light_eval():
                with no_dropout():
                    correctness(out, dry)
                ddp_check(out, dry)
        speed(out, dry)
        learning(out, dry, float(opts["deadline"]))
        return

    os.makedirs(out, exist_ok=True)
    for p in glob.glob(os.path.join(out, "*.png")) + glob.glob(os.path.join(out, "summary.json")):
        os.remove(p)
    t0 = time.time()
    deadline = t0 + (300 if dry else BUDGET)  # dry: the test's own timeout is the real bound
    record(out, "run", {"dry_run": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": BUDGET,
                        "children": []})
    for _ in ITEMS:  # a child killed or crashed on an item: that item fails, a fresh child runs the rest
        if deadline - time.time() < (5 if dry else 60):
            break
        rc = run_child(out, dry, deadline)
        s = summary(out)
        cur = s["run"].get("current")
        record(out, "run", {"children": s["run"]["children"] + [{"rc": rc, "last_item": cur}]})
        if rc == 0 or cur is None or cur in s["items"]:
            break  # finished, or it failed outside an item (no CUDA, ...): a new process would do the same
        how = "hung: killed past the item's limit or the deadline" if rc == "killed" else f"crashed (rc {rc})"
        record(out, cur, {"pass": False, "error": f"the process {how} in this item"})
    children = summary(out)["run"]["children"]
    for name in ITEMS:  # never reached
        if name not in summary(out)["items"]:
            why = "the time budget ran out first" if children[-1]["rc"] in (0, "killed") else \
                f"the check's process failed outside any item (rc {children[-1]['rc']}; its output says why)"
            record(out, name, {"pass": False, "error": f"not reached: {why}"})
    record(out, "run", {"seconds": round(time.time() - t0, 1), "current": None, "current_until": None})
    s = summary(out)
    failed = [k for k, r in s["items"].items() if r["pass"] is False]
    n_pass = sum(r["pass"] is True for r in s["items"].values())
    print(f"gpu_check: {n_pass}/{len(s['items'])} items pass ({len(s['items']) - n_pass - len(failed)} skipped) in "
          f"{s['run']['seconds']:.0f} s; {os.path.join(out, 'summary.json')}" +
          (f"\nfailed: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
