"""
The GPU check: in one call on one CUDA GPU (<= 8 minutes) what a CPU cannot verify; with --dry-run the
same code on the CPU at tiny sizes (tests/test_tools.py).

    bash tools/gpu_check.sh OUT_DIR                    # one CUDA GPU
    bash tools/gpu_check.sh OUT_DIR --data_dir=DIR     # the CIFAR-10 subset from another folder
    bash tools/gpu_check.sh OUT_DIR --dry-run          # the CPU, tiny models, generated images
    bash tools/gpu_check.sh OUT_DIR --only=NAME,...    # those items (and the ones they build on)

Data. Only the learning items and folder_imagenet_path read real images: the CIFAR-10 subset, from
--data_dir, else DATA_DIRS (../shared/data/cifar10-subset next to the repository, else
data/cifar10-subset inside it). Where it is missing they are recorded as skipped, with why, and all
the others run: the ImageNet items read generated JPEGs, the correctness runs a generated folder in
CIFAR-10's layout, the speed items synthetic tensors. The dry run's default data is that generated
folder.

Processes. Every item has its own time limit and its own failure boundary, in this order:
  imagenet     configs/imagenet.py through train.py under `torchrun --nproc_per_node=1` (DDP, nccl),
               DataLoader workers on a folder of generated 500 x 375 JPEGs, 128 px, bf16, compile,
               channels_last, batch 128 (the config's, one GPU's share of 8): peak memory of training,
               img/s fed by the loader, img/s of the step alone (the loader's batch repeated, the same
               compiled graph), the loader alone (its workers, no training) and MFU; batch 64 where 128
               does not fit. Each run is a fresh process group (its own compile, static shapes, as the
               8-GPU command compiles it), killed whole at its limit.
  correctness  4 steps of train.py, the small presets on the generated folder: bf16 autocast,
               torch.compile, channels_last, fused AdamW each against an eager fp32 reference, DDIM /
               DDPM under a torch.Generator, resume 2 + 2 == 4 steps, grad_accum 2 == a batch twice the
               size
  speed        bench.py, configs/cifar10.py on synthetic images: all switches off, each switch alone,
               the config eager and as it is (compiled): train img/s, MFU, peak memory, DDIM img-steps/s
  learning     configs/cifar10.py on the CIFAR-10 subset for what the budget leaves (<= TRAIN_S), then
               probe.py --task=linear against --random=True, and --task=zusage; PNGs copied here
  torchrun     1 process with nccl == the eager fp32 reference; on 2 GPUs, both with compile and z_bn
  folder       the CIFAR-10 PNGs as an ImageNet folder: train.py --dataset=imagenet 30 steps, the
               streaming linear probe and the kNN, extraction img/s
The ImageNet items run from this process; the others in one child process (a hang or a crash fails
its item, and a fresh child runs the rest), where torch._dynamo.reset() comes before a config
compiled for the first time (a config's runs share its graph). OUT_DIR/summary.json is rewritten after
every item, so a run cut short still reports what it did; OUT_DIR/logs/ holds the torchrun logs.
Every item is {"pass": true | false | null (skipped, with why), ...what was measured..., "tol", "why"}.
"""
import contextlib
import glob
import json
import math
import os
import signal
import shutil
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# the CIFAR-10 subset (PNGs, train/ and test/) where --data_dir names none: the shared folder, else a copy
# of it inside the repository (data/ is git-ignored)
DATA_DIRS = (os.path.join(ROOT, "..", "shared", "data", "cifar10-subset"), os.path.join(ROOT, "data", "cifar10-subset"))
BUDGET = 470  # the whole check, seconds (the call allows 8 minutes: 10 s for start-up and the summary)
TRAIN_S = 60  # the learning run's training time, if the budget allows (at least 20 s)
# what the items after the learning run's training need, at the H100 estimates below: its final evaluation
# and checkpoint 15, the probes 30, torchrun_vs_plain 20, folder_imagenet_path 25
LEARN_REST_S = 90

# The items in their order, with their time limits on the GPU (seconds). The estimates are for a bare
# H100 box with 16 cores and cold compile caches, none measured yet. Each torch.compile is a cold
# inductor compile of a forward + backward, assumed ~40-70 s for configs/cifar10.py; the others scaled by
# the size of the forward graph dynamo captures (FX nodes, counted on this CPU with a counting backend):
# configs/imagenet.py 1,486 against 1,317, ~1.1x, plus a graph split at each of DDP's buckets: ~60-120 s;
# the small presets 756, ~0.6x: ~20-40 s. A fresh process (import torch, CUDA's context) ~10 s. At the
# middle of those ranges: 5 (the device facts) + 125 (ImageNet) + 10 (the child) + 84 (correctness) + 110
# (speed) = 334 s before the learning run, which then trains for what is left after LEARN_REST_S:
# 470 - 334 - 90 = 46 s (20-60 s); the rest is 15 + 30 (learning) + 20 (torchrun) + 25 (folder) = 90 s.
# Slower compiles shorten the training to 20 s, then cut the end of the list (reported "not reached"),
# never the ImageNet figures, which come first. The limits end an item that hangs. The dry run takes
# the same limits.
ITEMS = {
    "imagenet_train_b128": 240,  # 125: torchrun + imports 10, 1,100 JPEGs 2, setup 5, compile 60-120, 40
    # steps 10, the loader alone 2, the evaluation 5, the 2.2 GB checkpoint 8
    "imagenet_train_b64": 200,  # 0: runs only where batch 128 is out of memory (then ~125)
    "eager_fp32_reference": 60,  # 15 (+ 10: the child's start), CUDA's first kernels, cudnn.benchmark
    "bf16_vs_fp32": 45,  # 5
    "compile_vs_eager": 120,  # 35: a cold compile of the small presets
    "channels_last_vs_nchw": 45,  # 5
    "fused_adamw_vs_looped": 45,  # 5
    "samplers_deterministic": 45,  # 3
    "resume_2_plus_2": 60,  # 8
    "grad_accum_vs_big_batch": 60,  # 8
    "speed_all_off": 60,  # 8 each: bench.py, batch 512, 10 + 3 steps, 64 images x 50 DDIM steps
    "speed_bf16_autocast": 60,  # 8
    "speed_fused_adamw": 60,  # 8
    "speed_channels_last": 60,  # 8
    "speed_config_eager": 60,  # 8
    "speed_config": 150,  # 70: a cold compile of configs/cifar10.py (the learning run reuses it)
    "learn_train": 90,  # + its training time (20-60 s): 15 for the evaluation and the checkpoint
    "learn_linear_vs_random": 90,  # 20
    "learn_zusage": 60,  # 10
    "torchrun_vs_plain": 120,  # 20: torchrun, two more interpreters, nccl; against the reference run
    "torchrun_2gpu_compile_zbn": 220,  # 0 on one GPU (two: ~100, a cold compile in each process)
    "folder_imagenet_path": 120,  # 25
}
IMAGENET = ("imagenet_train_b128", "imagenet_train_b64")  # run from this process, each under torchrun
CORRECTNESS = ("eager_fp32_reference", "bf16_vs_fp32", "compile_vs_eager", "channels_last_vs_nchw",
               "fused_adamw_vs_looped", "samplers_deterministic", "resume_2_plus_2", "grad_accum_vs_big_batch")
NEEDS_DATA = ("learn_train", "learn_linear_vs_random", "learn_zusage", "folder_imagenet_path")
# what an item builds on: --only adds it
BUILDS_ON = {**{k: "eager_fp32_reference" for k in CORRECTNESS[1:] + ("torchrun_vs_plain",)},
             "imagenet_train_b64": "imagenet_train_b128",
             "learn_linear_vs_random": "learn_train", "learn_zusage": "learn_train"}
SELECTED = None  # the items this process runs (--only, with what they build on); None: all
# the switches, as tools/bench.sh spells them: each alone on top of "all off"
OFF = ["--cpu_bf16=false", "--dtype=float32", "--compile=False", "--channels_last=False", "--fused_adamw=False"]
SWITCHES = {"bf16_autocast": ["--cpu_bf16=true", "--dtype=bfloat16"], "fused_adamw": ["--fused_adamw=True"],
            "channels_last": ["--channels_last=True"], "compile": ["--compile=True"]}
# --dry-run: the sizes differ, the code path does not. torch.compile's graph capture with the 'eager'
# backend: 'aot_eager' (+ AOT autograd, compared with eager in tests/test_train.py) took 23 of the
# dry run's 56 s, 'eager' 8; on CUDA the backend is the config's (inductor)
TINY = ["--encoder=tiny", "--unet=tiny", "--z_dim=32", "--batch_size=8", "--n_val=20", "--threads=1",
        "--compile_backend=eager"]
TINY_BENCH = [a for a in TINY if not a.startswith("--n_val")]  # bench.py has no data split
# the correctness runs on the GPU: the small presets (the op types of configs/cifar10.py's model:
# basic-block ResNet, GroupNorm, attention, z modulation) in ~0.6x its graph and a 20th of its parameters
SMALL = ["--encoder=small", "--unet=small", "--z_dim=128", "--batch_size=128", "--n_val=100"]
# the ImageNet run: steps, log interval, the log step after which the loader's batch is repeated (the
# intervals before it: compile, then the loader; after it: the step alone), batches the loader alone is timed
IMAGENET_RUN = {"dry": dict(steps=6, log=2, swap=4, loader_batches=4, size=(100, 75), per_class=(6, 1)),
                "gpu": dict(steps=40, log=8, swap=24, loader_batches=40, size=(500, 375), per_class=(100, 10))}


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
    else:  # in the check's order, whenever each was recorded
        s["items"][name] = res
        rank = {k: i for i, k in enumerate(ITEMS)}
        s["items"] = {k: s["items"][k] for k in sorted(s["items"], key=lambda k: rank.get(k, len(ITEMS)))}
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
    An item already in summary.json (a process before this one did it, or it was skipped for want of
    data) is not run again, nor one that --only leaves out (-> None)."""
    done = summary(out)["items"]
    if name in done:
        return done[name]
    if SELECTED is not None and name not in SELECTED:
        return None
    seconds = max(1, int(seconds))
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
# processes: a command in a process group of its own, killed whole

def kill_group(pgid):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_group(out, cmd, timeout, log, env=None):
    """cmd (torchrun and its workers) in a new session, its output into `log`; the whole group is
    killed when it ends, however it ends (its limit, this item's alarm, an exception), so no worker
    keeps the GPU. Its group id sits in summary.json while it runs: a parent that kills this process
    kills that group too. -> the return code."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        record(out, "run", {"group": p.pid})
        try:
            return p.wait(timeout=max(1, timeout))
        except subprocess.TimeoutExpired:
            raise Timeout(f"{os.path.basename(log)}: over its {int(timeout)} s; killed") from None
        finally:
            kill_group(p.pid)
            p.wait()
            record(out, "run", {"group": None})


def log_tail(log, n=600):
    with open(log, errors="replace") as f:
        return f.read()[-n:].strip()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, script, argv):
    """`torchrun --nproc_per_node=NPROC SCRIPT ARGV` with this interpreter, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", script] + list(argv)


# -----------------------------------------------------------------------------
# generated images: a CIFAR-10-layout folder (the correctness runs; the dry run's data) and ImageNet JPEGs

def cifar_fixture(out, dry):
    """OUT/fixture_cifar: train/ and test/ of 10 classes of 32 x 32 PNGs, noise in a class's colour;
    12 + 3 per class in the dry run, 30 + 3 on the GPU (batch 128 after 100 held out)."""
    root = os.path.join(out, "fixture_cifar")
    if not os.path.isdir(root):
        import numpy as np
        from PIL import Image
        tmp = root + ".part"
        shutil.rmtree(tmp, ignore_errors=True)
        rs = np.random.RandomState(0)
        for split, n in (("train", 12 if dry else 30), ("test", 3)):
            for c in range(10):
                os.makedirs(os.path.join(tmp, split, f"class{c}"))
                for i in range(n):
                    img = (rs.rand(32, 32, 3) * 60 + c * 19).astype(np.uint8)  # class-dependent colour
                    Image.fromarray(img).save(os.path.join(tmp, split, f"class{c}", f"{i}.png"))
        os.rename(tmp, root)
    return root


def write_jpeg(job):
    """One photograph-like JPEG: a gradient in its class's colour, noise, a bright disc at a random place."""
    import numpy as np
    from PIL import Image
    path, w, h, c, seed = job
    rs = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    hue = np.array([(c * 67) % 256, (c * 151) % 256, (c * 29 + 80) % 256], np.float32)
    noise = rs.standard_normal((h, w, 3), dtype=np.float32)  # float32: half the time of float64, most of the cost
    img = hue * 0.6 + np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 100 + noise * 20
    cy, cx, r = rs.random() * h, rs.random() * w, (0.1 + 0.2 * rs.random()) * min(w, h)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 60
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def imagenet_folder(out, dry):
    """OUT/imagenet_jpegs: ImageNet's layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG), 10 classes of
    generated JPEGs at ImageNet's typical size (500 x 375; 100 x 75 in the dry run), in a pool of
    processes (1,100 files of ~93 kB, ~15 ms each on one core)."""
    root = os.path.join(out, "imagenet_jpegs")
    if os.path.isdir(root):
        return root
    import multiprocessing
    p = IMAGENET_RUN["dry" if dry else "gpu"]
    (w, h), tmp, jobs = p["size"], root + ".part", []
    shutil.rmtree(tmp, ignore_errors=True)
    for split, n in zip(("train", "val"), p["per_class"]):
        for c in range(10):
            d = os.path.join(tmp, split, f"n{c:08d}")
            os.makedirs(d)
            jobs += [(os.path.join(d, f"{split}_{c}_{i}.JPEG"), w, h, c, len(jobs)) for i in range(n)]
    with multiprocessing.Pool(min(16, os.cpu_count() or 1)) as pool:
        pool.map(write_jpeg, jobs, chunksize=8)
    os.rename(tmp, root)
    return root


def has_cifar10(d):
    """As data.has_cifar10 (this process does not import torch): the PNG layout or torchvision's."""
    return os.path.isdir(os.path.join(d, "cifar-10-batches-py")) or \
        os.path.isdir(os.path.join(d, "train")) and os.path.isdir(os.path.join(d, "test"))


# -----------------------------------------------------------------------------
# ImageNet: configs/imagenet.py through train.py under torchrun, as the 8-GPU command runs it

def imagenet_item(out, dry, batch, deadline):
    """train.py configs/imagenet.py (bf16, compile, channels_last, 128 px, its DataLoader workers) at
    `batch` per GPU under torchrun, 1 process, on the generated JPEGs; tools/gpu_check.py --wrap-train
    is the worker torchrun starts (it runs train.py and measures, see wrap_train)."""
    p = IMAGENET_RUN["dry" if dry else "gpu"]
    rows = batch // 16 if dry else batch  # the dry run: tiny models at 32 px and a 16th of the batch, on the CPU
    root = imagenet_folder(out, dry)
    d = os.path.join(out, "imagenet", f"b{batch}")
    result = d + ".json"
    os.makedirs(os.path.dirname(d), exist_ok=True)
    for f in (result, os.path.join(d, "log.jsonl")):
        if os.path.exists(f):
            os.remove(f)
    argv = [os.path.join(ROOT, "configs", "imagenet.py"), f"--data_dir={root}", f"--out_dir={d}", "--overwrite=True",
            f"--max_iters={p['steps']}", f"--log_interval={p['log']}", "--eval_interval=0", "--eval_at_start=False",
            f"--ckpt_interval={p['steps']}", "--sample_steps=4", f"--batch_size={rows}"]
    if dry:  # gloo, torch.compile's capture with the eager backend
        argv += TINY[:3] + ["--threads=1", "--compile_backend=eager", "--image_size=32", "--num_workers=2",
                            "--device=cpu"]
    wrapper = [os.path.abspath(__file__), "--wrap-train", result, str(p["swap"]), str(p["loader_batches"])]
    cmd = torchrun(1, wrapper[0], wrapper[1:] + argv)
    t = time.time()
    log = os.path.join(out, "logs", f"imagenet_train_b{batch}.log")
    rc = run_group(out, cmd, min(ITEMS[f"imagenet_train_b{batch}"], deadline - time.time()) - 5, log)
    res = json.load(open(result)) if os.path.exists(result) else {}
    res["wall_s"] = round(time.time() - t, 1)
    if res.get("oom"):
        return {"pass": False, **res, "batch_size": rows, "log": log,
                "why": f"batch {batch}: out of memory in {res['failed_in']} on this GPU"}
    if rc != 0:
        return {"pass": False, **res, "error": res.get("error") or f"torchrun exited {rc}: {log_tail(log)}", "log": log}
    recs = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
    steps = [r for r in recs if "img_s" in r]
    fed = [r for r in steps if p["log"] < r["step"] <= p["swap"]]  # after the compile's interval, the loader's
    alone = [r for r in steps if r["step"] > p["swap"]]  # the loader's batch repeated: the step alone
    med = lambda rs, k: statistics.median(r[k] for r in rs) if rs and all(k in r for r in rs) else None
    fed_ips, alone_ips = med(fed, "img_s"), med(alone, "img_s")
    ev = [r for r in recs if "zgap" in r]
    res.update({"batch_size": rows, "img_s_with_loader": fed_ips, "img_s_step_alone": alone_ips,
                "mfu_with_loader": med(fed, "mfu"), "mfu_step_alone": med(alone, "mfu"),
                # the loader's waits as a share of the step time; over so few steps the batches its
                # workers prefetched during the compile (4 each) can hide them: loader_capacity_used (the
                # step's img/s over the loader's alone, > 1: the loader cannot keep up) says it for longer runs
                "loader_wait_share": max(0.0, 1 - fed_ips / alone_ips) if fed_ips and alone_ips else None,
                "loader_capacity_used": alone_ips / res["loader_img_s"]
                if alone_ips and res.get("loader_img_s") else None,
                "first_interval_s": round(p["log"] * rows / steps[0]["img_s"], 1) if steps else None,
                "losses": [r["loss"] for r in steps], "eval_s": ev[-1]["eval_s"] if ev else None,
                "ckpt_gb": os.path.getsize(os.path.join(d, "ckpt.pt")) / 2**30
                if os.path.exists(os.path.join(d, "ckpt.pt")) else None})
    measured = fed_ips and alone_ips and res.get("loader_img_s") and res.get("peak_mem_gb")
    ok = len(steps) == p["steps"] // p["log"] and all(map(math.isfinite, res["losses"])) and bool(ev) and \
        bool(measured) and res["ckpt_gb"] is not None
    return {"pass": ok, **res, "log": log,
            "why": f"one GPU's share of torchrun --nproc_per_node=8 train.py configs/imagenet.py: does batch {batch} "
                   "fit (8 x 128 is the paper's 1,024), how fast with the loader, the step alone, the loader alone; "
                   "first_interval_s holds the compile; pass: every interval logged, finite losses, the "
                   "evaluation and the checkpoint written"}


def imagenet(out, dry, deadline):
    item(out, "imagenet_train_b128", min(ITEMS["imagenet_train_b128"], deadline - time.time()),
         lambda: imagenet_item(out, dry, 128, deadline))
    first = summary(out)["items"].get("imagenet_train_b128", {})

    def fallback():
        if first.get("oom") and first.get("failed_in") == "training":
            return imagenet_item(out, dry, 64, deadline)
        why = "batch 128 fits" if first.get("pass") else "imagenet_train_b128 did not run out of memory in training"
        return {"pass": None, "skipped": f"{why}: batch 64 runs only where 128 is out of memory"}
    item(out, "imagenet_train_b64", min(ITEMS["imagenet_train_b64"], deadline - time.time()), fallback)


def wrap_train(result, swap, loader_batches, argv):
    """torchrun's worker for the ImageNet items: `python train.py ARGV` in this process (runpy), watched
    through the two monitor functions train.py calls, patched before it imports them. log_progress
    (after each log interval): at step `swap` the loader's next batch replaces the loader, repeated, so
    the intervals after it time the step alone on the same compiled graph (its copy to the GPU and its
    augmentation included). evaluate_and_log, at the last step: the peak memory of training (before
    the evaluation), then the loader alone: the same dataset and number of workers, `loader_batches`
    batches timed after the first, nothing else running. -> RESULT (JSON, rank 0): those figures,
    torch, CUDA, the device and the process group's backend; an out-of-memory error says so there."""
    import itertools
    import torch
    import monitor
    real_log, real_eval = monitor.log_progress, monitor.evaluate_and_log
    res = {"torch": torch.__version__, "cuda": torch.version.cuda}

    def log_progress(run, *a):
        real_log(run, *a)
        if run.step == swap:
            old = run.loader_iter
            run.loader_iter = itertools.repeat(next(old))
            del old  # its workers end here, before the next interval's clock starts

    def evaluate_and_log(run, it):
        if it == run.max_iters and "peak_mem_gb" not in res:
            res.update(memory(run))
            res.update(loader_alone(run, loader_batches))
        real_eval(run, it)
    monitor.log_progress, monitor.evaluate_and_log = log_progress, evaluate_and_log
    rank0 = int(os.environ.get("RANK", 0)) == 0
    try:
        run_script("train.py", argv)
    except Exception as e:  # out of memory (possibly inside the compiler's own exception)
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        res.update({"oom": oom, "error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:400]}",
                    "failed_in": "the evaluation or the checkpoint" if "peak_mem_gb" in res else "training"})
        if torch.cuda.is_available():
            res["peak_mem_gb_before_error"] = torch.cuda.max_memory_allocated() / 2**30
        if rank0:
            json.dump(res, open(result, "w"), indent=1)
        raise
    if rank0:
        json.dump(res, open(result, "w"), indent=1)


def memory(run):
    """The peak memory of training so far (the GPU's allocator; the dry run: the process's peak RSS),
    the device and the process group's backend."""
    import torch
    if not run.cuda:
        import resource
        return {"peak_mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "memory": "CPU, peak RSS",
                "device": "cpu (dry run: tiny sizes)", "backend": torch.distributed.get_backend()}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30, "gpu_total_gb": total / 2**30,
            "memory": "torch.cuda.max_memory_allocated over training, before the evaluation",
            "device": torch.cuda.get_device_name(), "backend": torch.distributed.get_backend()}


def loader_alone(run, n):
    """train.py's training images (the whole pictures, decoded and resized by the workers) through a
    DataLoader with its workers and batch size, nothing else running: img/s over n batches after the first."""
    import torch
    ds, b = run.train_views, run.batch_size
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=b * (n + 1),
                                             generator=torch.Generator().manual_seed(0))
    dl = torch.utils.data.DataLoader(ds, batch_size=b, sampler=sampler, num_workers=run.num_workers,
                                     pin_memory=run.cuda, prefetch_factor=4 if run.num_workers else None)
    batches = iter(dl)
    next(batches)  # the workers' start
    t = time.perf_counter()
    for _ in range(n):
        next(batches)
    dt = time.perf_counter() - t
    del batches
    return {"loader_img_s": n * b / dt, "loader_workers": run.num_workers}


# -----------------------------------------------------------------------------
# correctness: train.py runs of 4 steps, compared through their logs and checkpoints

COMPILED = {"config": None}  # the config this process compiled last


def fresh_compile(config):
    """torch._dynamo.reset() before the first compiled run of another config in this process: each
    config's graph is traced afresh with static shapes, as a fresh process compiles it (dynamo would
    otherwise mark the dimensions that differ from the graph before as dynamic); runs of one config
    share its graph."""
    import torch
    if COMPILED["config"] not in (None, config):
        torch._dynamo.reset()
    COMPILED["config"] = config


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


def check_args(out, dry):
    """train.py's arguments for the 4-step correctness runs: configs/cifar10.py with all switches off,
    the tiny (dry run) or small presets (no dropout in either: a compiled or channels_last run would
    draw other masks), on the generated folder. lr 1e-2 from warm-up step 1: the zero-initialised
    output moves, so a wrong op shows in the loss; warm-up 4 keeps the lr of steps 1-4 independent of
    max_iters (the resume runs 2, then 4)."""
    return [os.path.join(ROOT, "configs", "cifar10.py"), f"--data_dir={cifar_fixture(out, dry)}", "--download=False",
            "--max_iters=4", "--warmup_iters=4", "--lr=1e-2", "--log_interval=1", "--eval_interval=0",
            "--ckpt_interval=100", "--eval_at_start=False", "--sample_steps=4"] + (TINY if dry else SMALL) + OFF


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


def reference(out):
    """The eager fp32 reference run's out_dir, once its item has passed."""
    if not summary(out)["items"].get("eager_fp32_reference", {}).get("pass"):
        raise RuntimeError("no eager fp32 reference: eager_fp32_reference did not pass")
    return os.path.join(out, "runs", "eager_fp32")


def correctness(out, dry):
    import torch
    import common
    import diffusion as D
    cuda = torch.cuda.is_available() and not dry
    run = lambda name, *flags: run_steps(out, dry, name, *flags)

    def eager_reference():
        loss = losses(run("eager_fp32", "--overwrite=True"))
        return {"pass": len(loss) == 4 and all(map(math.isfinite, loss)), "losses": loss,
                "why": "the run every switch is compared with: eager, fp32, NCHW, AdamW looping over parameters"}
    item(out, "eager_fp32_reference", ITEMS["eager_fp32_reference"], eager_reference)
    ref = lambda: reference(out)

    def run_compiled(name, *flags):
        fresh_compile("correctness")
        return run(name, *flags)

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
    item(out, "bf16_vs_fp32", ITEMS["bf16_vs_fp32"], lambda: judge(
        compare(ref(), run("bf16", "--overwrite=True", *SWITCHES["bf16_autocast"])), 1e-2, None,
        "bf16 keeps 8 mantissa bits: the CPU dry run measured 1.6e-3 in the loss on the avx512, avx2 and default "
        "kernel sets; a wrong op moves the loss by ~10% a step. Weights not judged: Adam turns bf16's gradient "
        "rounding into full steps where a gradient is small (CPU dry run: 21-22% of the distance trained). Must "
        "not be bit-identical (autocast took effect)",
        must_differ=True))
    item(out, "compile_vs_eager", ITEMS["compile_vs_eager"], lambda: judge(
        compare(ref(), run_compiled("compile", "--overwrite=True", *SWITCHES["compile"])), loss_tol, weight_tol,
        "inductor fuses and reorders reductions: float rounding only" +
        ("" if cuda else " (dry run: dynamo's capture, eager backend)")))
    item(out, "channels_last_vs_nchw", ITEMS["channels_last_vs_nchw"], lambda: judge(
        compare(ref(), run("channels_last", "--overwrite=True", *SWITCHES["channels_last"])), loss_tol,
        10 * weight_tol if cuda else weight_tol,
        "other conv kernels, other summation order; Adam turns rounding-noise gradients into full steps, so the "
        "weights get more room than the loss (bounds above)"))
    item(out, "fused_adamw_vs_looped", ITEMS["fused_adamw_vs_looped"], lambda: judge(
        compare(ref(), run("fused_adamw", "--overwrite=True", *SWITCHES["fused_adamw"])), loss_tol, weight_tol,
        "the same AdamW update in one kernel: float rounding only, which Adam carries into the weights as "
        "channels_last's does"))

    def samplers():
        net, _ = common.model_from_checkpoint(os.path.join(ref(), "ckpt.pt"), "cuda" if cuda else "cpu")
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
    item(out, "samplers_deterministic", ITEMS["samplers_deterministic"], samplers)

    def resume():
        split = run("split", "--overwrite=True", "--max_iters=2")
        run("split", "--init_from=resume")
        return judge(compare(ref(), split), 0.0 if not cuda else 1e-4, 0.0 if not cuda else 1e-3,
                     "checkpoint holds weights, EMA, AdamW, RNG and data position: bit-exact on the CPU; on CUDA "
                     "cudnn.benchmark may choose other (equally exact) kernels in the resumed process, and some "
                     "backward kernels sum in a nondeterministic order, so rounding-level differences are allowed")
    item(out, "resume_2_plus_2", ITEMS["resume_2_plus_2"], resume)


    def accum():
        # z_bn standardises each micro-step's rows (its statistics are per micro-batch): off for this comparison
        b = 4 if dry else 64
        big = run("batch_2x", "--overwrite=True", "--z_bn=False", f"--batch_size={2 * b}")
        acc = run("accum_2", "--overwrite=True", "--z_bn=False", f"--batch_size={b}", "--grad_accum=2")
        tol = (1e-3, 1e-2) if cuda else (5e-5, 5e-3)
        return judge(compare(big, acc), *tol, f"{b} x 2 micro-steps sum the gradients of the same {2 * b} rows, views "
                     "and noise as one batch of 2b: float rounding only (the correctness bounds)")
    item(out, "grad_accum_vs_big_batch", ITEMS["grad_accum_vs_big_batch"], accum)


def torchrun_train(out, dry, name, nproc, *flags):
    """`torchrun --nproc_per_node=NPROC train.py` with the correctness runs' arguments and flags, in a
    process group of its own (killed whole at the item's limit) -> (return code, its out_dir, its log)."""
    d, log = os.path.join(out, "runs", name), os.path.join(out, "logs", f"{name}.log")
    cmd = torchrun(nproc, "train.py", check_args(out, dry) + [f"--out_dir={d}", "--overwrite=True", *flags])
    return run_group(out, cmd, ITEMS[name] - 5, log, env=dict(os.environ, PYTHONWARNINGS="ignore")), d, log


def ddp_check(out, dry):
    """torchrun, 1 process, against the eager fp32 reference (the same arguments; the presets have no dropout)."""
    import torch
    cuda = torch.cuda.is_available() and not dry

    def one_process():
        if dry:  # ~12 s of two more interpreters; tests/test_train.py runs 2 gloo processes against 1
            return {"pass": None, "skipped": "dry run: torchrun is run on CUDA only (nccl); the gloo path is "
                    "tests/test_train.py::test_ddp_two_processes_equal_one"}
        rc, d, log = torchrun_train(out, dry, "torchrun_vs_plain", 1)
        if rc:
            return {"pass": False, "error": log_tail(log), "log": log}
        return judge(compare(reference(out), d), 1e-4 if cuda else 0.0, 1e-3 if cuda else 0.0,
                     f"DDP over 1 process ({'nccl' if cuda else 'gloo'}) averages one gradient: the plain run's "
                     "arithmetic; on CUDA kernel choice and atomics may differ between processes")
    item(out, "torchrun_vs_plain", ITEMS["torchrun_vs_plain"], one_process)

    def two_gpus():
        if dry or torch.cuda.device_count() < 2:
            return {"pass": None, "skipped": "one GPU here" if not dry else "dry run: tests/test_train.py runs 2 gloo "
                    "processes with compile and z_bn (--multiprocess)"}
        t = time.time()
        rc, d, log = torchrun_train(out, dry, "torchrun_2gpu_compile_zbn", 2, "--compile=True", "--z_bn=True",
                                    "--eval_interval=4")
        if rc:
            return {"pass": False, "error": log_tail(log), "log": log}
        loss = losses(d)
        return {"pass": len(loss) == 4 and all(map(math.isfinite, loss)) and "deprecated" not in open(log).read(),
                "losses": loss, "seconds_with_compile": round(time.time() - t, 1),
                "why": "2 processes, nccl, compiled, z_bn all-reduced in forward and backward: 4 steps, an "
                       "evaluation on rank 0 and a checkpoint, no hang and no deprecation warning"}
    item(out, "torchrun_2gpu_compile_zbn", ITEMS["torchrun_2gpu_compile_zbn"], two_gpus)


# -----------------------------------------------------------------------------
# speed: bench.py per switch (synthetic images), as tools/bench.sh does it

def speed(out, dry):
    import gc
    import torch
    base = [os.path.join(ROOT, "configs", "cifar10.py")] + \
        (TINY_BENCH + ["--iters=2", "--warmup=1", "--sample_steps=2", "--sample_n=4"] if dry else
         ["--iters=10", "--warmup=3"])  # warm-up: compilation happens in the first step
    settings = {"all_off": OFF, **{k: OFF + SWITCHES[k] for k in ("bf16_autocast", "fused_adamw", "channels_last")},
                "config_eager": ["--compile=False"], "config": []}
    for name, flags in settings.items():
        def bench(name=name, flags=flags):
            if name == "config":
                fresh_compile("cifar10")
            cuda = torch.cuda.is_available()
            left = torch.cuda.memory_allocated() / 2**30 if cuda else None  # counted in peak_mem_gb too
            run_script("bench.py", base + flags + [f"--out_dir={os.path.join(out, 'bench', name)}"])
            with open(os.path.join(out, "bench", name, "bench.json")) as f:
                res = json.load(f)
            done = summary(out)["items"]
            x = lambda other: res["train_img_s"] / done[other]["train_img_s"] \
                if done.get(other, {}).get("pass") else None
            return {"pass": res["train_img_s"] > 0 and res["sample_s"] > 0, "x_all_off": x("speed_all_off"),
                    **({"x_config_eager": x("speed_config_eager")} if name == "config" else {}),
                    **{k: res[k] for k in ("train_img_s", "mfu", "peak_mem_gb", "sample_s", "sample_img_steps_s",
                                           "data_img_s", "device", "batch_size")}, "mem_at_start_gb": left}
        gc.collect()  # the models of the runs before, before this one measures its peak memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        item(out, f"speed_{name}", ITEMS[f"speed_{name}"], bench)


# -----------------------------------------------------------------------------
# learning: the config as it is, for the time the budget leaves; probes; the PNGs

def probe(out, name, *argv):
    """`python probe.py ARGV` (as run_script runs train.py) -> the result it writes to OUT/learn/NAME.json."""
    path = os.path.join(out, "learn", f"{name}.json")
    run_script("probe.py", [*argv, f"--out={path}"])
    with open(path) as f:
        return json.load(f)


def learning(out, dry, deadline, data_dir):
    d = os.path.join(out, "learn")
    bench = summary(out)["items"].get("speed_config", {})
    train_s = max(20.0, min(TRAIN_S, deadline - time.time() - LEARN_REST_S))
    if dry:
        iters = 4
    elif bench.get("train_img_s"):  # the img/s the bench just measured for this config (its compiled graph is reused)
        iters = max(100, int(train_s * bench["train_img_s"] / bench["batch_size"]))
    else:
        iters = 1000
    argv = [os.path.join(ROOT, "configs", "cifar10.py"), f"--data_dir={data_dir}", "--download=False",
            f"--out_dir={d}", "--overwrite=True", f"--max_iters={iters}", f"--warmup_iters={max(1, iters // 10)}",
            "--eval_interval=0", f"--ckpt_interval={max(1, iters // 4)}", "--eval_at_start=False",
            f"--log_interval={max(1, iters // 20)}"] + (TINY + ["--sample_steps=4"] if dry else [])

    def run_train():
        fresh_compile("cifar10")
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
    # a run cut short by its alarm still leaves the checkpoint of its last quarter for the probes
    item(out, "learn_train", int(train_s) + ITEMS["learn_train"], run_train)
    ckpt = os.path.join(d, "ckpt.pt")

    def linear():
        a = probe(out, "probe_linear", f"--ckpt={ckpt}", "--task=linear")
        b = probe(out, "probe_linear_random", f"--ckpt={ckpt}", "--task=linear", "--random=True")
        return {"pass": a["top1"] > b["top1"], "top1": a["top1"], "top1_random_init": b["top1"],
                "top5": a["top5"], "top5_random_init": b["top5"], "why": "pass: above the same encoder at random init"}
    item(out, "learn_linear_vs_random", ITEMS["learn_linear_vs_random"], linear)

    def zusage():
        r = probe(out, "probe_zusage", f"--ckpt={ckpt}", "--task=zusage")
        shutil.copyfile(r["plot"], os.path.join(out, "learn_zusage.png"))
        return {"pass": r["removed_mean"] > 0, "removed_at_-3": r["removed_at_-3"], "removed_mean": r["removed_mean"],
                "removed": r["removed"], "logsnr": r["logsnr"], "plot": "learn_zusage.png",
                "why": "pass: z lowers the decoder's x0 error on average over log-SNR -6..+2"}
    item(out, "learn_zusage", ITEMS["learn_zusage"], zusage)


def folder_path(out, dry, data_dir):
    """The ImageNet code path on real images: the CIFAR-10 PNGs laid out as an ImageNet folder
    (train/ and val/ links), train.py --dataset=imagenet for a few dozen steps (its evaluation reads
    the folder), then probe.py's streaming linear probe (features extracted and cached) and kNN (read
    from that cache): extraction img/s and each probe's seconds."""
    root = os.path.join(out, "folder_imagenet")
    d, iters, workers = os.path.join(out, "folder_run"), 4 if dry else 30, "0" if dry else "8"
    argv = ["--dataset=imagenet", f"--data_dir={root}", "--image_size=32", f"--out_dir={d}", "--overwrite=True",
            f"--max_iters={iters}", f"--eval_interval={iters if dry else iters // 2}", "--warmup_iters=1",
            f"--log_interval={iters // 4}" if dry else "--log_interval=5",
            f"--num_workers={workers}", "--sample_steps=4"] + (TINY if dry else ["--batch_size=64"])

    def run():
        os.makedirs(root, exist_ok=True)
        for split, name in (("train", "train"), ("test", "val")):
            if not os.path.exists(os.path.join(root, name)):
                os.symlink(os.path.abspath(os.path.join(data_dir, split)), os.path.join(root, name))
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
    item(out, "folder_imagenet_path", ITEMS["folder_imagenet_path"], run)


# -----------------------------------------------------------------------------

def child(out, dry, deadline, data_dir):
    """Every item but the ImageNet ones, in this process; each skips what a process before it finished."""
    import warnings
    import torch
    warnings.filterwarnings("ignore", message=".*partial copy")  # the shared subset is one
    if dry:
        torch.set_num_threads(1)
    load_cifar_once()
    with light_eval():
        correctness(out, dry)
    speed(out, dry)
    learning(out, dry, deadline, data_dir)
    ddp_check(out, dry)
    folder_path(out, dry, data_dir)


def run_child(out, dry, deadline, data_dir, grace=30):
    """The child in a process group of its own. Killed, with a torchrun group it started, at the
    deadline, or when an item is `grace` s past its own limit (its alarm could not fire: a hang inside
    a C call). -> its return code, or 'killed'."""
    cmd = [sys.executable, os.path.abspath(__file__), out, "--child", f"--deadline={deadline}",
           f"--data_dir={data_dir}", f"--only={','.join(SELECTED)}"] + (["--dry-run"] if dry else [])
    p = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    while True:
        try:
            return p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            run = summary(out)["run"]
            if time.time() > min(deadline, (run.get("current_until") or math.inf) + grace):
                kill_group(p.pid)
                if run.get("group"):
                    kill_group(run["group"])
                p.wait()
                return "killed"


def device_facts(dry):
    """torch, CUDA and the GPU, asked in a process of their own (this one keeps no CUDA context)."""
    code = ("import json, os, torch; c = torch.cuda.is_available() and not DRY; "
            "p = c and torch.cuda.get_device_properties(0); "
            "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'cuda_available': c, "
            "'gpu': p.name if c else None, 'gpu_count': torch.cuda.device_count() if c else 0, "
            "'gpu_mem_gb': p.total_memory / 2**30 if c else None, 'cpus': os.cpu_count()}))").replace("DRY", str(dry))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    if r.returncode:
        sys.exit(f"error: {sys.executable} cannot import torch: {r.stderr.strip()[-400:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


USAGE = "usage: bash tools/gpu_check.sh OUT_DIR [--data_dir=DIR] [--dry-run] [--only=ITEM,...]"


def parse(argv):
    """-> (out, dry, child, opts), or a one-line error."""
    args = [a for a in argv if not a.startswith("--")]
    flags = {a for a in argv if a.startswith("--") and "=" not in a}
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    bad = sorted(flags - {"--dry-run", "--child"}) + \
        [f"--{k}=" for k in opts if k not in ("data_dir", "only", "deadline")]
    if len(args) != 1 or bad:
        sys.exit(f"error: {'unknown option ' + bad[0] if bad else 'one OUT_DIR expected'}\n{USAGE}")
    only = [k for k in opts.get("only", "").split(",") if k]
    unknown = [k for k in only if k not in ITEMS]
    if unknown:
        sys.exit(f"error: --only: no item {unknown[0]!r}; the items: {', '.join(ITEMS)}\n{USAGE}")
    if opts.get("data_dir"):
        opts["data_dir"] = os.path.abspath(opts["data_dir"])
    return os.path.abspath(args[0]), "--dry-run" in flags, "--child" in flags, opts, only


def selection(only):
    """--only's items and what they build on, in the check's order (all items without --only)."""
    chosen = set(only or ITEMS)
    for k in list(chosen):
        if k in BUILDS_ON:
            chosen.add(BUILDS_ON[k])
    return [k for k in ITEMS if k in chosen]


def main(argv):
    global SELECTED
    if argv[:1] == ["--wrap-train"]:  # torchrun's worker for the ImageNet items
        return wrap_train(argv[1], int(argv[2]), int(argv[3]), argv[4:])
    out, dry, is_child, opts, only = parse(argv)
    os.chdir(ROOT)  # the paths given are absolute now; train.py and the others run from the repository
    SELECTED = selection(only)
    if is_child:
        return child(out, dry, float(opts["deadline"]), opts["data_dir"])

    os.makedirs(out, exist_ok=True)
    for p in glob.glob(os.path.join(out, "*.png")) + glob.glob(os.path.join(out, "summary.json")):
        os.remove(p)
    t0 = time.time()
    deadline = t0 + (300 if dry else BUDGET)  # dry: the test's own timeout is the real bound
    record(out, "run", {"dry_run": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": BUDGET,
                        "items": SELECTED, "children": []})
    facts = device_facts(dry)
    record(out, "run", {**facts, "python": sys.executable, "device": "cpu (dry run: tiny sizes)" if dry else
                        f"{facts['gpu']}, {facts['cpus']} CPUs"})
    if not dry and not facts["cuda_available"]:
        sys.exit("error: no CUDA device here; on a CPU run the dry run: bash tools/gpu_check.sh OUT_DIR --dry-run")
    # the CIFAR-10 subset: --data_dir, else the first of DATA_DIRS that holds it (the dry run: the generated folder)
    if opts.get("data_dir"):
        data_dir = opts["data_dir"]
    elif dry:
        data_dir = cifar_fixture(out, dry)
    else:
        data_dir = next((d for d in DATA_DIRS if has_cifar10(d)), DATA_DIRS[-1])
    found = has_cifar10(data_dir)
    record(out, "run", {"data_dir": os.path.normpath(data_dir), "data_found": found})
    for name in NEEDS_DATA:
        if not found and name in SELECTED:
            record(out, name, {"pass": None, "skipped": f"no CIFAR-10 at {os.path.normpath(data_dir)} (train/ and "
                               "test/ of PNGs): copy ../shared/data/cifar10-subset to data/cifar10-subset in the "
                               "repository, or pass --data_dir=DIR"})
    if any(k in SELECTED for k in IMAGENET):
        imagenet(out, dry, deadline)
    for _ in ITEMS:  # a child killed or crashed on an item: that item fails, a fresh child runs the rest
        if all(k in summary(out)["items"] for k in SELECTED) or deadline - time.time() < (5 if dry else 30):
            break
        rc = run_child(out, dry, deadline, data_dir)
        s = summary(out)
        cur = s["run"].get("current")
        record(out, "run", {"children": s["run"]["children"] + [{"rc": rc, "last_item": cur}]})
        if rc == 0 or cur is None or cur in s["items"]:
            break  # finished, or it failed outside an item: a new process would do the same
        how = "hung: killed past the item's limit or the deadline" if rc == "killed" else f"crashed (rc {rc})"
        record(out, cur, {"pass": False, "error": f"the process {how} in this item"})
    children = summary(out)["run"]["children"]
    for name in SELECTED:  # never reached
        if name not in summary(out)["items"]:
            why = "the time budget ran out first" if not children or children[-1]["rc"] in (0, "killed") else \
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
