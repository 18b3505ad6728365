#!/usr/bin/env bash
# All the GPU work of one measuring session in one call of about 8 minutes on one GPU (an H200):
# four steps, each under its own `timeout`, each with its wall-clock time, exit code and one-line
# error recorded; a failed step does not stop the next. The figures go to $OUT/gpu_check.json and
# $OUT/gpu_check.md (printed at the end), each step's output to $OUT/logs/, the evaluation reports
# to $OUT/<step>/.
#
#   bash experiments/gpu_check.sh                     # one GPU (DEVICE=cuda), about 8 minutes
#   TINY=1 DEVICE=cpu bash experiments/gpu_check.sh   # bench, world, preset at their smallest, CPU
#   TINY=1 DEVICE=cpu STEPS=hh bash experiments/gpu_check.sh   # the hh step (~30 s on 2 cores)
#   STEPS="world preset" bash experiments/gpu_check.sh         # some steps (again, after a failure)
#   BENCH_S=300 WORLD_S=300 bash experiments/gpu_check.sh      # other per-step limits, in seconds
#   OUT=/tmp/check WORK=/tmp/runs bash experiments/gpu_check.sh   # keep the runs in WORK (default:
#                               # a temporary folder, deleted at the end: $OUT holds no checkpoints)
#
# The steps:
#   bench   tools/bench.py --configs gpt2 --compile --ppo (GPT-2 124M, bf16 autocast): the MFU of compiled
#           training (T = 1024), KV-cache decode at batch 64 against transformers' generate, and the
#           share of a ppo.py iteration spent generating. TINY: --quick --configs tiny, eager.
#   world   bash train.sh, the default world pipeline: each stage's time; accuracy, the paired
#           difference against SFT and greedy accuracy per model (evaluate.py's report).
#           TINY: QUICK=1.
#   preset  the world pipeline with 10x the RL episodes (PRESET_PPO_ARGS, given to every ppo.py
#           stage), reusing world's stages up to the RM, whose inputs and settings are the same.
#           TINY: QUICK=1 and QUICK's episodes in batches of 32, to check that the arguments arrive.
#   hh      QUICK=1 bash train.sh hh with random weights of GPT-2's 124M shape (TINY: 1 layer) in a
#           Hugging Face directory: sft.py's --init scratch would give random weights too, but
#           train.sh hh also passes MODEL to evaluate.py --base, which needs weights. Not in TINY.
#
# Offline (as the GPU machine is): GPT-2's tokenizer ranks, needed by bench's --ppo at the gpt2
# shape and by the hh step, are read from $GPT2_TIKTOKEN or the cache (data/tokenizer.py): bring a
# gpt2.tiktoken file. HH_SOURCE and TEXT_SOURCE (train.sh hh) are used when set; otherwise the hh
# step writes a small synthetic HH-format file and text corpus (it measures the plumbing and the
# speed at GPT-2 size, not quality).
set -uo pipefail
cd "$(dirname "$0")/.."
export TINY=${TINY:-0}
export DEVICE=${DEVICE:-cuda}
export PYTHON=${PYTHON:-python}
PY=$PYTHON
export OUT=$(realpath -m "${OUT:-runs/gpu_check}")
export LOGS=$OUT/logs
declare -A LIMIT_S=([bench]=${BENCH_S:-150} [world]=${WORLD_S:-150} [preset]=${PRESET_S:-120}
                    [hh]=${HH_S:-70})
if [[ $TINY == 1 ]]; then
  STEPS=${STEPS:-bench world preset}
else
  STEPS=${STEPS:-bench world preset hh}
fi
for s in $STEPS; do
  if [[ -z ${LIMIT_S[$s]:-} ]]; then
    echo "STEPS: unknown step '$s' (bench world preset hh)" >&2
    exit 2
  fi
done
[[ $DEVICE =~ ^(cpu|cuda)$ ]] || { echo "DEVICE must be cpu or cuda, got '$DEVICE'" >&2; exit 2; }
if [[ $DEVICE == cpu ]]; then
  # the stages train.sh gives no device option (pretraining, sampling, evaluation) pick "auto"
  export CUDA_VISIBLE_DEVICES=""
else
  export DTYPE=${DTYPE:-bf16}  # train.sh's --dtype for the world stages (bf16 autocast)
  if ! $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "DEVICE=cuda but torch sees no GPU: TINY=1 DEVICE=cpu bash $0 checks on the CPU" >&2
    exit 2
  fi
fi
if [[ -z ${WORK:-} ]]; then
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
fi
export WORK=$(realpath -m "$WORK")
# The preset's PPO: 10x the default 2560 episodes, 1024 rollouts an iteration (25 iterations instead
# of 400 at 64, to fit the session: for a 0.9M model a GPU batch of 1024 should take little longer
# than one of 64; not measured yet) in minibatches of 256: 8 gradient steps an iteration, as the
# default.
# A larger model cannot be asked of train.sh's world mode: the shape is fixed by its MODEL array on
# the pretraining line, which takes no extra arguments (SFT, RM and PPO inherit the shape from the
# checkpoint). It needs a PRETRAIN_ARGS variable appended to that line, as SFT_ARGS is to SFT's:
#   PRETRAIN_ARGS="--n-layer 8 --n-head 8 --n-embd 512"   (the preset then reuses only world/)
if [[ $TINY == 1 ]]; then
  DEFAULT_PRESET="--total-episodes 64 --batch-size 32 --minibatch-size 16"
else
  DEFAULT_PRESET="--total-episodes 25600 --batch-size 1024 --minibatch-size 256"
fi
export PRESET_PPO_ARGS=${PRESET_PPO_ARGS:-$DEFAULT_PRESET}
rm -rf "$OUT"/{bench.json,gpu_check.json,gpu_check.md,world,preset,hh}
mkdir -p "$LOGS" "$WORK"
: > "$LOGS/steps.tsv"

step_bench() {
  if [[ $TINY == 1 ]]; then
    $PYTHON -m tools.bench --device "$DEVICE" --configs tiny --quick --ppo --json-out "$OUT/bench.json"
  else
    $PYTHON -m tools.bench --device "$DEVICE" --configs gpt2 --compile --ppo --json-out "$OUT/bench.json"
  fi
}

step_world() {
  QUICK=$TINY RUNS=$WORK/world SFT_ARGS="--device $DEVICE" RM_ARGS="--device $DEVICE" \
    PPO_ARGS="--device $DEVICE" bash train.sh
}

step_preset() {  # world's stages up to the RM are copied: train.sh skips finished stages
  mkdir -p "$WORK/preset"
  for d in world base sft rankings rm; do
    [[ -d $WORK/world/$d ]] && cp -r "$WORK/world/$d" "$WORK/preset/"
  done
  QUICK=$TINY RUNS=$WORK/preset SFT_ARGS="--device $DEVICE" RM_ARGS="--device $DEVICE" \
    PPO_ARGS="--device $DEVICE $PRESET_PPO_ARGS" bash train.sh
}

step_hh() {
  local H=$WORK/hh_inputs
  # random weights of the shape in a Hugging Face GPT-2 directory, as tools/export.py writes one
  $PYTHON - "$H/random-gpt2" "$TINY" <<'EOF' || return
import json, sys
from pathlib import Path
import torch
from export import gpt2_tensors, hf_config
from model import GPT, GPTConfig
from weights import write_safetensors
out, tiny = Path(sys.argv[1]), sys.argv[2] == "1"
torch.manual_seed(0)
shape = dict(n_layer=1, n_head=2, n_embd=16, block_size=128) if tiny else {}  # {}: GPT-2 124M
model = GPT(GPTConfig(vocab_size=50257, **shape))
out.mkdir(parents=True, exist_ok=True)
write_safetensors(out / "model.safetensors", gpt2_tensors(model, prefix="transformer."))
(out / "config.json").write_text(json.dumps(hf_config(model, "GPT2LMHeadModel", 50256, 50256)))
EOF
  if [[ -z ${HH_SOURCE:-} || -z ${TEXT_SOURCE:-} ]]; then
    $PYTHON - "$H/hh.jsonl" "$H/corpus.txt" <<'EOF' || return
import json, sys
# HH's format: two transcripts that share all but the last Assistant turn (data/hh_rlhf.py)
with open(sys.argv[1], "w") as f:
    for i in range(1000):
        a, b = i % 37, i // 37
        prompt = f"\n\nHuman: What is {a} plus {b}?"
        if i % 2:
            prompt += f"\n\nAssistant: Let me think.\n\nHuman: Please answer question {i}."
        f.write(json.dumps({"chosen": f"{prompt}\n\nAssistant: {a} plus {b} is {a + b}.",
                            "rejected": f"{prompt}\n\nAssistant: I am not sure."}) + "\n")
with open(sys.argv[2], "w") as f:
    f.writelines(f"Line {i}: the river ran past {i % 13} stones and {i % 7} gardens.\n"
                 for i in range(3000))
EOF
  fi
  QUICK=1 RUNS=$WORK/hh MODEL=$H/random-gpt2 HH_SOURCE=${HH_SOURCE:-$H/hh.jsonl} \
    TEXT_SOURCE=${TEXT_SOURCE:-$H/corpus.txt} SFT_ARGS="--device $DEVICE" \
    RM_ARGS="--device $DEVICE" PPO_ARGS="--device $DEVICE" bash train.sh hh
}
export -f step_bench step_world step_preset step_hh

run_step() {  # run_step NAME: step_NAME under its limit, output in $LOGS/NAME.log, steps.tsv's line
  local name=$1 limit=${LIMIT_S[$1]} rc=0 t0 t1 seconds
  echo "== gpu_check: $name (at most ${limit}s)"
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" bash -c "step_$name" > "$LOGS/$name.log" 2>&1 || rc=$?
  t1=$(date +%s.%N)
  seconds=$(awk "BEGIN {printf \"%.1f\", $t1 - $t0}")
  printf '%s\t%s\t%s\t%s\t\n' "$name" "$rc" "$seconds" "$limit" >> "$LOGS/steps.tsv"
  echo "== gpu_check: $name exit code $rc in ${seconds}s"
}

for name in bench world preset hh; do
  if [[ " $STEPS " == *" $name "* ]]; then
    run_step "$name"
  else
    why="not in STEPS ($STEPS)"
    [[ $TINY == 1 && $name == hh ]] && why="TINY leaves it out (30 s on 2 cores): STEPS=hh runs it"
    printf '%s\tskipped\t0\t%s\t%s\n' "$name" "${LIMIT_S[$name]}" "$why" >> "$LOGS/steps.tsv"
  fi
done

# The summary: every step's figures, from bench.json, train.sh's "== NAME done in Ns", the reports
$PYTHON - <<'EOF'
import datetime, importlib.metadata, json, math, os, re, shutil
from pathlib import Path

out, work, logs = Path(os.environ["OUT"]), Path(os.environ["WORK"]), Path(os.environ["LOGS"])
tiny, device = os.environ["TINY"] == "1", os.environ["DEVICE"]


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def error_line(text, rc, limit):
    """The step's error in one line: a timeout, or the last line naming an error, or the last."""
    lines = [l.strip() for l in re.split(r"[\r\n]+", text) if l.strip()]
    if rc in (124, 137):
        started = [l[3:] for l in lines if re.match(r"== (?!.*(done in|skipped))", l)]
        return f"timed out after {limit} s" + (f" in '{started[-1]}'" if started else "")
    named = [l for l in lines if re.search(r"^error\b|Error\b|Exception\b|^Killed", l)]
    return (named or lines or [f"exit code {rc}"])[-1][:300]


def bench_figures(path):
    """tools/bench.py's headline figures: training MFU, decode at the largest batch, the PPO split."""
    if not path.exists():
        return {}
    b = json.loads(path.read_text())
    train, decode = b["train"][-1], max(b["decode"], key=lambda d: d["batch"])
    tok = decode["tokens_per_s"]
    ours = "compiled" if "compiled" in tok else "ours"
    f = {"shape": train["shape"], "dtype": b["dtype"], "compiled": b["compile"],
         "train_batch": f"{train['batch']}x{train['seq_len']}",
         "train_tokens_per_s": train["tokens_per_s"],
         "mfu": train["mfu"].get("compiled", train["mfu"]["ours"]),
         "decode_batch": decode["batch"], "decode_new_tokens": decode["new_tokens"],
         "decode_tokens_per_s": tok,
         "decode_vs_transformers": {a: tok[ours] / tok[a] for a in ("eager", "sdpa") if tok.get(a)}}
    if f["mfu"] is None:
        f["mfu_reason"] = "no peak FLOP/s known for this device"
    if not b["transformers"]:
        f["decode_vs_transformers_reason"] = "transformers not installed"
    if b["ppo"]:
        p = b["ppo"][-1]
        f.update(ppo_rollouts=p["rollouts"], ppo_iteration_s=p["iteration_s"],
                 ppo_generate_share=p["generate_share"])
    return f


def report_rows(report):
    """Per model: accuracy, its paired difference against SFT and greedy accuracy (world); win
    rate, RM score and KL (hh, judged by the RM); each with its 95% CI where the report has one."""
    keys = ("accuracy", "accuracy_ci", "greedy_accuracy", "greedy_accuracy_ci", "gold_score",
            "win_rate_vs_sft", "rm_score", "kl_vs_sft")
    rows = {}
    for name, m in report["models"].items():
        row = rows[name] = {k: m[k] for k in keys if m.get(k) is not None}
        if m.get("win_rate_ci"):
            row["win_rate_vs_sft_ci"] = m["win_rate_ci"]
        if m.get("paired_vs_sft") and report["config"].get("judge") != "rm":
            row["accuracy_minus_sft"], row["accuracy_minus_sft_ci"] = m["paired_vs_sft"]["accuracy"]
    return rows


def pipeline_figures(name, text):
    """Stage times from train.sh's log, the rows of its report (copied to $OUT/<name>/)."""
    done = re.finditer(r"^== (.+) done in (\d+)s$", text, re.M)
    f = {"stages_s": {m[1]: int(m[2]) for m in done},
         "reused": re.findall(r"^== (.+): .* exists, skipped$", text, re.M)}
    total = re.search(r"^== (?:HH )?pipeline done in (\d+)s", text, re.M)
    f["pipeline_s"] = int(total[1]) if total else None
    eval_dir = work / name / ("hh/eval" if name == "hh" else "eval")
    if (eval_dir / "report.json").exists():
        (out / name).mkdir(exist_ok=True)
        for file in ("report.json", "report.md"):
            shutil.copy(eval_dir / file, out / name / file)
        f["models"] = report_rows(json.loads((eval_dir / "report.json").read_text()))
    return f


steps = {}
for line in (logs / "steps.tsv").read_text().splitlines():
    name, rc, seconds, limit, why = line.split("\t")
    if rc == "skipped":
        steps[name] = {"ok": False, "seconds": 0.0, "error": None, "skipped": why,
                       "limit_s": int(limit)}
        continue
    rc, text = int(rc), (logs / f"{name}.log").read_text(errors="replace")
    error = None if rc == 0 else error_line(text, rc, limit)
    step = {"ok": rc == 0, "seconds": float(seconds), "error": error, "limit_s": int(limit),
            "log": f"logs/{name}.log"}
    if name == "bench":
        step.update(bench_figures(out / "bench.json"))
    else:
        step.update(pipeline_figures(name, text))
    if name == "preset":
        step["ppo_args"] = os.environ["PRESET_PPO_ARGS"]
    if name == "hh" and not (os.environ.get("HH_SOURCE") and os.environ.get("TEXT_SOURCE")):
        step["data"] = "synthetic HH-format pairs and text written by gpu_check.sh (offline)"
    missing = "ppo_generate_share" if name == "bench" else "models"
    if step["ok"] and missing not in step:
        step.update(ok=False, error=f"exit code 0 but no {missing} in its output")
    steps[name] = step

if device == "cuda":  # torch's import takes seconds: only for the card's name
    import torch
card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
hf_version = version("transformers")
summary = {"device": device, "card": card, "torch": version("torch"), "transformers": hf_version,
           "tiny": tiny,
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "seconds": round(sum(s["seconds"] for s in steps.values()), 1), "steps": steps}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")


def num(v, fmt):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def cell(row, key, fmt=".3f"):
    ci = row.get(key + "_ci")
    return num(row.get(key), fmt) + (f" [{num(ci[0], fmt)}, {num(ci[1], fmt)}]" if ci else "")


def status(s):
    return "skipped" if "skipped" in s else ("yes" if s["ok"] else "NO")


md = [f"# GPU check{' (TINY)' if tiny else ''}: {card}, torch {summary['torch']}, "
      f"transformers {hf_version or 'not installed'}, {summary['date']}", "",
      "| step | ok | seconds | limit | error |", "|---|---|---|---|---|"]
md += [f"| {n} | {status(s)} | {s['seconds']:.0f} | {s['limit_s']} | "
       f"{s['error'] or s.get('skipped', '')} |" for n, s in steps.items()]
b = steps.get("bench", {})
if "decode_tokens_per_s" in b:
    ratios = ", ".join(f"{v:.2f}x vs {k}" for k, v in b["decode_vs_transformers"].items())
    compiled = ", compiled" if b["compiled"] else ""
    md += ["", f"## tools/bench.py ({b['shape']}, {b['dtype']}{compiled})", "",
           f"- training {b['train_batch']}: MFU {num(b['mfu'], '.1%')} {b.get('mfu_reason', '')}; "
           "tokens/s "
           + ", ".join(f"{k} {v:,.0f}" for k, v in b["train_tokens_per_s"].items() if v),
           f"- decode, batch {b['decode_batch']}, {b['decode_new_tokens']} new tokens, tokens/s: "
           + ", ".join(f"{k} {v:,.0f}" for k, v in b["decode_tokens_per_s"].items() if v),
           "- ours / transformers generate: "
           + (ratios or b.get("decode_vs_transformers_reason", "-")),
           f"- PPO iteration: {num(b.get('ppo_iteration_s'), '.2f')} s, generation "
           f"{num(b.get('ppo_generate_share'), '.0%')} of it"]
for n, s in steps.items():
    if n == "bench" or "skipped" in s:
        continue
    md += ["", f"## {n}" + (f" (PPO_ARGS {s['ppo_args']})" if n == "preset" else ""), "",
           "stages: " + (", ".join(f"{k} {v}s" for k, v in s["stages_s"].items()) or "-")
           + (f"; reused: {', '.join(s['reused'])}" if s["reused"] else "")]
    if "models" in s:
        if n == "hh":
            keys = {"win_rate_vs_sft": "win rate vs SFT", "rm_score": "RM score",
                    "kl_vs_sft": "KL vs SFT"}
        else:
            keys = {"accuracy": "accuracy", "accuracy_minus_sft": "accuracy - SFT's",
                    "greedy_accuracy": "greedy accuracy"}
        md += ["", "| model | " + " | ".join(keys.values()) + " |", "|---" * (len(keys) + 1) + "|"]
        md += [f"| {m} | " + " | ".join(cell(row, k) for k in keys) + " |"
               for m, row in s["models"].items()]
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
