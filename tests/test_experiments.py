"""experiments/accuracy.py end to end, on the saves that ppo.py --rm gold --keep-saves keeps along training."""
import json
import os
import subprocess
import sys
from pathlib import Path

from test_reliability import write_tiny_policy_and_rm

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Reverse the word stone.", "Add 7 and 5.", "Reverse the word apple."]


def test_gold_ppo_saves_and_accuracy_run_end_to_end(tmp_path):
    write_tiny_policy_and_rm(tmp_path)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, ROOT / "ppo.py", "--sft", "sft.pt", "--rm", "gold",
                          "--prompts", "prompts.jsonl", "--batch-size", "4", "--minibatch-size", "2",
                          "--max-new-tokens", "8", "--total-episodes", "8", "--save-interval", "1", "--keep-saves",
                          "--device", "cpu", "--sample-interval", "1000", "--out-dir", "out"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "out" / "ckpt_1.pt").exists() and (tmp_path / "out" / "ckpt_2.pt").exists()
    res = subprocess.run([sys.executable, ROOT / "experiments" / "accuracy.py", "out/ckpt_1.pt", "out/ckpt_2.pt",
                          "--prompts", "prompts.jsonl", "--max-new-tokens", "8"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and all("accuracy 0.000" in line and "reverse 0.00" in line for line in lines), lines
