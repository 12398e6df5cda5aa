"""
The ImageNet loader's CPU cost, per core: the path train.py takes for configs/imagenet.py
(data.FolderData: JPEG decode, resize of the short side, centre crop; DataLoader collation), in
one process with num_workers=0 and one thread, on synthetic JPEGs written to a temporary folder.
RandAugment runs later, batched on the training device (data.make_views); it is timed apart, on
the CPU, for reference.

    python tools/loader_bench.py                       # 500 JPEGs of 128 px, 3 rounds
    python tools/loader_bench.py --size=500x375        # ImageNet's typical image (~110 kB JPEG)

The JPEGs are noise plus a smooth gradient at quality 90, so they decode like photographs of that
size, roughly; a machine busy with other jobs reads low: the best of the rounds is reported.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402



def write_jpegs(root, n, w, h, classes=10):
    rs = np.random.RandomState(0)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        d = os.path.join(root, f"n{i % classes:08d}")
        os.makedirs(d, exist_ok=True)
        smooth = (np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1) + rs.rand(3) * 100) % 256
        img = np.clip(smooth + rs.randn(h, w, 3) * 20, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{i}.JPEG"), quality=90)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as the project's scripts say it
        self.exit(2, f"error: {message} (see python tools/loader_bench.py --help)\n")


def main():
    p = Parser()
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--size", default="128x128", help="WxH of the JPEGs")
    p.add_argument("--image_size", type=int, default=128, help="train.py's image_size (configs/imagenet.py: 128)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    for k in ("n", "image_size", "batch", "rounds"):
        if getattr(a, k) < 1:
            p.error(f"--{k}={getattr(a, k)} is out of range: it must be >= 1")
    if a.batch > a.n:
        p.error(f"--batch={a.batch} is larger than --n={a.n}: a round needs at least one full batch")
    w, _, h = a.size.partition("x")
    if not (w.isdigit() and h.isdigit() and int(w) >= 1 and int(h) >= 1):
        p.error(f"--size={a.size!r}: expected WxH in pixels, e.g. 500x375")
    w, h = int(w), int(h)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        write_jpegs(root, a.n, w, h)
        kb = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(root) for f in fs) / a.n / 1024
        ds = data.FolderData(root, a.image_size)
        steps = a.n // a.batch
        load, aug = [], []
        for r in range(a.rounds):
            # train.py's DataLoader for the image-folder path, with num_workers=0: this process is the worker
            batches = data.StepBatches(len(ds), a.batch, [slice(None)], 0, 0, steps)
            dl = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=0)
            t = time.perf_counter()
            for xb, yb, _ in dl:
                pass
            load.append(steps * a.batch / (time.perf_counter() - t))
            t = time.perf_counter()
            for i in range(2):  # the two RandAugment views train.py makes of a batch
                data.make_views(xb, "augment", "randaugment", data.Rng(0, i, a.batch))
            aug.append(2 * a.batch / (time.perf_counter() - t))
            print(f"round {r + 1}: loader {load[-1]:.0f} img/s, RandAugment (2 views, CPU) {aug[-1]:.0f} img/s",
                  flush=True)
    print(f"loader_bench: {a.n} JPEGs {w}x{h} ({kb:.0f} kB) -> {a.image_size} px, 1 thread: decode+resize+crop "
          f"max {max(load):.0f} img/s per core (rounds {', '.join(f'{v:.0f}' for v in load)}); RandAugment 2 views on "
          f"the CPU max {max(aug):.0f} img/s (on CUDA it runs on the GPU)")


if __name__ == "__main__":
    main()
