"""
What each config costs in memory, measured on the CPU, and how its global batch splits over 1, 2, 4
and 8 GPUs (docs/speed.md's table):

    python tools/memory_table.py                      # the five configs, ~2 minutes on 2 cores
    python tools/memory_table.py configs/cifar10.py   # one

Per config: trained parameters, the checkpoint's size (model, EMA, AdamW's two moments: 16 bytes a
parameter, plus buffers), and the activations one training image keeps for the backward pass, at the
config's image size, in fp32 and under bf16 autocast (counted with saved-tensor hooks: every storage
the forward saves, once, the weights excepted; the difference between a batch of 2 and of 1, so
what does not grow with the batch drops out). From these a GPU's memory at batch B is estimated as
  weights + gradients + AdamW + EMA (20 bytes a parameter, fp32) + B x activations (bf16)
before the allocator's slack, cuDNN's workspaces and compile's own buffers, which the GPU check
measures (tools/gpu_check.py: peak_mem_gb). The split: the largest power of two up to the config's
batch_size whose estimate fits GPU_GB, and grad_accum for the rest of the global batch.
"""
import ast
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import configurator  # noqa: E402

CONFIGS = ("cifar10_cpu", "cifar10", "imagenet", "celeba", "cars3d")
GPU_GB = 80  # an A100 / H100; the estimate's slack is the GPU check's to measure
GPUS = (1, 2, 4, 8)
GLOBAL_BATCH = {"imagenet": 1024}  # the paper's (§4.1: 8 GPUs x 128); the others: their batch_size on one GPU


def saved_bytes(net, batch, image_size, bf16):
    """Bytes of the storages a training forward of `batch` images saves for backward (weights excepted)."""
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            seen[s.data_ptr()] = s.nbytes()
        return t
    x = torch.randn(batch, 3, image_size, image_size)
    rays = torch.randn(batch, 6, image_size, image_size) if net.ray_freqs else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        net(x, torch.zeros(batch), x, rays_src=rays, rays_tgt=rays)
    return sum(seen.values())


def train_defaults():
    """train.py's config keys and their defaults, read from its source (its plain `key = value`
    lines, as train.DEFAULTS collects them): a tool runs scripts, it does not import them."""
    tree = ast.parse(open(os.path.join(ROOT, "train.py")).read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if not node.targets[0].id.startswith("_") and isinstance(value, (int, float, bool, str)):
                out[node.targets[0].id] = value
    return out


def measure(name, defaults):
    cfg = configurator.configure([os.path.join(ROOT, "configs", f"{name}.py")], defaults)
    torch.manual_seed(0)
    net = common.build_model(common.model_args(cfg)).train()
    n_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    S = cfg["image_size"]
    per_image = {kind: (saved_bytes(net, 2, S, bf16) - saved_bytes(net, 1, S, bf16))
                 for kind, bf16 in (("fp32", False), ("bf16", True))}
    fixed = 20 * n_params  # fp32 weights, gradients, AdamW's two moments, the EMA
    fits = lambda b: fixed + b * per_image["bf16"] <= GPU_GB * 2**30
    global_batch = GLOBAL_BATCH.get(name, cfg["batch_size"])
    split = {}
    for g in GPUS:
        share = global_batch // g if global_batch % g == 0 else 0
        b = min(1 << (share.bit_length() - 1), cfg["batch_size"]) if share else 0  # a power of two, at most batch_size
        while b > 1 and not fits(b):
            b //= 2
        split[g] = f"{b} x {share // b}" if b and share % b == 0 else "-"
    return {"config": name, "image_size": S, "batch_size": cfg["batch_size"], "global_batch": global_batch,
            "params_m": n_params / 1e6,
            "ckpt_mb": (16 * n_params + 2 * n_buffers) / 2**20,
            "act_mb_per_img_fp32": per_image["fp32"] / 2**20, "act_mb_per_img_bf16": per_image["bf16"] / 2**20,
            "gpu_gb_at_batch_size": (fixed + cfg["batch_size"] * per_image["bf16"]) / 2**30, "split": split}


def main(names):
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows, defaults = [], train_defaults()
    for name in names:
        r = measure(name, defaults)
        rows.append(r)
        print(json.dumps(r), flush=True)
    splits = " | ".join(f"{g} GPU{'s' * (g > 1)}: batch_size x grad_accum" for g in GPUS)
    print("\n| config | image | params | checkpoint | activations / image fp32 (CPU) | bf16 "
          f"| est. GPU GB at batch_size | {splits} |")
    print("|---" * (7 + len(GPUS)) + "|")
    for r in rows:
        print(f"| `{r['config']}` (batch_size {r['batch_size']}, global {r['global_batch']}) | {r['image_size']} px "
              f"| {r['params_m']:.1f}M | "
              f"{r['ckpt_mb']:,.0f} MB | {r['act_mb_per_img_fp32']:.1f} MB | {r['act_mb_per_img_bf16']:.1f} MB | "
              f"{r['gpu_gb_at_batch_size']:.1f} | " + " | ".join(r["split"][g] for g in GPUS) + " |")


if __name__ == "__main__":
    main([os.path.splitext(os.path.basename(a))[0] for a in sys.argv[1:]] or CONFIGS)
