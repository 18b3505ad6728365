"""Direct Preference Optimization (DPO; Rafailov et al. 2023): the policy learns from the rankings directly, with
no reward model and no PPO. Not in the InstructGPT paper: it is the later alternative to its stages 2 and 3.

With beta = --kl-coef (ppo.py's name for the same coefficient), the policy that maximises PPO's objective
E[r(x, y)] - beta * KL(pi || pi_ref) is pi_ref(y|x) exp(r(x, y) / beta)
up to normalisation (DPO, eq. 4). Read backwards, every policy pi is the optimum for the implicit reward
r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) (eq. 5, less a term of x alone, which cancels in a comparison), and
the RM's pairwise loss on that reward (reward.py's ranking_loss) trains the policy itself (eq. 7). log pi(y|x)
sums the log-probs of the response's tokens, its end-of-text included. The policy starts from the SFT model;
pi_ref is a frozen copy of it. Each ranking of K responses gives its C(K,2) pairs (y_w ranked above y_l), all
in ONE batch element, each response forwarded once per model, as reward.py does for the RM.

    python dpo.py --sft runs/sft/ckpt.pt --data runs/rankings/rm_train.jsonl \\
                  --val-data runs/rankings/rankings_val.jsonl --out-dir runs/dpo      # CPU (--dtype bf16 with AMX)
    torchrun --nproc_per_node=4 dpo.py --sft runs/sft/ckpt.pt ...                     # GPUs
    python dpo.py ... --resume    # after Ctrl-C (which saves) or a crash: continue from out_dir/ckpt.pt

out_dir/ckpt.pt is a policy checkpoint like PPO's (sampling.load_policy loads it: tools/sample.py, tools/chat.py). Pairwise
data ({"prompt","chosen","rejected"} or HH-RLHF transcripts) is K = 2.
Deviations from the DPO paper: it trains on pairs; here a K-wise ranking is all its C(K,2) pairs (not its
Plackett-Luce form, appendix A.3), the loss per prompt is the mean over its pairs (a prompt weighs the same
whatever its K, as in reward.py) and the batch is of prompts.
Its preferences are over samples of pi_ref; here they are partly the SFT model's samples and partly the
world's perturbed answers (off-policy for pi_ref). AdamW with cosine decay as reward.py, not RMSprop at 1e-6
with 150 warmup steps; batch 32 prompts, not 64 pairs; a tiny model.
"""
import itertools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from data.batches import describe_rankings, encode_rankings, pad_right, shuffled_indices
from data.tokenizer import get_tokenizer
from lib.common import (Dist, RunConfig, RunLog, cosine_lr, load_model, prepare_model,
                        save_checkpoint, set_seed)
from lib.config import cli, parse_config
from lib.reliability import Interrupt, NonFiniteGuard, preflight, resume_training, training_state
from lib.weights import GPT2_NAMES
from model import logprobs_from_logits


@dataclass
class DPOConfig(RunConfig):
    out_dir: str = "runs/dpo"  # where ckpt.pt and metrics.jsonl go
    sft: str = "runs/sft/ckpt.pt"  # the SFT checkpoint (or a GPT-2 name / HF dir): the policy's init and pi_ref
    data: str = "runs/rankings/rm_train.jsonl"  # K-wise rankings JSONL (or pairwise / HH-RLHF), the RM's data
    val_data: str | None = None  # held-out rankings for the implicit reward's accuracy
    kl_coef: float = 0.1  # DPO's beta, the KL coefficient as ppo.py's: reward beta * log(pi / pi_ref); paper: 0.1
    seq_len: int = 256  # longest prompt + response, in tokens
    epochs: float = 1.0  # passes over the rankings
    max_iters: int = 0  # optimiser steps; 0 = derived from epochs
    batch_size: int = 32  # prompts per optimiser step, over all processes
    micro_batch_size: int = 16  # prompts per forward pass (all K responses of each)
    lr: float = 3e-5  # peak learning rate (the DPO paper: 1e-6 for models of billions of parameters)
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of the peak
    warmup_iters: int = 0  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.95  # Adam beta2
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = off
    dropout: float = 0.0  # dropout in the policy while training (pi_ref never drops out)
    eval_interval: int = 25  # steps between validation accuracies
    log_interval: int = 10  # steps between log lines

    def __post_init__(self):
        super().__post_init__()  # the shared settings' ranges (common.RunConfig)
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size "
                             f"{self.micro_batch_size}")
        if self.kl_coef <= 0:
            raise ValueError(f"--kl-coef must be > 0, got {self.kl_coef}")


def ranked_pairs(prompts, K, device):
    """(P, K, K) bool: [p, w, l] is True for each of prompt p's C(K,2) pairs, response w ranked above l."""
    better = torch.zeros(len(prompts), K, K, dtype=torch.bool)
    for i, p in enumerate(prompts):
        for w, l in itertools.combinations(p["ranking"], 2):  # the ranking lists the best first
            better[i, w, l] = True
    return better.to(device)


# exercise: dpo_loss
def dpo_loss(logps, ref_logps, better, kl_coef):
    """DPO's loss for each prompt (Rafailov et al. 2023, eq. 7), all its C(K,2) comparisons at once:
        loss = -1/C(K,2) * sum_{(y_w, y_l)} log sigmoid(kl_coef * [(log pi(y_w|x) - log pi_ref(y_w|x))
                                                                   - (log pi(y_l|x) - log pi_ref(y_l|x))])
    logps and ref_logps (P, K): log pi(y|x) and log pi_ref(y|x) of each response, summed over its tokens;
    better (P, K, K) as from ranked_pairs (padded response slots have no True; a prompt without pairs gets 0);
    kl_coef is DPO's beta.
    Returns (P,)."""
    rewards = kl_coef * (logps - ref_logps)  # (P, K): the implicit rewards r(x, y) = beta * log(pi / pi_ref)
    margin = rewards[:, :, None] - rewards[:, None, :]  # (P, K, K): r(x, y_i) - r(x, y_j)
    # -log sigmoid(r(x, y_w) - r(x, y_l)) on the pairs, then the mean over each prompt's pairs
    pair_losses = -F.logsigmoid(margin) * better
    return pair_losses.sum(dim=(1, 2)) / better.sum(dim=(1, 2)).clamp(min=1)


def response_logprobs(model, prompts, device, rows_per_pass=32):
    """log pi(y|x) of every response of every prompt: (P, Kmax), 0 in the empty slots of prompts with fewer.
    Each response is forwarded once, sorted by length and rows_per_pass at a time, as reward.py does."""
    seqs = [s for p in prompts for s in p["seqs"]]  # N = sum of K (ids, n_query)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    parts = []
    for j in range(0, len(seqs), rows_per_pass):
        rows = [seqs[i] for i in order[j:j + rows_per_pass]]
        idx = pad_right([ids for ids, _ in rows], 0).to(device)  # (n, T): right padding, never seen by real tokens
        logits, _ = model(idx)  # through the DDP wrapper when training
        token_logps = logprobs_from_logits(logits[:, :-1], idx[:, 1:])  # (n, T - 1): position t predicts t + 1
        target = torch.arange(1, idx.size(1), device=device)[None, :]  # (1, T - 1): the predicted token's index
        n_query = torch.tensor([n for _, n in rows], device=device)[:, None]  # (n, 1)
        length = torch.tensor([len(ids) for ids, _ in rows], device=device)[:, None]  # (n, 1)
        response = (target >= n_query) & (target < length)  # (n, T - 1): the response and its end-of-text
        parts.append((token_logps * response).sum(dim=1))
    flat = torch.cat(parts)[torch.tensor(order, device=device).argsort()]  # (N,): back in the prompts' order
    return pad_sequence(flat.split([len(p["seqs"]) for p in prompts]), batch_first=True)  # (P, Kmax)


def pair_stats(rewards, better):
    """Sums over the pairs (y_w, y_l) of [r_w > r_l], r_w - r_l, r_w and r_l, and the number of pairs: (5,),
    to add up over micro-batches and processes; mean_stats divides. A tie (pi = pi_ref at the start) is wrong."""
    chosen = rewards[:, :, None].expand_as(better)[better]  # (M,): r(x, y_w) of the M pairs
    rejected = rewards[:, None, :].expand_as(better)[better]  # (M,): r(x, y_l)
    return torch.stack([(chosen > rejected).float().sum(), (chosen - rejected).sum(), chosen.sum(), rejected.sum(),
                        torch.tensor(float(chosen.numel()), device=rewards.device)])


def mean_stats(sums, prefix=""):
    """The means of pair_stats' sums over the pairs, as metrics named prefix + name."""
    names = ("accuracy", "margin", "chosen_reward", "rejected_reward")
    return {prefix + name: (sums[i] / sums[4].clamp(min=1)).item() for i, name in enumerate(names)}


@torch.no_grad()
def validation(model, ref_policy, prompts, cfg, d):
    """The DPO loss and the implicit reward's pairwise accuracy, margin and rewards on held-out rankings."""
    model.eval()
    sums, loss_sum = torch.zeros(5, device=d.device), 0.0
    for i in range(0, len(prompts), cfg.micro_batch_size):
        chunk = prompts[i:i + cfg.micro_batch_size]
        with d.autocast():
            logps, ref_logps = response_logprobs(model, chunk, d.device), response_logprobs(ref_policy, chunk, d.device)
        better = ranked_pairs(chunk, logps.size(1), d.device)
        loss_sum += dpo_loss(logps, ref_logps, better, cfg.kl_coef).sum().item()
        sums += pair_stats(cfg.kl_coef * (logps - ref_logps), better)
    model.train()
    return {"val_loss": loss_sum / max(1, len(prompts)), **mean_stats(sums, "val_")}


def train_step(ddp_model, ref_policy, optimizer, guard, batch, it, cfg, d):
    """One optimiser step on a global batch of ranked prompts, whole prompts per batch element. Returns this
    process's part of the batch's mean loss and its pair_stats sums."""
    mine = batch[d.rank::d.world_size]
    accum = cfg.batch_size // (cfg.micro_batch_size * d.world_size)
    loss_sum, sums = torch.zeros((), device=d.device), torch.zeros(5, device=d.device)
    for micro in range(accum):
        prompts = mine[micro * cfg.micro_batch_size:(micro + 1) * cfg.micro_batch_size]
        if d.ddp:
            ddp_model.require_backward_grad_sync = micro == accum - 1  # all-reduce once, on the last micro-batch
        with d.autocast():
            logps = response_logprobs(ddp_model, prompts, d.device)
            with torch.no_grad():
                ref_logps = response_logprobs(ref_policy, prompts, d.device)
        better = ranked_pairs(prompts, logps.size(1), d.device)
        # mean over the global batch's prompts; x world_size undoes DDP's average over processes
        loss = dpo_loss(logps, ref_logps, better, cfg.kl_coef).sum() / cfg.batch_size
        (loss * d.world_size).backward()
        loss_sum += loss.detach()
        sums += pair_stats(cfg.kl_coef * (logps.detach() - ref_logps), better)
    grad_norm = torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), cfg.grad_clip or math.inf)  # inf: no clip
    if guard.ok(it, loss_sum, grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, sums


def main():
    # -- config, models (the policy and the frozen reference pi_ref, both the SFT model at the start), data
    cfg = parse_config(DPOConfig)
    d = Dist(cfg.device, cfg.dtype)
    if cfg.batch_size % (cfg.micro_batch_size * d.world_size):
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size x processes "
                         f"({cfg.micro_batch_size} x {d.world_size})")
    preflight(cfg, {"--sft": cfg.sft if cfg.sft not in GPT2_NAMES else None, "--data": cfg.data,
                    "--val-data": cfg.val_data}, d)
    set_seed(cfg.seed)
    tokenizer, ref_policy, sft_ckpt = load_model(cfg.sft, "lm", 0.0, kind="lm")
    ref_policy = ref_policy.to(d.device).eval().requires_grad_(False)
    init = f"{cfg.out_dir}/ckpt.pt" if cfg.resume else cfg.sft  # --resume: the interrupted run's policy
    _, model, ckpt = load_model(init, "lm", cfg.dropout, kind="lm")
    tok = get_tokenizer(tokenizer)
    seq_len = min(cfg.seq_len, model.config.block_size)
    model, ddp_model = prepare_model(model, cfg, d)
    if cfg.compile:
        ref_policy.compile()
    train = encode_rankings(cfg.data, tok, seq_len)
    val = encode_rankings(cfg.val_data, tok, seq_len) if cfg.val_data else []
    if not train:
        raise ValueError(f"--data {cfg.data}: no ranking fits in --seq-len {seq_len} tokens")
    max_iters = cfg.max_iters or max(1, round(cfg.epochs * len(train) / cfg.batch_size))
    # the SFT model's longest demonstration: evaluate.py and tools/sample.py check that they let the policy say that much
    longest = {k: v for k, v in (sft_ckpt or {}).items() if k == "max_response_tokens"}
    if d.master:
        print(f"DPO: {describe_rankings(train)}, {max_iters} steps, device {d.device}")
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), d.device_type)

    # -- plumbing (skip on a first read): --resume, periodic saves, Ctrl-C, non-finite steps; see lib/reliability.py
    # opened only now that inputs and models have loaded: a failed fresh start keeps the old log
    log = RunLog(cfg.out_dir, enabled=d.master, resume=cfg.resume)
    start = resume_training(ckpt, cfg, max_iters, d, log, [optimizer]) if cfg.resume else 0

    def save(step):  # the weights and what --resume needs, every --save-interval steps and at the end
        if d.master:
            save_checkpoint(f"{cfg.out_dir}/ckpt.pt", model, cfg, tokenizer, iter=step, max_iters=max_iters,
                            **longest, **training_state(d, [optimizer]))
    interrupt, guard = Interrupt(d), NonFiniteGuard(cfg.max_bad_steps, d)
    t_last, it_last = time.time(), start - 1  # time and step of the last log line

    # -- training loop
    for it in tqdm(interrupt.steps(start, max_iters), total=max_iters, initial=start, desc="dpo",
                   disable=not d.master):
        lr = cosine_lr(it, max_iters, cfg.lr, cfg.lr * cfg.min_lr_ratio, cfg.warmup_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [train[i] for i in shuffled_indices(len(train), it * cfg.batch_size, cfg.batch_size, cfg.seed)]
        loss, sums = train_step(ddp_model, ref_policy, optimizer, guard, batch, it, cfg, d)
        if it % cfg.log_interval == 0 or it == max_iters - 1:
            dt = (time.time() - t_last) / (it - it_last)  # per step since the last log line
            t_last, it_last = time.time(), it
            log.log(it, loss=d.all_reduce_mean(loss).item() * d.world_size, **mean_stats(d.all_reduce_mean(sums)),
                    lr=lr, ms=dt * 1000, **guard.stats())
        if val and d.master and (it % cfg.eval_interval == 0 or it == max_iters - 1):
            log.log(it, **validation(model, ref_policy, val, cfg, d))
        if cfg.save_interval and (it + 1) % cfg.save_interval == 0 and it + 1 < max_iters:
            save(it + 1)

    # -- save (after Ctrl-C too: the state to --resume from), then exit
    interrupt.finish(save, cfg.out_dir)

if __name__ == "__main__":
    cli(main)
