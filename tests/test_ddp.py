"""torchrun with 2 CPU processes (gloo) computes what one process computes with the same global batch:
the same losses and metrics step by step and the same final weights, for sft.py, reward.py, ppo.py and dpo.py."""
import json

import pytest
import torch

from lib.common import load_checkpoint, model_from_checkpoint, save_checkpoint
from model import GPT, GPTConfig
from test_stages import ROOT, TINY_MODEL, run, write_tiny_data


def metrics(path, key):
    return [json.loads(line)[key] for line in open(path / "metrics.jsonl") if f'"{key}"' in line]


def assert_same_weights(a, b, key="model"):
    a, b = load_checkpoint(a)[key], load_checkpoint(b)[key]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=k)


def test_sft_two_processes_match_one(tmp_path):
    write_tiny_data(tmp_path)
    args = [str(ROOT / "sft.py"), "--text-data", "text.txt", "--sft-data", "sft.jsonl", "--ptx-fraction", "0.25",
            "--max-iters", "5", "--batch-size", "8", "--micro-batch-size", "2", "--log-interval", "1", *TINY_MODEL]
    run([*args, "--out-dir", "one"], tmp_path)
    run([*args, "--out-dir", "two"], tmp_path, nproc=2)
    one, two = metrics(tmp_path / "one", "loss"), metrics(tmp_path / "two", "loss")
    assert len(one) == 5 and one == pytest.approx(two, rel=1e-4, abs=1e-5)
    assert_same_weights(tmp_path / "one" / "ckpt.pt", tmp_path / "two" / "ckpt.pt")


def test_reward_two_processes_match_one(tmp_path):
    write_tiny_data(tmp_path)
    torch.manual_seed(0)
    sft = GPT(GPTConfig(block_size=64, vocab_size=258, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "sft.pt", sft, {}, "byte")
    args = [str(ROOT / "reward.py"), "--init", "sft.pt", "--data", "rank.jsonl", "--val-data", "rank.jsonl",
            "--demo-data", "sft.jsonl", "--max-iters", "4", "--batch-size", "4", "--micro-batch-size", "1",
            "--lr", "1e-3", "--log-interval", "1", "--device", "cpu"]
    run([*args, "--out-dir", "one"], tmp_path)
    run([*args, "--out-dir", "two"], tmp_path, nproc=2)
    one, two = metrics(tmp_path / "one", "loss"), metrics(tmp_path / "two", "loss")
    assert len(one) == 4 and one == pytest.approx(two, rel=1e-4, abs=1e-5)
    assert len(set(one)) > 1  # it trained: the loss moved
    assert_same_weights(tmp_path / "one" / "ckpt.pt", tmp_path / "two" / "ckpt.pt")


@pytest.mark.parametrize("advantage,reward", [("gae", "rm.pt"), ("grpo", "rm.pt"), ("grpo", "gold")])
def test_ppo_two_processes_match_one(tmp_path, advantage, reward):
    """Two PPO-ptx iterations: the rollouts (sampled in halves with the same random numbers), RM or gold
    scores (each process judging its own rows against their own prompts), globally whitened advantages (or
    GRPO's group baselines, over groups split between the processes), minibatch steps and ptx batches all
    agree with one process."""
    write_tiny_data(tmp_path)
    torch.manual_seed(0)
    sft = GPT(GPTConfig(block_size=64, vocab_size=258, n_layer=1, n_head=2, n_embd=32))
    if reward == "gold":  # end-of-text likelier (logit +3 through ln_f's bias): about half the responses end
        eot = sft.transformer.wte.weight[256].detach()
        sft.transformer.ln_f.bias.data.copy_(eot * 3.0 / eot.norm() ** 2)
    save_checkpoint(tmp_path / "sft.pt", sft, {}, "byte")
    rm = model_from_checkpoint(load_checkpoint(tmp_path / "sft.pt"), head="scalar")
    torch.nn.init.normal_(rm.score_head.weight, std=1.0)  # scores that differ between responses
    save_checkpoint(tmp_path / "rm.pt", rm, {}, "byte")
    prompts = ["Add 2 and 3.", "Reverse the word stone.", "Sort these numbers: 20, 13, 7.", "Why is 18 bigger than 7?",
               "Is it true that 11 is even?", "Make green bell all caps.", "Tell me how to cheat on a quiz.",
               "Count the letter l in the word yellow."]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts * 2))
    args = [str(ROOT / "ppo.py"), "--sft", "sft.pt", "--rm", reward, "--prompts", "prompts.jsonl",
            "--ptx-data", "text.txt", "--ptx-coef", "0.5", "--ptx-batch-size", "4", "--ptx-seq-len", "16",
            "--total-episodes", "16", "--batch-size", "8", "--minibatch-size", "4", "--ppo-epochs", "2",
            "--max-new-tokens", "12", "--lr", "1e-3", "--warmup-iters", "0", "--device", "cpu",
            "--advantage", advantage]
    run([*args, "--out-dir", "one"], tmp_path)
    run([*args, "--out-dir", "two"], tmp_path, nproc=2)
    for key in ("score", "kl", "exact_kl", "entropy", "response_length", "non_score_reward"):
        one, two = metrics(tmp_path / "one", key), metrics(tmp_path / "two", key)
        assert len(one) == 2 and one == pytest.approx(two, rel=1e-4, abs=1e-5), key
    assert metrics(tmp_path / "one", "kl")[1] != 0  # the first update moved the policy away from SFT
    assert_same_weights(tmp_path / "one" / "ckpt.pt", tmp_path / "two" / "ckpt.pt")
    if advantage == "gae":
        assert_same_weights(tmp_path / "one" / "ckpt.pt", tmp_path / "two" / "ckpt.pt", key="value_model")
    if reward == "gold":  # the responses that ended were judged, and differently from one another
        assert all(-3.0 < s < 0 for s in metrics(tmp_path / "one", "score"))
        assert metrics(tmp_path / "one", "pg_loss")[0] != 0


def test_dpo_two_processes_match_one(tmp_path):
    """Four DPO steps: each process takes its share of the ranked prompts; losses, pair metrics, validation and
    the final weights agree with one process."""
    write_tiny_data(tmp_path)
    torch.manual_seed(0)
    sft = GPT(GPTConfig(block_size=64, vocab_size=258, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "sft.pt", sft, {}, "byte")
    args = [str(ROOT / "dpo.py"), "--sft", "sft.pt", "--data", "rank.jsonl", "--val-data", "rank.jsonl",
            "--max-iters", "4", "--batch-size", "4", "--micro-batch-size", "1", "--lr", "1e-3", "--log-interval", "1",
            "--device", "cpu"]
    run([*args, "--out-dir", "one"], tmp_path)
    run([*args, "--out-dir", "two"], tmp_path, nproc=2)
    for key in ("loss", "accuracy", "margin", "val_accuracy"):
        one, two = metrics(tmp_path / "one", key), metrics(tmp_path / "two", key)
        assert len(one) >= 2 and one == pytest.approx(two, rel=1e-4, abs=1e-5), key
    assert len(set(metrics(tmp_path / "one", "loss"))) > 1  # it trained: the loss moved
    assert_same_weights(tmp_path / "one" / "ckpt.pt", tmp_path / "two" / "ckpt.pt")
