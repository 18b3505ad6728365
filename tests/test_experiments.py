"""experiments/: the oracle reward is the gold judge by ppo.py's own rule, and both scripts run end to end."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from data.batches import pad_left, pad_right
from data.formats import encode_chat
from data.judge import gold_score
from data.tokenizer import get_tokenizer
from test_reliability import write_tiny_policy_and_rm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
PROMPTS = ["Reverse the word stone.", "Add 7 and 5.", "Reverse the word apple."]


def test_oracle_reward_is_the_scaled_gold_score_and_unended_responses_get_the_fixed_score(tmp_path):
    import oracle_ppo
    from ppo import Rollouts, mask_through_eos
    tok = get_tokenizer("byte")
    texts = ["enots.", "7 plus 5 is 11.", "elppa, and then it goes on and on"]
    queries, responses = zip(*(encode_chat(tok, p, t) for p, t in zip(PROMPTS, texts)))
    responses = [r if i != 2 else r[:-1] for i, r in enumerate(responses)]  # the third (longest) never ends
    query, query_mask = pad_left(list(queries), tok.pad_token)
    response = pad_right(responses, tok.pad_token)
    ro = Rollouts(torch.cat([query, response], 1), query.size(1), query_mask,
                  mask_through_eos(response, tok.eot_token), torch.tensor([True, True, False]))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    oracle_ppo.current.clear()
    oracle_ppo.current.update(batch=[0, 1, 2], tok=tok)
    cfg = types.SimpleNamespace(prompts=str(tmp_path / "p.jsonl"), unended_score=-3.0)
    scores = oracle_ppo.gold_reward(None, ro, cfg, None)
    want = [(gold_score(p, t) - oracle_ppo.CENTER) * oracle_ppo.SCALE for p, t in zip(PROMPTS, texts)]
    assert want[0] > 0 > want[1]  # right and wrong answers land on either side of zero
    assert scores.tolist() == pytest.approx([want[0], want[1], -3.0], abs=1e-6)


def test_oracle_ppo_and_accuracy_run_end_to_end(tmp_path):
    write_tiny_policy_and_rm(tmp_path)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, ROOT / "experiments" / "oracle_ppo.py", "--sft", "sft.pt", "--rm", "rm.pt",
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
