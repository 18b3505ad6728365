"""From encoded examples to batches: chat-template examples that fit the context, the epoch-shuffled order
of the examples, random windows of pretraining text, and left or right padding.
"""
import sys

import torch

from data.formats import encode_chat, load_rankings, truncate_left


def shuffled_indices(n, start, count, seed):
    """Positions start .. start+count-1 of an endless stream of epochs, each a fresh permutation of
    range(n) seeded by (seed, epoch): every rank computes the same global batch from the step alone."""
    out, perms = [], {}
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out.append(perms[epoch][i])
    return out


def text_windows(tokens, n, seq_len, generator):
    """n random windows of seq_len + 1 tokens from a 1-D tensor of pretraining text, as (ids, 0) examples
    (0 query tokens: every token counts)."""
    offsets = torch.randint(len(tokens) - seq_len - 1, (n,), generator=generator)
    return [(tokens[o:o + seq_len + 1].tolist(), 0) for o in offsets.tolist()]


def encode_example(tok, prompt, response, max_len, stats):
    """Token ids of `prompt` + `response` in the chat template and the number of query tokens, in at most
    max_len tokens. An over-long prompt loses tokens from the left (stats["truncated"] counts them); an
    example whose response alone does not fit is dropped (stats["dropped"]) and None is returned."""
    query, resp = encode_chat(tok, prompt, response)
    if len(resp) >= max_len:
        stats["dropped"] = stats.get("dropped", 0) + 1
        return None
    query, cut = truncate_left(query, max_len - len(resp))
    stats["truncated"] = stats.get("truncated", 0) + int(cut)
    return query + resp, len(query)


def encode_rankings(path, tok, seq_len):
    """Each ranked prompt of a rankings file as {"seqs": its K responses, each encoded with the
    prompt as (ids, n_query) by encode_example, "ranking"}; a ranking with a response that does not
    fit is dropped. The warning counts rankings (one with a cut prompt is truncated), not
    responses."""
    records, stats, out = load_rankings(path), {}, []
    for r in records:
        own = {}
        seqs = [encode_example(tok, r["prompt"], resp, seq_len, own) for resp in r["responses"]]
        for what in ("truncated", "dropped"):
            stats[what] = stats.get(what, 0) + bool(own.get(what))
        if all(seqs):
            out.append({"seqs": seqs, "ranking": r["ranking"]})
    warn_counts(path, stats, len(records), "rankings", seq_len)
    return out


def describe_rankings(prompts):
    """'N ranked prompts (K: {K: count, ...})' of encode_rankings' output, for a stage's first line."""
    ks = {}
    for p in prompts:
        ks[len(p["seqs"])] = ks.get(len(p["seqs"]), 0) + 1
    return f"{len(prompts)} ranked prompts (K: {dict(sorted(ks.items()))})"


def warn_counts(name, stats, total, unit="examples", max_len=None):
    """Say how many examples (or rankings) were truncated or dropped: never silently. When every one
    was dropped there is nothing to train on: a one-line error (ValueError) naming the file and
    max_len."""
    if total and stats.get("dropped") == total:
        context = f"a context of {max_len} tokens (--seq-len, at most the model's block size)"
        raise ValueError(f"{name}: none of its {total} {unit} fits in {context}")
    for what in ("truncated", "dropped"):
        if stats.get(what):
            counted = f"{stats[what]} of {total} {unit} {what}"
            print(f"warning: {name}: {counted} to fit the context", file=sys.stderr)


def pad_right(seqs, pad_value):
    """(B, T) tensor of right-padded rows; causal attention never looks right, so no mask is needed."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def pad_left(seqs, pad_value):
    """(B, T) left-padded ids and their attention mask (1 = real): prompts of different lengths end at the
    same column, so generation appends to all rows at once."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            idx[i, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
    return idx, mask


def val_windows(tokens, seq_len, limit):
    """Consecutive, non-overlapping windows of held-out text, as (ids, 0) examples (every token counts)."""
    return [(tokens[i:i + seq_len + 1].tolist(), 0) for i in range(0, len(tokens) - seq_len - 1, seq_len)][:limit]
