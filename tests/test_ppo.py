"""PPO's pieces against independent computations: GAE by a reverse loop, the clipped losses by hand, and
rewards/log-probs at the right positions under left padding and early end-of-text; and ppo.py end to end
moving a tiny policy the way its reward points."""
import math
from types import SimpleNamespace

import pytest
import torch

from common import load_checkpoint
from data.batches import pad_left
from model import GPT, GPTConfig, forward_response, value_of_response
from ppo import compute_gae, compute_rewards, mask_through_eos, ppo_losses

EOS = 1


def gae_loop(rewards, values, length, gamma, lam):
    """The textbook reverse loop over one response of `length` tokens."""
    adv, last = [0.0] * length, 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values[:length])]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_of_the_batch_equals_a_loop_per_response(gamma, lam):
    torch.manual_seed(0)
    B, R = 4, 9
    lengths = [9, 1, 5, 7]
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths])
    rewards = torch.randn(B, R) * mask
    values = torch.randn(B, R)  # garbage past the end must not matter
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        ref_adv, ref_ret = gae_loop(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
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
    from sampling import unended_rule
    scores = torch.tensor([0.7, 5.0, -0.2])
    ended = torch.tensor([True, False, True])
    assert unended_rule(scores, ended, -3.0).tolist() == pytest.approx([0.7, -3.0, -0.2])


@pytest.mark.parametrize("advantage", ["gae", "grpo", "rloo"])
def test_ppo_learns_what_the_reward_asks_for(tmp_path, advantage):
    """The whole of ppo.py, end to end, moves the policy the way the reward points. A random policy almost
    never emits end-of-text within 8 tokens, and an unended response gets the fixed low score (-3, against
    the RM's ~0 for an ended one): after 30 iterations it ends nearly every response. A sign error anywhere
    between the score and the optimiser step (rewards, GAE or the group baseline, whitening, the surrogate)
    fails this."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_reliability import write_tiny_policy_and_rm
    root = Path(__file__).resolve().parent.parent
    write_tiny_policy_and_rm(tmp_path)
    args = ["--sft", "sft.pt", "--rm", "rm.pt", "--prompts", "prompts.jsonl", "--batch-size", "16",
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


def test_ptx_term_adds_gamma_times_the_pretraining_gradient(monkeypatch):
    """PPO-ptx (equation 2): one ppo_update step with gamma_ptx moves the policy by the step without the ptx
    term plus gamma_ptx times the (negative) gradient of the pretraining loss on the same windows. With plain
    SGD at learning rate 1 a step is minus the gradient, so this is exact; a dropped, mis-scaled or
    sign-flipped ptx term fails it."""
    import ppo
    from common import Dist
    from reliability import NonFiniteGuard
    torch.manual_seed(0)
    V = 16
    policy = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=16))
    value_model = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=16, head="scalar"))
    query, query_mask = pad_left([[3, 4, 5], [6, 7], [8, 9, 10, 11], [12]], 0)
    response = torch.tensor([[5, 6, EOS, 0], [7, 8, 9, 4], [EOS, 0, 0, 0], [2, EOS, 0, 0]])
    ro = ppo.Rollouts(torch.cat([query, response], 1), query.size(1), query_mask, mask_through_eos(response, EOS),
                      (response == EOS).any(1))
    with torch.no_grad():
        logprobs, _ = forward_response(policy, ro.seq, ro.attention_mask, ro.n_query, 1.0)
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
    for gamma in (0.5, 2.0):
        with_ptx = step(gamma, torch.arange(100))
        for k, g in lm_grad.items():
            torch.testing.assert_close(with_ptx[k], without[k] - gamma * g, atol=1e-5, rtol=1e-4, msg=k)
