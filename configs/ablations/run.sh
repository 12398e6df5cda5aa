#!/usr/bin/env bash
# Paper Table 1 at CIFAR-10 scale: train each ablation variant on top of a base config, probe its
# frozen features (linear and kNN; the unconditional baseline on UNet features), print the table.
#   bash configs/ablations/run.sh                                   # CPU, configs/cifar10_cpu.py
#   bash configs/ablations/run.sh configs/cifar10.py --compile=True  # one GPU (no_bottleneck: see its file)
# Variants already trained (out/ablations/<base>/<variant>/ckpt.pt exists) are only probed again.
set -euo pipefail
cd "$(dirname "$0")/../.."
base=${1:-configs/cifar10_cpu.py}
shift || true
root=out/ablations/$(basename "$base" .py)
for v in full no_schedule no_novel_views no_modulation no_bottleneck uncond; do
  out=$root/$v
  if [ ! -f "$out/ckpt.pt" ]; then
    t0=$(date +%s)
    python train.py "$base" configs/ablations/paper.py "configs/ablations/$v.py" --out_dir="$out" "$@"
    echo $(( $(date +%s) - t0 )) > "$out/wall_s"
  fi
  feats=pool
  [ "$v" = uncond ] && feats=unet
  python probe.py --ckpt="$out/ckpt.pt" --features=$feats --task=linear
  python probe.py --ckpt="$out/ckpt.pt" --features=$feats --task=knn
done
for task in linear knn; do  # the floor: the same encoder at random init
  python probe.py --ckpt="$root/full/ckpt.pt" --task=$task --random=True
done
python - "$root" <<'PY'
import json, os, sys
root = sys.argv[1]
paper = {"full": 72.2, "no_schedule": 62.0, "no_novel_views": 55.1, "no_modulation": 56.7, "no_bottleneck": 34.2, "uncond": 24.5}
print(f"\n{'variant':16s} {'features':8s} {'linear top1':>11s} {'kNN top1':>9s} {'train wall':>10s} {'paper (ImageNet)':>16s}")
for v, p in paper.items():
    f = "unet" if v == "uncond" else "pool"
    get = lambda task: json.load(open(os.path.join(root, v, f"probe_{task}_{f}.json")))["top1"]
    wall = os.path.join(root, v, "wall_s")
    wall = f"{int(open(wall).read()) / 60:.1f} min" if os.path.isfile(wall) else "-"
    print(f"{v:16s} {f:8s} {get('linear'):11.2f} {get('knn'):9.2f} {wall:>10s} {p:16.1f}")
rnd = lambda task: json.load(open(os.path.join(root, "full", f"probe_{task}_pool_random.json")))["top1"]
print(f"{'random init':16s} {'pool':8s} {rnd('linear'):11.2f} {rnd('knn'):9.2f} {'-':>10s} {'-':>16s}")
PY
