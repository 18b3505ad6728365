"""model.py against independent computations: attention by loops, generation without a cache, padding."""
import math

import pytest
import torch
import torch.nn.functional as F

from lib.common import model_from_checkpoint
from model import (GPT, GPTConfig, CausalSelfAttention, filter_logits, load_lm_into,
                   logprobs_from_logits)

TINY = dict(block_size=64, vocab_size=61, n_layer=2, n_head=4, n_embd=32)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **kw})).eval()


def left_pad(rows, pad=0):
    """Left-pad lists of ids into (B, T) ids and a 0/1 attention mask."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return idx, mask


def test_attention_matches_loop_reference():
    torch.manual_seed(0)
    cfg = GPTConfig(**TINY)
    attn = CausalSelfAttention(cfg).eval()
    B, T, C, nh = 2, 7, cfg.n_embd, cfg.n_head
    hs = C // nh
    x = torch.randn(B, T, C)
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, :3] = False  # row 1 is left-padded by 3
    i = torch.arange(T)
    allowed = ((i[None, :] <= i[:, None]) & real[:, None, :]) | (i[None, :] == i[:, None])
    mask_bias = torch.zeros(B, 1, T, T).masked_fill(~allowed.unsqueeze(1), float("-inf"))  # 0 or -inf
    y = attn(x, mask_bias)

    # reference: explicit loops over batch, head and query; softmax by hand over the visible keys
    W, bias = attn.c_attn.weight, attn.c_attn.bias
    qkv = x @ W.t() + bias
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    out = torch.zeros(B, T, C)
    for b in range(B):
        for h in range(nh):
            sl = slice(h * hs, (h + 1) * hs)
            for t in range(T):
                keys = [j for j in range(t + 1) if real[b, j]] or [t]
                scores = torch.stack([q[b, t, sl] @ k[b, j, sl] / math.sqrt(hs) for j in keys])
                w = scores.exp() / scores.exp().sum()
                out[b, t, sl] = sum(w[n] * v[b, j, sl] for n, j in enumerate(keys))
    ref = out @ attn.c_proj.weight.t() + attn.c_proj.bias
    real_rows = real[:, :, None].expand_as(ref)
    torch.testing.assert_close(y[real_rows], ref[real_rows], atol=1e-5, rtol=1e-5)


def test_causal_changing_token_t_never_changes_earlier_logits():
    m = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (2, 20))
    logits, _ = m(idx)
    for t in (0, 7, 19):
        idx2 = idx.clone()
        idx2[:, t] = (idx2[:, t] + 1) % TINY["vocab_size"]
        logits2, _ = m(idx2)
        torch.testing.assert_close(logits2[:, :t], logits[:, :t])
        assert not torch.allclose(logits2[:, t], logits[:, t])


def test_loss_matches_cross_entropy_with_mask_and_ignore_index():
    m = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (3, 12))
    targets = torch.randint(0, TINY["vocab_size"], (3, 12))
    targets[0, :4] = -1
    loss_mask = torch.ones(3, 12)
    loss_mask[2, 6:] = 0
    logits, loss = m(idx, targets, loss_mask=loss_mask)
    terms = [F.cross_entropy(logits[b, t], targets[b, t]) for b in range(3) for t in range(12)
             if targets[b, t] >= 0 and loss_mask[b, t] > 0]
    torch.testing.assert_close(loss, torch.stack(terms).mean())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_generation_equals_recomputation(temperature):
    m = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (3, 9))
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(123)
        outs.append(m.generate(idx, 25, temperature=temperature, use_cache=use_cache, generator=g))
    assert outs[0].shape == (3, 34)
    assert torch.equal(outs[0], outs[1])


def test_sampling_frequencies_follow_the_distribution():
    """The exponential race picks token v with probability p_v: 20000 draws from one fixed distribution."""
    m = tiny_model(vocab_size=5)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    with torch.no_grad():  # logits = log probs whatever the input: zero the trunk's output, bias-free head
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(torch.zeros(32))
    m.lm_head = torch.nn.Linear(32, 5)
    with torch.no_grad():
        m.lm_head.weight.zero_()
        m.lm_head.bias.copy_(probs.log())
    idx = torch.zeros(20000, 1, dtype=torch.long)
    out = m.generate(idx, 1, temperature=1.0, generator=torch.Generator().manual_seed(0))[:, 1]
    freq = torch.bincount(out, minlength=5).float() / len(out)
    assert freq[4] == 0  # probability 0 is never sampled
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)


def test_rows_of_a_split_batch_sample_what_the_whole_batch_samples():
    """generate(rows=...) on each part of a batch split over processes gives the whole batch's tokens."""
    m = tiny_model()
    rows = [[5, 9, 2], [1, 2, 3, 4, 5, 6], [11, 12, 13, 14, 15], [7], [8, 8, 8, 8]]
    idx, mask = left_pad(rows)
    whole = m.generate(idx, 10, temperature=1.0, attention_mask=mask, generator=torch.Generator().manual_seed(5))
    for world_size in (2, 3):
        for rank in range(world_size):
            ids = torch.arange(rank, len(rows), world_size)
            part_idx, part_mask = left_pad([rows[i] for i in ids])
            part = m.generate(part_idx, 10, temperature=1.0, attention_mask=part_mask, rows=(ids, len(rows)),
                              generator=torch.Generator().manual_seed(5))
            assert torch.equal(part[:, part_idx.size(1):], whole[ids, idx.size(1):])


def test_padding_invariance_logits_and_greedy_continuation():
    m = tiny_model()
    rows = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8], [11, 12, 13, 14, 15]]
    idx, mask = left_pad(rows)
    batch_logits, _ = m(idx, attention_mask=mask)
    batch_gen = m.generate(idx, 12, temperature=0, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = torch.tensor([r])
        logits, _ = m(alone)
        torch.testing.assert_close(batch_logits[i, -len(r):], logits[0], atol=1e-5, rtol=1e-5)
        gen = m.generate(alone, 12, temperature=0)
        assert torch.equal(batch_gen[i, idx.size(1):], gen[0, len(r):])


def test_generate_logprobs_match_forward_and_eos_pads_finished_rows():
    m = tiny_model()
    idx, mask = left_pad([[3, 4, 5, 6], [7, 8]])
    eos, pad = 1, 0
    # make eos likely so that rows end at different steps
    with torch.no_grad():
        m.lm_head.weight[eos] += 0.3 * m.transformer.ln_f.weight.sign()
    g = torch.Generator().manual_seed(0)
    tokens, logps = m.generate(idx, 30, temperature=0.7, attention_mask=mask, eos_token_id=eos, pad_token_id=pad,
                               return_logprobs=True, generator=g)
    resp = tokens[:, idx.size(1):]
    assert resp.shape == logps.shape
    for b in range(2):
        ends = (resp[b] == eos).nonzero()
        if len(ends):  # everything after the first eos is padding with log-prob 0
            e = ends[0, 0].item()
            assert (resp[b, e + 1:] == pad).all() and (logps[b, e + 1:] == 0).all()
    if resp.size(1) < 30:  # stopped early: every row finished
        assert all((resp[b] == eos).any() for b in range(2))
    full_mask = torch.cat([mask, torch.ones_like(resp)], dim=1)
    recomputed = m.token_logprobs(tokens, attention_mask=full_mask, temperature=0.7)[:, idx.size(1) - 1:]
    live = logps != 0
    torch.testing.assert_close(logps[live], recomputed[live], atol=1e-5, rtol=1e-5)


def test_top_k_top_p_filter_matches_brute_force():
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    for k, p in [(5, None), (None, 0.6), (10, 0.8), (None, 0.999)]:
        out = filter_logits(logits, k, p)
        for b in range(4):
            order = sorted(range(30), key=lambda j: -logits[b, j].item())
            keep = set(order[:k] if k else order)
            if p is not None:
                probs = F.softmax(torch.tensor([logits[b, j] for j in order if j in keep]), -1)
                kept, mass = set(), 0.0
                for j, pr in zip([j for j in order if j in keep], probs):
                    if mass >= p:
                        break
                    kept.add(j)
                    mass += pr.item()
                keep = kept
            assert {j for j in range(30) if out[b, j] > float("-inf")} == keep


def test_scalar_head_loads_lm_trunk():
    lm = tiny_model(seed=1)
    rm = GPT(GPTConfig(**TINY, head="scalar"))
    load_lm_into(rm, lm.state_dict())
    for k, v in lm.state_dict().items():
        if k.startswith("transformer."):
            assert torch.equal(rm.state_dict()[k], v)
    idx = torch.randint(0, TINY["vocab_size"], (2, 10))
    values, loss = rm(idx)
    assert values.shape == (2, 10) and loss is None
    value_model = GPT(GPTConfig(**TINY, head="scalar"))  # the value model starts from the RM, head included
    load_lm_into(value_model, rm.state_dict())
    torch.testing.assert_close(value_model(idx)[0], values)


def test_score_logprob_rm_is_last_value_plus_gain_times_mean_response_logprob():
    """An RM with score_logprob, from an LM: r = v_last + g * mean log p(response token), the
    log-probs computed token by token by the LM itself, on right-padded rows and on left-padded rows
    with a mask (PPO's rollouts); the value model built from it (head given) has no LM head and
    scores v_last."""
    lm = tiny_model(seed=3)
    rm = GPT(GPTConfig(**TINY, head="scalar", score_logprob=True))
    load_lm_into(rm, lm.state_dict())
    with torch.no_grad():
        rm.logprob_gain.fill_(0.7)
        rm.score_head.bias.fill_(0.3)
    rows = [torch.randint(0, TINY["vocab_size"], (n,)) for n in (9, 14, 6)]
    firsts = [4, 10, 1]  # the index of each row's first response token
    expected = []
    for row, first in zip(rows, firsts):
        with torch.no_grad():
            logits, _ = lm(row[None])
            values, _ = rm(row[None])
        logp = [F.log_softmax(logits[0, t - 1], -1)[row[t]].item() for t in range(first, len(row))]
        expected.append(values[0, -1].item() + 0.7 * sum(logp) / len(logp))
    right = torch.stack([F.pad(r, (0, 14 - len(r))) for r in rows])
    last = torch.tensor([len(r) - 1 for r in rows])
    with torch.no_grad():
        got = rm.score(right, last, first=torch.tensor(firsts))
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    idx, mask = left_pad([r.tolist() for r in rows])
    shift = torch.tensor([14 - len(r) for r in rows])
    with torch.no_grad():
        got = rm.score(idx, last + shift, attention_mask=mask, first=torch.tensor(firsts) + shift)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=1e-4)
    rm_ckpt = {"model": rm.state_dict(), "model_config": vars(rm.config)}
    value_model = model_from_checkpoint(rm_ckpt, head="scalar")
    assert not hasattr(value_model, "lm_head") and not value_model.config.score_logprob
    with torch.no_grad():
        torch.testing.assert_close(value_model(right)[0], rm(right)[0])


def test_logprobs_from_logits_is_log_softmax_gather():
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3))
    ref = torch.tensor([[math.log(F.softmax(logits[b, t], -1)[tokens[b, t]]) for t in range(3)] for b in range(2)])
    torch.testing.assert_close(logprobs_from_logits(logits, tokens), ref)


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16)
    eager = GPT(cfg).eval()
    compiled = GPT(cfg, compile=True).eval()
    compiled.load_state_dict(eager.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(compiled(idx)[0], eager(idx)[0], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    m = tiny_model().train()
    idx = torch.randint(0, TINY["vocab_size"], (2, 16))
    grads = []
    for checkpointing in (False, True):
        m.gradient_checkpointing = checkpointing
        m.zero_grad()
        loss = m(idx, targets=idx)[1]
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in m.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 weights of the frozen models: CUDA only")
def test_bf16_frozen_model_logprobs_close_to_fp32_on_cuda():
    m = tiny_model().cuda()
    idx = torch.randint(0, TINY["vocab_size"], (4, 32), device="cuda")
    ref = m.token_logprobs(idx)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = m.to(torch.bfloat16).token_logprobs(idx)
    torch.testing.assert_close(half.float(), ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("use_cache", [True, False])
def test_finished_rows_leave_the_batch_without_changing_any_row(use_cache):
    """Rows that end early are dropped from the running batch (and the KV cache): every row still samples
    exactly what it samples alone with the same noise, and log-probs match."""
    m = tiny_model()
    eos, pad = 1, 0
    with torch.no_grad():  # make eos likely so that rows end at many different steps
        m.lm_head.weight[eos] += 0.25 * m.transformer.ln_f.weight.sign()
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(2, TINY["vocab_size"], (n,), generator=g).tolist() for n in (3, 7, 1, 5, 9, 2, 4, 6, 8, 3, 5, 7)]
    idx, mask = left_pad(rows)
    kw = dict(temperature=1.0, eos_token_id=eos, pad_token_id=pad, return_logprobs=True, use_cache=use_cache)
    tokens, logps = m.generate(idx, 40, attention_mask=mask, generator=torch.Generator().manual_seed(9), **kw)
    resp = tokens[:, idx.size(1):]
    lengths = []
    for i, r in enumerate(rows):
        alone, alone_logps = m.generate(torch.tensor([r]), 40, rows=(torch.tensor([i]), len(rows)),
                                        generator=torch.Generator().manual_seed(9), **kw)
        n = alone.size(1) - len(r)
        lengths.append(n)
        assert torch.equal(resp[i, :n], alone[0, len(r):]) and (resp[i, n:] == pad).all()
        torch.testing.assert_close(logps[i, :n], alone_logps[0], atol=1e-5, rtol=0)
    assert len(set(lengths)) > 4  # rows did finish at many different steps
