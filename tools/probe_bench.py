"""Peak memory and speed of probe.py's streaming linear probe as an image folder grows: one
probe.py process per size (2,000 and 20,000 training images by default; a fixed 1,000-image val
folder), its peak resident memory, its feature extraction in img/s and its linear probe in seconds.
The folders are links to the CIFAR-10 PNGs (each used several times under new names) laid out as
an ImageNet folder, so the images are real files decoded one batch at a time.

    python tools/probe_bench.py                                   # a one-step tiny checkpoint
    python tools/probe_bench.py --ckpt=out/cifar10_cpu/ckpt.pt --sizes=2000,20000 --workers=0

Peak memory is the probe process's maximum resident set size (wait4: the largest of the process and
the DataLoader workers it reaped), so the default is --workers=0: one process, all of its memory in
one figure. Without --ckpt, train.py runs one step on the first folder for a tiny 32 px checkpoint.
"""
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from configurator import ConfigError, parse_list  # noqa: E402

PNG = os.path.join(ROOT, "..", "shared", "data", "cifar10-subset")
USAGE = "usage: python tools/probe_bench.py [--ckpt=PATH] [--sizes=2000,20000] [--workers=0] [--png=DIR]"


def make_folder(root, png, n_train, n_val=1000):
    """root/train with n_train links and root/val with n_val, cycling through png/train and png/test
    one class after another (so every size holds every class)."""
    for split, src, n in (("train", "train", n_train), ("val", "test", n_val)):
        per_class = [[(c, f) for f in sorted(os.listdir(os.path.join(png, src, c)))]
                     for c in sorted(os.listdir(os.path.join(png, src)))]
        files = [cf for row in itertools.zip_longest(*per_class) for cf in row if cf]
        for i in range(n):
            c, f = files[i % len(files)]
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            os.symlink(os.path.abspath(os.path.join(png, src, c, f)), os.path.join(root, split, c, f"{i}_{f}"))


def first_step_checkpoint(folder, out_dir):
    """train.py --dataset=imagenet for one step on the folder (a tiny 32 px model): a checkpoint of the
    folder's kind, so the probe needs no other data and no flag to read it."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset=imagenet", f"--data_dir={folder}",
                        "--image_size=32", "--max_iters=1", "--batch_size=8", "--eval_at_start=False",
                        "--num_workers=0", "--sample_steps=1", f"--out_dir={out_dir}"],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise ConfigError(f"train.py failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return os.path.join(out_dir, "ckpt.pt")


def run_probe(ckpt, folder, workers, out, log):
    """probe.py in its own process -> (its result JSON, its peak RSS in MB: the largest of the
    process and the workers it reaped)."""
    cmd = [sys.executable, os.path.join(ROOT, "probe.py"), f"--ckpt={ckpt}", "--dataset=imagenet",
           f"--data_dir={folder}", "--cache=False", f"--num_workers={workers}", f"--out={out}"]
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise ConfigError(f"probe.py failed: {(open(log).read().strip().splitlines() or ['?'])[-1]}")
    return json.load(open(out)), usage.ru_maxrss / 1024


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    bad = [a for a in argv if not (a.startswith("--") and "=" in a) or a[2:].split("=")[0] not in
           ("ckpt", "sizes", "workers", "png")]
    if bad:
        raise ConfigError(f"unknown argument {bad[0]!r}. {USAGE}")
    sizes = [int(s) for s in parse_list(opts.get("sizes", "2000,20000"))]
    workers, png = int(opts.get("workers", "0")), opts.get("png", PNG)
    if not os.path.isdir(os.path.join(png, "train")):
        raise ConfigError(f"no CIFAR-10 PNGs at {png!r} (expected train/<class>/*.png, test/<class>/*.png): --png=DIR")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = opts.get("ckpt")
        for n in sizes:
            folder = os.path.join(tmp, f"folder_{n}")
            make_folder(folder, png, n)
            ckpt = ckpt or first_step_checkpoint(folder, os.path.join(tmp, "run"))
            t = time.time()
            res, peak = run_probe(ckpt, folder, workers, os.path.join(tmp, f"probe_{n}.json"),
                                  os.path.join(tmp, f"{n}.log"))
            rows.append({"train_images": n, "val_images": res["n_test"], "peak_rss_mb": round(peak, 1),
                         "extract_img_s": res["extract_img_s"], "probe_s": res["task_s"],
                         "wall_s": round(time.time() - t, 1),
                         "top1": round(res["top1"], 2), "workers": workers})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'train images':>12} {'peak RSS MB':>11} {'train img/s':>11} {'val img/s':>9} {'probe s':>7} "
          f"{'wall s':>6}")
    for r in rows:
        print(f"{r['train_images']:>12,} {r['peak_rss_mb']:>11} {r['extract_img_s'].get('train', 0):>11} "
              f"{r['extract_img_s'].get('test', 0):>9} {r['probe_s']:>7} {r['wall_s']:>6}")
    return rows


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
