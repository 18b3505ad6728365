"""PPO's pieces against independent computations: GAE by a reverse loop, the clipped losses by hand, and
rewards/log-probs at the right positions under left padding and early end-of-text; and ppo.py end to end
moving a tiny policy the way its reward points."""
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data.batches import pad_left
from lib.common import load_checkpoint
from lib.rl import mask_through_eos
from model import GPT, GPTConfig, forward_response, value_of_response
from ppo import compute_gae, compute_rewards, ppo_losses

EOS = 1


def gae_loop(rewards, values, length, discount, lam):
    """The textbook reverse loop over one response of `length` tokens."""
    adv, last = [0.0] * length, 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + discount * next_value - values[t]
        last = delta + discount * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values[:length])]


@pytest.mark.parametrize("discount,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_of_the_batch_equals_a_loop_per_response(discount, lam):
    torch.manual_seed(0)
    B, R = 4, 9
    lengths = [9, 1, 5, 7]
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths])
    rewards = torch.randn(B, R) * mask
    values = torch.randn(B, R)  # garbage past the end must not matter
    adv, ret = compute_gae(rewards, values, mask, discount, lam)
    for b, n in enumerate(lengths):
        ref_adv, ref_ret = gae_loop(rewards[b].tolist(), values[b].tolist(), n, discount, lam)
        assert adv[b, :n].tolist() == pytest.approx(ref_adv, abs=1e-5)
        assert ret[b, :n].tolist() == pytest.approx(ref_ret, abs=1e-5)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_clipped_losses_equal_hand_computation():
    cfg = SimpleNamespace(cliprange=0.2, cliprange_value=0.2)
    new = torch.tensor([[0.0, -1.0, -0.5]])
    old = torch.tensor([[-0.5, -0.7, -0.5]])
    adv = torch.tensor([[1.0, -2.0, 0.5]])
    vpred = torch.tensor([[0.5, 1.0, -1.0]])
    old_v = torch.tensor([[0.0, 0.9, 0.0]])
    ret = torch.tensor([[1.0, 0.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is past the end
    pg, vf, stats = ppo_losses(new, old, adv, vpred, old_v, ret, mask, cfg)
    pg_terms, vf_terms, clipped = [], [], 0
    for t in range(2):
        ratio = math.exp(new[0, t] - old[0, t])
        clip_ratio = min(max(ratio, 0.8), 1.2)
        pg_terms.append(max(-adv[0, t].item() * ratio, -adv[0, t].item() * clip_ratio))
        clipped += abs(ratio - 1) > 0.2
        v, v0, r = vpred[0, t].item(), old_v[0, t].item(), ret[0, t].item()
        v_clip = v0 + min(max(v - v0, -0.2), 0.2)
        vf_terms.append(max((v - r) ** 2, (v_clip - r) ** 2))
    assert pg.item() == pytest.approx(sum(pg_terms) / 2, rel=1e-6)
    assert vf.item() == pytest.approx(0.5 * sum(vf_terms) / 2, rel=1e-6)
    assert stats["clipfrac"] == pytest.approx(clipped / 2)


def test_rewards_kl_at_the_right_positions_with_early_eos():
    response = torch.tensor([[5, 6, EOS, 0, 0], [7, 8, 9, 4, 3], [EOS, 0, 0, 0, 0]])
    mask = mask_through_eos(response, EOS).float()
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    logprobs = torch.randn(3, 5)
    ref_logprobs = torch.randn(3, 5)
    scores = torch.tensor([2.0, -1.0, 0.5])
    rewards, kl, nsr = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    for b, last in enumerate([2, 4, 0]):
        for t in range(5):
            k = (logprobs[b, t] - ref_logprobs[b, t]).item() if t <= last else 0.0
            assert kl[b, t].item() == pytest.approx(k, abs=1e-6)
            expected = -0.1 * k + (scores[b].item() if t == last else 0.0)
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-6)


def test_response_logprobs_and_values_under_left_padding_equal_unpadded_rows():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=20, n_layer=2, n_head=2, n_embd=16)
    policy = GPT(cfg).eval()
    value_model = GPT(GPTConfig(**{**cfg.__dict__, "head": "scalar"})).eval()
    queries = [[3, 4, 5, 6, 7], [8, 9]]
    responses = [[10, 11, EOS, 0], [12, 13, 14, 15]]  # row 0 ended early; 0 is padding after its end
    query, qmask = pad_left(queries, 0)
    response = torch.tensor(responses)
    mask = mask_through_eos(response, EOS)
    seq, attn = torch.cat([query, response], 1), torch.cat([qmask, mask], 1)
    with torch.no_grad():
        logprobs, _ = forward_response(policy, seq, attn, query.size(1), temperature=0.7)
        values = value_of_response(value_model, seq, attn, query.size(1))
        for b, (q, r) in enumerate(zip(queries, responses)):
            n = int(mask[b].sum())
            alone = torch.tensor([q + r[:n]])
            ref = policy.token_logprobs(alone, temperature=0.7)[0, len(q) - 1:]
            torch.testing.assert_close(logprobs[b, :n], ref, atol=1e-5, rtol=1e-5)
            ref_v = value_model(alone)[0][0, len(q) - 1:-1]
            torch.testing.assert_close(values[b, :n], ref_v, atol=1e-5, rtol=1e-5)


def test_unended_responses_get_the_fixed_score():
    from lib.sampling import unended_rule
    scores = torch.tensor([0.7, 5.0, -0.2])
    ended = torch.tensor([True, False, True])
    assert unended_rule(scores, ended, -3.0).tolist() == pytest.approx([0.7, -3.0, -0.2])


@pytest.mark.parametrize("advantage,rm", [("gae", "rm.pt"), ("grpo", "rm.pt"), ("rloo", "rm.pt"), ("gae", "gold"),
                                          ("rloo", "gold")])
def test_ppo_learns_what_the_reward_asks_for(tmp_path, advantage, rm):
    """The whole of ppo.py, end to end, moves the policy the way the reward points. A random policy almost
    never emits end-of-text within 8 tokens, and an unended response gets the fixed low score (-3, against
    the RM's ~0 or the gold reward's -2.4 or more for an ended one): after 30 iterations it ends nearly every
    response. A sign error anywhere between the score and the optimiser step (rewards, GAE or the group
    baseline, whitening, the surrogate) fails this; with --rm gold, so does a gold reward that lost the
    unended rule."""
    import json
    from test_reliability import write_tiny_policy_and_rm
    root = Path(__file__).resolve().parent.parent
    write_tiny_policy_and_rm(tmp_path)
    args = ["--sft", "sft.pt", "--rm", rm, "--prompts", "prompts.jsonl", "--batch-size", "16",
            "--minibatch-size", "8", "--max-new-tokens", "8", "--lr", "3e-3", "--kl-coef", "0",
            "--total-episodes", "480", "--device", "cpu", "--sample-interval", "1000", "--out-dir", "out",
            "--advantage", advantage]
    res = subprocess.run([sys.executable, root / "ppo.py", *args], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ended = [r["ended"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
             if "ended" in r]
    first, last = sum(ended[:5]) / 5, sum(ended[-5:]) / 5
    assert len(ended) == 30 and first < 0.2 and last > 0.7, ended
    assert ("value_model" in load_checkpoint(tmp_path / "out" / "ckpt.pt")) == (advantage == "gae")


def test_rl_params_norms_trains_the_layernorms_only(tmp_path):
    """--rl-params norms: after PPO, every LayerNorm gain or bias may have moved and some did; every other
    weight of the policy is SFT's, bit for bit."""
    from test_reliability import write_tiny_policy_and_rm
    root = Path(__file__).resolve().parent.parent
    write_tiny_policy_and_rm(tmp_path)
    args = ["--sft", "sft.pt", "--rm", "rm.pt", "--prompts", "prompts.jsonl", "--batch-size", "8",
            "--minibatch-size", "4", "--max-new-tokens", "8", "--lr", "1e-2", "--warmup-iters", "0",
            "--total-episodes", "16", "--device", "cpu", "--sample-interval", "1000", "--out-dir", "out",
            "--rl-params", "norms"]
    res = subprocess.run([sys.executable, root / "ppo.py", *args], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    sft, rl = load_checkpoint(tmp_path / "sft.pt")["model"], load_checkpoint(tmp_path / "out" / "ckpt.pt")["model"]
    norms = [k for k in sft if ".ln_" in k]
    assert norms and all(torch.equal(sft[k], rl[k]) for k in sft if k not in norms)
    assert any(not torch.equal(sft[k], rl[k]) for k in norms)


def test_ptx_term_adds_ptx_coef_times_the_pretraining_gradient(monkeypatch):
    """PPO-ptx (equation 2): one ppo_update step with ptx_coef moves the policy by the step without the ptx
    term plus ptx_coef times the (negative) gradient of the pretraining loss on the same windows. With plain
    SGD at learning rate 1 a step is minus the gradient, so this is exact; a dropped, mis-scaled or
    sign-flipped ptx term fails it."""
    import ppo
    from lib.common import Dist
    from lib.reliability import NonFiniteGuard
    torch.manual_seed(0)
    V = 16
    policy = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=16))
    value_model = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=16, head="scalar"))
    query, query_mask = pad_left([[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]], 0)
    response = torch.tensor([[5, 6, EOS, 0], [7, 8, 9, 4], [EOS, 0, 0, 0], [2, EOS, 0, 0]])
    ro = ppo.Rollouts(torch.cat([query, response], 1), query.size(1), query_mask, mask_through_eos(response, EOS),
                      (response == EOS).any(1))
    with torch.no_grad():
        logprobs, _ = forward_response(policy, ro.seq, ro.attention_mask, ro.response_start, 1.0)
    old = {"logprobs": logprobs, "values": torch.randn(4, 4), "advantages": torch.randn(4, 4),
           "returns": torch.randn(4, 4)}
    windows = [(torch.randint(V, (9,)).tolist(), 0) for _ in range(2)]
    monkeypatch.setattr(ppo, "text_windows", lambda *args: windows)  # the same windows in every update

    def step(ptx_coef, ptx_tokens):
        cfg = SimpleNamespace(ppo_epochs=1, batch_size=4, minibatch_size=4, cliprange=0.2, cliprange_value=0.2,
                              temperature=1.0, grad_clip=0.0, seed=0, ptx_batch_size=2, ptx_coef=ptx_coef)
        p, v = GPT(policy.config), GPT(value_model.config)
        p.load_state_dict(policy.state_dict())
        v.load_state_dict(value_model.state_dict())
        d = Dist("cpu", "fp32")
        opts = [torch.optim.SGD(m.parameters(), lr=1.0) for m in (p, v)]
        ppo.ppo_update(p, v, opts, NonFiniteGuard(5, d), ro, old, 0, cfg, d, ptx_tokens, 8)
        return {k: p.state_dict()[k] - w for k, w in policy.state_dict().items()}

    without = step(0.0, None)
    x = torch.tensor([w[:-1] for w, _ in windows])
    y = torch.tensor([w[1:] for w, _ in windows])
    policy.zero_grad()
    logits, _ = policy(x)
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).backward()
    lm_grad = {k: p.grad for k, p in policy.named_parameters()}
    for ptx_coef in (0.5, 2.0):
        with_ptx = step(ptx_coef, torch.arange(100))
        for k, g in lm_grad.items():
            torch.testing.assert_close(with_ptx[k], without[k] - ptx_coef * g, atol=1e-5, rtol=1e-4, msg=k)


def byte_rollouts(prompts, responses, ended):
    """Rollouts of the byte tokenizer: each prompt in the chat template, then its response text, followed by
    end-of-text where `ended`, else cut as if max_new_tokens had run out."""
    import ppo
    from data.formats import encode_chat
    from data.tokenizer import get_tokenizer
    tok = get_tokenizer("byte")
    queries = [encode_chat(tok, p)[0] for p in prompts]
    tails = [tok.encode(" " + r) + ([tok.eot_token] if e else []) for r, e in zip(responses, ended)]
    R = max(len(t) for t in tails)
    query, query_mask = pad_left(queries, tok.pad_token)
    response = torch.tensor([t + [tok.pad_token] * (R - len(t)) for t in tails])
    response_mask = torch.tensor([[1] * len(t) + [0] * (R - len(t)) for t in tails])
    return ppo.Rollouts(torch.cat([query, response], 1), query.size(1), query_mask, response_mask,
                        torch.tensor(ended)), tok


def test_gold_reward_scores_the_decoded_responses_by_the_gold_judge():
    """--rm gold: step 2 is the gold score of each (prompt, response text), centred at 0.6 and scaled by 4
    (the gold answer 1.6), and the fixed --unended-score for a response that never ended, however good."""
    import ppo
    from data.judge import gold_score
    prompts = ["Add 2 and 3.", "Reverse the word stone.", "Add 4 and 4.", "Add 2 and 3."]
    responses = ["2 plus 3 is 5.", "The word stone reversed is enots, I think.", "4 plus 4 is 9.",
                 "2 plus 3 is 5."]
    ro, tok = byte_rollouts(prompts, responses, [True, True, True, False])
    cfg = SimpleNamespace(unended_score=-3.0)
    scores = ppo.score(None, ro, prompts, tok, cfg, None)
    expected = [(gold_score(p, r) - 0.6) * 4 for p, r in zip(prompts, responses)]
    assert expected[0] == pytest.approx(1.6) and expected[1] < 1.6
    assert scores.tolist() == pytest.approx(expected[:3] + [-3.0])


def test_rm_scores_of_rollouts_equal_scores_of_the_unpadded_pairs():
    """Step 2 with a learnt RM (here one with score_logprob, which also reads where each response
    starts): the score of each left-padded rollout equals sampling.score_responses on its own
    (query, response)."""
    import ppo
    from lib.sampling import score_responses
    prompts = ["Add 2 and 3.", "Reverse the word stone.", "Add 4 and 4."]
    responses = ["2 plus 3 is 5.", "enots.", "4 plus 4 is 9, which is even."]
    ro, tok = byte_rollouts(prompts, responses, [True, True, True])
    torch.manual_seed(0)
    config = GPTConfig(block_size=128, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=32,
                       head="scalar", score_logprob=True)
    rm = GPT(config).eval()
    d = SimpleNamespace(autocast=lambda: torch.autocast("cpu", enabled=False))
    scores = ppo.score(rm, ro, prompts, tok, SimpleNamespace(unended_score=-3.0), d)
    queries = [ro.seq[b, :ro.response_start][ro.query_mask[b].bool()].tolist() for b in range(3)]
    answers = [ro.seq[b, ro.response_start:][ro.response_mask[b].bool()].tolist() for b in range(3)]
    with torch.no_grad():
        expected = score_responses(rm, queries, answers, 8)
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)


def test_logprob_change_equals_a_loop_over_unpadded_responses():
    """The diagnostic: after a change of the weights, the mean change of sum_t log pi(y_t) over the responses
    whose advantages sum above 0 and over those below 0, each response recomputed alone."""
    from lib import rl
    from lib.common import Dist
    torch.manual_seed(0)
    prompts = ["Add 2 and 3.", "Add 4 and 4.", "Reverse the word stone.", "Sort these numbers: 20, 13, 7."]
    ro, tok = byte_rollouts(prompts, ["2 plus 3 is 5.", "9.", "enots.", "7, 13"], [True, True, True, False])
    policy = GPT(GPTConfig(block_size=128, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)).eval()
    cfg = SimpleNamespace(temperature=1.0)
    with torch.no_grad():
        old, _ = forward_response(policy, ro.seq, ro.attention_mask, ro.response_start, 1.0)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    advantages = torch.tensor([[1.0] * 20, [-0.5] * 20, [0.3] * 20, [-2.0] * 20])[:, :ro.response_mask.size(1)]
    stats = rl.logprob_change(policy, ro, old, advantages, cfg, Dist("cpu", "fp32"))
    change = []
    for b in range(4):
        q = ro.seq[b, :ro.response_start][ro.query_mask[b].bool()].tolist()
        n = int(ro.response_mask[b].sum())
        alone = torch.tensor([q + ro.seq[b, ro.response_start:ro.response_start + n].tolist()])
        with torch.no_grad():
            new_lp = policy.token_logprobs(alone)[0, len(q) - 1:]
        change.append((new_lp - old[b, :n]).sum().item())
    assert stats["logprob_change_pos"] == pytest.approx((change[0] + change[2]) / 2, abs=1e-4)
    assert stats["logprob_change_neg"] == pytest.approx((change[1] + change[3]) / 2, abs=1e-4)


def test_probe_scores_and_judges_the_sampled_and_greedy_responses(monkeypatch):
    """The held-out probe: probe_score is the mean reward by the unended rule (here the gold reward) of the
    responses sampled at the training temperature, probe_accuracy their gold accuracy, and
    probe_greedy_accuracy that of the responses decoded at temperature 0."""
    from lib import rl
    from lib.common import Dist
    from data.formats import encode_chat
    from data.tokenizer import get_tokenizer
    tok = get_tokenizer("byte")
    prompts = ["Add 2 and 3.", "Add 4 and 4.", "Reverse the word stone."]
    outputs = {1.0: [" 2 plus 3 is 5.", " 4 plus 4 is 9.", " enots"],  # the last one never ends
               0.0: [" 2 plus 3 is 4.", " 4 plus 4 is 8.", " I think stone backwards is enots, maybe enots."]}
    ended = {1.0: [True, True, False], 0.0: [True, True, True]}

    def fake_sample(policy, queries, tok_, max_new_tokens, temperature, batch_size, generator, desc=None):
        return [tok.encode(t) + [tok.eot_token] * e for t, e in zip(outputs[temperature], ended[temperature])]
    monkeypatch.setattr(rl, "sample_responses", fake_sample)
    cfg = SimpleNamespace(temperature=1.0, max_new_tokens=16, batch_size=4, seed=0, unended_score=-3.0)
    queries = [encode_chat(tok, p)[0] for p in prompts]
    out = rl.probe(torch.nn.Linear(1, 1), None, prompts, queries, tok, cfg, Dist("cpu", "fp32"))
    from data.judge import gold_score
    rewards = [(gold_score(prompts[0], "2 plus 3 is 5.") - 0.6) * 4, (gold_score(prompts[1], "4 plus 4 is 9.") - 0.6) * 4,
               -3.0]
    assert out["probe_score"] == pytest.approx(sum(rewards) / 3)
    # accuracy reads the content, ended or not (as evaluate.py): "enots" is the reversed word; the greedy third
    # answer is the gold answer buried in other text (half credit), and "2 plus 3 is 4." wrong
    assert out["probe_accuracy"] == pytest.approx(2 / 3)
    assert out["probe_greedy_accuracy"] == pytest.approx(1 / 3)
