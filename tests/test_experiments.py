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
    res = subprocess.run([sys.executable, "-m", "experiments.accuracy", "out/ckpt_1.pt", "out/ckpt_2.pt",
                          "--prompts", "prompts.jsonl", "--max-new-tokens", "8"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert len(lines) == 2 and all("accuracy 0.000" in line and "reverse 0.00" in line for line in lines), lines



def test_rm_checks_of_a_policy_rank_by_its_mean_response_logprob(tmp_path):
    """experiments/rm_checks.py on a policy scores each answer by the policy's own mean
    log-probability of the response (here against a token-by-token computation for gold over
    wrong); on an RM it gives evaluate.py's RM checks."""
    import random
    import torch
    from lib.common import load_checkpoint, model_from_checkpoint
    from data.formats import encode_chat
    from data.tokenizer import get_tokenizer
    from data.world import gold_answer, parse_prompt, wrong_answer
    write_tiny_policy_and_rm(tmp_path)
    prompts = PROMPTS + ["Add 2 and 9.", "Reverse the word river.", "Add 12 and 30."]
    lines = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
    (tmp_path / "prompts.jsonl").write_text(lines)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = ["-m", "experiments.rm_checks"]
    out = {}
    for ckpt in ("sft.pt", "rm.pt"):
        args = ["--ckpt", ckpt, "--prompts", "prompts.jsonl", "--max-new-tokens", "16"]
        res = subprocess.run([sys.executable, *script, *args],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        out[ckpt] = json.loads(res.stdout)
        assert set(out[ckpt]) == {"gold_over_wrong", "gold_over_other_prompt"}
        assert set(out[ckpt]["gold_over_wrong"]) == {"all", "add", "reverse"}
    policy = model_from_checkpoint(load_checkpoint(tmp_path / "sft.pt")).eval()
    tok = get_tokenizer("byte")
    # evaluate.rm_checks draws the wrong answers first, in prompt order
    rng = random.Random("0/rm_checks")

    def mean_logprob(prompt, answer):
        query, response = encode_chat(tok, prompt, answer)
        with torch.no_grad():
            logp = policy.token_logprobs(torch.tensor([query + response]))[0]
        return logp[len(query) - 1:].mean().item()
    tasks = [parse_prompt(p) for p in prompts]
    right = [mean_logprob(p, gold_answer(t)) > mean_logprob(p, wrong_answer(t, rng))
             for p, t in zip(prompts, tasks)]
    assert out["sft.pt"]["gold_over_wrong"]["all"] == round(sum(right) / len(right), 3)
