#!/usr/bin/env bash
# Seconds per training step of PPO, GRPO, RLOO and DPO at train.sh's settings, one after the other on the same
# machine, each for a few steps, and the time of a whole run of train.sh's length (40 PPO iterations, one DPO
# epoch) that follows. Needs a finished run (world, SFT, RM, rankings):
#
#   bash experiments/time_methods.sh runs            # RUNS of `bash train.sh`; STEPS=5 by default
#
# A step's time is metrics.jsonl's "time" at the last step over the number of steps (model loading left out).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:?usage: bash experiments/time_methods.sh RUNS}
STEPS=${STEPS:-5}
PY=${PYTHON:-python}
DTYPE=${DTYPE:-auto}
grep -qw amx_bf16 /proc/cpuinfo 2>/dev/null && [[ $DTYPE == auto ]] && DTYPE=bf16
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
common=(--sft "$RUNS/sft/ckpt.pt" --seed 0 --dtype "$DTYPE")
ppo=(ppo.py "${common[@]}" --rm "$RUNS/rm/ckpt.pt" --prompts "$RUNS/world/ppo_prompts.jsonl" --kl-coef 0.3
     --total-episodes $((64 * STEPS)) --sample-interval 1000)
per_step() {  # per_step NAME FULL_STEPS: seconds per step from OUT/NAME/metrics.jsonl
  $PY - "$OUT/$1/metrics.jsonl" "$1" "$2" <<'PYEOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
last = max(r["step"] for r in records)
t = max(r["time"] for r in records if r["step"] == last)
print(f"{sys.argv[2]:>5}: {t / (last + 1):6.2f} s per step; {sys.argv[3]} steps: {t / (last + 1) * int(sys.argv[3]):5.0f} s")
PYEOF
}
$PY "${ppo[@]}" --out-dir "$OUT/ppo" > /dev/null 2>&1
$PY "${ppo[@]}" --out-dir "$OUT/grpo" --advantage grpo > /dev/null 2>&1
$PY "${ppo[@]}" --out-dir "$OUT/rloo" --advantage rloo > /dev/null 2>&1
$PY dpo.py "${common[@]}" --data "$RUNS/rankings/rm_train.jsonl" --max-iters "$STEPS" --log-interval 1 \
  --out-dir "$OUT/dpo" > /dev/null 2>&1
dpo_steps=$($PY -c "import sys; print(round(sum(1 for _ in open(sys.argv[1])) / 32))" "$RUNS/rankings/rm_train.jsonl")
for m in ppo grpo rloo; do per_step $m 40; done
per_step dpo "$dpo_steps"
