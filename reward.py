"""Stage 2: the reward model (RM), trained on K-wise rankings with the paper's pairwise loss.

The RM is the SFT model with its unembedding replaced by a scalar head; r_theta(x, y) is the head's
output at the last token of the response (its end-of-text). Labelers ranked K = 4..9 responses per
prompt, which gives C(K,2) comparisons; all of them form ONE batch element, so each response is
forwarded once (K passes, not 2 * C(K,2)) and correlated comparisons do not overfit (section 3.5,
appendix C.2). After training, the head is rescaled so that the demonstrations score 0 +- 1 (the
paper adds a bias for mean 0).

    python reward.py --init runs/sft/ckpt.pt --data runs/world/rankings_train.jsonl \\
                     --val-data runs/world/rankings_val.jsonl --demo-data runs/world/sft_val.jsonl
    torchrun --nproc_per_node=4 reward.py --init runs/sft/ckpt.pt ...         # GPUs
    python reward.py ... --resume   # after Ctrl-C (which saves) or a crash: continue the run

Pairwise data ({"prompt","chosen","rejected"} or HH-RLHF transcripts) is K = 2. Deviations from the
paper: the RM is as small as the policy (the paper used a 6B RM for every policy). With
--score-logprob (off by default; train.sh passes it on the built-in world) r also counts the
response's mean log-probability under the RM's own language-model head, kept from SFT and trained
with it, times a learnt gain (model.response_score).
"""
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.batches import (describe_rankings, encode_example, encode_rankings, shuffled_indices,
                          warn_counts)
from data.formats import load_sft
from data.tokenizer import get_tokenizer
from lib.common import Dist, load_model, prepare_model, set_seed
from lib.config import cli, parse_config
from lib.rankings import per_response, ranked_pairs
from lib.reliability import preflight
from lib.sampling import score_responses
from lib.training import TrainConfig, TrainingRun, check_batch_size, micro_batches, optimizer_step
from lib.weights import GPT2_NAMES
from model import response_score


@dataclass
class RewardConfig(TrainConfig):
    out_dir: str = "runs/rm"  # where ckpt.pt and metrics.jsonl go
    # the SFT checkpoint (or a GPT-2 name / HF dir) whose trunk starts the RM
    init: str = "runs/sft/ckpt.pt"
    data: str = "runs/world/rankings_train.jsonl"  # K-wise rankings JSONL (or pairwise / HH-RLHF)
    val_data: str | None = None  # held-out rankings for accuracy
    # demonstrations (SFT JSONL) whose mean score is set to 0 after training
    demo_data: str | None = None
    seq_len: int = 256  # longest prompt + response, in tokens
    # r also adds g x the response's mean log-prob (a deviation: docs/what_was_tried.md)
    score_logprob: bool = False
    freeze_trunk: bool = False  # train the scalar head and g only; trunk and LM head stay SFT's
    epochs: float = 1.0  # passes over the rankings (the paper: 1)
    max_iters: int = 0  # optimiser steps; 0 = derived from epochs
    batch_size: int = 64  # prompts per optimiser step, over all processes (the paper: 64)
    micro_batch_size: int = 16  # prompts per forward pass (all K responses of each)
    lr: float = 1e-4  # peak learning rate (the paper: 9e-6 for a 6B RM)
    dropout: float = 0.0  # dropout while training the RM
    eval_interval: int = 50  # steps between validation accuracies


# exercise: ranking_loss
def ranking_loss(scores, better):
    """The paper's RM loss for each prompt, all its C(K,2) comparisons at once:
        loss = -1/C(K,2) * sum_{(y_w, y_l)} log sigmoid(r(x, y_w) - r(x, y_l))
    scores (P, K): r(x, y) of each response; better (P, K, K) as from lib.rankings.ranked_pairs
    (padded response slots have no True; a prompt without comparisons gets 0). Returns (P,)."""
    diff = scores[:, :, None] - scores[:, None, :]  # (P, K, K): r_i - r_j
    pair_losses = -F.logsigmoid(diff) * better
    return pair_losses.sum(dim=(1, 2)) / better.sum(dim=(1, 2)).clamp(min=1)


def ranked_scores(model, prompts, device, rows_per_pass=32):
    """r(x, y) of every response of every prompt, each forwarded once (P, Kmax), and the (P, Kmax,
    Kmax) comparisons of ranking_loss."""
    def score(idx, first, last):  # GPT.score, written out: through the DDP wrapper when training
        values, logits = model(idx)
        return response_score(model, values, logits, idx, first, last)
    scores = per_response(prompts, device, score, rows_per_pass)
    return scores, ranked_pairs(prompts, scores.size(1), device)


def validation_accuracy(model, prompts, cfg, d):
    """Pairwise accuracy on held-out rankings (overall and per K), the loss, and the score
    spread."""
    model.eval()
    correct, total, loss_sum = defaultdict(int), defaultdict(int), 0.0
    all_scores = []
    with torch.no_grad():
        for i in range(0, len(prompts), cfg.micro_batch_size):
            chunk = prompts[i:i + cfg.micro_batch_size]
            with d.autocast():
                scores, better = ranked_scores(model, chunk, d.device)
            scores = scores.float()
            loss_sum += ranking_loss(scores, better).sum().item()
            right = ((scores[:, :, None] > scores[:, None, :]) & better).sum(dim=(1, 2))
            n_pairs = better.sum(dim=(1, 2)).tolist()
            for p, k_right, n, r in zip(chunk, right.tolist(), n_pairs, scores):
                K = len(p["seqs"])
                correct[K] += k_right
                total[K] += n
                all_scores += r[:K].tolist()
    model.train()
    s = torch.tensor(all_scores)
    return {"val_accuracy": sum(correct.values()) / max(1, sum(total.values())),
            "val_loss": loss_sum / max(1, len(prompts)),
            "val_accuracy_by_k": {k: round(correct[k] / total[k], 4) for k in sorted(total)},
            "score_mean": s.mean().item(), "score_std": s.std().item()}


def train_step(ddp_model, optimizer, guard, batch, it, cfg, d):
    """One optimiser step on a global batch of ranked prompts: whole prompts per batch element,
    never shuffled-apart pairs. Returns this process's part of the batch's mean loss, and its
    pairwise accuracy."""
    loss_sum, accuracies = torch.zeros((), device=d.device), []
    for prompts in micro_batches(ddp_model, batch, cfg, d):
        with d.autocast():
            scores, better = ranked_scores(ddp_model, prompts, d.device)
        # mean over the global batch's prompts; x world_size undoes DDP's average over processes
        loss = ranking_loss(scores.float(), better).sum() / cfg.batch_size
        (loss * d.world_size).backward()
        loss_sum += loss.detach()
        right = (scores[:, :, None] > scores[:, None, :]) & better
        accuracies.append((right.sum() / better.sum()).item())
    optimizer_step(ddp_model, optimizer, guard, it, loss_sum, cfg.grad_clip)
    return loss_sum, sum(accuracies) / len(accuracies)


@torch.no_grad()
def normalise(model, tok, cfg, d, seq_len):
    """Rescale the head so that the demonstrations score 0 on average (the paper's bias) with
    standard deviation 1 (a gain, as lm-human-preferences normalises its RM): kl_coef, the unended
    score and the value model's targets then have a known size. Folded into the head: r' = (r -
    mean) / std."""
    stats, records = {}, load_sft(cfg.demo_data)
    demos = [e for r in records if (e := encode_example(tok, r["prompt"], r["response"], seq_len,
                                                        stats))]
    warn_counts(cfg.demo_data, stats, len(records), max_len=seq_len)
    model.eval()
    with d.autocast():
        # score_responses takes (query, response) pairs: each demonstration split at its query's end
        queries, responses = [ids[:n] for ids, n in demos], [ids[n:] for ids, n in demos]
        r = torch.tensor(score_responses(model, queries, responses, cfg.micro_batch_size * 4))
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
    check_batch_size(cfg, d)
    preflight(cfg, {"--init": cfg.init if cfg.init not in GPT2_NAMES else None, "--data": cfg.data,
                    "--val-data": cfg.val_data, "--demo-data": cfg.demo_data}, d)
    set_seed(cfg.seed)
    # --resume: the interrupted run's RM
    init = f"{cfg.out_dir}/ckpt.pt" if cfg.resume else cfg.init
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
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2),
                                           d.device_type)

    # -- training loop; its plumbing (log, --resume, saves, Ctrl-C, bad steps): lib/training.py
    run = TrainingRun(cfg, d, model, tokenizer, optimizer, max_iters, ckpt, "reward model")
    for it in run.steps():
        batch = [train[i] for i in shuffled_indices(len(train), it * cfg.batch_size, cfg.batch_size,
                                                    cfg.seed)]
        loss, accuracy = train_step(ddp_model, optimizer, run.guard, batch, it, cfg, d)
        if run.is_log_step(it):
            run.log_step(it, loss, {"accuracy": accuracy})
        if val and run.is_eval_step(it):
            run.log.log(it, **validation_accuracy(model, val, cfg, d))

    # -- normalise the scale on the demonstrations, a last validation, save
    if cfg.demo_data and d.master and run.finished:
        normalise(model, tok, cfg, d, seq_len)
    if val and run.finished and d.master:
        run.log.log(max_iters, **validation_accuracy(model, val, cfg, d))
    run.finish()

if __name__ == "__main__":
    cli(main)
