#!/usr/bin/env bash
# Paper Table 1 at CIFAR-10 scale: train each ablation variant on top of a base config, for several
# seeds, probe its frozen features on the test split (linear and kNN; the unconditional baseline on
# UNet features), measure its z-usage, print the table (mean +- sd over seeds).
#   bash tools/ablations.sh                                     # the paper's recipe on configs/cifar10_cpu.py, seed 0
#   SEEDS="0 1 2" OVERLAY=none bash tools/ablations.sh configs/cifar10_cpu.py --max_iters=500
#                                                                     # the teaching config's own recipe, 3 seeds
#   bash tools/ablations.sh configs/cifar10.py --compile=True   # one GPU (no_bottleneck: see its file)
# OVERLAY (default configs/ablations/paper.py: two augmented views, eps output and loss, no z_bn)
# goes between the base and each variant; OVERLAY=none keeps the base's recipe, and then the views
# variant is novel_views.py (the base auto-encodes) instead of no_novel_views.py.
# VARIANTS picks a subset (e.g. to train two halves side by side, then run once more for the table).
# Runs already trained (out/ablations/<base>[-recipe]/<variant>-s<seed>/ckpt.pt) and probes already
# written are not redone. Other flags go to every train.py call.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-configs/cifar10_cpu.py}
shift || true
overlay=${OVERLAY:-configs/ablations/paper.py}
seeds=${SEEDS:-0}
views=no_novel_views
root=out/ablations/$(basename "$base" .py)
if [ "$overlay" = none ]; then
  overlay=(); views=novel_views; root=$root-recipe
else
  overlay=("$overlay")
fi
variants=${VARIANTS:-full no_schedule $views no_modulation no_bottleneck uncond}
probe() {  # probe.py unless its json is there: out task feats [extra flags]; L-BFGS, as docs/ablations.md was measured
  local out=$1 task=$2 feats=$3; shift 3
  local sfx=""; [ "${1:-}" = --random=True ] && sfx=_random
  [ -f "$out/probe_${task}_${feats}${sfx}.json" ] || python probe.py --ckpt="$out/ckpt.pt" --task="$task" --features="$feats" --seed="$s" --solver=lbfgs "$@" | tail -1
}
for v in $variants; do
  for s in $seeds; do
    out=$root/$v-s$s
    if [ ! -f "$out/ckpt.pt" ]; then
      t0=$(date +%s)
      python train.py "$base" "${overlay[@]}" "configs/ablations/$v.py" --out_dir="$out" --seed="$s" --eval_interval=0 "$@"
      echo $(( $(date +%s) - t0 )) > "$out/wall_s"
    fi
    feats=pool
    [ "$v" = uncond ] && feats=unet
    probe "$out" linear $feats
    probe "$out" knn $feats
    [ "$v" = uncond ] || probe "$out" zusage pool
    if [ "$v" = full ] || [ "$v" = uncond ]; then  # the floor: the same network at random init
      probe "$out" linear $feats --random=True
      probe "$out" knn $feats --random=True
    fi
  done
done
python - "$root" "$seeds" "$views" <<'PY'
import json, os, statistics as st, sys
root, seeds, views = sys.argv[1], sys.argv[2].split(), sys.argv[3]
paper = {"full": 72.2, "no_schedule": 62.0, views: 55.1, "no_modulation": 56.7, "no_bottleneck": 34.2, "uncond": 24.5}
if views == "novel_views":  # the base auto-encodes: the paper's "w/o novel views" is the full row here
    paper["full"], paper[views] = 55.1, 72.2
ms = lambda v: f"{st.mean(v):.1f}" + (f" +- {st.stdev(v):.1f}" if len(v) > 1 else "")
def get(v, name, key):
    vals = [json.load(open(p))[key] for s in seeds if os.path.isfile(p := os.path.join(root, f"{v}-s{s}", name))]
    return ms(vals) if vals else "-"
def wall(v):
    w = [int(open(p).read()) / 60 for s in seeds if os.path.isfile(p := os.path.join(root, f"{v}-s{s}", "wall_s"))]
    return f"{st.mean(w):.1f} min" if w else "-"
print(f"\n{root}, seeds {' '.join(seeds)} (mean +- sd), test split")
print("| variant | features | linear top-1 | kNN top-1 | z removes at -3 (%) | mean -6..+2 (%) | train wall | paper (ImageNet linear) |")
print("|---|---|---|---|---|---|---|---|")
for v, p in paper.items():
    f = "unet" if v == "uncond" else "pool"
    zu = [get(v, "probe_zusage_pool.json", k) for k in ("removed_at_-3", "removed_mean")]
    print(f"| {v} | {f} | {get(v, f'probe_linear_{f}.json', 'top1')} | {get(v, f'probe_knn_{f}.json', 'top1')} | "
          f"{zu[0]} | {zu[1]} | {wall(v)} | {p} |")
for v, f in (("full", "pool"), ("uncond", "unet")):
    print(f"| random init | {f} | {get(v, f'probe_linear_{f}_random.json', 'top1')} | "
          f"{get(v, f'probe_knn_{f}_random.json', 'top1')} | - | - | - | - |")
PY
