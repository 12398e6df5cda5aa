"""Learning curve of a run trained with --ckpt_keep=True: the linear probe (pooled features) and
z-usage of every kept checkpoint against minutes of training, beside the same encoder at random
init. Measured on the validation split (train.py's n_val held-out images), so the test split stays
for the final table.

    python train.py configs/cifar10_cpu.py --ckpt_keep=True --ckpt_interval=200 --max_iters=3000 --out_dir=out/curve
    python tools/zusage_curve.py out/curve            # -> out/curve/curve.png, curve.json
"""
import glob
import json
import os
import re
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import configurator  # noqa: E402
import data  # noqa: E402
import common  # noqa: E402
from configurator import ConfigError  # noqa: E402

POOLED = ("--features=pool", "--solver=lbfgs")  # the probe of docs/zusage.md's curve: pooled features, L-BFGS

USAGE = "usage: python tools/zusage_curve.py OUT_DIR (a train.py out_dir of a run with --ckpt_keep=True)"


def kept_checkpoints(out_dir):
    """OUT_DIR's ckpt_<step>.pt files, by step; what the curve needs is checked before any probe runs:
    a directory this process can write into (the curve, the probes' JSON), log.jsonl, ckpt.pt, a kept checkpoint."""
    if not os.path.isdir(out_dir):
        raise ConfigError(f"out_dir={out_dir!r} is not a directory. {USAGE}")
    configurator.check_writable("out_dir", out_dir, out_dir, "curve.json, curve.png and the probes' JSON files")
    paths = sorted(p for p in glob.glob(os.path.join(out_dir, "ckpt_*.pt"))
                   if re.fullmatch(r"ckpt_\d+\.pt", os.path.basename(p)))
    if not paths:
        raise ConfigError(f"out_dir={out_dir!r} holds no kept checkpoints ckpt_<step>.pt: train with --ckpt_keep=True")
    return paths


def train_minutes(out_dir):
    """step -> minutes of training (evaluation excluded), from the img/s of log.jsonl's records."""
    log = os.path.join(out_dir, "log.jsonl")
    try:
        lines = open(log).read().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read {log!r} ({e.strerror}): the curve's minutes come from the run's log") from None
    recs = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{log!r} line {i} is not a JSON record ({e.msg}): not a train.py log") from None
    speed_ok = lambda r: "step" in r and isinstance(r["img_s"], (int, float)) and r["img_s"] > 0
    if any(not isinstance(r, dict) or "img_s" in r and not speed_ok(r) for r in recs):
        raise ConfigError(f"{log!r} is not a train.py log: its img_s records need a step and a speed > 0")
    cfg_batch = common.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["config"].get("batch_size")
    if not isinstance(cfg_batch, int):
        raise common.CheckpointError(f"{os.path.join(out_dir, 'ckpt.pt')!r}: its config has no batch_size")
    t, last, at = 0.0, 0, {0: 0.0}
    for r in recs:
        if "img_s" in r:
            t += (r["step"] - last) * cfg_batch / r["img_s"] / 60
            last = r["step"]
            at[r["step"]] = t
    return at


def probe(out_dir, name, *argv):
    """`python probe.py ARGV --split=val`, in its own process -> the result it writes to OUT_DIR/NAME.json;
    its one-line error is this tool's."""
    path = os.path.join(out_dir, f"{name}.json")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "probe.py"), *argv, "--split=val", f"--out={path}"],
                       stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise ConfigError(f"probe.py {' '.join(argv)}: " + (r.stderr.strip().splitlines() or ["failed"])[-1])
    with open(path) as f:
        return json.load(f)


def main(out_dir):
    paths = kept_checkpoints(out_dir)
    at = train_minutes(out_dir)
    rows = []
    for path in paths:
        step = int(os.path.basename(path)[5:-3])
        lin = probe(out_dir, f"probe_linear_{step:06d}", f"--ckpt={path}", "--task=linear", *POOLED)
        zu = probe(out_dir, f"probe_zusage_{step:06d}", f"--ckpt={path}", "--task=zusage")
        minutes = at[max(s for s in at if s <= step)]  # the last logged step at or before it
        rows.append({"step": step, "minutes": minutes, "linear": lin["top1"],
                     "z_removed_-3": zu["removed_at_-3"], "z_removed_mean": zu["removed_mean"]})
    rnd = probe(out_dir, "probe_linear_random", f"--ckpt={path}", "--task=linear", "--random=True", *POOLED)["top1"]
    res = {"rows": rows, "random_init_linear": rnd}
    with open(os.path.join(out_dir, "curve.json"), "w") as f:
        json.dump(res, f, indent=1)
    plt = common.pyplot()
    m = [r["minutes"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(m, [r["linear"] for r in rows], "o-", label="SODA (pooled encoder features)")
    a.axhline(rnd, ls="--", c="grey", label="same encoder, random init")
    a.set(xlabel="minutes of CPU training", ylabel="linear probe top-1 (val, %)", title="linear probe")
    a.legend(fontsize=8)
    b.plot(m, [r["z_removed_-3"] for r in rows], "o-", label="at log-SNR -3")
    b.plot(m, [r["z_removed_mean"] for r in rows], "o-", label="mean over -6..+2")
    b.set(xlabel="minutes of CPU training", ylabel="x0-MSE removed by z (%)", title="z-usage")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curve.png"), dpi=110)
    for r in rows:
        print(f"step {r['step']:5d}  {r['minutes']:5.1f} min  linear {r['linear']:.2f}  "
              f"z removes {r['z_removed_-3']:.1f}% at -3, {r['z_removed_mean']:.1f}% mean")
    print(f"random init linear {rnd:.2f}; figure {os.path.join(out_dir, 'curve.png')}")


if __name__ == "__main__":
    configurator.plain_warnings()
    if len(sys.argv) != 2:
        sys.exit(f"error: expected one argument, got {len(sys.argv) - 1}. {USAGE}")
    try:
        main(sys.argv[1])
    except (ConfigError, common.CheckpointError, data.DataError) as e:
        sys.exit(f"error: {e}")
