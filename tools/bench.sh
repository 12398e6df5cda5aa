#!/usr/bin/env bash
# The speed switches one at a time, against "all off" and the config as it is, in one run:
#   bash tools/bench.sh                                   # the CPU teaching config
#   bash tools/bench.sh configs/cifar10.py                # one GPU
#   ROUNDS=5 bash tools/bench.sh configs/cifar10_cpu.py --threads=2
# Every setting runs bench.py (synthetic data) once per round, rounds interleaved, so a
# slow spell of a noisy machine hits all settings alike; the table gives medians over the rounds
# and train img/s as a ratio to "all off" (eager fp32, no fused AdamW, NCHW).
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-configs/cifar10_cpu.py}
shift || true
rounds=${ROUNDS:-3}
root=out/bench/$(basename "$base" .py)
off="--cpu_bf16=False --dtype=float32 --compile=False --channels_last=False --fused_adamw=False"
names=(all_off bf16_autocast fused_adamw channels_last compile config)
flags=("$off" "$off --cpu_bf16=True --dtype=bfloat16" "$off --fused_adamw=True" "$off --channels_last=True"
       "$off --compile=True" "")
for r in $(seq 1 "$rounds"); do
  for i in "${!names[@]}"; do
    echo "round $r/$rounds: ${names[$i]}"
    # shellcheck disable=SC2086  # the flags are words
    python bench.py "$base" ${flags[$i]} "$@" --out_dir="$root/${names[$i]}/$r" | grep '^bench:'
  done
done
python - "$root" "${names[@]}" <<'PY'
import json, os, statistics as st, sys
root, names = sys.argv[1], sys.argv[2:]
runs = {n: [json.load(open(os.path.join(root, n, r, "bench.json"))) for r in sorted(os.listdir(os.path.join(root, n)))]
        for n in names}
med = lambda n, k: st.median(x[k] for x in runs[n])
base = med("all_off", "train_img_s")
print(f"\n{'setting':14s} {'train img/s':>11s} {'x all_off':>9s} {'DDIM 64x50 s':>12s} {'data img/s':>10s} "
      f"{'peak GB':>7s} {'MFU':>6s}   rounds: train img/s")
for n in names:
    mfu = runs[n][0]["mfu"]
    print(f"{n:14s} {med(n, 'train_img_s'):11.1f} {med(n, 'train_img_s') / base:9.2f} {med(n, 'sample_s'):12.1f} "
          f"{med(n, 'data_img_s'):10.0f} {med(n, 'peak_mem_gb'):7.2f} {'-' if mfu is None else f'{mfu:.1%}':>6s}   "
          + " ".join(f"{x['train_img_s']:.0f}" for x in runs[n]))
print(f"device: {runs['config'][0]['device']}")
PY
