"""Stage 3: PPO against the reward model, with a per-token KL penalty to the SFT policy, and PPO-ptx.

Each episode is a bandit: a prompt, a sampled response, the RM's score, the end (section 3.5). The policy
pi_RL (from SFT) maximises equation 2 of the paper, with kl_coef = the paper's beta:

    objective = E_{(x,y) ~ pi_RL} [ r_theta(x, y) - kl_coef * log(pi_RL(y|x) / pi_SFT(y|x)) ]
                + gamma_ptx * E_{x ~ D_pretrain} [ log pi_RL(x) ]          (gamma_ptx = 0: "PPO"; > 0: "PPO-ptx")

main() runs the paper's loop; each iteration takes five steps: 1. rollout, 2. score (with the rollout's
log-probs under pi_RL and pi_SFT and its values: old_logprobs_and_values), 3. compute_rewards, 4. compute_gae,
5. ppo_update (+ ptx). The value model starts from the RM (own weights and learning rate).

--advantage grpo or rloo replaces step 4 and the value model by a group baseline: each prompt is sampled
--group-size G times, and a response's advantage (the same at each of its tokens) is its total reward (score
+ non_score_reward) against the others of its group (group_advantages):
    grpo  (Shao et al. 2024)     A_i = (R_i - mean_j R_j) / std_j R_j
    rloo  (Ahmadian et al. 2024) A_i = R_i - 1/(G - 1) * sum_{j != i} R_j

    python ppo.py --sft runs/sft/ckpt.pt --rm runs/rm/ckpt.pt --prompts runs/world/ppo_prompts.jsonl   # CPU
    python ppo.py ... --ptx-data runs/world/pretrain.txt --ptx-coef 0.02 --out-dir runs/ppo_ptx      # PPO-ptx
    python ppo.py ... --advantage grpo --out-dir runs/grpo                           # GRPO (or rloo: RLOO)
    torchrun --nproc_per_node=4 ppo.py ...      # GPUs;  --resume continues after Ctrl-C (which saves) or a crash

Deviations from the paper (tiny models, minutes on a CPU): batch 64 and minibatch 16 (paper 512 and 64),
2 PPO epochs per batch (paper 1), minibatches that are fixed slices of the randomly drawn batch (so that N
processes split each one evenly), and gamma_ptx weighs a mean per token, not a sum (the paper's 27.8). The
policy's EMA (paper 0.992) is optional and off: over train.sh's 40 iterations it would average in SFT.
GRPO and RLOO keep this file's clipped surrogate, epochs and minibatches, and its KL penalty in the reward
(as RLOO does; GRPO puts a k3 estimate of the KL in the loss instead) with kl_coef and ptx_coef as options;
GRPO's loss is a mean per token here, not per response then per group.
--rl-params norms (train.sh's setting on the built-in world, not the paper's) lets RL train only the
policy's LayerNorm gains and biases, at a learning rate 100x the whole model's: with 64 episodes an
iteration, that is the step that learns here (README, "Why RL barely moves a policy").
"""
import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.batches import pad_left, shuffled_indices, text_windows
from data.formats import load_prompts, load_text
from data.judge import assess, gold_reward
from data.tokenizer import get_tokenizer
from data.world import parse_prompt
from lib.common import (Dist, RunConfig, RunLog, atomic_copy, check_max_new_tokens, load_checkpoint,
                        model_from_checkpoint, save_checkpoint, set_seed, update_ema)
from lib.config import cli, parse_config
from lib.reliability import Interrupt, NonFiniteGuard, preflight, resume_training, training_state
from lib.sampling import (UNENDED_SCORE, decode_response, encode_queries, make_generator,
                          sample_responses, sample_table, score_responses, unended_rule)
from model import forward_response, value_of_response


@dataclass
class PPOConfig(RunConfig):
    out_dir: str = "runs/ppo"  # where ckpt.pt (policy, value model, training state) and metrics.jsonl go
    sft: str = "runs/sft/ckpt.pt"  # SFT checkpoint: the policy's init and the frozen reference pi_SFT
    rm: str = "runs/rm/ckpt.pt"  # reward model checkpoint (frozen scorer, value model's init), or gold: the world's judge
    prompts: str = "runs/world/ppo_prompts.jsonl"  # RL prompts, JSONL {"prompt"}
    ptx_data: str | None = None  # pretraining text for PPO-ptx (.txt or JSONL {"text"})
    ptx_coef: float = 0.0  # gamma_ptx: weight of the pretraining loss (0 = plain PPO)
    ptx_batch_size: int = 4  # pretraining windows per minibatch, over all processes
    ptx_seq_len: int = 128  # tokens per pretraining window
    total_episodes: int = 6400  # prompts rolled out in all (paper 256k): 100 iterations of 64
    batch_size: int = 64  # rollouts per iteration, over all processes (paper 512)
    minibatch_size: int = 16  # rollouts per gradient step (paper 64)
    ppo_epochs: int = 2  # passes over each batch of rollouts (paper 1)
    max_new_tokens: int = 128  # longest response (as tools/sample.py and evaluate.py; at least the longest demonstration)
    temperature: float = 1.0  # sampling temperature; log-probs are recomputed at the same temperature
    lr: float = 1e-5  # policy learning rate (constant after warmup, as the paper; 5e-5 drifts, see README)
    vf_lr: float = 1e-4  # value model learning rate
    warmup_iters: int = 10  # linear learning-rate warmup (paper: 10 iterations)
    kl_coef: float = 0.02  # the paper's beta: weight of the per-token KL penalty to pi_SFT (paper 0.02)
    adaptive_kl: bool = False  # adapt kl_coef towards kl_target (Ziegler et al. 2019) instead of fixing it
    kl_target: float = 6.0  # adaptive KL: target KL per response, in nats
    kl_horizon: int = 10000  # adaptive KL: horizon, in episodes
    gamma: float = 1.0  # GAE discount (paper 1)
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # PPO ratio clip (paper 0.2)
    cliprange_value: float = 0.2  # value clip around the rollout's value estimate
    unended_score: float = UNENDED_SCORE  # the score of a response that never emitted end-of-text (lib/sampling.py)
    grad_clip: float = 1.0  # clip each model's gradient norm; 0 = off
    advantage: str = "gae"  # gae: a value model and GAE (PPO); grpo or rloo: a group baseline, no value model
    group_size: int = 4  # grpo / rloo: samples per prompt (G); each iteration has batch_size / G prompts
    rl_params: str = "all"  # the policy's parameters RL trains: all, or norms (LayerNorm gains, biases)
    ema_decay: float = 0.0  # EMA of the policy weights saved for evaluation (paper 0.992); 0 = off
    sample_interval: int = 10  # iterations between tables of sample responses
    save_interval: int = 20  # iterations between saves of the resumable training state to ckpt.pt; 0 = at the end only
    keep_saves: bool = False  # also keep each save as ckpt_<iteration>.pt: the policy along training
    probe_prompts: str | None = None  # held-out prompts JSONL: the policy's score on them every --probe-interval
    probe_interval: int = 10  # iterations between probes (and at the start and the end)
    probe_size: int = 200  # the first N of --probe-prompts
    frozen_bf16: bool = True  # on CUDA, the frozen reference and RM in bf16 (half the memory; fp32 on CPU)

    def __post_init__(self):
        super().__post_init__()  # the shared settings' ranges (common.RunConfig)
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of --minibatch-size "
                             f"{self.minibatch_size}")
        if self.total_episodes < self.batch_size:
            raise ValueError(f"--total-episodes {self.total_episodes} is less than one iteration's "
                             f"--batch-size {self.batch_size}: no iteration would run")
        if self.kl_coef < 0 or self.ptx_coef < 0:
            raise ValueError("--kl-coef and --ptx-coef must be >= 0")
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0: PPO needs the sampling distribution's log-probs")
        if self.advantage not in ("gae", "grpo", "rloo"):
            raise ValueError(f"--advantage must be gae, grpo or rloo, got {self.advantage!r}")
        if self.advantage != "gae" and (self.group_size < 2 or self.batch_size % self.group_size):
            raise ValueError(f"--group-size {self.group_size} must be >= 2 and divide --batch-size {self.batch_size}: "
                             "a group baseline needs two or more samples of each prompt in the batch")
        if self.rl_params not in ("all", "norms"):
            raise ValueError(f"--rl-params must be all or norms, got {self.rl_params!r}")


# --- the five steps of an iteration ---------------------------------------------------------------------------
@dataclass
class Rollouts:
    """One iteration's episodes: left-padded queries with their sampled responses."""
    seq: torch.Tensor  # (B, T + R) token ids: the query, then the response (padding after its end-of-text)
    n_query: int  # T: the response starts at column T
    query_mask: torch.Tensor  # (B, T) 1 on real query tokens (0 on the left padding)
    response_mask: torch.Tensor  # (B, R) 1 on the response's tokens up to and including its end-of-text
    ended: torch.Tensor  # (B,) True where the response emitted end-of-text
    attention_mask: torch.Tensor = field(init=False)  # (B, T + R): padding on either side is never attended

    def __post_init__(self):  # built once: every forward pass of the iteration uses it
        self.attention_mask = torch.cat([self.query_mask, self.response_mask], dim=1)

    def decode(self, tok):  # the response texts, each up to and including its end-of-text
        return [tok.decode(self.seq[b, self.n_query:self.n_query + n].tolist())
                for b, n in enumerate(self.response_mask.sum(1).tolist())]


def rollout(policy, queries, tok, cfg, d, generator):
    """Step 1: sample a response to each query (lists of token ids) with the KV cache until end-of-text.
    `generator` is the same on every process: it draws the noise of the whole global batch and each process
    uses its rows (batch rows rank, rank + N, ...), so N processes sample exactly what one would."""
    query, query_mask = pad_left(queries, tok.pad_token)
    query, query_mask = query.to(d.device), query_mask.to(d.device)
    policy.eval()
    with torch.no_grad(), d.autocast():
        seq = policy.generate(query, cfg.max_new_tokens, temperature=cfg.temperature, attention_mask=query_mask,
                              eos_token_id=tok.eot_token, pad_token_id=tok.pad_token, generator=generator,
                              rows=(torch.arange(d.rank, cfg.batch_size, d.world_size), cfg.batch_size))
    response = seq[:, query.size(1):]  # (B, R)
    return Rollouts(seq, query.size(1), query_mask, mask_through_eos(response, tok.eot_token),
                    (response == tok.eot_token).any(1))


def mask_through_eos(response, eos):
    """(B, R) 1 on the response's real tokens: everything up to and including the first end-of-text."""
    is_eos = (response == eos).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


@torch.no_grad()
def score(reward_model, ro, prompts, tok, cfg, d):
    """Step 2: r_theta(x, y), the RM at the response's last real token; with --rm gold (reward_model None)
    the world's gold judge on the prompt and the response text instead (data.judge.gold_reward). A response
    that never ended gets the fixed --unended-score (sampling.unended_rule). prompts: the B prompt strings.
    Returns (B,)."""
    if reward_model is None:
        gold = [gold_reward(p, text) for p, text in zip(prompts, ro.decode(tok))]
        scores = torch.tensor(gold, device=ro.seq.device)
    else:
        last = ro.n_query - 1 + ro.response_mask.sum(1)
        with d.autocast():
            # rollouts: left-padded queries, then the responses
            first = torch.full_like(last, ro.n_query)
            scores = reward_model.score(ro.seq, last, ro.attention_mask, first).float()
    return unended_rule(scores, ro.ended, cfg.unended_score)


@torch.no_grad()
def old_logprobs_and_values(policy, ref_policy, value_model, ro, cfg, d):
    """The rollout's log-probs under pi_RL and pi_SFT and the value estimates, each recomputed by one
    forward pass at the sampling temperature, and two statistics: the full-vocabulary KL per response and
    the mean entropy per token. (B, R) x 3 (values None without a value model), then (B,) and a scalar."""
    mask = ro.response_mask.float()
    with d.autocast():
        logprobs, logits = forward_response(policy, ro.seq, ro.attention_mask, ro.n_query, cfg.temperature)
        ref_logprobs, ref_logits = forward_response(ref_policy, ro.seq, ro.attention_mask, ro.n_query, cfg.temperature)
        values = (value_of_response(value_model, ro.seq, ro.attention_mask, ro.n_query)
                  if value_model is not None else None)
    logp_all, ref_logp_all = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
    exact_kl = ((logp_all.exp() * (logp_all - ref_logp_all)).sum(-1) * mask).sum(1)
    entropy = (-(logp_all.exp() * logp_all).sum(-1) * mask).sum() / mask.sum()
    return logprobs, ref_logprobs, values, exact_kl, entropy


# exercise: compute_rewards
def compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Step 3: per-token rewards of the objective, the KL penalty at every response token and the RM score
    added at the last one:
        kl_t             = log pi_RL(y_t | x, y_<t) - log pi_SFT(y_t | x, y_<t)    (the k1 estimate)
        non_score_reward = -kl_coef * kl_t
        rewards_t        = non_score_reward_t + [t = last] * score
    scores (B,), the rest (B, R). Returns rewards, kl, non_score_reward, all (B, R) and 0 past the end."""
    kl = (logprobs - ref_logprobs) * mask
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    last = mask.sum(1).long() - 1  # (B,): index of each response's last real token
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores
    return rewards, kl, non_score_reward


# exercise: compute_gae
def compute_gae(rewards, values, mask, gamma, lam):
    """Step 4: generalised advantage estimation over the response tokens (Schulman et al. 2016), from the
    last token back to the first:
        delta_t   = r_t + gamma * V_{t+1} - V_t          (V after the last token = 0)
        A_t       = delta_t + gamma * lam * A_{t+1}      (A after the last token = 0)
        returns_t = A_t + V_t                            (the value model's targets)
    rewards, values, mask: (B, R). Tokens after the end (mask 0) carry no reward and no value."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,) V_{t+1}
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
    for t in reversed(range(rewards.size(1))):
        delta = (rewards[:, t] + gamma * next_value - values[:, t]) * mask[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages * mask, (advantages + values) * mask


# exercise: group_advantages
def group_advantages(rewards, group_size, estimator):
    """Step 4 of GRPO and RLOO: each response's total reward R_i (B,) against the other responses to its
    prompt, the batch being groups of group_size G consecutive responses to one prompt:
        grpo  A_i = (R_i - mean_j R_j) / (std_j R_j + 1e-8)      (std: the sample standard deviation)
        rloo  A_i = R_i - 1/(G - 1) * sum_{j != i} R_j           (the leave-one-out mean)
    Returns (B,)."""
    r = rewards.view(-1, group_size)  # (B / G, G)
    if estimator == "grpo":
        advantages = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-8)
    else:
        advantages = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return advantages.view(-1)


def masked_mean(x, mask, n=None):
    """Mean of x over mask == 1; n overrides the count (the global count under DDP)."""
    return (x * mask).sum() / (mask.sum() if n is None else n)


def masked_whiten(x, mask, d):
    """(x - mean) / std over the masked entries of the whole global batch (all ranks)."""
    stats = d.all_reduce_mean(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]))
    mean = stats[0] / stats[2]
    var = stats[1] / stats[2] - mean ** 2
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


# exercise: ppo_losses
def ppo_losses(new_logprobs, old_logprobs, advantages, vpred, old_values, returns, mask, cfg, n_tokens=None):
    """The clipped surrogate and the clipped value loss (Schulman et al. 2017), means per response token:
        pg_loss = E[ max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) ],  ratio = pi(y_t) / pi_old(y_t)
        vf_loss = 0.5 * E[ max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2) ]
    eps = cfg.cliprange, eps_v = cfg.cliprange_value; all tensors (B, R). The means divide by n_tokens when
    given (the global token count under DDP), else by mask.sum(). Returns pg_loss, vf_loss and the stats
    {approx_kl, clipfrac, vf_clipfrac}: means over this process's tokens."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    pg_losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange))
    pg_loss = masked_mean(pg_losses, mask, n_tokens)
    vpred_clipped = old_values + (vpred - old_values).clamp(-cfg.cliprange_value, cfg.cliprange_value)
    vf_losses = torch.max((vpred - returns) ** 2, (vpred_clipped - returns) ** 2)
    vf_loss = 0.5 * masked_mean(vf_losses, mask, n_tokens)
    stats = {"approx_kl": masked_mean(0.5 * (new_logprobs - old_logprobs) ** 2, mask).item(),
             "clipfrac": masked_mean((torch.abs(ratio - 1) > cfg.cliprange).float(), mask).item(),
             "vf_clipfrac": masked_mean((torch.abs(vpred - old_values) > cfg.cliprange_value).float(), mask).item()}
    return pg_loss, vf_loss, stats


# exercise: ptx_loss
def ptx_loss(policy, windows, device):
    """PPO-ptx's pretraining term: the policy's next-token loss on windows of pretraining text (every token
    counts), -E_{x ~ D_pretrain}[log pi_RL(x)] per token. windows: (ids, 0) pairs of seq_len + 1 tokens."""
    x = torch.tensor([w[:-1] for w, _ in windows], device=device)
    y = torch.tensor([w[1:] for w, _ in windows], device=device)
    _, loss = policy(x, y)
    return loss


def ppo_update(ddp_policy, ddp_value_model, optimizers, guard, ro, old, it, cfg, d, ptx_tokens=None, ptx_seq_len=0):
    """Step 5: cfg.ppo_epochs passes over the rollouts in minibatches, each one gradient step of
        policy loss = pg_loss + gamma_ptx * ptx_loss   (ptx only with pretraining tokens: PPO-ptx)
        value loss  = vf_loss                          (a separate model with its own optimiser)
    old: the rollout's logprobs, values, advantages and returns, (B, R) each; ptx_tokens: a 1-D tensor of
    pretraining text, cut into random windows of ptx_seq_len + 1 tokens. Without a value model (GRPO, RLOO:
    ddp_value_model None, one optimiser) only the policy is trained. Returns the mean statistics."""
    models = [m for m in (ddp_policy, ddp_value_model) if m is not None]
    mask = ro.response_mask.float()
    local_mb = cfg.minibatch_size // d.world_size
    n_mb = cfg.batch_size // cfg.minibatch_size
    ptx_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
    acc = dict.fromkeys(["pg_loss", "approx_kl", "clipfrac"] + ["ptx_loss"] * (ptx_tokens is not None)
                        + ["vf_loss", "vf_clipfrac"] * (ddp_value_model is not None), 0.0)
    n_steps = 0
    for m in models:
        m.train()
    for epoch in range(cfg.ppo_epochs):
        # minibatches are fixed slices of the batch (its prompts are already in random order), visited in a
        # new order each epoch. Process r holds the batch's rows r, r + N, ...: its slice k is its part of
        # the global slice k, so N processes take exactly the gradient steps of one
        order = torch.randperm(n_mb, generator=torch.Generator().manual_seed(cfg.seed + 7919 * it + epoch))
        for k in order.tolist():
            mb = torch.arange(k * local_mb, (k + 1) * local_mb, device=d.device)
            # drop the minibatch's columns that are padding in all its rows: the left padding shared by its
            # prompts, the response columns after its longest response (position ids skip padding, so the
            # log-probs and values do not change)
            lo = int((1 - ro.query_mask[mb]).sum(1).min())
            r = int(ro.response_mask[mb].sum(1).max())
            mb_seq, mb_attention_mask = ro.seq[mb, lo:ro.n_query + r], ro.attention_mask[mb, lo:ro.n_query + r]
            # means per token over the global minibatch; x world_size undoes DDP's gradient average
            n_tokens = d.all_reduce_mean(mask[mb].sum()) * d.world_size
            with d.autocast():
                new_logprobs, mb_logits = forward_response(ddp_policy, mb_seq, mb_attention_mask, ro.n_query - lo,
                                                           cfg.temperature)
                if ddp_value_model is not None:
                    vpred = value_of_response(ddp_value_model, mb_seq, mb_attention_mask, ro.n_query - lo)
            del mb_logits
            if ddp_value_model is not None:
                old_values, returns = old["values"][mb, :r], old["returns"][mb, :r]
            else:  # GRPO, RLOO: no value model; the value terms, on zeros, are 0 and left out of the stats
                vpred = old_values = returns = torch.zeros_like(new_logprobs)
            pg_loss, vf_loss, st = ppo_losses(new_logprobs, old["logprobs"][mb, :r], old["advantages"][mb, :r],
                                              vpred, old_values, returns, mask[mb, :r], cfg, n_tokens)
            loss = pg_loss * d.world_size
            if ptx_tokens is not None:
                # the global batch of windows, drawn alike on every process; each takes its share
                windows = text_windows(ptx_tokens, cfg.ptx_batch_size, ptx_seq_len, ptx_gen)[d.rank::d.world_size]
                with d.autocast():
                    ptx = ptx_loss(ddp_policy, windows, d.device)
                loss = loss + cfg.ptx_coef * ptx
                acc["ptx_loss"] += ptx.item()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            if ddp_value_model is not None:
                (vf_loss * d.world_size).backward()
            grad_norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip or math.inf)  # inf: no clip
                          for m in models]
            if guard.ok(it, loss, vf_loss, *grad_norms):
                for opt in optimizers:
                    opt.step()
            for key, v in {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), **st}.items():
                if key in acc:
                    acc[key] += v
            n_steps += 1
    return {key: v / n_steps for key, v in acc.items()}


@torch.no_grad()
def logprob_change(policy, ro, old_logprobs, advantages, cfg, d):
    """What step 5 did to the rollouts it learnt from: the mean change of log pi(y|x) (summed over each
    response's tokens, nats) over the responses whose advantages sum above 0, and over those below 0. A step
    that learns raises the first and lowers the second; what both lose went to responses nobody sampled."""
    mask = ro.response_mask.float()
    with d.autocast():
        new_logprobs, _ = forward_response(policy, ro.seq, ro.attention_mask, ro.n_query, cfg.temperature)
    change = ((new_logprobs.float() - old_logprobs) * mask).sum(1)  # (B,)
    direction = (advantages * mask).sum(1)  # (B,)
    pos, neg = (direction > 0).float(), (direction < 0).float()
    sums = d.all_reduce_mean(torch.stack([(change * pos).sum(), pos.sum(), (change * neg).sum(), neg.sum()]))
    return {"logprob_change_pos": (sums[0] / sums[1].clamp(min=1)).item(),
            "logprob_change_neg": (sums[2] / sums[3].clamp(min=1)).item()}


# exercise: adaptive_kl_coef
def adaptive_kl_coef(kl_coef, kl, kl_target, kl_horizon, n_episodes):
    """kl_coef that follows the measured KL towards a target (Ziegler et al. 2019, section 2.2): after an
    iteration of n_episodes whose mean KL per response is `kl` (nats), the new kl_coef is
        error   = clip(kl / kl_target - 1, -0.2, 0.2)
        kl_coef = kl_coef * (1 + error * n_episodes / kl_horizon)"""
    error = max(-0.2, min(0.2, kl / kl_target - 1))
    return kl_coef * (1 + error * n_episodes / kl_horizon)


# --- plumbing of the loop (skip on a first read) ----------------------------------------------------------------
def load_rl_models(cfg, d):
    """The models of RL fine-tuning: the policy and the frozen reference pi_SFT from cfg.sft, the
    frozen RM and the value model from cfg.rm (None for GRPO and RLOO; with --resume: the interrupted run's
    policy and value model), the policy's EMA when cfg.ema_decay > 0 (else None); then the tokenizer and the
    resumed checkpoint (or None). With cfg.rm "gold" (the world's gold judge) there is no RM (None) and the
    value model starts from the SFT trunk with a fresh scalar head."""
    sft_ckpt = load_checkpoint(cfg.sft, kind="lm")
    rm_ckpt = None if cfg.rm == "gold" else load_checkpoint(cfg.rm, kind="scalar")
    if rm_ckpt is not None and sft_ckpt["tokenizer"] != rm_ckpt["tokenizer"]:
        raise ValueError(f"{cfg.sft} uses tokenizer {sft_ckpt['tokenizer']} but {cfg.rm} uses {rm_ckpt['tokenizer']}")
    check_max_new_tokens(sft_ckpt, cfg.max_new_tokens, cfg.sft)
    policy = model_from_checkpoint(sft_ckpt, head="lm", dropout=0.0).to(d.device)
    ref_policy = model_from_checkpoint(sft_ckpt, head="lm", dropout=0.0).to(d.device).eval().requires_grad_(False)
    reward_model = (model_from_checkpoint(rm_ckpt, dropout=0.0).to(d.device).eval().requires_grad_(False)
                    if rm_ckpt is not None else None)
    # GRPO and RLOO (--advantage grpo|rloo) use a group baseline instead of a value model
    value_model = (model_from_checkpoint(rm_ckpt or sft_ckpt, head="scalar", dropout=0.0).to(d.device)
                   if cfg.advantage == "gae" else None)
    ema = copy.deepcopy(policy).requires_grad_(False) if cfg.ema_decay > 0 else None
    resumed = None
    if cfg.resume:  # the interrupted run's models; ckpt.pt's "model" is the EMA when there is one
        path = f"{cfg.out_dir}/ckpt.pt"
        resumed = load_checkpoint(path, quiet=True)  # no note that --resume finishes it: this is --resume
        try:
            policy.load_state_dict(resumed.get("policy", resumed["model"]))
            if value_model is not None:
                value_model.load_state_dict(resumed["value_model"])
            if ema is not None and "policy" in resumed:
                ema.load_state_dict(resumed["model"])
        except RuntimeError:  # torch's message lists every tensor that differs, one per line
            raise ValueError(f"--resume: the shapes of the models in {path} differ from those built from --sft "
                             "and --rm (another model size); resume with the checkpoints its run started from, "
                             "or run without --resume") from None
    trained = [m for m in (policy, value_model) if m is not None]
    for m in trained:
        m.gradient_checkpointing = cfg.grad_checkpointing
    frozen = [m for m in (ref_policy, reward_model) if m is not None]
    if cfg.frozen_bf16 and d.device_type == "cuda":  # inference only: bf16 weights halve their memory
        for m in frozen:
            m.to(torch.bfloat16)
    if cfg.compile:
        for m in (*trained, *frozen):
            m.compile()
    return policy, ref_policy, reward_model, value_model, ema, get_tokenizer(sft_ckpt["tokenizer"]), resumed


def check_inputs(cfg, d):
    if cfg.batch_size % d.world_size or cfg.minibatch_size % d.world_size or cfg.ptx_batch_size % d.world_size:
        raise ValueError(f"--batch-size, --minibatch-size and --ptx-batch-size must be multiples of {d.world_size}")
    inputs = {"--sft": cfg.sft, "--rm": cfg.rm if cfg.rm != "gold" else None, "--prompts": cfg.prompts,
              "--ptx-data": cfg.ptx_data, "--probe-prompts": cfg.probe_prompts}
    preflight(cfg, inputs, d)


@torch.no_grad()
def probe(policy, reward_model, prompts, queries, tok, cfg, d):
    """The held-out probe: the policy's responses to fixed prompts, sampled with the same noise at every
    probe (so that two probes differ only by the policy), scored by the reward PPO maximises (probe_score).
    On prompts of the built-in world also their accuracy by the gold judge, sampled and greedy: a
    measurement for the curves, never a learning signal."""
    policy.eval()
    out = {}
    world = all(parse_prompt(p) is not None for p in prompts)
    for prefix, temperature in (("probe_", cfg.temperature), ("probe_greedy_", 0.0)):
        if prefix == "probe_greedy_" and not world:
            break
        with d.autocast():
            responses = sample_responses(policy, queries, tok, cfg.max_new_tokens, temperature, cfg.batch_size,
                                         make_generator(d.device, cfg.seed))
        texts = [decode_response(tok, r) for r in responses]
        if prefix == "probe_":
            ended = torch.tensor([r[-1:] == [tok.eot_token] for r in responses])
            if reward_model is None:
                scores = torch.tensor([gold_reward(p, t) for p, t in zip(prompts, texts)])
            else:
                with d.autocast():
                    scores = torch.tensor(score_responses(reward_model, queries, responses, cfg.batch_size))
            out["probe_score"] = unended_rule(scores, ended, cfg.unended_score).mean().item()
        if world:
            right = [assess(p, t)["content"] == 1.0 for p, t in zip(prompts, texts)]
            out[prefix + "accuracy"] = sum(right) / len(right)
    return out


def iteration_metrics(d, ro, scores, kl, non_score_reward, exact_kl, entropy, values, returns):
    """What metrics.jsonl records of an iteration: means over the global batch, KL and rewards per response."""
    def mean(x):
        return d.all_reduce_mean(x.float().mean()).item()
    out = {"score": mean(scores), "kl": mean(kl.sum(1)), "exact_kl": mean(exact_kl),
           "non_score_reward": mean(non_score_reward.sum(1)), "entropy": mean(entropy),
           "response_length": mean(ro.response_mask.sum(1)), "ended": mean(ro.ended)}
    if values is not None:
        real = ro.response_mask.bool()
        out["explained_variance"] = (1 - (returns - values)[real].var() / returns[real].var().clamp(min=1e-8)).item()
    return out


def main():
    cfg = parse_config(PPOConfig)
    d = Dist(cfg.device, cfg.dtype)
    check_inputs(cfg, d)
    set_seed(cfg.seed)
    policy, ref_policy, reward_model, value_model, ema, tok, resumed = load_rl_models(cfg, d)
    if cfg.rl_params == "norms":
        for name, p in policy.named_parameters():
            p.requires_grad_(".ln_" in name)
    ddp_policy, ddp_value_model = d.wrap(policy), d.wrap(value_model) if value_model is not None else None
    prompts = load_prompts(cfg.prompts)
    queries = encode_queries(tok, prompts, policy.config.block_size - cfg.max_new_tokens, source=cfg.prompts)
    ptx_tokens = torch.tensor(tok.encode(load_text(cfg.ptx_data))) if cfg.ptx_data and cfg.ptx_coef > 0 else None
    probe_prompts = load_prompts(cfg.probe_prompts)[:cfg.probe_size] if cfg.probe_prompts else []
    probe_queries = encode_queries(tok, probe_prompts, policy.config.block_size - cfg.max_new_tokens,
                                   source=cfg.probe_prompts)
    if cfg.rm == "gold" and (bad := next((p for p in prompts if parse_prompt(p) is None), None)):
        raise ValueError(f"--rm gold: --prompts {cfg.prompts} holds {bad[:60]!r}, not a prompt of the built-in "
                         "world; the gold judge knows only those")
    optimizers = [torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
                  for m, lr in ((policy, cfg.lr), (value_model, cfg.vf_lr)) if m is not None]  # own lrs (C.4)
    kl_coef = cfg.kl_coef  # changes only with --adaptive-kl
    n_iters = cfg.total_episodes // cfg.batch_size
    G = 1 if cfg.advantage == "gae" else cfg.group_size  # samples per prompt in a batch
    sample_gen = torch.Generator(device=d.device if d.device_type == "cuda" else "cpu").manual_seed(cfg.seed)

    # -- plumbing (skip on a first read): --resume, saves, Ctrl-C, non-finite steps; see lib/reliability.py
    # opened only now that inputs and models have loaded: a failed fresh start keeps the old log
    log = RunLog(cfg.out_dir, enabled=d.master, resume=cfg.resume)
    start = resume_training(resumed, cfg, n_iters, d, log, optimizers, [sample_gen]) if cfg.resume else 0
    if cfg.resume and cfg.adaptive_kl:  # where the adaptive kl_coef had got to
        kl_coef = resumed.get("kl_coef", kl_coef)

    def save(step):  # the policy for evaluation (its EMA when enabled), the value model, what --resume needs
        extra = {"policy": policy} if ema is not None else {}
        if value_model is not None:
            extra.update(value_model=value_model, value_model_config=asdict(value_model.config))
        state = training_state(d, optimizers, [sample_gen])
        if d.master:
            save_checkpoint(f"{cfg.out_dir}/ckpt.pt", ema if ema is not None else policy, cfg, tok.name, iter=step,
                            max_iters=n_iters, kl_coef=kl_coef, **extra, **state)
            if cfg.keep_saves:
                atomic_copy(f"{cfg.out_dir}/ckpt.pt", f"{cfg.out_dir}/ckpt_{step}.pt")
    interrupt, guard = Interrupt(d), NonFiniteGuard(cfg.max_bad_steps, d)
    if d.master:
        print(f"PPO: {len(queries)} prompts, {n_iters} iterations of {cfg.batch_size} rollouts "
              f"({cfg.batch_size // G} prompts x {G}), advantage {cfg.advantage}, ptx_coef {cfg.ptx_coef}, "
              f"device {d.device}, {d.world_size} process(es)")

    for it in tqdm(interrupt.steps(start, n_iters), total=n_iters, initial=start,
                   desc=("ppo" if G == 1 else cfg.advantage) + ("-ptx" if ptx_tokens is not None else ""),
                   disable=not d.master):
        # the held-out probe of the policy before this iteration's update (not counted in the iteration's time)
        probed = (probe(policy, reward_model, probe_prompts, probe_queries, tok, cfg, d)
                  if d.master and probe_prompts and it % cfg.probe_interval == 0 else {})
        t0 = time.time()
        for opt, lr in zip(optimizers, (cfg.lr, cfg.vf_lr)):  # linear warmup, then constant
            opt.param_groups[0]["lr"] = lr * min(1.0, (it + 1) / cfg.warmup_iters) if cfg.warmup_iters else lr
        batch = [i for i in shuffled_indices(len(queries), it * cfg.batch_size // G, cfg.batch_size // G, cfg.seed)
                 for _ in range(G)][d.rank::d.world_size]  # each prompt G times in a row (G = 1 for gae)

        ro = rollout(policy, [queries[i] for i in batch], tok, cfg, d, sample_gen)  # 1. rollout
        t_gen = time.time() - t0
        scores = score(reward_model, ro, [prompts[i] for i in batch], tok, cfg, d)  # 2. score
        logprobs, ref_logprobs, values, exact_kl, entropy = old_logprobs_and_values(  # 2. and log-probs, values
            policy, ref_policy, value_model, ro, cfg, d)
        mask = ro.response_mask.float()
        rewards, kl, non_score_reward = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)  # 3. rewards
        if cfg.advantage == "gae":
            advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)  # 4. GAE, then whitened
            advantages = masked_whiten(advantages, mask, d)
        else:  # 4. GRPO / RLOO: each response's total reward against its group's, at all its tokens
            total = d.all_rows(rewards.sum(1), cfg.batch_size)  # (batch_size,): groups may span processes
            advantages = group_advantages(total, G, cfg.advantage)[d.rank::d.world_size, None] * mask
            returns = None
        t_score = time.time() - t0 - t_gen
        old = {"logprobs": logprobs, "values": values, "advantages": advantages, "returns": returns}
        stats = ppo_update(ddp_policy, ddp_value_model, optimizers, guard, ro, old, it, cfg, d,  # 5. PPO (+ ptx)
                           ptx_tokens, min(cfg.ptx_seq_len, policy.config.block_size))
        if ema is not None:
            update_ema(ema, policy, cfg.ema_decay)
        stats.update(logprob_change(policy, ro, logprobs, advantages, cfg, d))
        t_train = time.time() - t0 - t_gen - t_score

        metrics = iteration_metrics(d, ro, scores, kl, non_score_reward, exact_kl, entropy, values, returns)
        log.log(it, **metrics, kl_coef=kl_coef, **stats, **probed, time_generate=t_gen, time_score=t_score,
                time_train=t_train, **guard.stats(), echo=it % 5 == 0 or it == n_iters - 1)
        if cfg.adaptive_kl and math.isfinite(metrics["kl"]):  # one NaN KL would stick in kl_coef for good
            kl_coef = adaptive_kl_coef(kl_coef, metrics["kl"], cfg.kl_target, cfg.kl_horizon, cfg.batch_size)
        if d.master and (it % cfg.sample_interval == 0 or it == n_iters - 1):
            sample_table([prompts[i] for i in batch], ro.decode(tok), {"score": scores, "kl": kl.sum(1)})
        if cfg.save_interval and (it + 1) % cfg.save_interval == 0 and it + 1 < n_iters:
            save(it + 1)

    if d.master and probe_prompts and interrupt.done == n_iters:  # the probe of the trained policy
        log.log(n_iters, **probe(ema if ema is not None else policy, reward_model, probe_prompts, probe_queries,
                                 tok, cfg, d))
    interrupt.finish(save, cfg.out_dir)

if __name__ == "__main__":
    cli(main)
