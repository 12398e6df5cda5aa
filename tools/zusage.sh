#!/usr/bin/env bash
# The z-usage study (docs/zusage.md): train recipe variants on top of a base
# config, for several seeds, and print what each did to z-usage (zusage.z_usage: x0-MSE with z
# vs z masked) and to the linear probe (pooled encoder features) against the same encoder at
# random init.
#   bash tools/zusage.sh val  "0"     name "flags" [name "flags" ...]   # screens: the val split
#   bash tools/zusage.sh test "0 1 2" name "flags" [name "flags" ...]   # the final table, once
# e.g. bash tools/zusage.sh val "0" eps "" v "--prediction=v --weighting=v"
# Choices are made on split=val (train.py's n_val held-out training images); split=test is read
# once, for the final table. Runs already trained (out/zusage/<name>-s<seed>/ckpt.pt) are only probed.
# BASE (default configs/cifar10_cpu.py) and EXTRA (flags for every run, e.g. --threads=1) from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
split=$1; seeds=$2; shift 2
base=${BASE:-configs/cifar10_cpu.py}
rows=()
while [ $# -ge 2 ]; do
  name=$1; flags=$2; shift 2
  for s in $seeds; do
    out=out/zusage/$name-s$s
    if [ ! -f "$out/ckpt.pt" ]; then
      t0=$(date +%s)
      # shellcheck disable=SC2086
      python train.py "$base" --out_dir="$out" --seed="$s" --eval_interval=0 ${EXTRA:-} $flags
      echo $(( $(date +%s) - t0 )) > "$out/wall_s"
    fi
    python probe.py --ckpt="$out/ckpt.pt" --split="$split" --seed="$s" --task=linear --features=pool --solver=lbfgs | tail -1
    python probe.py --ckpt="$out/ckpt.pt" --split="$split" --seed="$s" --task=linear --random=True --features=pool --solver=lbfgs | tail -1
    python probe.py --ckpt="$out/ckpt.pt" --split="$split" --seed="$s" --task=zusage | tail -1
    rows+=("$name|$s|$out|$flags")
  done
done
python - "$split" "${rows[@]}" <<'PY'
import json, os, statistics as st, sys
split, rows = sys.argv[1], [r.split("|", 3) for r in sys.argv[2:]]
sfx = "_val" if split == "val" else ""
by = {}
for name, seed, out, flags in rows:
    get = lambda f: json.load(open(os.path.join(out, f)))
    lin, rnd, zu = get(f"probe_linear_pool{sfx}.json"), get(f"probe_linear_pool_random{sfx}.json"), get(f"probe_zusage_z{sfx}.json")
    wall = int(open(os.path.join(out, "wall_s")).read()) if os.path.isfile(os.path.join(out, "wall_s")) else 0
    by.setdefault((name, flags), []).append((zu["removed_at_-3"], zu["removed_mean"], zu["mse_z"][0], zu["grey"],
                                             lin["top1"], rnd["top1"], lin["top1"] - rnd["top1"], wall))
ms = lambda v: f"{st.mean(v):.1f}" + (f" +- {st.stdev(v):.1f}" if len(v) > 1 else "")
print(f"\nsplit={split}  (z-usage on {split} images; linear probe on pooled features; mean +- sd over seeds)")
print("| run | flags | seeds | z removes at -3 (%) | mean -6..+2 (%) | x0-MSE at -8 (grey) | linear | random init | gain | train wall (s) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (name, flags), v in by.items():
    c = list(zip(*v))
    print(f"| {name} | `{flags}` | {len(v)} | {ms(c[0])} | {ms(c[1])} | {st.mean(c[2]):.3f} ({st.mean(c[3]):.3f}) | "
          f"{ms(c[4])} | {ms(c[5])} | {ms(c[6])} | {st.mean(c[7]):.0f} |")
PY
