"""
SODA against the contrastive yardstick at the same CPU time: each SODA recipe and SimCLR
(tools/contrastive.py) on the same encoder, data and seeds, at several budgets, two runs side by
side at one thread each; then probe.py (linear, converged L-BFGS) on z and the pooled features, a
table (mean +- sd over seeds) and one plot: linear top-1 against minutes of training.

    python tools/yardstick.py --steps=500,1900 --recipes=identical,identical_lr2x  # docs/yardstick.md's curve
    python tools/yardstick.py --steps=500 --seeds=0 --split=val             # choosing: the validation split
    python tools/yardstick.py --steps=500 --recipes=identical,distort --out=out/ys  # a subset of RECIPES

The budget is SODA's: `--steps` of configs/cifar10_cpu.py (64 images each); SimCLR then gets the
minutes of training that the first recipe's run of the same steps and seed took (read from its
log: the steps' images over their img/s), so its step count is whatever those minutes allow. All
runs and probes go through one queue of --jobs workers (default 2: on a 2-core CPU each run trains
at one thread beside another run or a probe; the figure is only as fair as the machine is otherwise
quiet). The random-init row is probe.py --random=True (the encoder at probe.py's seed). Runs that
reached their last step and probes already written under --out are not redone, so a stopped study
goes on where it stopped.
-> OUT/yardstick.json (every figure), OUT/yardstick.png, the table on stdout.
"""
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/cifar10_cpu.py"
BATCH = 64  # CONFIG's batch_size, which no recipe changes
# SODA recipes: flags on top of CONFIG, each spelled out so that it names the same run whatever the config's defaults
RECIPES = {
    # auto-encoding one crop + flip (§4.1 "w/o novel views") at 1e-3 (the encoder at twice that, §3.4)
    "identical": ["--views=identical", "--aug=cropflip", "--lr=1e-3", "--enc_lr_mult=2"],
    "identical_lr2x": ["--views=identical", "--aug=cropflip", "--lr=2e-3", "--enc_lr_mult=2"],  # the config's now
    "distort": ["--views=distort", "--aug=cropflip", "--lr=1e-3", "--enc_lr_mult=2"],  # the source recoloured
}
ARGS = {"steps": "500", "seeds": "0,1,2", "recipes": ",".join(RECIPES), "split": "test", "jobs": 2,
        "out": "out/yardstick", "plot_only": False}
USAGE = ("usage: python tools/yardstick.py [--steps=500,1900] [--seeds=0,1,2] [--recipes=identical,distort] "
         "[--split=test|val] [--jobs=2] [--out=out/yardstick] [--plot_only=True]")


def parse(argv):
    a = dict(ARGS)
    try:
        for arg in argv:
            key, eq, value = arg.lstrip("-").partition("=")
            if not arg.startswith("--") or not eq or key not in a:
                raise ValueError(f"unknown argument {arg!r}")
            if isinstance(a[key], bool) and value not in ("True", "False"):
                raise ValueError(f"{arg!r}: True or False")
            a[key] = value == "True" if isinstance(a[key], bool) else type(a[key])(value)
        unique = lambda items: list(dict.fromkeys(items))  # noqa: E731 (in order, each once)
        a["steps"] = unique(int(v) for v in a["steps"].split(","))
        a["seeds"] = unique(int(v) for v in a["seeds"].split(","))
        a["recipes"] = unique(a["recipes"].split(","))
    except ValueError as e:
        sys.exit(f"yardstick: {e}\n{USAGE}")
    bad = [r for r in a["recipes"] if r not in RECIPES]
    if bad or a["split"] not in ("test", "val") or a["jobs"] < 1 or min(a["steps"]) < 1:
        sys.exit(f"yardstick: recipes are {sorted(RECIPES)}, split 'test' or 'val', jobs and steps >= 1\n{USAGE}")
    return a


def sh(cmd, log):
    """Run cmd (a list) in the repository at one thread; its output goes to log. -> True if it succeeded."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        ok = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode == 0
    if not ok:
        print(f"yardstick: failed, see {log}: {' '.join(cmd)}")
    return ok


def log_records(out):
    path = os.path.join(out, "log.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def train_minutes(out):
    """Minutes of training of a train.py run: each log interval's images over its img/s (setup and
    evaluation excepted, as tools/contrastive.py's --minutes counts them)."""
    seconds, prev = 0.0, 0
    for r in log_records(out):
        if "img_s" in r and "loss" in r:
            seconds += (r["step"] - prev) * BATCH / r["img_s"]
            prev = r["step"]
    return seconds / 60


def minutes_of(out):
    """A finished run's minutes of training: SimCLR's own clock (its last log line), SODA's log."""
    recs = log_records(out)
    if os.path.basename(out).startswith("simclr-"):
        return recs[-1]["seconds"] / 60
    return train_minutes(out)


def fresh(out):
    """A run about to be (re)trained: its probes of an earlier training go."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        if name.startswith("probe_") or name == "done":
            os.remove(os.path.join(out, name))


def soda(a, recipe, steps, seed):
    """Train one SODA run unless done; 'done' only when it reached its last step (a run stopped by a
    signal saves and exits 0 short of it)."""
    out = os.path.join(a["out"], f"{recipe}-{steps}-s{seed}")
    if not os.path.exists(os.path.join(out, "done")):
        fresh(out)
        cmd = [sys.executable, "train.py", CONFIG, *RECIPES[recipe], f"--out_dir={out}", f"--max_iters={steps}",
               f"--seed={seed}", "--threads=1", "--eval_interval=0", "--eval_at_start=False",
               f"--ckpt_interval={steps}", "--overwrite=True"]
        if sh(cmd, os.path.join(out, "train.out")):
            last = max([r["step"] for r in log_records(out) if "loss" in r], default=0)
            if last == steps:
                open(os.path.join(out, "done"), "w").write(f"{train_minutes(out):.4f}\n")
            else:
                print(f"yardstick: {out} stopped at step {last} of {steps}; run the study again to redo it")
    return out


def simclr(a, steps, seed):
    """SimCLR for the minutes the first recipe's run of the same steps and seed trained."""
    out = os.path.join(a["out"], f"simclr-{steps}-s{seed}")
    ref = os.path.join(a["out"], f"{a['recipes'][0]}-{steps}-s{seed}")
    if not os.path.exists(os.path.join(ref, "done")):
        print(f"yardstick: no SimCLR run beside {ref}: it did not finish")
    elif not os.path.exists(os.path.join(out, "done")):
        fresh(out)
        minutes = train_minutes(ref)
        cmd = [sys.executable, "tools/contrastive.py", CONFIG, f"--out_dir={out}", f"--minutes={minutes:.4f}",
               f"--seed={seed}", "--threads=1", "--overwrite=True"]
        if sh(cmd, os.path.join(out, "train.out")):
            open(os.path.join(out, "done"), "w").write(f"{minutes_of(out):.4f} (budget {minutes:.4f}, {ref})\n")
    return out


def probe_path(a, out, features, random=False):
    return os.path.join(out, f"probe_{features}_{a['split']}{'_random' if random else ''}.json")


def probe(a, out, features, random=False):
    path = probe_path(a, out, features, random)
    if not os.path.exists(path) and os.path.exists(os.path.join(out, "done")):
        cmd = [sys.executable, "probe.py", f"--ckpt={os.path.join(out, 'ckpt.pt')}", f"--features={features}",
               f"--split={a['split']}", "--task=linear", "--solver=lbfgs", f"--out={path}"]
        sh(cmd + (["--random=True"] if random else []), path[:-5] + ".out")


def run_all(a):
    """One queue of a['jobs'] workers: every SODA run, then (first in, first out) each SimCLR run as
    its reference run finishes and each run's probes as it finishes. So a timed run trains beside
    another run or a probe until the queue empties; only the study's last run may end alone."""
    pool = concurrent.futures.ThreadPoolExecutor(a["jobs"])
    futures, lock = [], threading.Lock()
    runs = [(r, n, s) for n in a["steps"] for s in a["seeds"] for r in a["recipes"]]

    def then(fn, *args):
        with lock:
            futures.append(pool.submit(fn, *args))

    def probes(out, random=False):
        for features in ("z", "pool"):
            then(probe, a, out, features)
            if random:  # the floor: the same encoder at random init (probe.py's seed)
                then(probe, a, out, features, True)

    def soda_job(recipe, n, s):
        probes(soda(a, recipe, n, s), random=(recipe, n, s) == runs[0])
        if recipe == a["recipes"][0]:
            then(lambda: probes(simclr(a, n, s)))

    for job in runs:
        then(soda_job, *job)
    while True:
        with lock:
            pending = [f for f in futures if not f.done()]
        if not pending:
            break
        concurrent.futures.wait(pending)
    for f in futures:
        f.result()  # an exception in a job is raised here
    pool.shutdown()


def read_top1(a, out, features, random=False):
    path = probe_path(a, out, features, random)
    return json.load(open(path))["top1"] if os.path.exists(path) else None


def gather(a):
    """-> {method: {steps: {'minutes': [...], 'z': [...], 'pool': [...]}}}, and the random-init
    figures; read only (a run or probe not there is left out)."""
    table = {}
    for method in a["recipes"] + ["simclr"]:
        for n in a["steps"]:
            row = table.setdefault(method, {}).setdefault(n, {"minutes": [], "z": [], "pool": [], "seeds": []})
            for s in a["seeds"]:
                out = os.path.join(a["out"], f"{method}-{n}-s{s}")
                z, pool = read_top1(a, out, "z"), read_top1(a, out, "pool")
                if z is None or pool is None or not os.path.exists(os.path.join(out, "done")):
                    continue
                row["seeds"].append(s)
                row["minutes"].append(minutes_of(out))
                row["z"].append(z)
                row["pool"].append(pool)
    first = os.path.join(a["out"], f"{a['recipes'][0]}-{a['steps'][0]}-s{a['seeds'][0]}")
    rand = {f: read_top1(a, first, f, random=True) for f in ("z", "pool")}
    return table, rand


def ms(v):
    return f"{statistics.mean(v):.2f}" + (f" +- {statistics.stdev(v):.2f}" if len(v) > 1 else "") if v else "-"


def report(a, table, rand):
    print(f"| method | SODA steps | minutes | linear z ({a['split']}) | linear pooled | seeds |")
    print("|---|---|---|---|---|---|")
    for method, rows in table.items():
        for n, r in rows.items():
            print(f"| {method} | {n} | {ms(r['minutes'])} | {ms(r['z'])} | {ms(r['pool'])} | {len(r['z'])} |")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"| random init | - | - | {fmt(rand['z'])} | {fmt(rand['pool'])} | probe.py's seed |")
    json.dump({"split": a["split"], "table": table, "random": rand}, open(os.path.join(a["out"], "yardstick.json"),
                                                                          "w"), indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    budgets = [[m for rows in table.values() for m in rows[n]["minutes"]] for n in a["steps"]]
    ticks = sorted({round(statistics.mean(b), 1) for b in budgets if b})  # one a budget: its runs' mean
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, feats, title in zip(axes, ("z", "pool"), ("z (the bottleneck)", "pooled features")):
        for method, rows in table.items():
            pts = [(statistics.mean(r["minutes"]), statistics.mean(r[feats]),
                    statistics.stdev(r[feats]) if len(r[feats]) > 1 else 0) for r in rows.values() if r[feats]]
            if pts:
                x, y, e = zip(*sorted(pts))
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3,
                            label="SimCLR (the yardstick)" if method == "simclr" else f"SODA, {method}")
        if rand[feats] is not None:
            ax.axhline(rand[feats], color="grey", ls="--", label="random init")
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("minutes of training (one thread, beside another run)")
        ax.set_title(f"linear probe on {title}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"top-1 on CIFAR-10 {a['split']} (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(a["out"], "yardstick.png")
    fig.savefig(path, dpi=100)
    print(f"yardstick: {path}, {os.path.join(a['out'], 'yardstick.json')}")


def main(argv):
    a = parse(argv)
    a["out"] = os.path.abspath(a["out"])
    os.makedirs(a["out"], exist_ok=True)
    if not a["plot_only"]:
        run_all(a)
    report(a, *gather(a))


if __name__ == "__main__":
    main(sys.argv[1:])
