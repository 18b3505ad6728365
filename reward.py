"""Stage 2: the reward model (RM), trained on K-wise rankings with the paper's pairwise loss.

The RM is the SFT model with its unembedding replaced by a scalar head; r_theta(x, y) is the head's output
at the last token of the response (its end-of-text). Labelers ranked K = 4..9 responses per prompt, which
gives C(K,2) comparisons; all of them form ONE batch element, so each response is forwarded once (K
passes, not 2 * C(K,2)) and correlated comparisons do not overfit (section 3.5, appendix C.2). After
training, the head is rescaled so that the demonstrations score 0 +- 1 (the paper adds a bias for mean 0).

    python reward.py --init runs/sft/ckpt.pt --data runs/world/rankings_train.jsonl \\
                     --val-data runs/world/rankings_val.jsonl --demo-data runs/world/sft_val.jsonl   # CPU
    torchrun --nproc_per_node=4 reward.py --init runs/sft/ckpt.pt ...                              # GPUs
    python reward.py ... --resume    # after Ctrl-C (which saves) or a crash: continue from out_dir/ckpt.pt

Pairwise data ({"prompt","chosen","rejected"} or HH-RLHF transcripts) is K = 2.
Deviations from the paper: the RM is as small as the policy (the paper used a 6B RM for every policy).
With --score-logprob (off by default; train.sh passes it on the built-in world) r also counts the
response's mean log-probability under the RM's own language-model head, kept from SFT and trained
with it, times a learnt gain (model.response_score).
"""
import math
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.batches import (describe_rankings, encode_example, encode_rankings, pad_right,
                          shuffled_indices, warn_counts)
from data.formats import load_sft
from data.tokenizer import get_tokenizer
from lib.common import (Dist, RunConfig, RunLog, cosine_lr, load_model, prepare_model,
                        save_checkpoint, set_seed)
from lib.config import cli, parse_config
from lib.reliability import Interrupt, NonFiniteGuard, preflight, resume_training, training_state
from lib.sampling import score_responses
from lib.weights import GPT2_NAMES
from model import response_score


@dataclass
class RewardConfig(RunConfig):
    out_dir: str = "runs/rm"  # where ckpt.pt and metrics.jsonl go
    init: str = "runs/sft/ckpt.pt"  # the SFT checkpoint (or a GPT-2 name / HF dir) whose trunk starts the RM
    data: str = "runs/world/rankings_train.jsonl"  # K-wise rankings JSONL (or pairwise / HH-RLHF)
    val_data: str | None = None  # held-out rankings for accuracy
    demo_data: str | None = None  # demonstrations (SFT JSONL) whose mean score is set to 0 after training
    seq_len: int = 256  # longest prompt + response, in tokens
    score_logprob: bool = False  # r also adds g x the response's mean log-prob (deviation; README)
    freeze_trunk: bool = False  # train the scalar head and g only; trunk and LM head stay SFT's
    epochs: float = 1.0  # passes over the rankings (the paper: 1)
    max_iters: int = 0  # optimiser steps; 0 = derived from epochs
    batch_size: int = 64  # prompts per optimiser step, over all processes (the paper: 64)
    micro_batch_size: int = 16  # prompts per forward pass (all K responses of each)
    lr: float = 1e-4  # peak learning rate (the paper: 9e-6 for a 6B RM)
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of the peak
    warmup_iters: int = 0  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.95  # Adam beta2
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = off
    dropout: float = 0.0  # dropout while training the RM
    eval_interval: int = 50  # steps between validation accuracies
    log_interval: int = 10  # steps between log lines

    def __post_init__(self):
        super().__post_init__()  # the shared settings' ranges (common.RunConfig)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size "
                             f"{self.micro_batch_size}")


def better_than(ranking, K):
    """(K, K) bool: [i, j] is True when labelers ranked response i above response j."""
    place = torch.empty(K, dtype=torch.long)
    place[torch.as_tensor(ranking)] = torch.arange(K)  # place[i] = 0 for the best response
    return place[:, None] < place[None, :]


# exercise: ranking_loss
def ranking_loss(rewards, better):
    """The paper's RM loss for each prompt, all its C(K,2) comparisons at once:
        loss = -1/C(K,2) * sum_{(y_w, y_l)} log sigmoid(r(x, y_w) - r(x, y_l))
    rewards (P, K) and better (P, K, K) as from better_than (padded response slots have no True; a prompt
    without comparisons gets 0). Returns (P,)."""
    diff = rewards[:, :, None] - rewards[:, None, :]  # (P, K, K): r_i - r_j
    pair_losses = -F.logsigmoid(diff) * better
    return pair_losses.sum(dim=(1, 2)) / better.sum(dim=(1, 2)).clamp(min=1)


def forward_prompts(model, prompts, device, rows_per_pass=32):
    """Score every response of every prompt, each forwarded once, and build the (P, Kmax) reward matrix
    and (P, Kmax, Kmax) comparison masks of ranking_loss. The responses go through the model sorted by
    length, rows_per_pass at a time, each pass padded to its own longest: padded to the longest of all,
    about half of a batch of the world's rankings would be padding."""
    seqs = [ids for p in prompts for ids, _ in p["seqs"]]  # N = sum of K sequences (p["seqs"]: (ids, n_query))
    n_query = [n for p in prompts for _, n in p["seqs"]]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    parts = []
    for j in range(0, len(seqs), rows_per_pass):
        rows = [seqs[i] for i in order[j:j + rows_per_pass]]
        idx = pad_right(rows, 0).to(device)  # (n, T): right padding, never seen by the real tokens
        values, logits = model(idx)  # through the DDP wrapper when training: GPT.score, written out
        last = torch.tensor([len(s) - 1 for s in rows], device=device)
        first = torch.tensor([n_query[i] for i in order[j:j + rows_per_pass]], device=device)
        parts.append(response_score(model, values, logits, idx, first, last))
    r = torch.empty(len(seqs), dtype=parts[0].dtype, device=device)
    r[torch.tensor(order, device=device)] = torch.cat(parts)  # (N,): back in the prompts' order
    Kmax = max(len(p["seqs"]) for p in prompts)
    rewards = torch.zeros(len(prompts), Kmax, device=device)
    better = torch.zeros(len(prompts), Kmax, Kmax, dtype=torch.bool, device=device)
    start = 0
    for i, p in enumerate(prompts):
        K = len(p["seqs"])
        rewards[i, :K] = r[start:start + K]
        better[i, :K, :K] = better_than(p["ranking"], K)
        start += K
    return rewards, better


def validation_accuracy(model, prompts, cfg, d):
    """Pairwise accuracy on held-out rankings (overall and per K), the loss, and the score spread."""
    model.eval()
    correct, total, loss_sum = defaultdict(int), defaultdict(int), 0.0
    scores = []
    with torch.no_grad():
        for i in range(0, len(prompts), cfg.micro_batch_size):
            chunk = prompts[i:i + cfg.micro_batch_size]
            with d.autocast():
                rewards, better = forward_prompts(model, chunk, d.device)
            rewards = rewards.float()
            loss_sum += ranking_loss(rewards, better).sum().item()
            right = ((rewards[:, :, None] > rewards[:, None, :]) & better).sum(dim=(1, 2))
            for p, k_right, n, r in zip(chunk, right.tolist(), better.sum(dim=(1, 2)).tolist(), rewards):
                K = len(p["seqs"])
                correct[K] += k_right
                total[K] += n
                scores += r[:K].tolist()
    model.train()
    s = torch.tensor(scores)
    return {"val_accuracy": sum(correct.values()) / max(1, sum(total.values())),
            "val_loss": loss_sum / max(1, len(prompts)),
            "val_accuracy_by_k": {k: round(correct[k] / total[k], 4) for k in sorted(total)},
            "score_mean": s.mean().item(), "score_std": s.std().item()}


def train_step(ddp_model, optimizer, guard, batch, it, cfg, d):
    """One optimiser step on a global batch of ranked prompts: whole prompts per batch element, never
    shuffled-apart pairs. Returns this process's part of the batch's mean loss, and its pairwise accuracy."""
    mine = batch[d.rank::d.world_size]
    accum = cfg.batch_size // (cfg.micro_batch_size * d.world_size)
    loss_sum, acc_sum = torch.zeros((), device=d.device), 0.0
    for micro in range(accum):
        prompts = mine[micro * cfg.micro_batch_size:(micro + 1) * cfg.micro_batch_size]
        if d.ddp:
            ddp_model.require_backward_grad_sync = micro == accum - 1  # all-reduce once, on the last micro-batch
        with d.autocast():
            rewards, better = forward_prompts(ddp_model, prompts, d.device)
        # mean over the global batch's prompts; x world_size undoes DDP's average over processes
        loss = ranking_loss(rewards.float(), better).sum() / cfg.batch_size
        (loss * d.world_size).backward()
        loss_sum += loss.detach()
        acc_sum += (((rewards[:, :, None] > rewards[:, None, :]) & better).sum() / better.sum()).item()
    grad_norm = torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), cfg.grad_clip or math.inf)  # inf: no clip
    if guard.ok(it, loss_sum, grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, acc_sum / accum


@torch.no_grad()
def normalise(model, tok, cfg, d, seq_len):
    """Rescale the head so that the demonstrations score 0 on average (the paper's bias) with standard
    deviation 1 (a gain, as lm-human-preferences normalises its RM): kl_coef, the unended score and the value
    model's targets then have a known size. Folded into the head: r' = (r - mean) / std."""
    stats, records = {}, load_sft(cfg.demo_data)
    demos = [e for r in records if (e := encode_example(tok, r["prompt"], r["response"], seq_len, stats))]
    warn_counts(cfg.demo_data, stats, len(records), max_len=seq_len)
    model.eval()
    with d.autocast():
        # score_responses takes (query, response) pairs: each demonstration split at its query's end
        r = torch.tensor(score_responses(model, [ids[:n] for ids, n in demos], [ids[n:] for ids, n in demos],
                                         cfg.micro_batch_size * 4))
    mean, std = r.mean().item(), r.std().item()
    model.score_head.weight /= std
    model.score_head.bias.sub_(mean).div_(std)
    if model.config.score_logprob:
        model.logprob_gain /= std
    print(f"reward normalised: demonstrations scored {mean:+.3f} +- {std:.3f}, now 0 +- 1")


def main():
    # -- config, model (the SFT trunk with a fresh scalar head), data
    cfg = parse_config(RewardConfig)
    d = Dist(cfg.device, cfg.dtype)
    if cfg.batch_size % (cfg.micro_batch_size * d.world_size):
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size x processes "
                         f"({cfg.micro_batch_size} x {d.world_size})")
    preflight(cfg, {"--init": cfg.init if cfg.init not in GPT2_NAMES else None, "--data": cfg.data,
                    "--val-data": cfg.val_data, "--demo-data": cfg.demo_data}, d)
    set_seed(cfg.seed)
    init = f"{cfg.out_dir}/ckpt.pt" if cfg.resume else cfg.init  # --resume: the interrupted run's RM
    tokenizer, model, ckpt = load_model(init, "scalar", cfg.dropout, None, cfg.score_logprob)
    # --freeze-trunk (a deviation): the RM reads SFT's features and (--score-logprob) its likelihood
    if cfg.freeze_trunk:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("score_head.") or name == "logprob_gain")
    tok = get_tokenizer(tokenizer)
    seq_len = min(cfg.seq_len, model.config.block_size)
    model, ddp_model = prepare_model(model, cfg, d)
    train = encode_rankings(cfg.data, tok, seq_len)
    val = encode_rankings(cfg.val_data, tok, seq_len) if cfg.val_data else []
    max_iters = cfg.max_iters or max(1, round(cfg.epochs * len(train) / cfg.batch_size))
    if d.master:
        print(f"RM: {describe_rankings(train)}, {max_iters} steps, device {d.device}")
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), d.device_type)

    # -- plumbing (skip on a first read): --resume, periodic saves, Ctrl-C, non-finite steps; see lib/reliability.py
    # opened only now that inputs and models have loaded: a failed fresh start keeps the old log
    log = RunLog(cfg.out_dir, enabled=d.master, resume=cfg.resume)
    start = resume_training(ckpt, cfg, max_iters, d, log, [optimizer]) if cfg.resume else 0

    def save(step):  # the weights and what --resume needs, every --save-interval steps and at the end
        if d.master:
            save_checkpoint(f"{cfg.out_dir}/ckpt.pt", model, cfg, tokenizer, iter=step, max_iters=max_iters,
                            **training_state(d, [optimizer]))
    interrupt, guard = Interrupt(d), NonFiniteGuard(cfg.max_bad_steps, d)
    t_last, it_last = time.time(), start - 1  # time and step of the last log line

    # -- training loop
    for it in tqdm(interrupt.steps(start, max_iters), total=max_iters, initial=start, desc="reward model",
                   disable=not d.master):
        lr = cosine_lr(it, max_iters, cfg.lr, cfg.lr * cfg.min_lr_ratio, cfg.warmup_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [train[i] for i in shuffled_indices(len(train), it * cfg.batch_size, cfg.batch_size, cfg.seed)]
        loss, accuracy = train_step(ddp_model, optimizer, guard, batch, it, cfg, d)
        if it % cfg.log_interval == 0 or it == max_iters - 1:
            dt = (time.time() - t_last) / (it - it_last)  # per step since the last log line
            t_last, it_last = time.time(), it
            log.log(it, loss=d.all_reduce_mean(loss).item() * d.world_size, accuracy=accuracy, lr=lr,
                    ms=dt * 1000, **guard.stats())
        if val and d.master and (it % cfg.eval_interval == 0 or it == max_iters - 1):
            log.log(it, **validation_accuracy(model, val, cfg, d))
        if cfg.save_interval and (it + 1) % cfg.save_interval == 0 and it + 1 < max_iters:
            save(it + 1)
    finished = interrupt.done == max_iters  # else stopped by Ctrl-C: save the state to resume, as it is

    # -- normalise the scale on the demonstrations, a last validation, save
    if cfg.demo_data and d.master and finished:
        normalise(model, tok, cfg, d, seq_len)
    if val and finished and d.master:
        log.log(max_iters, **validation_accuracy(model, val, cfg, d))
    interrupt.finish(save, cfg.out_dir)

if __name__ == "__main__":
    cli(main)
