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
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import evaluation  # noqa: E402
import probe  # noqa: E402


def train_minutes(out_dir):
    """step -> minutes of training (evaluation excluded), from the img/s of log.jsonl's records."""
    recs = [json.loads(l) for l in open(os.path.join(out_dir, "log.jsonl"))]
    cfg_batch = evaluation.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["config"]["batch_size"]
    t, last, at = 0.0, 0, {0: 0.0}
    for r in recs:
        if "img_s" in r:
            t += (r["step"] - last) * cfg_batch / r["img_s"] / 60
            last = r["step"]
            at[r["step"]] = t
    return at


def main(out_dir):
    at = train_minutes(out_dir)
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt"))):
        step = int(os.path.basename(path)[5:-3])
        lin = probe.main([f"--ckpt={path}", "--split=val", "--task=linear"])
        zu = probe.main([f"--ckpt={path}", "--split=val", "--task=zusage"])
        minutes = at[max(s for s in at if s <= step)]  # the last logged step at or before it
        rows.append({"step": step, "minutes": minutes, "linear": lin["top1"],
                     "z_removed_-3": zu["removed_at_-3"], "z_removed_mean": zu["removed_mean"]})
    rnd = probe.main([f"--ckpt={path}", "--split=val", "--task=linear", "--random=True"])["top1"]
    res = {"rows": rows, "random_init_linear": rnd}
    with open(os.path.join(out_dir, "curve.json"), "w") as f:
        json.dump(res, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    main(sys.argv[1])
