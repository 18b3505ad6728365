#!/usr/bin/env bash
# The whole InstructGPT pipeline on the built-in world, on the CPU:
#   world -> pretrain (stage 0) -> SFT (1) -> rank SFT samples -> RM (2) -> PPO, PPO-ptx (3) -> evaluate
#
#   bash train.sh              # the full run (minutes on a laptop CPU)
#   QUICK=1 bash train.sh      # everything tiny, in about a minute (what the tests run)
#   FORCE=1 bash train.sh      # redo stages whose checkpoints already exist
#   RUNS=/tmp/r SEED=1 bash train.sh
#
# Each stage is skipped when its output exists and is finished (unless FORCE=1); an interrupted stage
# is rerun from the start (or continue it by hand with its script's --resume). Extra arguments for a stage can be
# given in SFT_ARGS, RM_ARGS, PPO_ARGS (e.g. PPO_ARGS="--device cuda").
set -euo pipefail
cd "$(dirname "$0")"
RUNS=${RUNS:-runs}
SEED=${SEED:-0}
QUICK=${QUICK:-0}
FORCE=${FORCE:-0}
PY=${PYTHON:-python}
W=$RUNS/world
start=$(date +%s)

finished() {  # a checkpoint saved mid-run (Ctrl-C, --save-interval) has iter < max_iters: not finished
  [[ $1 != *.pt ]] && return 0
  $PY -c "import sys, torch; c = torch.load(sys.argv[1], map_location='cpu', weights_only=True)
sys.exit(0 if c.get('iter') == c.get('max_iters', c.get('iter')) else 1)" "$1"
}

stage() {  # stage NAME OUTPUT COMMAND...: run COMMAND unless OUTPUT exists; report its time
  local name=$1 out=$2; shift 2
  if [[ -e $out && $FORCE != 1 ]] && finished "$out"; then echo "== $name: $out exists, skipped"; return; fi
  echo "== $name"
  local t0=$(date +%s)
  "$@"
  echo "== $name done in $(( $(date +%s) - t0 ))s"
}

if [[ $QUICK == 1 ]]; then
  WORLD=(--pretrain-bytes 60000 --pretrain-val-bytes 8000 --sft-train 200 --sft-val 40 --rankings-train 60
         --rankings-val 30 --ppo-prompts 100 --val-prompts 20 --test-prompts 40)
  MODEL=(--n-layer 1 --n-head 2 --n-embd 32 --seq-len 128)
  PRETRAIN=(--max-iters 30 --batch-size 16 --micro-batch-size 16)
  SFT=(--max-iters 30 --batch-size 16 --micro-batch-size 16)
  RANK_PROMPTS=(--max-prompts 40)
  RM=(--max-iters 10 --batch-size 8 --micro-batch-size 8)
  PPO=(--total-episodes 64 --batch-size 16 --minibatch-size 8 --ppo-epochs 1 --max-new-tokens 24 --sample-interval 1000)
  EVAL=(--max-prompts 40 --max-new-tokens 24 --best-of 2)
else
  WORLD=()
  MODEL=(--n-layer 4 --n-head 4 --n-embd 128 --seq-len 256)
  PRETRAIN=(--epochs 1 --batch-size 32 --micro-batch-size 32 --lr 2e-3 --warmup-iters 20)
  SFT=(--epochs 4 --batch-size 32 --micro-batch-size 32 --lr 1e-3)
  RANK_PROMPTS=()
  RM=(--epochs 2 --batch-size 32 --micro-batch-size 16 --lr 3e-4)
  PPO=()
  EVAL=()
fi

# 0. The world: pretraining text, demonstrations, prompts (data/world.py; see data/README.md)
stage world "$W/world.json" $PY -m data.world --out "$W" --seed "$SEED" "${WORLD[@]}"

# Stage 0: a base model pretrained from scratch on the world's text: it knows the facts but does not
# follow instructions.
stage pretrain "$RUNS/base/ckpt.pt" $PY sft.py --text-data "$W/pretrain.txt" --val-text-data "$W/pretrain_val.txt" \
  --out-dir "$RUNS/base" --seed "$SEED" "${MODEL[@]}" "${PRETRAIN[@]}"

# Stage 1: SFT on the simulated demonstrators' (imperfect) demonstrations; loss on response tokens only.
stage sft "$RUNS/sft/ckpt.pt" $PY sft.py --init "$RUNS/base/ckpt.pt" --sft-data "$W/sft_train.jsonl" \
  --val-sft-data "$W/sft_val.jsonl" --out-dir "$RUNS/sft" --seed "$SEED" "${SFT[@]}" ${SFT_ARGS:-}

# Rankings, as in the paper: K = 4..9 samples of the SFT model per prompt, ranked by simulated labelers.
for split in train val; do
  stage "collect SFT samples ($split)" "$RUNS/rankings/samples_$split.jsonl" $PY sample.py collect \
    --ckpt "$RUNS/sft/ckpt.pt" --prompts "$W/rankings_$split.jsonl" --out "$RUNS/rankings/samples_$split.jsonl" \
    --seed "$SEED" "${RANK_PROMPTS[@]}"
  stage "labelers rank ($split)" "$RUNS/rankings/rankings_$split.jsonl" $PY -m data.world rank \
    --samples "$RUNS/rankings/samples_$split.jsonl" --out "$RUNS/rankings/rankings_$split.jsonl" --seed "$SEED"
done

# The RM learns from both: rankings of SFT samples, and the world's rankings of perturbed answers
# (hedged, padded, refused, ...), flaws a small SFT model samples too rarely to be learnt from its samples
# alone (the paper's labelers also ranked outputs of several models, not one).
cat "$W/rankings_train.jsonl" "$RUNS/rankings/rankings_train.jsonl" > "$RUNS/rankings/rm_train.jsonl"

# Stage 2: the reward model, from the SFT model's trunk; demonstrations then score 0 on average.
stage "reward model" "$RUNS/rm/ckpt.pt" $PY reward.py --init "$RUNS/sft/ckpt.pt" \
  --data "$RUNS/rankings/rm_train.jsonl" --val-data "$RUNS/rankings/rankings_val.jsonl" \
  --demo-data "$W/sft_val.jsonl" --out-dir "$RUNS/rm" --seed "$SEED" "${RM[@]}" ${RM_ARGS:-}

# Stage 3: PPO against the RM with a KL penalty to SFT; then PPO-ptx, which mixes in pretraining text.
stage ppo "$RUNS/ppo/ckpt.pt" $PY ppo.py --sft "$RUNS/sft/ckpt.pt" --rm "$RUNS/rm/ckpt.pt" \
  --prompts "$W/ppo_prompts.jsonl" --out-dir "$RUNS/ppo" --seed "$SEED" "${PPO[@]}" ${PPO_ARGS:-}
stage ppo-ptx "$RUNS/ppo_ptx/ckpt.pt" $PY ppo.py --sft "$RUNS/sft/ckpt.pt" --rm "$RUNS/rm/ckpt.pt" \
  --prompts "$W/ppo_prompts.jsonl" --ptx-data "$W/pretrain.txt" --ptx-coef "${PTX_COEF:-1.0}" \
  --out-dir "$RUNS/ppo_ptx" --seed "$SEED" "${PPO[@]}" ${PPO_ARGS:-}

# Evaluation: held-out prompts, every model against SFT, judged by the world's gold judge.
stage evaluate "$RUNS/eval/report.json" $PY evaluate.py --prompts "$W/test_prompts.jsonl" \
  --base "$RUNS/base/ckpt.pt" --few-shot-data "$W/sft_train.jsonl" --sft "$RUNS/sft/ckpt.pt" --rm "$RUNS/rm/ckpt.pt" \
  --ppo "$RUNS/ppo/ckpt.pt" --ppo-ptx "$RUNS/ppo_ptx/ckpt.pt" --pretrain-val "$W/pretrain_val.txt" \
  --out-dir "$RUNS/eval" --seed "$SEED" "${EVAL[@]}"

[[ -f $RUNS/eval/report.md ]] && cat "$RUNS/eval/report.md"
echo "== pipeline done in $(( $(date +%s) - start ))s: $RUNS/eval/report.json, $RUNS/eval/report.md and the plot in $RUNS/eval/"
