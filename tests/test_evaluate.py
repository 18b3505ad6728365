"""evaluate.py and sample.py: the metrics against hand and loop computations, and both scripts end to end
on tiny random checkpoints."""
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sample
from common import save_checkpoint
from data.formats import encode_chat, load_samples, write_jsonl, write_text
from data.tokenizer import get_tokenizer
from data.world import FAMILIES, gold_answer, pretrain_text, sample_tasks
from evaluate import MODELS, best_of_n_kl, few_shot_contexts, response_logprobs, reward_scores, win_rate
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("gold_score", "win_rate_vs_sft", "win_rate_ci", "rm_score", "kl_vs_sft", "pretrain_loss",
          "mean_length", "family_accuracy")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when the CPU cores are busy)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed, head="lm"):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=128, vocab_size=258, n_layer=1, n_head=2, n_embd=32, head=head)).eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny random checkpoints (ppo is a copy of sft) and a few world prompts, demonstrations and text."""
    d = tmp_path_factory.mktemp("eval")
    for name, seed, head in (("base", 1, "lm"), ("sft", 2, "lm"), ("ppo_ptx", 3, "lm"), ("rm", 4, "scalar")):
        save_checkpoint(d / name / "ckpt.pt", tiny(seed, head), {"seed": seed}, "byte")
    (d / "ppo").mkdir()
    shutil.copy(d / "sft" / "ckpt.pt", d / "ppo" / "ckpt.pt")
    rng = random.Random(0)
    tasks = sample_tasks(rng, FAMILIES, "test", 10)
    write_jsonl(d / "prompts.jsonl", [{"prompt": t.prompt} for t in tasks])
    write_jsonl(d / "demos.jsonl", [{"prompt": t.prompt, "response": gold_answer(t)}
                                    for t in sample_tasks(rng, FAMILIES, "train", 5)])
    write_text(d / "pretrain_val.txt", pretrain_text(rng, FAMILIES, 1500))
    return d


def run_evaluate(d, out_dir, *extra):
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--prompts", "prompts.jsonl", "--sft", "sft/ckpt.pt",
           "--rm", "rm/ckpt.pt", "--base", "base/ckpt.pt", "--ppo", "ppo/ckpt.pt", "--ppo-ptx", "ppo_ptx/ckpt.pt",
           "--few-shot-data", "demos.jsonl", "--pretrain-val", "pretrain_val.txt", "--pretrain-windows", "4",
           "--best-of", "3", "--max-new-tokens", "16", "--batch-size", "4", "--device", "cpu",
           "--out-dir", out_dir, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_win_rate_and_ci_by_hand():
    rate, (lo, hi) = win_rate([1.0, 0.5, 0.0, 1.0])
    # mean 0.625; s^2 = (0.375^2 + 0.125^2 + 0.625^2 + 0.375^2) / 3 = 0.6875 / 3; half = 1.96 s / sqrt(4)
    half = 1.96 * math.sqrt(0.6875 / 3) / 2
    assert rate == 0.625 and lo == pytest.approx(0.625 - half) and hi == 1.0  # 0.625 + 0.469 clipped to 1
    assert win_rate([0.5] * 7) == (0.5, (0.5, 0.5))  # all ties: exactly 0.5, no spread
    assert win_rate([0.0, 1.0] * 50)[1] == pytest.approx((0.5 - 1.96 * math.sqrt(100 / 99 * 0.25) / 10,
                                                          0.5 + 1.96 * math.sqrt(100 / 99 * 0.25) / 10))
    assert best_of_n_kl(1) == 0.0 and best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)


def test_response_logprobs_match_a_loop_over_unpadded_sequences():
    model = tiny(0)
    g = torch.Generator().manual_seed(0)
    contexts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 12, 1, 8)]
    responses = [torch.randint(0, 258, (n,), generator=g).tolist() for n in (3, 1, 7, 4)]
    got = response_logprobs(model, contexts, responses, temperature=0.7, batch_size=3)
    for c, r, value in zip(contexts, responses, got):
        ids = torch.tensor([c + r])
        logp = F.log_softmax(model(ids)[0][0] / 0.7, dim=-1)  # (T, V): row t predicts token t + 1
        ref = sum(logp[t - 1, ids[0, t]].item() for t in range(len(c), len(c) + len(r)))
        assert value == pytest.approx(ref, abs=1e-4)
    rm = tiny(1, head="scalar")
    scores = reward_scores(rm, contexts, responses, batch_size=3)
    for c, r, value in zip(contexts, responses, scores):
        assert value == pytest.approx(rm(torch.tensor([c + r]))[0][0, -1].item(), abs=1e-5)


def test_few_shot_prefix_drops_whole_demonstrations_to_fit():
    tok = get_tokenizer("byte")
    demos = [{"prompt": f"Reverse the word {w}.", "response": w[::-1] + "."} for w in ("stone", "river", "cloud")]
    shot = len(sum(encode_chat(tok, demos[0]["prompt"], demos[0]["response"]), []))  # the same for all three
    queries = [[1] * 10, [2] * (200 - 2 * shot), [3] * (201 - shot)]
    contexts = few_shot_contexts(tok, demos, queries, k=3, seed=0, max_len=200)
    assert [c.count(tok.eot_token) for c in contexts] == [3, 2, 0]  # each demonstration ends with end-of-text
    assert all(c[len(c) - len(q):] == q and len(c) <= 200 for c, q in zip(contexts, queries))
    assert contexts[1][:shot] == contexts[0][shot:2 * shot]  # the earliest demonstration went first


def test_evaluate_end_to_end(world):
    res = run_evaluate(world, "eval")
    report = json.loads((world / "eval" / "report.json").read_text())
    assert list(report["models"]) == list(MODELS) and set(report["seconds"]) == set(MODELS)
    assert report["n_prompts"] == 10 and report["config"]["judge"] == "gold"
    for name, m in report["models"].items():
        assert all(k in m for k in FIELDS), name
        values = [m[k] for k in FIELDS if k not in ("win_rate_ci", "family_accuracy")] + m["win_rate_ci"]
        assert all(isinstance(v, float) and math.isfinite(v) for v in values), (name, m)
        assert m["win_rate_ci"][0] <= m["win_rate_vs_sft"] <= m["win_rate_ci"][1]
        assert set(m["family_accuracy"]) <= set(FAMILIES) and m["family_accuracy"]
    # the SFT model against itself, and a copy of it sampled with the same seed: all ties, no KL
    for name in ("sft", "ppo"):
        assert report["models"][name]["win_rate_vs_sft"] == 0.5 and report["models"][name]["win_rate_ci"] == [0.5, 0.5]
        assert report["models"][name]["kl_vs_sft"] == 0.0
    assert report["models"]["best_of_n"]["kl_vs_sft"] == pytest.approx(math.log(3) - 2 / 3)
    assert report["models"]["best_of_n"]["pretrain_loss"] == report["models"]["sft"]["pretrain_loss"]
    assert report["models"]["base_prompted"]["pretrain_loss"] == report["models"]["base"]["pretrain_loss"]
    assert report["models"]["ppo_ptx"]["kl_vs_sft"] > 0  # another random model: a KL estimate, positive here
    samples = [json.loads(line) for line in open(world / "eval" / "samples.jsonl")]
    assert len(samples) == 10 and all(set(s["responses"]) == set(MODELS) for s in samples)
    assert all(s["responses"]["ppo"]["response"] == s["responses"]["sft"]["response"] for s in samples)
    assert (world / "eval" / "report.md").read_text().count("| sft |") == 2  # main and family tables
    assert (world / "eval" / "winrate.png").exists() or (world / "eval" / "winrate.txt").exists()
    assert "| best_of_n |" in res.stdout

    # the RM as judge (real data): no gold score; and the same seed gives the same samples
    run_evaluate(world, "eval_rm", "--judge", "rm")
    report_rm = json.loads((world / "eval_rm" / "report.json").read_text())
    assert all(m["gold_score"] is None and m["family_accuracy"] == {} for m in report_rm["models"].values())
    assert report_rm["models"]["sft"]["win_rate_vs_sft"] == 0.5
    assert report_rm["models"]["best_of_n"]["win_rate_vs_sft"] >= 0.5  # judged by the RM that picked it
    samples_rm = [json.loads(line) for line in open(world / "eval_rm" / "samples.jsonl")]
    for a, b in zip(samples, samples_rm):
        for name in MODELS:
            assert a["responses"][name]["response"] == b["responses"][name]["response"]
            assert a["responses"][name]["rm_score"] == b["responses"][name]["rm_score"]


def test_sample_collect_k_in_range_and_deterministic(world, monkeypatch, capsys):
    rankings = world / "rankings.jsonl"  # a rankings file: collect takes its prompts
    prompts = [json.loads(line)["prompt"] for line in open(world / "prompts.jsonl")]
    write_jsonl(rankings, [{"prompt": p, "responses": ["a.", "b."], "ranking": [1, 0]} for p in prompts])

    def collect(out, seed):
        monkeypatch.setattr(sys, "argv", ["sample.py", "collect", "--ckpt", str(world / "sft" / "ckpt.pt"),
                                          "--prompts", str(rankings), "--out", str(out), "--k-min", "2",
                                          "--k-max", "5", "--max-new-tokens", "8", "--batch-size", "7",
                                          "--device", "cpu", "--seed", str(seed), "--max-prompts", "8"])
        sample.main()
        return (Path(out)).read_bytes()

    first, again = collect(world / "s0.jsonl", 0), collect(world / "s0b.jsonl", 0)
    other = collect(world / "s1.jsonl", 1)
    assert first == again and first != other
    records = load_samples(world / "s0.jsonl")
    assert [r["prompt"] for r in records] == prompts[:8]
    ks = [len(r["responses"]) for r in records]
    assert all(2 <= k <= 5 for k in ks) and len(set(ks)) > 1

    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", str(world / "sft" / "ckpt.pt"), "--ckpt",
                                      str(world / "base" / "ckpt.pt"), "--prompt", "Reverse the word stone.",
                                      "--max-new-tokens", "8", "--device", "cpu"])
    sample.main()
    out = capsys.readouterr().out
    assert "Reverse the word stone." in out and "  sft " in out and "  base " in out


def test_join_repeated_ckpt_flags():
    argv = ["--ckpt", "a.pt", "--n", "2", "--ckpt=b.pt", "--ckpt", "c.pt"]
    assert sample.join_repeated(argv, "--ckpt") == ["--n", "2", "--ckpt", "a.pt,b.pt,c.pt"]
