"""dpo.py: its loss equals a hand computation from token-by-token log-probs over all C(K,2) pairs, one SGD step
raises the chosen response's log-ratio over the rejected one's, and the script runs end to end (a policy
checkpoint evaluate.py can load, --resume equal to an uninterrupted run, one-line errors for bad data)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from data.batches import encode_rankings
from data.formats import encode_chat
from data.tokenizer import get_tokenizer
from dpo import dpo_loss, mean_stats, ranked_logprobs, train_step
from lib.common import Dist, check_max_new_tokens, load_checkpoint, stage_finished
from lib.rankings import ranked_pairs
from lib.reliability import NonFiniteGuard
from lib.sampling import load_policy
from model import GPT, GPTConfig
from test_reliability import (ROOT, assert_same_weights, finish, metrics, run_cli, start,
                              write_tiny_policy_and_rm)
from test_stages import write_tiny_data

TOK = get_tokenizer("byte")
RANKINGS = [  # responses of different lengths, a ranking that is not the listed order, and K = 3 next to K = 2
    {"prompt": "Reverse the word stone.", "responses": ["enots.", "I think it is enots, yes.", "stone."],
     "ranking": [1, 0, 2]},
    {"prompt": "Add 2 and 3.", "responses": ["5.", "2 plus 3 is 6, I believe."], "ranking": [1, 0]},
]


def tiny_gpt(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=128, vocab_size=TOK.n_vocab, n_layer=1, n_head=2, n_embd=32)).eval()


def write_rankings(path, rankings):
    path.write_text("".join(json.dumps(r) + "\n" for r in rankings))
    return path


def logprob_by_hand(model, prompt, response):
    """log pi(response | prompt), end-of-text included: each prefix forwarded alone, one token at a time."""
    query, resp = encode_chat(TOK, prompt, response)
    ids, total = query + resp, 0.0
    with torch.no_grad():
        for t in range(len(query), len(ids)):
            logits, _ = model(torch.tensor([ids[:t]]))
            total += torch.log_softmax(logits[0, -1].double(), dim=-1)[ids[t]].item()
    return total


def log_ratios_by_hand(policy, ref, ranking):
    """log pi(y|x) - log pi_ref(y|x) of each response."""
    return [logprob_by_hand(policy, ranking["prompt"], y) - logprob_by_hand(ref, ranking["prompt"], y)
            for y in ranking["responses"]]


class SGD:
    """Plain gradient descent with the optimiser interface train_step uses (torch.optim's first use spends seconds
    importing torch._dynamo)."""

    def __init__(self, model, lr):
        self.params, self.lr = list(model.parameters()), lr

    @torch.no_grad()
    def step(self):
        for p in self.params:
            p -= self.lr * p.grad

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def step_config(batch_size, beta):
    return SimpleNamespace(batch_size=batch_size, micro_batch_size=batch_size, kl_coef=beta, grad_clip=0.0)


def test_dpo_loss_matches_a_hand_computation_over_all_pairs(tmp_path):
    """Log-probs summed token by token, all C(K,2) pairs of K = 3 and K = 2 by hand: dpo.py's loss and accuracy."""
    policy, ref, beta = tiny_gpt(0), tiny_gpt(2), 0.3
    losses, right, n_pairs = [], 0, 0
    for r in RANKINGS:
        ratios = log_ratios_by_hand(policy, ref, r)
        order = r["ranking"]
        pairs = [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]  # (w, l)
        margins = [beta * (ratios[w] - ratios[l]) for w, l in pairs]
        losses.append(sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / len(pairs))
        right, n_pairs = right + sum(m > 0 for m in margins), n_pairs + len(pairs)
    expected = sum(losses) / len(losses)
    assert 0 < right < n_pairs  # the implicit rewards order some pairs right and some wrong

    prompts = encode_rankings(write_rankings(tmp_path / "rank.jsonl", RANKINGS), TOK, 128)
    with torch.no_grad():
        logps, ref_logps = ranked_logprobs(policy, prompts, "cpu"), ranked_logprobs(ref, prompts, "cpu")
    for i, r in enumerate(RANKINGS):
        by_hand = torch.tensor([logprob_by_hand(policy, r["prompt"], y) for y in r["responses"]])
        assert torch.allclose(logps[i, :len(by_hand)], by_hand.float(), atol=1e-4), (logps[i], by_hand)
    got = dpo_loss(logps, ref_logps, ranked_pairs(prompts, logps.size(1), "cpu"), beta)
    assert got.tolist() == pytest.approx(losses, abs=1e-5)

    # the training step's own path: the loss it reports (mean over the batch's prompts) and its accuracy
    d = Dist("cpu")
    loss, sums = train_step(policy.train(), ref, SGD(policy, lr=0.0), NonFiniteGuard(5, d), prompts, 0,
                            step_config(len(prompts), beta), d)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert mean_stats(sums)["accuracy"] == pytest.approx(right / n_pairs)


def test_one_sgd_step_raises_the_chosen_log_ratio_over_the_rejected(tmp_path):
    """The gradient's sign: a step of train_step moves log(pi / pi_ref) of y_w up relative to that of y_l."""
    policy, ref, beta = tiny_gpt(0), tiny_gpt(1), 0.1
    pair = {"prompt": "Reverse the word stone.", "responses": ["stone.", "enots."], "ranking": [1, 0]}  # y_w = "enots."
    prompts = encode_rankings(write_rankings(tmp_path / "pair.jsonl", [pair]), TOK, 128)
    d = Dist("cpu")

    def margin():  # the chosen response's log-ratio minus the rejected one's
        ratios = log_ratios_by_hand(policy.eval(), ref, pair)
        return ratios[1] - ratios[0]
    before = margin()
    train_step(policy.train(), ref, SGD(policy, lr=0.05), NonFiniteGuard(5, d), prompts, 0, step_config(1, beta), d)
    after = margin()
    assert after > before + 1e-3, (before, after)
    loss = [-math.log(1 / (1 + math.exp(-beta * m))) for m in (before, after)]
    assert loss[1] < loss[0]


def test_dpo_end_to_end_resume_and_bad_data(tmp_path, monkeypatch, capsys):
    """dpo.py learns the tiny rankings, --resume equals the uninterrupted run, its ckpt.pt is a finished policy
    that keeps the SFT model's response-length check; bad data and a finished run's --resume: one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    write_tiny_data(tmp_path)
    write_tiny_policy_and_rm(tmp_path)
    sft = load_checkpoint(tmp_path / "sft.pt")
    sft["max_response_tokens"] = 20  # an SFT model taught answers of up to 20 tokens: the DPO policy keeps the check
    torch.save(sft, tmp_path / "sft.pt")
    # dropout: the RNG state matters; --min-lr-ratio 1: the schedule does not depend on --max-iters
    args = ["--sft", "sft.pt", "--data", "rank.jsonl", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-3",
            "--dropout", "0.1", "--min-lr-ratio", "1.0", "--log-interval", "1", "--device", "cpu"]
    val = ["--val-data", "rank.jsonl", "--eval-interval", "5"]
    whole = start([ROOT / "dpo.py", *args, "--max-iters", "6", *val, "--out-dir", "whole"], tmp_path)
    finish(start([ROOT / "dpo.py", *args, "--max-iters", "3", "--out-dir", "parts"], tmp_path))
    parts = start([ROOT / "dpo.py", *args, "--max-iters", "6", "--out-dir", "parts", "--resume"], tmp_path)
    good = (tmp_path / "rank.jsonl").read_text().splitlines()[0]
    bad_line = json.dumps({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]})
    (tmp_path / "bad.jsonl").write_text(f"{good}\n{bad_line}\n")
    code, err = run_cli("dpo.py", [*args, "--data", "bad.jsonl", "--out-dir", "bad"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: bad.jsonl:2: ") and "permutation" in err, err
    finish(whole)
    code, err = run_cli("dpo.py", [*args, "--max-iters", "6", "--out-dir", "whole", "--resume"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "has finished all 6 steps; raise --max-iters" in err, err
    finish(parts)

    losses = metrics(tmp_path / "whole" / "metrics.jsonl", "loss")
    assert len(losses) == 6 and losses[5] < losses[0] == pytest.approx(math.log(2), abs=0.01)  # pi = pi_ref (+ dropout)
    assert metrics(tmp_path / "parts" / "metrics.jsonl", "loss") == pytest.approx(losses, rel=1e-6)
    accuracy = metrics(tmp_path / "whole" / "metrics.jsonl", "accuracy")
    val = metrics(tmp_path / "whole" / "metrics.jsonl", "val_accuracy")
    assert accuracy[5] > 0.5 and set(val) == {0, 5} and val[5] > 0.5, (accuracy, val)
    path = tmp_path / "whole" / "ckpt.pt"
    assert_same_weights(load_checkpoint(path)["model"], load_checkpoint(tmp_path / "parts" / "ckpt.pt")["model"])
    model, tokenizer, ckpt = load_policy(str(path), "cpu")  # a policy checkpoint, like PPO's
    assert tokenizer == "byte" and model.config.head == "lm" and stage_finished(path)
    with pytest.raises(ValueError, match="shorter than the longest demonstration"):
        check_max_new_tokens(ckpt, 8, path)
