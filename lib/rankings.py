"""Ranked responses, as reward.py and dpo.py both read them: which response of a prompt beats which,
and one number per response from a forward pass of each. Each prompt of a rankings file is encoded
(data/batches.py encode_rankings) as {"seqs": [(ids, n_query) per response], "ranking": [best
first]}."""
import itertools

import torch
from torch.nn.utils.rnn import pad_sequence

from data.batches import pad_right


def ranked_pairs(prompts, K, device):
    """(P, K, K) bool: [p, w, l] is True for each of prompt p's C(K,2) pairs, response w ranked
    above l; the slots past a prompt's own number of responses have no True."""
    better = torch.zeros(len(prompts), K, K, dtype=torch.bool)
    for i, p in enumerate(prompts):
        for w, l in itertools.combinations(p["ranking"], 2):  # the ranking lists the best first
            better[i, w, l] = True
    return better.to(device)


def per_response(prompts, device, forward, rows_per_pass=32):
    """forward(idx, first, last) -> (n,) for every response of every prompt, each forwarded once:
    idx (n, T) right-padded token ids, first and last (n,) the columns of each response's first
    token and of its end-of-text. The responses go through sorted by length, rows_per_pass at a
    time, each pass padded to its own longest (padded to the longest of all, about half of a batch
    of the world's rankings would be padding). Returns (P, Kmax), 0 in the slots of prompts with
    fewer responses."""
    seqs = [s for p in prompts for s in p["seqs"]]  # N = sum of K
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    parts = []
    for j in range(0, len(seqs), rows_per_pass):
        rows = [seqs[i] for i in order[j:j + rows_per_pass]]
        # right padding: never seen by the real tokens
        idx = pad_right([ids for ids, _ in rows], 0).to(device)
        first = torch.tensor([n_query for _, n_query in rows], device=device)
        last = torch.tensor([len(ids) - 1 for ids, _ in rows], device=device)
        parts.append(forward(idx, first, last))
    back = torch.tensor(order, device=device).argsort()
    flat = torch.cat(parts)[back]  # (N,): in the prompts' order
    per_prompt = flat.split([len(p["seqs"]) for p in prompts])
    return pad_sequence(per_prompt, batch_first=True)  # (P, Kmax)
