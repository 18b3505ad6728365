"""A compact GPT for every stage of the pipeline: the policy, the reference, the reward and value
models.

The public surface follows nanoGPT (GPTConfig, GPT, forward -> (logits, loss), generate,
configure_optimizers, from_pretrained) with what RLHF adds:
- logits at every position, per-token log-probabilities of given tokens, a loss with a per-token
  mask;
- padding: an attention mask (1 = real token) plus position ids that skip the pad, so a left-padded
  prompt gives exactly the logits it gives alone;
- a scalar head (config.head = "scalar"): the reward model and the value model, one number per
  position;
- generate() with a KV cache, batched prompts of different lengths, top-k / top-p, per-row
  end-of-text.
attention() is written out by hand (q @ k^T / sqrt(d), mask, softmax, @ v); torch.compile fuses it
on CUDA.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from lib.weights import GPT2_NAMES, download_gpt2, read_safetensors


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (context length)
    vocab_size: int = 50257  # GPT-2's 50257 BPE tokens; 258 for the byte tokenizer
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # the paper's SFT used residual dropout 0.2
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2
    # "lm": next-token logits; "scalar": one number per position (reward / value model)
    head: str = "lm"
    # scalar head: r also counts the response's mean log-prob (reward.py)
    score_logprob: bool = False


# exercise: attention
def attention(q, k, v, mask_bias, dropout):
    """Scaled dot-product attention of every head at once (Vaswani et al. 2017):
        y = dropout(softmax(q k^T / sqrt(hs) + mask_bias)) v
    q (B, nh, T, hs), k and v (B, nh, Tk, hs); mask_bias (B, 1, T, Tk) is 0 where a query may see a
    key and -inf where it may not (a future or padded key), broadcast over the heads.
    Returns (B, nh, T, hs)."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1))) + mask_bias  # (B, nh, T, Tk)
    att = F.softmax(att, dim=-1)
    return dropout(att) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        # q, k, v in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask_bias, kv_cache=None):
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, nh, Tk, hs) with Tk = cached + T
        y = attention(q, k, v, mask_bias, self.attn_dropout)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask_bias, kv_cache=None):
        x = x + self.attn(self.ln_1(x), mask_bias, kv_cache)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of past positions for one layer, preallocated for the whole generation."""

    def __init__(self, B, n_head, max_len, hs, device, dtype):
        # (B, nh, Tmax, hs)
        self.k = torch.empty(B, n_head, max_len, hs, device=device, dtype=dtype)
        # (B, nh, Tmax, hs)
        self.v = torch.empty(B, n_head, max_len, hs, device=device, dtype=dtype)
        self.len = 0

    def keep(self, rows):
        """Drop the rows of the batch that have finished generating: rows (B,) bool, True = keep."""
        self.k, self.v = self.k[rows], self.v[rows]

    def append(self, k, v):
        end = self.len + k.size(2)
        self.k[:, :, self.len:end], self.v[:, :, self.len:end] = k, v
        self.len = end
        return self.k[:, :, :self.len], self.v[:, :, :self.len]


def position_ids_from_mask(attention_mask):
    """Positions that skip padding: a left-padded row's first real token gets position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def logprobs_from_logits(logits, tokens):
    """log p(tokens) under softmax(logits): (B, T, V), (B, T) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


def response_score(model, values, logits, idx, first, last):
    """The RM's score of each row from its forward pass: the value at the last token, and with
    score_logprob (a deviation: the paper reads the last token only) g times the mean
    log-probability of the response tokens idx[first..last] under the RM's own language-model head,
    which starts as SFT's:
        r(x, y) = v_last + g * 1/|y| sum_t log p(y_t | x, y_<t)
    `model` may be DDP-wrapped (values, logits from its forward). first, last (B,) -> (B,)."""
    rows = torch.arange(idx.size(0), device=idx.device)
    if logits is None:
        return values[rows, last]
    # (B, T - 1): position t predicts token t + 1
    logp = logprobs_from_logits(logits[:, :-1], idx[:, 1:])
    pos = torch.arange(logp.size(1), device=idx.device).unsqueeze(0)
    in_response = (pos >= first.unsqueeze(1) - 1) & (pos < last.unsqueeze(1))
    mean_logp = (logp * in_response).sum(1) / in_response.sum(1).clamp(min=1)
    return values[rows, last] + getattr(model, "module", model).logprob_gain * mean_logp


def forward_response(model, seq, attention_mask, response_start, temperature):
    """Per response token, from one forward pass: log-probs under `model` and logits (position
    response_start - 1 + t predicts response token t). `model` may be DDP-wrapped, hence a function
    and not a method."""
    logits, _ = model(seq, attention_mask=attention_mask)
    logits = logits[:, response_start - 1:-1].float() / temperature  # (B, R, V)
    return logprobs_from_logits(logits, seq[:, response_start:]), logits


def value_of_response(value_model, seq, attention_mask, response_start):
    """V(state before response token t) for every t: the value head at position response_start - 1 +
    t."""
    values, _ = value_model(seq, attention_mask=attention_mask)
    return values[:, response_start - 1:-1].float()  # (B, R)


class GPT(nn.Module):
    def __init__(self, config, compile=False):
        super().__init__()
        assert config.head in ("lm", "scalar"), f"unknown head {config.head!r}"
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.head == "lm" or config.score_logprob:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        if config.head == "scalar":
            self.score_head = nn.Linear(config.n_embd, 1)  # the paper's RM: unembedding -> a scalar
        if config.score_logprob:
            self.logprob_gain = nn.Parameter(torch.ones(()))  # g of response_score
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # True: recompute each block's activations in backward (less memory)
        self.gradient_checkpointing = False
        # torch.compile in place (state_dict keys unchanged); fuses the attention on CUDA
        if compile:
            self.compile()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, attention_mask=None, loss_mask=None, kv_caches=None):
        """idx (B, T) token ids -> (logits (B, T, V), loss) for the LM head, (values (B, T), None)
        for the scalar head. attention_mask (B, T[k]) marks real tokens with 1 (covering cached
        positions too when kv_caches is given); padded keys are never attended to. targets (B, T)
        with -1 = ignore, and an optional loss_mask (B, T) of 0/1 weights: the loss is the mean
        cross-entropy over counted tokens."""
        B, T = idx.size()
        past = kv_caches[0].len if kv_caches is not None else 0
        Tk = past + T
        block_size = self.config.block_size
        assert Tk <= block_size, f"sequence of {Tk} tokens > block_size {block_size}"
        if attention_mask is None:
            pos = torch.arange(past, Tk, device=idx.device).unsqueeze(0)  # (1, T)
            key_real = torch.ones(1, Tk, dtype=torch.bool, device=idx.device)  # (1, Tk)
        else:
            pos = position_ids_from_mask(attention_mask)[:, past:]  # (B, T)
            key_real = attention_mask.bool()  # (B, Tk)
        # query i (absolute position past + i) sees key j when j <= past + i and key j is real; it
        # always
        # sees itself, so that pad queries get a finite (unused) softmax instead of NaN.
        q_abs = torch.arange(past, Tk, device=idx.device).view(T, 1)  # (T, 1)
        k_abs = torch.arange(Tk, device=idx.device).view(1, Tk)  # (1, Tk)
        allowed = ((k_abs <= q_abs) & key_real[:, None, :]) | (k_abs == q_abs)  # (B, T, Tk)
        # (B, T, C)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        # built once for all layers: 0 where allowed, -inf elsewhere, added to the attention scores
        mask_bias = torch.zeros(allowed.shape, dtype=x.dtype,
                                device=x.device).masked_fill_(~allowed, float("-inf"))
        mask_bias = mask_bias.unsqueeze(1)  # (B, 1, T, Tk)
        for i, block in enumerate(self.transformer.h):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, mask_bias, use_reentrant=False)
            else:
                x = block(x, mask_bias, kv_caches[i] if kv_caches is not None else None)
        x = self.transformer.ln_f(x)
        # (B, T) values; the logits too for an RM with score_logprob
        if self.config.head == "scalar":
            logits = self.lm_head(x) if self.config.score_logprob else None
            return self.score_head(x).squeeze(-1), logits
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            flat_logits = logits.float().view(-1, logits.size(-1))
            flat_targets = targets.reshape(-1).clamp(min=0)
            ce = F.cross_entropy(flat_logits, flat_targets, reduction="none").view(B, T)
            weight = (targets >= 0).float()
            if loss_mask is not None:
                weight = weight * loss_mask.float()
            loss = (ce * weight).sum() / weight.sum().clamp(min=1.0)
        return logits, loss

    def token_logprobs(self, idx, attention_mask=None, temperature=1.0):
        """log pi(idx[:, t+1] | idx[:, :t+1]) for every t: (B, T) -> (B, T - 1). PPO's log-probs of
        sampled tokens; divide by the sampling temperature, as the sampler did."""
        logits, _ = self(idx, attention_mask=attention_mask)
        return logprobs_from_logits(logits[:, :-1] / temperature, idx[:, 1:])

    def score(self, idx, last, attention_mask=None, first=None):
        """r_theta(x, y) of a reward model: the scalar head's output at each row's last real token,
        at index last (B,); pass the attention mask when rows are left-padded, and the index of each
        response's first token (B,) to an RM with score_logprob (response_score). (B, T) -> (B,)."""
        values, logits = self(idx, attention_mask=attention_mask)
        return response_score(self, values, logits, idx, first, last)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 attention_mask=None, eos_token_id=None, pad_token_id=None, return_logprobs=False,
                 use_cache=True, generator=None, rows=None, streamer=None):
        """Continue each row of idx (B, T), left-padded with attention_mask where prompts differ in
        length. Returns (B, T + n) tokens, n <= max_new_tokens (it stops early once every row has
        emitted eos_token_id; finished rows are padded with pad_token_id). With return_logprobs,
        also (B, n) log-probabilities of the sampled tokens under softmax(logits / temperature),
        before top-k / top-p (what a forward pass at that temperature recomputes); 0 at padded
        steps. temperature 0 is greedy. rows = (row_ids (B,), n_rows): this batch is the rows
        row_ids of a batch of n_rows split over processes (sample_next_token). streamer, when given,
        is called after each step with the (B,) tokens just sampled (pad for finished rows)."""
        B, T = idx.shape
        assert T + max_new_tokens <= self.config.block_size, "prompt + max_new_tokens > block_size"
        mask = attention_mask if attention_mask is not None else torch.ones_like(idx)
        pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
        row_ids, n_rows = rows if rows is not None else (torch.arange(B), B)
        row_ids = row_ids.to(idx.device)  # a caller's row ids may live on the CPU
        caches = self.new_kv_caches(B, T + max_new_tokens) if use_cache else None
        out = torch.full((B, T + max_new_tokens), pad, dtype=idx.dtype, device=idx.device)
        out[:, :T] = idx
        logps = torch.zeros(B, max_new_tokens, device=idx.device) if return_logprobs else None
        live = torch.arange(B, device=idx.device)  # the rows still in the batch
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)  # of the live rows
        step_input = idx  # prefill with the whole prompt, then one token per step
        n = 0
        for t in range(max_new_tokens):
            if use_cache:
                logits, _ = self(step_input, attention_mask=mask, kv_caches=caches)
            else:
                logits, _ = self(out[live, :T + t], attention_mask=mask)
            next_tok, logp = sample_next_token(logits[:, -1, :].float(), temperature, top_k, top_p,
                                               generator, row_ids[live], n_rows, return_logprobs)
            next_tok = torch.where(done, torch.full_like(next_tok, pad), next_tok)
            out[live, T + t] = next_tok
            if streamer is not None:
                streamer(out[:, T + t])
            if return_logprobs:
                logps[live, t] = logp.masked_fill(done, 0.0)
            n = t + 1
            mask = torch.cat([mask, torch.ones_like(next_tok[:, None])], dim=1)
            step_input = next_tok[:, None]
            if eos_token_id is not None:
                done = done | (next_tok == eos_token_id)
                if done.all():
                    break
                if done.sum() * 4 >= len(live):  # a quarter of the live rows have finished
                    live, mask, step_input, done = drop_finished(done, caches, live, mask,
                                                                 step_input, done)
        tokens = out[:, :T + n]
        return (tokens, logps[:, :n]) if return_logprobs else tokens

    def new_kv_caches(self, B, max_len):
        """One empty KVCache per layer for B rows of up to max_len tokens."""
        p = next(self.parameters())
        hs = self.config.n_embd // self.config.n_head
        return [KVCache(B, self.config.n_head, max_len, hs, p.device, p.dtype)
                for _ in range(self.config.n_layer)]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay the matrices (Linear weights, embeddings); not biases and LayerNorm gains
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda"  # fused AdamW: one kernel for all parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    @classmethod
    def from_pretrained(cls, name_or_path, head="lm", dropout=0.0, score_logprob=False):
        """GPT-2 weights in the Hugging Face layout (config.json + model.safetensors): a name from
        GPT2_NAMES is downloaded into the cache once; a directory is read from disk."""
        path = Path(name_or_path)
        if not path.is_dir():
            if name_or_path not in GPT2_NAMES:
                raise ValueError(f"{name_or_path!r} is neither a directory nor one of {GPT2_NAMES}")
            path = download_gpt2(name_or_path)
        hf = json.loads((path / "config.json").read_text())
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           dropout=dropout, bias=True, head=head, score_logprob=score_logprob)
        model = cls(config)
        sd = model.state_dict()
        # Hugging Face's Conv1D stores (in, out): these four are transposed relative to nn.Linear
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                      "mlp.c_proj.weight")
        loaded = set()
        for key, tensor in read_safetensors(path / "model.safetensors").items():
            key = key.removeprefix("transformer.")
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue  # causal-mask buffers; lm_head is tied to wte
            ours = "transformer." + key
            if ours not in sd:
                raise KeyError(f"{path / 'model.safetensors'}: unexpected tensor {key!r}")
            if key.endswith(transposed):
                tensor = tensor.t()
            shapes = f"{tuple(tensor.shape)} vs {tuple(sd[ours].shape)}"
            assert tensor.shape == sd[ours].shape, f"{key}: {shapes}"
            with torch.no_grad():
                sd[ours].copy_(tensor)
            loaded.add(ours)
        trunk = {k for k in sd if k.startswith("transformer.")}
        missing = trunk - loaded - {"transformer.wte.weight"}
        if "transformer.wte.weight" not in loaded or missing:
            raise KeyError(f"{path}: missing tensors {sorted(missing) or ['wte.weight']}")
        return model


def filter_logits(logits, top_k=None, top_p=None):
    """Keep the top_k largest logits and the smallest set whose probability reaches top_p; -inf
    elsewhere."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = F.softmax(sorted_logits, dim=-1).cumsum(-1)
        # mass before this token already >= p
        drop_sorted = cum - F.softmax(sorted_logits, dim=-1) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def drop_finished(done, caches, *rows):
    """Compaction: the finished rows leave the batch, from each tensor of `rows` (indexed by the
    live rows) and from every KV cache. generate() does this once a quarter of its live rows have
    finished, so that a batch with one long response costs little more than that one row."""
    keep = ~done
    for cache in caches or ():
        cache.keep(keep)
    return [r[keep] for r in rows]


def sample_next_token(logits, temperature, top_k, top_p, generator, row_ids, n_rows,
                      return_logprobs=False):
    """The next token of each row from its last logits (b, V): argmax at temperature 0, else a
    sample of softmax(filter_logits(logits / temperature)), and its log-probability before top-k /
    top-p (0 when greedy; None without return_logprobs). The sample is the exponential race:
    argmax_v p_v / E_v with E_v ~ Exp(1) is token v with probability p_v. Each step draws the noise
    of all n_rows rows of the whole batch from `generator` and each row uses row row_ids[i] of it,
    so rows split over processes, or finished and dropped, sample exactly what one batch would."""
    if temperature == 0:
        return logits.argmax(-1), torch.zeros(len(logits), device=logits.device)
    logits = logits / temperature
    probs = F.softmax(filter_logits(logits, top_k, top_p), dim=-1)  # (b, V)
    noise = torch.empty(n_rows, probs.size(1),
                        device=probs.device).exponential_(generator=generator)
    next_tok = (probs / noise[row_ids].clamp(min=1e-30)).argmax(-1)  # (b,)
    return next_tok, logprobs_from_logits(logits, next_tok) if return_logprobs else None


def load_lm_into(model, lm_state_dict):
    """Copy a checkpoint's trunk (everything under transformer.) into model, whatever its head: the
    RM starts from the SFT model, the value model from the RM. A head of the same kind is copied
    too."""
    own = model.state_dict()
    trunk = {k: v for k, v in lm_state_dict.items() if k.startswith("transformer.") or k in own}
    missing, unexpected = model.load_state_dict(trunk, strict=False)
    missing = [k for k in missing if not k.startswith(("score_head.", "lm_head.", "logprob_gain"))]
    if missing or unexpected:
        raise KeyError(f"checkpoint does not fit the model: missing {missing}, "
                       f"unexpected {unexpected}")
