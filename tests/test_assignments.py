"""The exercises of docs/assignments.md, each against an independent computation: loops, closed forms, torch's
own functions. Run one exercise's tests with `python -m pytest tests/test_assignments.py -k NAME`.

The tests of an exercise call only that exercise's function (the ptx_loss tests give the tiny GPT an
attention of their own), so the exercises can be done in any order."""
import itertools
import math
import statistics
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.batches import text_windows
from dpo import dpo_loss
from lib.rankings import ranked_pairs
import model
from model import GPT, GPTConfig, attention
from ppo import (adaptive_kl_coef, compute_gae, compute_rewards, group_advantages, ppo_losses,
                 ptx_loss)
from reward import ranking_loss
from sft import collate, sft_loss_mask


def assert_close(got, expected, atol=1e-5):
    """allclose with a message for the student (torch.testing.assert_close takes most of a second to import)."""
    assert got.shape == expected.shape, f"shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    assert torch.allclose(got, expected, atol=atol, rtol=1e-5), \
        f"largest difference {(got - expected).abs().max().item():.3g}\ngot {got}\nexpected {expected}"


def mask_bias_of(allowed):
    """0 where a query may see a key, -inf where it may not: (B, T, Tk) bool -> (B, 1, T, Tk)."""
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).unsqueeze(1)


# --- attention (model.py) -------------------------------------------------------------------------------------
def test_attention_matches_a_loop_over_queries():
    """Each query gets the softmax-weighted sum of the values of the keys it may see; dropout gets those weights."""
    torch.manual_seed(0)
    B, nh, T, Tk, hs = 2, 2, 3, 5, 4  # 3 new queries after 2 cached positions, as in generation with a KV cache
    q, k, v = torch.randn(B, nh, T, hs), torch.randn(B, nh, Tk, hs), torch.randn(B, nh, Tk, hs)
    real = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)  # row 1: two keys of left padding
    past = Tk - T
    allowed = torch.tensor([[[(j <= past + i and bool(real[b, j])) or j == past + i for j in range(Tk)]
                             for i in range(T)] for b in range(B)])
    seen = []

    def dropout(weights):  # stands in for nn.Dropout, which acts on the attention weights
        seen.append(weights)
        return weights

    y = attention(q, k, v, mask_bias_of(allowed), dropout)
    ref_y, ref_w = torch.zeros(B, nh, T, hs), torch.zeros(B, nh, T, Tk)
    for b, h, i in itertools.product(range(B), range(nh), range(T)):
        keys = [j for j in range(Tk) if allowed[b, i, j]]
        scores = torch.tensor([float(q[b, h, i] @ k[b, h, j]) / math.sqrt(hs) for j in keys])
        w = scores.exp() / scores.exp().sum()
        for n, j in enumerate(keys):
            ref_w[b, h, i, j] = w[n]
            ref_y[b, h, i] += w[n] * v[b, h, j]
    assert_close(y, ref_y)
    assert len(seen) == 1, "call dropout once, on the attention weights"
    assert_close(seen[0], ref_w, atol=1e-6)


def test_attention_matches_torch_sdpa_with_is_causal():
    """With a causal mask and no padding, the output equals torch's scaled_dot_product_attention(is_causal=True)."""
    torch.manual_seed(1)
    B, nh, T, hs = 2, 3, 6, 8
    q, k, v = torch.randn(B, nh, T, hs), torch.randn(B, nh, T, hs), torch.randn(B, nh, T, hs)
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    y = attention(q, k, v, mask_bias_of(causal), nn.Identity())
    assert_close(y, F.scaled_dot_product_attention(q, k, v, is_causal=True))


# --- sft_loss_mask (sft.py) -------------------------------------------------------------------------
def test_sft_loss_mask_equals_hand_written_masks():
    """Response targets, never padding: masks written by hand for prompts of 3 and 5 tokens and for pretraining text."""
    targets = torch.tensor([[11, 12, 13, 14, 15, 16],  # 3 query tokens, no padding
                            [21, 22, 23, 24, -1, -1],  # pretraining text (n_query 0), 2 targets of padding
                            [31, 32, 33, 34, 35, -1]])  # 5 query tokens, 1 target of padding
    n_query = torch.tensor([3, 0, 5])
    expected = [[0, 0, 1, 1, 1, 1],  # target position 2 is the first response token (predicted from position 2)
                [1, 1, 1, 1, 0, 0],
                [0, 0, 0, 0, 1, 0]]
    assert sft_loss_mask(targets, n_query).long().tolist() == expected


def test_sft_loss_mask_counts_exactly_the_response_through_collate():
    """Through sft.collate, the counted targets of each example are its response and end-of-text, nothing else."""
    EOT = 1
    examples = [([50, 51, 52] + [60, 61, EOT], 3),  # (ids, n_query): 3 prompt tokens, then "60 61" and end-of-text
                ([70, 71, 72, 73, 74] + [80, EOT], 5),
                ([90, 91, 92, 93], 0)]  # pretraining text: every next token counts
    x, y, mask = collate(examples, "cpu")
    assert x.shape == y.shape == mask.shape == (3, 6)
    counted = [y[b][mask[b].bool()].tolist() for b in range(3)]
    assert counted == [[60, 61, EOT], [80, EOT], [91, 92, 93]]


# --- ranking_loss (reward.py) ---------------------------------------------------------------------------------
RANKINGS = [[2, 0, 3, 1], [1, 0], [0, 2, 1]]  # K = 4, 2, 3 in one batch; best first


def ranked_batch():
    """Random RM scores (padding slots hold large garbage that must not count) and ranked_pairs masks, Kmax = 4."""
    torch.manual_seed(2)
    scores = torch.randn(len(RANKINGS), 4) + 10.0 * torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]])
    better = torch.zeros(len(RANKINGS), 4, 4, dtype=torch.bool)
    for p, ranking in enumerate(RANKINGS):
        better[p, :len(ranking), :len(ranking)] = ranked_pairs([{"ranking": ranking}], len(ranking), "cpu")[0]
    return scores, better


def test_ranking_loss_matches_brute_force_over_all_pairs():
    """Each prompt's loss is -1/C(K,2) * sum of log sigmoid(r_w - r_l) over its C(K,2) pairs, summed in plain Python."""
    scores, better = ranked_batch()
    got = ranking_loss(scores, better)
    assert got.shape == (len(RANKINGS),)
    for p, ranking in enumerate(RANKINGS):
        pairs = list(itertools.combinations(ranking, 2))  # (w, l): w comes earlier in the ranking
        assert len(pairs) == math.comb(len(ranking), 2)
        r = scores[p].tolist()
        ref = -sum(math.log(1 / (1 + math.exp(-(r[w] - r[l])))) for w, l in pairs) / len(pairs)
        where = f"prompt {p} (K = {len(ranking)}, ranking {ranking})"
        assert got[p].item() == pytest.approx(ref, rel=1e-5), \
            f"{where}: loss {got[p].item():.6f}, expected {ref:.6f}"


def test_ranking_loss_gradient_matches_a_pair_by_pair_sum():
    """The gradient with respect to the scores equals that of a pair-by-pair torch sum: the loss is differentiable."""
    scores, better = ranked_batch()
    r1, r2 = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    ranking_loss(r1, better).sum().backward()
    ref = sum(-F.logsigmoid(r2[p, w] - r2[p, l]) / math.comb(len(ranking), 2)
              for p, ranking in enumerate(RANKINGS) for w, l in itertools.combinations(ranking, 2))
    ref.backward()
    assert_close(r1.grad, r2.grad, atol=1e-6)
    assert (r1.grad[1, 2:] == 0).all() and r1.grad[2, 3] == 0  # padding gets no gradient


def test_ranking_loss_of_a_prompt_without_comparisons_is_zero():
    """A prompt with one response has no pair: its loss is 0 (not 0 / 0 = NaN), and it does not
    change the loss of the other prompts in the batch."""
    scores = torch.tensor([[0.7, -0.2, 1.5], [2.0, 0.0, 0.0]])
    better = ranked_pairs([{"ranking": [2, 0, 1]}, {"ranking": [0]}], 3, "cpu")
    got = ranking_loss(scores, better)
    assert got[1].item() == 0.0, f"a prompt without pairs: loss {got[1].item()}, expected 0"
    alone = ranking_loss(scores[:1], better[:1])
    assert got[0].item() == pytest.approx(alone[0].item()), "the first prompt's loss changed"


# --- compute_rewards (ppo.py) ----------------------------------------------------------------------
def response_batch(lengths, R, seed):
    """A (B, R) response mask for responses of the given lengths (end-of-text included), and random log-probs."""
    torch.manual_seed(seed)
    mask = torch.tensor([[1.0] * n + [0.0] * (R - n) for n in lengths])
    return mask, torch.randn(len(lengths), R) - 2.0, torch.randn(len(lengths), R) - 2.0


def test_compute_rewards_match_a_loop_over_tokens():
    """KL and -kl_coef * KL at every real token, the score added at the last real token, zeros after end-of-text."""
    lengths, R, kl_coef = [3, 5, 1], 5, 0.1
    mask, logprobs, ref_logprobs = response_batch(lengths, R, seed=3)
    scores = torch.tensor([2.0, -1.0, 0.5])
    rewards, kl, non_score_reward = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    for b, n in enumerate(lengths):
        for t in range(R):
            k = logprobs[b, t].item() - ref_logprobs[b, t].item() if t < n else 0.0
            assert kl[b, t].item() == pytest.approx(k, abs=1e-6)
            assert non_score_reward[b, t].item() == pytest.approx(-kl_coef * k, abs=1e-6)
            assert rewards[b, t].item() == pytest.approx(-kl_coef * k + (scores[b].item() if t == n - 1 else 0.0),
                                                         abs=1e-6)


def test_compute_rewards_sum_to_the_papers_objective():
    """Summed over a response, the rewards are r(x, y) - kl_coef * log(pi_RL(y|x) / pi_SFT(y|x)), the paper's objective."""
    lengths, R, kl_coef = [4, 2, 6, 6], 6, 0.3
    mask, logprobs, ref_logprobs = response_batch(lengths, R, seed=4)
    scores = torch.tensor([0.7, -2.0, 1.5, 0.0])
    rewards, _, _ = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    for b, n in enumerate(lengths):
        log_ratio = logprobs[b, :n].sum().item() - ref_logprobs[b, :n].sum().item()  # log of a product of ratios
        assert rewards[b].sum().item() == pytest.approx(scores[b].item() - kl_coef * log_ratio, abs=1e-5)


# --- compute_gae (ppo.py) ---------------------------------------------------------------------------------
GAE_LENGTHS, GAE_R = [6, 1, 4, 5], 6


def gae_batch(seed):
    """Rewards, values and mask of responses of GAE_LENGTHS tokens; values past the end are garbage."""
    torch.manual_seed(seed)
    mask = torch.tensor([[1.0] * n + [0.0] * (GAE_R - n) for n in GAE_LENGTHS])
    return torch.randn(len(GAE_LENGTHS), GAE_R) * mask, torch.randn(len(GAE_LENGTHS), GAE_R) * 3.0, mask


@pytest.mark.parametrize("discount,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_compute_gae_matches_the_textbook_reverse_loop(discount, lam):
    """Advantages and returns equal the textbook reverse loop over each response alone in plain Python; 0 after it."""
    rewards, values, mask = gae_batch(seed=5)
    advantages, returns = compute_gae(rewards, values, mask, discount, lam)
    for b, n in enumerate(GAE_LENGTHS):
        r, v = rewards[b, :n].tolist(), values[b, :n].tolist() + [0.0]  # V after the last token is 0
        ref, last = [0.0] * n, 0.0
        for t in reversed(range(n)):
            last = r[t] + discount * v[t + 1] - v[t] + discount * lam * last
            ref[t] = last
        assert advantages[b, :n].tolist() == pytest.approx(ref, abs=1e-5), f"advantages of {b}"
        want = [a + v[t] for t, a in enumerate(ref)]
        assert returns[b, :n].tolist() == pytest.approx(want, abs=1e-5), f"returns of response {b}"
        past_end = f"response {b} ends after {n} tokens: advantages and returns after it must be 0"
        assert advantages[b, n:].tolist() == [0.0] * (GAE_R - n), f"{past_end}: advantages " \
            f"{advantages[b, n:].tolist()}"
        assert returns[b, n:].tolist() == [0.0] * (GAE_R - n), \
            f"{past_end}: returns {returns[b, n:].tolist()}"


def test_compute_gae_matches_the_closed_form():
    """A_t = sum over k >= t of (discount * lam)^(k - t) * delta_k, with delta_k = r_k + discount * V_{k+1} - V_k."""
    discount, lam = 0.95, 0.7
    rewards, values, mask = gae_batch(seed=6)
    advantages, _ = compute_gae(rewards, values, mask, discount, lam)
    for b, n in enumerate(GAE_LENGTHS):
        v = values[b, :n].tolist() + [0.0]
        delta = [rewards[b, k].item() + discount * v[k + 1] - v[k] for k in range(n)]
        ref = [sum((discount * lam) ** (k - t) * delta[k] for k in range(t, n)) for t in range(n)]
        assert advantages[b, :n].tolist() == pytest.approx(ref, abs=1e-5)


# --- ppo_losses (ppo.py) --------------------------------------------------------------------------------------
CLIP = SimpleNamespace(cliprange=0.2, cliprange_value=0.2)


def ppo_batch():
    """One row of 7 tokens, the last past the end: every case of the clipped surrogate and of the value clip.
    Token: 0 A>0 ratio above 1+eps, 1 A>0 below 1-eps, 2 A<0 above, 3 A<0 below, 4 A>0 inside, 5 A<0 inside."""
    log_ratio = torch.tensor([[0.25, -0.5, 0.4, -0.3, 0.1, -0.1, 2.0]])  # ratios 1.28, 0.61, 1.49, 0.74, ...
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -3.0, -0.2, -1.0]])
    adv = torch.tensor([[1.0, 2.0, -1.5, -0.5, 0.7, -1.2, 5.0]])
    old_v = torch.tensor([[0.0, 1.0, -1.0, 0.5, 0.0, 2.0, 0.0]])
    vpred = old_v + torch.tensor([[0.5, -0.6, 0.1, 0.9, -0.3, 0.0, 3.0]])  # some moved by more than eps_v
    returns = torch.tensor([[1.0, 2.0, -2.0, 2.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    return old + log_ratio, old, adv, vpred, old_v, returns, mask


def test_ppo_losses_match_per_token_hand_computation():
    """pg_loss, vf_loss and the clip fraction equal a per-token computation in plain Python, both signs of A."""
    new, old, adv, vpred, old_v, returns, mask = ppo_batch()
    pg_loss, vf_loss, stats = ppo_losses(new, old, adv, vpred, old_v, returns, mask, CLIP)
    pg, vf, clipped = [], [], []
    for t in range(6):  # the real tokens
        ratio = math.exp(new[0, t].item() - old[0, t].item())
        a = adv[0, t].item()
        pg.append(max(-a * ratio, -a * min(max(ratio, 0.8), 1.2)))
        clipped.append(abs(ratio - 1) > 0.2)
        v, v0, r = vpred[0, t].item(), old_v[0, t].item(), returns[0, t].item()
        vf.append(max((v - r) ** 2, (v0 + min(max(v - v0, -0.2), 0.2) - r) ** 2))
    assert pg_loss.item() == pytest.approx(sum(pg) / 6, rel=1e-5)
    assert vf_loss.item() == pytest.approx(0.5 * sum(vf) / 6, rel=1e-5)
    assert stats["clipfrac"] == pytest.approx(sum(clipped) / 6)


def test_ppo_losses_gradient_is_zero_where_the_clip_binds():
    """The surrogate's gradient is -A * ratio / n_tokens, and 0 where clipping binds; the same for the value loss."""
    new, old, adv, vpred, old_v, returns, mask = ppo_batch()
    new, vpred = new.clone().requires_grad_(), vpred.clone().requires_grad_()
    n_tokens = 10.0  # the global token count under DDP: the means divide by it, not by this row's 6 tokens
    pg_loss, vf_loss, _ = ppo_losses(new, old, adv, vpred, old_v, returns, mask, CLIP, n_tokens)
    assert pg_loss.requires_grad, "pg_loss has no gradient: is the ratio of detached log-probs?"
    assert vf_loss.requires_grad, "vf_loss has no gradient: is vpred detached?"
    (pg_loss + vf_loss).backward()
    assert new.grad is not None, "no gradient reaches new_logprobs: is the ratio detached?"
    assert vpred.grad is not None, "no gradient reaches vpred: is it detached?"
    ratio = (new - old).exp().detach()
    binds = torch.tensor([[True, False, False, True, False, False, True]])  # A>0 above 1+eps, A<0 below 1-eps; masked
    assert_close(new.grad, torch.where(binds, 0.0, -adv * ratio / n_tokens))
    v_binds = torch.tensor([[True, False, False, True, False, False, True]])  # the clipped value is further from R
    assert_close(vpred.grad, torch.where(v_binds, 0.0, (vpred - returns).detach() / n_tokens))


# --- ptx_loss (ppo.py) ----------------------------------------------------------------------------------------
@pytest.fixture
def tiny_gpt(monkeypatch):
    """A tiny random GPT that attends with torch's own attention, so these tests do not need the attention exercise."""
    monkeypatch.setattr(model, "attention", lambda q, k, v, mask_bias, dropout:
                        F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias))
    torch.manual_seed(7)
    return GPT(GPTConfig(block_size=16, vocab_size=23, n_layer=1, n_head=2, n_embd=16))


def test_ptx_loss_equals_cross_entropy_of_next_tokens(tiny_gpt):
    """The loss is F.cross_entropy of the GPT's logits at positions 0..T-1 against the tokens at 1..T of each window."""
    windows = [([3, 5, 7, 11, 13, 17, 19, 2, 4], 0), ([1, 1, 2, 3, 5, 8, 13, 21, 0], 0), ([9] * 9, 0)]
    loss = ptx_loss(tiny_gpt, windows, "cpu")
    ids = torch.tensor([w for w, _ in windows])  # (3, 9)
    logits, _ = tiny_gpt(ids[:, :-1])  # (3, 8, V)
    ref = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_ptx_loss_trains_the_policy_on_text_windows(tiny_gpt):
    """On data.batches.text_windows the loss is the mean of each window's loss, and its gradient reaches the policy."""
    text = torch.randint(23, (200,), generator=torch.Generator().manual_seed(8))
    windows = text_windows(text, 4, 12, torch.Generator().manual_seed(9))
    loss = ptx_loss(tiny_gpt, windows, "cpu")
    each = [ptx_loss(tiny_gpt, [w], "cpu").item() for w in windows]
    assert loss.item() == pytest.approx(sum(each) / len(each), rel=1e-5)
    loss.backward()
    assert tiny_gpt.lm_head.weight.grad is not None and tiny_gpt.lm_head.weight.grad.abs().sum() > 0


# --- adaptive_kl_coef (ppo.py) ---------------------------------------------------------
def test_adaptive_kl_coef_follows_the_formula_above_and_below_target():
    """KL 10% above the target raises kl_coef by 0.1 * n / horizon, 10% below lowers it by as much, step after step."""
    kl_coef = adaptive_kl_coef(0.2, 6.6, 6.0, 1000, 64)
    assert kl_coef == pytest.approx(0.2 * (1 + 0.1 * 64 / 1000), rel=1e-12)
    kl_coef = adaptive_kl_coef(kl_coef, 5.4, 6.0, 1000, 32)
    assert kl_coef == pytest.approx(0.2 * (1 + 0.1 * 64 / 1000) * (1 - 0.1 * 32 / 1000), rel=1e-12)
    kl_coef = adaptive_kl_coef(kl_coef, 6.0, 6.0, 1000, 64)  # on target: unchanged
    assert kl_coef == pytest.approx(0.2 * (1 + 0.1 * 64 / 1000) * (1 - 0.1 * 32 / 1000), rel=1e-12)


def test_adaptive_kl_coef_clips_the_error_at_0_2():
    """However far the KL is from the target, the proportional error is clipped to [-0.2, 0.2]."""
    for kl, error in [(60.0, 0.2), (7.5, 0.2), (0.0, -0.2), (3.0, -0.2), (7.0, 1 / 6)]:
        kl_coef = adaptive_kl_coef(0.5, kl, 6.0, 100, 10)
        assert kl_coef == pytest.approx(0.5 * (1 + error * 10 / 100), rel=1e-12), kl


# --- group_advantages (ppo.py) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_advantages_match_a_loop_per_group(estimator):
    """Each response against the others of its group of G: centred and scaled (grpo), or minus the mean of the
    other G - 1 (rloo); a group whose total_rewards are all equal gets advantages 0."""
    torch.manual_seed(0)
    G = 4
    total_rewards = torch.randn(3 * G)
    total_rewards[G:2 * G] = 0.5  # a group whose responses all scored alike: no signal, advantages 0
    got = group_advantages(total_rewards, G, estimator)
    for g in range(3):
        group = total_rewards[g * G:(g + 1) * G].tolist()
        for i, r in enumerate(group):
            if estimator == "grpo":
                want = (r - statistics.mean(group)) / (statistics.stdev(group) + 1e-8)
            else:
                want = r - sum(group[j] for j in range(G) if j != i) / (G - 1)
            assert got[g * G + i].item() == pytest.approx(want, abs=1e-5), (estimator, g, i)


# --- dpo_loss (dpo.py) ----------------------------------------------------------------------------------------
def test_dpo_loss_matches_a_loop_over_the_ranked_pairs():
    """Per prompt, the mean over its C(K,2) pairs of -log sigmoid(beta * (log-ratio of y_w - log-ratio of y_l))."""
    torch.manual_seed(0)
    logps, ref_logps, beta = -10 * torch.rand(2, 3), -10 * torch.rand(2, 3), 0.5
    rankings = [[2, 0, 1], [1, 0]]  # best first; the second prompt has K = 2, its third slot is padding
    better, expected = torch.zeros(2, 3, 3, dtype=torch.bool), []
    for p, ranking in enumerate(rankings):
        losses = []
        for w, l in itertools.combinations(ranking, 2):
            better[p, w, l] = True
            z = beta * ((logps[p, w] - ref_logps[p, w]) - (logps[p, l] - ref_logps[p, l])).item()
            losses.append(math.log(1 + math.exp(-z)))
        expected.append(sum(losses) / len(losses))
    assert_close(dpo_loss(logps, ref_logps, better, beta), torch.tensor(expected))


def test_dpo_loss_gradient_raises_the_chosen_and_lowers_the_rejected():
    """One pair: d loss / d log pi(y_w) = -beta * sigmoid(-z) and d loss / d log pi(y_l) = +beta * sigmoid(-z)."""
    logps = torch.tensor([[-5.0, -7.0]], requires_grad=True)
    ref_logps, beta = torch.tensor([[-6.0, -6.5]]), 0.2
    better = torch.tensor([[[False, False], [True, False]]])  # response 1 ranked above response 0
    dpo_loss(logps, ref_logps, better, beta).sum().backward()
    z = beta * ((-7.0 + 6.5) - (-5.0 + 6.0))
    s = 1 / (1 + math.exp(z))  # sigmoid(-z)
    assert_close(logps.grad, torch.tensor([[beta * s, -beta * s]]))
