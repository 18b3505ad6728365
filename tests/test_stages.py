"""Stages 0-2: the RM's K-wise loss, SFT's loss mask, and the scripts end to end (torchrun: test_ddp.py)."""
import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.formats import encode_chat
from data.tokenizer import get_tokenizer
from lib.common import load_checkpoint, model_from_checkpoint, save_checkpoint
from lib.rankings import ranked_pairs
from lib.sampling import score_responses
from model import GPT, GPTConfig
from reward import ranked_scores, ranking_loss
from sft import collate

ROOT = Path(__file__).resolve().parent.parent


def test_ranking_loss_equals_brute_force_over_all_pairs():
    torch.manual_seed(0)
    rankings = [[2, 0, 3, 1], [1, 0], [4, 2, 0, 1, 3, 5, 6, 8, 7]]  # K = 4, 2, 9 in one batch
    Kmax = 9
    scores = torch.randn(3, Kmax)
    better = torch.zeros(3, Kmax, Kmax, dtype=torch.bool)
    for p, rk in enumerate(rankings):
        better[p, :len(rk), :len(rk)] = ranked_pairs([{"ranking": rk}], len(rk), "cpu")[0]
    got = ranking_loss(scores, better)
    for p, rk in enumerate(rankings):
        pairs = list(itertools.combinations(rk, 2))  # (w, l): w appears earlier in the ranking = better
        assert len(pairs) == math.comb(len(rk), 2)
        ref = -sum(math.log(1 / (1 + math.exp(-(scores[p, w] - scores[p, l]).item()))) for w, l in pairs)
        assert got[p].item() == pytest.approx(ref / len(pairs), rel=1e-5)


def test_ranking_loss_gradient_matches_hand_derivation():
    r = torch.tensor([[0.3, -1.2, 2.0]], requires_grad=True)
    ranking = [1, 2, 0]  # response 1 best, then 2, then 0
    loss = ranking_loss(r, ranked_pairs([{"ranking": ranking}], 3, "cpu"))[0]
    loss.backward()
    # d/dr_i of -1/C sum log sigmoid(r_w - r_l) = -1/C [sum_{i beats l} sigmoid(r_l - r_i) - sum_{w beats i} sigmoid(r_i - r_w)]
    sig = lambda z: 1 / (1 + math.exp(-z))
    v = r.detach()[0].tolist()
    pairs = list(itertools.combinations(ranking, 2))
    for i in range(3):
        g = sum(sig(v[l] - v[i]) for w, l in pairs if w == i) - sum(sig(v[i] - v[w]) for w, l in pairs if l == i)
        assert r.grad[0, i].item() == pytest.approx(-g / len(pairs), rel=1e-5)


def test_each_response_is_forwarded_once():
    torch.manual_seed(0)
    rm = GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=1, n_head=2, n_embd=16, head="scalar"))
    rows_seen = []
    rm.register_forward_hook(lambda mod, args, out: rows_seen.append(args[0].size(0)))
    prompts = [{"seqs": [([1, 2, 3 + k] + [7] * (5 * k % 4), 2) for k in range(K)], "ranking": list(range(K))}
               for K in (4, 9, 2)]
    scores, better = ranked_scores(rm, prompts, "cpu")
    assert rows_seen == [4 + 9 + 2]  # K rows per prompt, once each: not 2 * C(K, 2)
    rows_seen.clear()
    chunked, _ = ranked_scores(rm, prompts, "cpu", rows_per_pass=4)  # length-sorted passes of <= 4 rows
    assert rows_seen == [4, 4, 4, 3]
    torch.testing.assert_close(chunked, scores)  # the same score for each response, in its place
    assert scores.shape == (3, 9) and better[0].sum() == 6 and better[1].sum() == 36 and better[2].sum() == 1


def test_sft_loss_mask_counts_response_tokens_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=1, n_head=2, n_embd=16)).eval()
    ids, n_query = [5, 6, 7, 8, 9, 10, 11, 12], 5  # 5 prompt tokens, then a 3-token response
    x, y, mask = collate([(ids, n_query)], "cpu")
    loss = model(x, y, loss_mask=mask)[1]
    # the prediction of the first response token (from the last prompt token) counts, earlier ones do not
    assert mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    for t in range(len(ids) - 1):
        y2 = y.clone()
        y2[0, t] = (y2[0, t] + 1) % 40
        changed = not torch.allclose(model(x, y2, loss_mask=mask)[1], loss)
        assert changed == (t >= n_query - 1), t


def write_tiny_data(d):
    words = ["stone", "apple", "river", "cloud", "green", "table", "house", "light"]
    text = " ".join(f"the reverse of {w} is {w[::-1]}." for w in words * 20)
    (d / "text.txt").write_text(text)
    with open(d / "sft.jsonl", "w") as f:
        for w in words * 4:
            f.write(json.dumps({"prompt": f"Reverse the word {w}.", "response": f"{w[::-1]}."}) + "\n")
    with open(d / "rank.jsonl", "w") as f:
        for w in words * 2:
            resp = [f"{w[::-1]}.", f"I think {w[::-1]}.", f"{w}.", "No."]
            f.write(json.dumps({"prompt": f"Reverse the word {w}.", "responses": resp, "ranking": [0, 1, 2, 3]}) + "\n")


def run(args, cwd, nproc=None):
    cmd = [sys.executable, *args] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


TINY_MODEL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "64", "--device", "cpu"]


def test_pretrain_sft_rm_end_to_end_through_the_command_lines(tmp_path):
    write_tiny_data(tmp_path)
    run([str(ROOT / "sft.py"), "--text-data", "text.txt", "--val-text-data", "text.txt", "--out-dir", "base",
         "--max-iters", "4", "--batch-size", "8", "--micro-batch-size", "4", *TINY_MODEL], tmp_path)
    run([str(ROOT / "sft.py"), "--init", "base/ckpt.pt", "--sft-data", "sft.jsonl", "--val-sft-data", "sft.jsonl",
         "--text-data", "text.txt", "--ptx-fraction", "0.25", "--out-dir", "sft", "--max-iters", "4",
         "--batch-size", "8", "--micro-batch-size", "8", "--device", "cpu"], tmp_path)
    run([str(ROOT / "reward.py"), "--init", "sft/ckpt.pt", "--data", "rank.jsonl", "--val-data", "rank.jsonl",
         "--demo-data", "sft.jsonl", "--out-dir", "rm", "--max-iters", "3", "--batch-size", "4",
         "--micro-batch-size", "2", "--device", "cpu"], tmp_path)
    sft = load_checkpoint(tmp_path / "sft" / "ckpt.pt")
    rm_ckpt = load_checkpoint(tmp_path / "rm" / "ckpt.pt")
    assert sft["tokenizer"] == rm_ckpt["tokenizer"] == "byte" and sft["model_config"]["head"] == "lm"
    rm = model_from_checkpoint(rm_ckpt)
    assert rm.config.head == "scalar"
    tok = get_tokenizer("byte")
    idx = torch.tensor([tok.encode("\n\nHuman: hi\n\nAssistant: ok")])
    assert rm(idx)[0].shape == idx.shape
    # normalised: the demonstrations score 0 on average with standard deviation 1
    demos = [sum(encode_chat(tok, json.loads(line)["prompt"], json.loads(line)["response"]), [])
             for line in open(tmp_path / "sft.jsonl")]
    with torch.no_grad():
        scores = torch.tensor([rm(torch.tensor([ids]))[0][0, -1].item() for ids in demos])
    assert abs(scores.mean().item()) < 1e-4 and scores.std().item() == pytest.approx(1.0, abs=1e-4)
    # the SFT checkpoint records the longest response it was taught (with its end-of-text)
    assert sft["max_response_tokens"] == max(len(encode_chat(tok, json.loads(line)["prompt"],
                                                             json.loads(line)["response"])[1])
                                             for line in open(tmp_path / "sft.jsonl"))
    losses = [json.loads(l)["loss"] for l in open(tmp_path / "sft" / "metrics.jsonl") if '"loss"' in l]
    assert all(math.isfinite(x) for x in losses)


def test_rm_with_score_logprob_trains_normalises_and_drives_ppo(tmp_path):
    """reward.py --score-logprob from an SFT checkpoint: the RM keeps its LM head, the
    demonstrations score 0 +- 1 after normalisation (gain included), and ppo.py trains against it
    with a value model that has the scalar head only."""
    write_tiny_data(tmp_path)
    torch.manual_seed(0)
    tok = get_tokenizer("byte")
    config = GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=32)
    save_checkpoint(tmp_path / "sft.pt", GPT(config), {}, tokenizer="byte")
    words = ("stone", "apple", "river", "cloud")
    lines = "".join(json.dumps({"prompt": f"Reverse the word {w}."}) + "\n" for w in words)
    (tmp_path / "prompts.jsonl").write_text(lines)
    rm_args = [str(ROOT / "reward.py"), "--init", "sft.pt", "--data", "rank.jsonl", "--demo-data",
               "sft.jsonl", "--score-logprob", "--max-iters", "3", "--batch-size", "4",
               "--micro-batch-size", "2", "--device", "cpu"]
    run([*rm_args, "--out-dir", "rm"], tmp_path)
    rm_ckpt = load_checkpoint(tmp_path / "rm" / "ckpt.pt")
    assert rm_ckpt["model_config"]["score_logprob"] and "lm_head.weight" in rm_ckpt["model"]
    rm = model_from_checkpoint(rm_ckpt).eval()
    demos = [encode_chat(tok, json.loads(line)["prompt"], json.loads(line)["response"])
             for line in open(tmp_path / "sft.jsonl")]
    with torch.no_grad():
        scores = torch.tensor(score_responses(rm, [q for q, _ in demos], [r for _, r in demos], 8))
    assert abs(scores.mean().item()) < 1e-4 and scores.std().item() == pytest.approx(1.0, abs=1e-4)
    # --freeze-trunk: the scalar head and g train, the trunk and the LM head it reads stay SFT's
    run([*rm_args, "--freeze-trunk", "--out-dir", "rm_frozen", "--lr", "1e-2"], tmp_path)
    sft = load_checkpoint(tmp_path / "sft.pt")["model"]
    frozen = load_checkpoint(tmp_path / "rm_frozen" / "ckpt.pt")["model"]
    trunk = [k for k in sft if k.startswith(("transformer.", "lm_head."))]
    assert all(torch.equal(frozen[k], sft[k]) for k in trunk)
    assert not all(torch.equal(rm_ckpt["model"][k], sft[k]) for k in trunk)  # unfrozen, it trains
    run([str(ROOT / "ppo.py"), "--sft", "sft.pt", "--rm", "rm/ckpt.pt", "--prompts",
         "prompts.jsonl", "--out-dir", "ppo", "--total-episodes", "8", "--batch-size", "4",
         "--minibatch-size", "2", "--max-new-tokens", "8", "--device", "cpu"], tmp_path)
    ppo = load_checkpoint(tmp_path / "ppo" / "ckpt.pt")
    assert ppo["iter"] == 2 and not any(k.startswith("lm_head") for k in ppo["value_model"])


def test_bad_config_is_a_one_line_error(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--sft-data", "x.jsonl", "--batch-size", "10",
                          "--micro-batch-size", "4"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 2 and "multiple of --micro-batch-size" in res.stderr


def test_quick_pipeline_end_to_end(tmp_path):
    """QUICK=1 bash train.sh: every stage through its real command line, ending in a complete
    report; then FORCE=sft with ALGOS: the stages made from SFT rerun, the alternatives to PPO
    trained and reported; then a run that finds every stage finished."""
    env = {**os.environ, "QUICK": "1", "RUNS": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "train.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    from evaluate import MODELS
    algos = ["dpo", "grpo", "rloo"]
    assert list(report["models"]) == [m for m in MODELS if m not in ["base_prompted", *algos]]  # no few-shot base
    for m in report["models"].values():
        assert math.isfinite(m["win_rate_vs_sft"]) and len(m["win_rate_ci"]) == 2 and math.isfinite(m["kl_vs_sft"])
    # train.sh's RM reads the response's likelihood too (reward.py --score-logprob), under SFT's own
    # trunk and LM head (--freeze-trunk)
    rm_ckpt = load_checkpoint(tmp_path / "rm" / "ckpt.pt")
    sft = load_checkpoint(tmp_path / "sft" / "ckpt.pt")
    assert rm_ckpt["model_config"]["score_logprob"]
    assert all(torch.equal(rm_ckpt["model"][k], w) for k, w in sft["model"].items())
    for stage in ("base", "sft", "rm", "ppo", "ppo_ptx"):  # the training curves of every stage
        assert (tmp_path / stage / "curves.txt").read_text().count("\n") > 5
    bad = subprocess.run(["bash", str(ROOT / "train.sh")], env={**env, "ALGOS": "dpo ppo"}, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unknown algorithm 'ppo'" in bad.stderr
    # SFT again (FORCE=sft; a new seed, so a new model) and the alternatives to PPO: every stage
    # made from SFT reruns, the world and pretraining do not, DPO, GRPO and RLOO are trained and
    # evaluated too, and the report names the checkpoints it evaluated
    again_env = {**env, "ALGOS": " ".join(algos), "FORCE": "sft", "SFT_ARGS": "--seed 5"}
    again = subprocess.run(["bash", str(ROOT / "train.sh")], capture_output=True, text=True,
                           timeout=600, env=again_env)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    skipped = re.findall(r"^== (.+?): \S+ exists, skipped$", again.stdout, re.M)
    rerun = re.findall(r"^== (.+?): rerun: (.+) changed since", again.stdout, re.M)
    assert skipped == ["world", "pretrain"], again.stdout
    ranking_stages = {f"{step} ({split})" for step in ("collect SFT samples", "labelers rank")
                      for split in ("train", "val")}
    # evaluation: rerun for ALGOS' rows anyway
    expected_reruns = ranking_stages | {"reward model", "ppo", "ppo-ptx", "ppo-gold"}
    assert {name for name, _ in rerun} == expected_reruns, again.stdout
    assert "== evaluate done" in again.stdout
    assert dict(rerun)["reward model"].split() == ["sft/ckpt.pt", "rankings/rm_train.jsonl",
                                                  "rankings/rankings_val.jsonl"]  # under RUNS
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert list(report["models"]) == [m for m in MODELS if m != "base_prompted"]
    assert all(report["models"][a]["train_seconds"] > 0 for a in algos)
    sha = hashlib.sha256((tmp_path / "sft" / "ckpt.pt").read_bytes()).hexdigest()
    assert report["checkpoints"]["sft"] == {"path": f"{tmp_path}/sft/ckpt.pt", "sha256": sha}
    assert set(report["checkpoints"]) == {"base", "sft", "rm", "ppo", "ppo_ptx", "ppo_gold", *algos}
    # a third run finds every stage finished and made from the files it would read now: nothing runs
    third = subprocess.run(["bash", str(ROOT / "train.sh")], env={**env, "ALGOS": " ".join(algos)},
                           capture_output=True, text=True, timeout=300)
    nothing_ran = third.stdout.count(", skipped") == 15 and "rerun" not in third.stdout
    assert third.returncode == 0 and nothing_ran, third.stdout[-2000:] + third.stderr[-2000:]
    # experiments.sign_flips on this run: the RM again in a copy with ranking_loss's sign
    # flipped, from train.sh's own command line, and a table of the run's and the flipped stage's
    # val_accuracy
    flip_cmd = [sys.executable, "-m", "experiments.sign_flips", "--runs", str(tmp_path),
                "--only", "ranking_loss"]
    flips = subprocess.run(flip_cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert flips.returncode == 0, flips.stdout[-2000:] + flips.stderr[-2000:]
    rows = flips.stdout.splitlines()
    row = next(line for line in rows if line.startswith("| ranking_loss | rm |"))
    flipped = tmp_path / "sign_flips" / "ranking_loss_rm"
    from experiments.sign_flips import metric
    last = metric(flipped / "metrics.jsonl", "val_accuracy")[-1]
    assert float(row.split("->")[-1].strip(" |")) == pytest.approx(last, abs=5e-4)
    flipped_source = (flipped.parent / "repo_ranking_loss/reward.py").read_text()
    assert "scores[:, None, :] - scores[:, :, None]" in flipped_source
