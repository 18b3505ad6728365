"""Direct Preference Optimization (DPO; Rafailov et al. 2023): the policy learns from the rankings
directly, with no reward model and no PPO. Not in the InstructGPT paper: it is the later alternative
to its stages 2 and 3.

With beta = --kl-coef (ppo.py's name for the same coefficient), the policy that maximises PPO's
objective E[r(x, y)] - beta * KL(pi || pi_ref) is pi_ref(y|x) exp(r(x, y) / beta) up to
normalisation (DPO, eq. 4). Read backwards, every policy pi is the optimum for the implicit reward
r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) (eq. 5, less a term of x alone, which cancels in a
comparison), and the RM's pairwise loss on that reward (reward.py's ranking_loss) trains the policy
itself (eq. 7). log pi(y|x) sums the log-probs of the response's tokens, its end-of-text included.
The policy starts from the SFT model; pi_ref is a frozen copy of it. Each ranking of K responses
gives its C(K,2) pairs (y_w ranked above y_l), all in ONE batch element, each response forwarded
once per model, as reward.py does for the RM.

    python dpo.py --sft runs/sft/ckpt.pt --data runs/rankings/rm_train.jsonl \\
                  --val-data runs/rankings/rankings_val.jsonl --out-dir runs/dpo   # CPU
    torchrun --nproc_per_node=4 dpo.py --sft runs/sft/ckpt.pt ...                  # GPUs
    python dpo.py ... --resume   # after Ctrl-C (which saves) or a crash: continue the run

out_dir/ckpt.pt is a policy checkpoint like PPO's (sampling.load_policy loads it: tools/sample.py,
tools/chat.py). Pairwise data ({"prompt","chosen","rejected"} or HH-RLHF transcripts) is K = 2.
Deviations from the DPO paper: it trains on pairs; here a K-wise ranking is all its C(K,2) pairs
(not its Plackett-Luce form, appendix A.3), the loss per prompt is the mean over its pairs (a prompt
weighs the same whatever its K, as in reward.py) and the batch is of prompts. Its preferences are
over samples of pi_ref; here they are partly the SFT model's samples and partly the world's
perturbed answers (off-policy for pi_ref). AdamW with cosine decay as reward.py, not RMSprop at 1e-6
with 150 warmup steps; batch 32 prompts, not 64 pairs; a tiny model.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.batches import describe_rankings, encode_rankings, shuffled_indices
from data.tokenizer import get_tokenizer
from lib.common import Dist, load_model, prepare_model, set_seed
from lib.config import cli, parse_config
from lib.rankings import per_response, ranked_pairs
from lib.reliability import preflight
from lib.training import TrainConfig, TrainingRun, check_batch_size, micro_batches, optimizer_step
from lib.weights import GPT2_NAMES
from model import logprobs_from_logits


@dataclass
class DPOConfig(TrainConfig):
    out_dir: str = "runs/dpo"  # where ckpt.pt and metrics.jsonl go
    # the SFT checkpoint (or a GPT-2 name / HF dir): the policy's init and pi_ref
    sft: str = "runs/sft/ckpt.pt"
    # K-wise rankings JSONL (or pairwise / HH-RLHF), the RM's data
    data: str = "runs/rankings/rm_train.jsonl"
    val_data: str | None = None  # held-out rankings for the implicit reward's accuracy
    # DPO's beta, the KL coefficient as ppo.py's: reward beta * log(pi / pi_ref); paper: 0.1
    kl_coef: float = 0.1
    seq_len: int = 256  # longest prompt + response, in tokens
    epochs: float = 1.0  # passes over the rankings
    max_iters: int = 0  # optimiser steps; 0 = derived from epochs
    batch_size: int = 32  # prompts per optimiser step, over all processes
    micro_batch_size: int = 16  # prompts per forward pass (all K responses of each)
    # peak learning rate (the DPO paper: 1e-6 for models of billions of parameters)
    lr: float = 3e-5
    dropout: float = 0.0  # dropout in the policy while training (pi_ref never drops out)
    eval_interval: int = 25  # steps between validation accuracies

    def __post_init__(self):
        super().__post_init__()  # the shared settings' ranges (common.RunConfig)
        if self.kl_coef <= 0:
            raise ValueError(f"--kl-coef must be > 0, got {self.kl_coef}")


# exercise: dpo_loss
def dpo_loss(logps, ref_logps, better, kl_coef):
    """DPO's loss for each prompt (Rafailov et al. 2023, eq. 7), all its C(K,2) comparisons at once:
        loss = -1/C(K,2) * sum_{(y_w, y_l)} log sigmoid(kl_coef * margin(y_w, y_l))
        margin(y_w, y_l) = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
    logps and ref_logps (P, K): log pi(y|x) and log pi_ref(y|x) of each response, summed over its
    tokens; better (P, K, K) as from ranked_pairs (padded response slots have no True; a prompt
    without pairs gets 0); kl_coef is DPO's beta. Returns (P,)."""
    implicit_rewards = kl_coef * (logps - ref_logps)  # (P, K): r(x, y) = beta * log(pi / pi_ref)
    # (P, K, K): r(x, y_i) - r(x, y_j)
    margin = implicit_rewards[:, :, None] - implicit_rewards[:, None, :]
    # -log sigmoid(r(x, y_w) - r(x, y_l)) on the pairs, then the mean over each prompt's pairs
    pair_losses = -F.logsigmoid(margin) * better
    return pair_losses.sum(dim=(1, 2)) / better.sum(dim=(1, 2)).clamp(min=1)


def ranked_logprobs(model, prompts, device):
    """log pi(y|x) of every response of every prompt, summed over the response's tokens and its
    end-of-text: (P, Kmax), 0 in the empty slots of prompts with fewer responses."""
    def summed_logprobs(idx, first, last):  # through the DDP wrapper when training
        logits, _ = model(idx)
        # (n, T - 1): t predicts t + 1
        token_logps = logprobs_from_logits(logits[:, :-1], idx[:, 1:])
        # (1, T - 1): the predicted column
        target = torch.arange(1, idx.size(1), device=device)[None, :]
        response = (target >= first[:, None]) & (target <= last[:, None])  # (n, T - 1)
        return (token_logps * response).sum(dim=1)
    return per_response(prompts, device, summed_logprobs)


def pair_stats(implicit_rewards, better):
    """Sums over the pairs (y_w, y_l) of [r_w > r_l], r_w - r_l, r_w and r_l, and the number of
    pairs: (5,), to add up over micro-batches and processes; mean_stats divides. A tie (pi = pi_ref
    at the start) is wrong."""
    chosen = implicit_rewards[:, :, None].expand_as(better)[better]  # (M,): r(x, y_w) of M pairs
    rejected = implicit_rewards[:, None, :].expand_as(better)[better]  # (M,): r(x, y_l)
    n_pairs = torch.tensor(float(chosen.numel()), device=implicit_rewards.device)
    return torch.stack([(chosen > rejected).float().sum(), (chosen - rejected).sum(), chosen.sum(),
                        rejected.sum(), n_pairs])


def mean_stats(sums, prefix=""):
    """The means of pair_stats' sums over the pairs, as metrics named prefix + name."""
    names = ("accuracy", "margin", "chosen_reward", "rejected_reward")
    return {prefix + name: (sums[i] / sums[4].clamp(min=1)).item() for i, name in enumerate(names)}


@torch.no_grad()
def validation(model, ref_policy, prompts, cfg, d):
    """The DPO loss and the implicit reward's pairwise accuracy, margin and rewards on held-out
    rankings."""
    model.eval()
    sums, loss_sum = torch.zeros(5, device=d.device), 0.0
    for i in range(0, len(prompts), cfg.micro_batch_size):
        chunk = prompts[i:i + cfg.micro_batch_size]
        with d.autocast():
            logps = ranked_logprobs(model, chunk, d.device)
            ref_logps = ranked_logprobs(ref_policy, chunk, d.device)
        better = ranked_pairs(chunk, logps.size(1), d.device)
        loss_sum += dpo_loss(logps, ref_logps, better, cfg.kl_coef).sum().item()
        sums += pair_stats(cfg.kl_coef * (logps - ref_logps), better)
    model.train()
    return {"val_loss": loss_sum / max(1, len(prompts)), **mean_stats(sums, "val_")}


def train_step(ddp_model, ref_policy, optimizer, guard, batch, it, cfg, d):
    """One optimiser step on a global batch of ranked prompts, whole prompts per batch element.
    Returns this process's part of the batch's mean loss and its pair_stats sums."""
    loss_sum, sums = torch.zeros((), device=d.device), torch.zeros(5, device=d.device)
    for prompts in micro_batches(ddp_model, batch, cfg, d):
        with d.autocast():
            logps = ranked_logprobs(ddp_model, prompts, d.device)
            with torch.no_grad():
                ref_logps = ranked_logprobs(ref_policy, prompts, d.device)
        better = ranked_pairs(prompts, logps.size(1), d.device)
        # mean over the global batch's prompts; x world_size undoes DDP's average over processes
        loss = dpo_loss(logps, ref_logps, better, cfg.kl_coef).sum() / cfg.batch_size
        (loss * d.world_size).backward()
        loss_sum += loss.detach()
        sums += pair_stats(cfg.kl_coef * (logps.detach() - ref_logps), better)
    optimizer_step(ddp_model, optimizer, guard, it, loss_sum, cfg.grad_clip)
    return loss_sum, sums


def main():
    # -- config, models (the policy and the frozen reference pi_ref, both SFT at the start), data
    cfg = parse_config(DPOConfig)
    d = Dist(cfg.device, cfg.dtype)
    check_batch_size(cfg, d)
    preflight(cfg, {"--sft": cfg.sft if cfg.sft not in GPT2_NAMES else None, "--data": cfg.data,
                    "--val-data": cfg.val_data}, d)
    set_seed(cfg.seed)
    tokenizer, ref_policy, sft_ckpt = load_model(cfg.sft, "lm", 0.0, kind="lm")
    ref_policy = ref_policy.to(d.device).eval().requires_grad_(False)
    # --resume: the interrupted run's policy
    init = f"{cfg.out_dir}/ckpt.pt" if cfg.resume else cfg.sft
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
    # the SFT model's longest demonstration: evaluate.py and tools/sample.py check that they let the
    # policy say that much
    longest = {k: v for k, v in (sft_ckpt or {}).items() if k == "max_response_tokens"}
    if d.master:
        print(f"DPO: {describe_rankings(train)}, {max_iters} steps, device {d.device}")
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2),
                                           d.device_type)

    # -- training loop; its plumbing (log, --resume, saves, Ctrl-C, bad steps): lib/training.py
    run = TrainingRun(cfg, d, model, tokenizer, optimizer, max_iters, ckpt, "dpo", **longest)
    for it in run.steps():
        batch = [train[i] for i in shuffled_indices(len(train), it * cfg.batch_size, cfg.batch_size,
                                                    cfg.seed)]
        loss, sums = train_step(ddp_model, ref_policy, optimizer, run.guard, batch, it, cfg, d)
        if run.is_log_step(it):
            run.log_step(it, loss, mean_stats(d.all_reduce_mean(sums)))
        if val and run.is_eval_step(it):
            run.log.log(it, **validation(model, ref_policy, val, cfg, d))
    run.finish()


if __name__ == "__main__":
    cli(main)
