"""Sampling and scoring, the library under ppo.py, tools/sample.py, evaluate.py and tools/chat.py: load a policy, put
prompts in the chat template, sample responses in batches, decode them, and score them with the reward
model by one rule (an unended response gets a fixed low score) wherever a score is used.
"""

import torch
from tqdm import tqdm

from data.batches import pad_left, pad_right, warn_counts
from data.formats import encode_chat, truncate_left
from lib.common import load_model

# The score of a response that never emitted end-of-text. The RM only ever sees text that ended, so its
# output on a cut-off response is an untrained extrapolation (it can be high); ppo.py and evaluate.py both
# replace it by this fixed value (as lm-human-preferences does for a missing end token), on the RM's
# normalised scale (demonstrations: mean 0, standard deviation 1), so running out of tokens never pays.
UNENDED_SCORE = -3.0


def load_policy(path, device):
    """(model in eval mode on device, tokenizer name, checkpoint dict) of a language-model checkpoint (base,
    SFT or PPO), or of GPT-2 weights (a name such as gpt2, or a Hugging Face directory; checkpoint None)."""
    tokenizer, model, ckpt = load_model(path, head="lm", dropout=0.0, kind="lm")
    return model.to(device).eval(), tokenizer, ckpt


def encode_queries(tok, prompts, max_len, prefix=(), source="prompts"):
    """Token ids of each prompt in the chat template, after an optional fixed prefix of ids, in at most
    max_len tokens (the room left for the response). Over-long queries lose tokens on the left; a warning
    counts them (`source`: the file they came from)."""
    out, cut = [], 0
    for p in prompts:
        ids, was_cut = truncate_left(list(prefix) + encode_chat(tok, p)[0], max_len)
        out.append(ids)
        cut += was_cut
    warn_counts(source, {"truncated": cut}, len(prompts))
    return out


@torch.no_grad()
def sample_responses(model, contexts, tok, max_new_tokens, temperature, batch_size, generator, desc=None):
    """One sampled response per context (a list of token ids), in batches of left-padded contexts.
    A response is its tokens up to and including the first end-of-text, when one was emitted."""
    device = next(model.parameters()).device
    responses = []
    for i in tqdm(range(0, len(contexts), batch_size), desc=desc, disable=desc is None, leave=False):
        idx, attention_mask = pad_left(contexts[i:i + batch_size], tok.pad_token)  # (B, T)
        tokens = model.generate(idx.to(device), max_new_tokens, temperature=temperature,
                                attention_mask=attention_mask.to(device), eos_token_id=tok.eot_token,
                                pad_token_id=tok.pad_token, generator=generator)
        for row in tokens[:, idx.size(1):].tolist():
            responses.append(row[:row.index(tok.eot_token) + 1] if tok.eot_token in row else row)
    return responses


def decode_response(tok, ids):
    """The response text: the ids before end-of-text, without the template's leading space."""
    if tok.eot_token in ids:
        ids = ids[:ids.index(tok.eot_token)]
    return tok.decode(ids).strip()


def make_generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def model_names(paths):
    """Short names for checkpoints: the directory name (runs/ppo/ckpt.pt -> ppo), the path when ambiguous."""
    names = [p.rstrip("/").split("/")[-2] if "/" in p.rstrip("/") else p for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def unended_rule(scores, ended, unended_score=UNENDED_SCORE):
    """The score PPO maximises: r(x, y) where the response ended, unended_score where it did not."""
    return torch.where(ended, scores, torch.full_like(scores, unended_score))


@torch.no_grad()
def score_responses(rm, queries, responses, batch_size):
    """r(x, y) of each (query, response) pair of token-id lists, read at the response's last token (its
    end-of-text when it emitted one), whether or not it ended; unended_rule applies the rule. Rows are
    right-padded: causal attention never looks right, so no mask is needed."""
    device = next(rm.parameters()).device
    out = []
    for i in range(0, len(queries), batch_size):
        batch_q, batch_r = queries[i:i + batch_size], responses[i:i + batch_size]
        seqs = [truncate_left(q + r, rm.config.block_size)[0] for q, r in zip(batch_q, batch_r)]
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        # the index of each response's first token
        starts = [max(1, len(s) - len(r)) for s, r in zip(seqs, batch_r)]
        first = torch.tensor(starts, device=device)
        out.append(rm.score(pad_right(seqs, 0).to(device), last, first=first).float())
    return torch.cat(out).cpu().tolist() if out else []


def sample_table(prompts, responses, columns, n=4):
    """Print the first n prompts and responses under the progress bar, each after its values in `columns`
    ({name: (B,) tensor}), e.g. the score and the KL of PPO's rollouts."""
    rows = [" ".join(f"{name:>6}" for name in columns) + "  prompt -> response"]
    for b in range(min(n, len(prompts))):
        values = " ".join(f"{v[b].item():6.2f}" for v in columns.values())
        rows.append(f"{values}  {prompts[b]!r} -> {responses[b].strip()!r}")
    tqdm.write("\n".join(rows))
