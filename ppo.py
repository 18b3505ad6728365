"""Stage 3: PPO against the reward model, with a per-token KL penalty to SFT, and PPO-ptx.

Each episode is a bandit: a prompt, a sampled response, the RM's score, the end (section 3.5). The
policy pi_RL (from SFT) maximises the paper's equation 2 (its beta is kl_coef, its gamma ptx_coef):

    objective = E_{(x,y) ~ pi_RL} [ r_theta(x, y) - kl_coef * log(pi_RL(y|x) / pi_SFT(y|x)) ]
                + ptx_coef * E_{x ~ D_pretrain} [ log pi_RL(x) ]     (ptx_coef 0: PPO; > 0: PPO-ptx)

An iteration of main() takes five steps: 1. rollout, 2. score (and old_logprobs_and_values), 3.
compute_rewards, 4. advantages_and_returns (compute_gae; the value model starts from the RM), 5.
ppo_update (+ ptx_loss). --advantage grpo|rloo: step 4 without a value model, group_advantages.

    python ppo.py --sft runs/sft/ckpt.pt --rm runs/rm/ckpt.pt --prompts runs/world/ppo_prompts.jsonl
    python ppo.py ... --ptx-data runs/world/pretrain.txt --ptx-coef 0.02 --out-dir runs/ppo_ptx
    python ppo.py ... --advantage grpo --out-dir runs/grpo           # GRPO (or rloo: RLOO)
    torchrun --nproc_per_node=4 ppo.py ...    # GPUs; --resume continues after Ctrl-C or a crash

Deviations from the paper (tiny models, minutes on a CPU): docs/ppo.md."""
import copy
import math
import time
from dataclasses import dataclass, field

import torch

from data.batches import pad_left, shuffled_indices, text_windows
from data.judge import gold_reward
from data.tokenizer import get_tokenizer
from lib.common import Dist, RunConfig, load_checkpoint, model_from_checkpoint, set_seed, update_ema
from lib.config import cli, parse_config
from lib import rl
from lib.sampling import UNENDED_SCORE, unended_rule
from model import forward_response, value_of_response


@dataclass
class PPOConfig(RunConfig):
    out_dir: str = "runs/ppo"  # where ckpt.pt (policy, value model, state), metrics.jsonl go
    sft: str = "runs/sft/ckpt.pt"  # SFT checkpoint: the policy's init, the frozen pi_SFT
    rm: str = "runs/rm/ckpt.pt"  # the RM (and value model's init), or gold: the world's judge
    prompts: str = "runs/world/ppo_prompts.jsonl"  # RL prompts, JSONL {"prompt"}
    ptx_data: str | None = None  # pretraining text for PPO-ptx (.txt or JSONL {"text"})
    ptx_coef: float = 0.0  # the paper's gamma: weight of the pretraining loss (0 = plain PPO)
    ptx_batch_size: int = 4  # pretraining windows per minibatch, over all processes
    ptx_seq_len: int = 128  # tokens per pretraining window
    total_episodes: int = 6400  # prompts rolled out in all (paper 256k): 100 iterations of 64
    batch_size: int = 64  # rollouts per iteration, over all processes (paper 512)
    minibatch_size: int = 16  # rollouts per gradient step (paper 64)
    ppo_epochs: int = 2  # passes over each batch of rollouts (paper 1)
    max_new_tokens: int = 128  # longest response (at least the longest demonstration)
    temperature: float = 1.0  # sampling temperature; log-probs are recomputed at it
    lr: float = 1e-5  # policy learning rate (constant after warmup, as the paper's)
    vf_lr: float = 1e-4  # value model learning rate
    warmup_iters: int = 10  # linear learning-rate warmup (paper: 10 iterations)
    # the paper's beta: weight of the per-token KL penalty to pi_SFT (paper 0.02)
    kl_coef: float = 0.02
    adaptive_kl: bool = False  # adapt kl_coef towards kl_target (Ziegler et al. 2019)
    kl_target: float = 6.0  # adaptive KL: target KL per response, in nats
    kl_horizon: int = 10000  # adaptive KL: horizon, in episodes
    discount: float = 1.0  # GAE's discount (its papers' gamma; paper 1)
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # PPO ratio clip (paper 0.2)
    cliprange_value: float = 0.2  # value clip around the rollout's value estimate
    unended_score: float = UNENDED_SCORE  # the score of a response without end-of-text
    grad_clip: float = 1.0  # clip each model's gradient norm; 0 = off
    advantage: str = "gae"  # gae: a value model and GAE (PPO); grpo or rloo: a group baseline
    group_size: int = 4  # grpo / rloo: samples per prompt (G); batch_size / G prompts an iteration
    # the policy's parameters RL trains: all, or norms (LayerNorm gains, biases)
    rl_params: str = "all"
    ema_decay: float = 0.0  # EMA of the policy weights saved for evaluation (paper 0.992); 0 = off
    sample_interval: int = 10  # iterations between tables of sample responses
    save_interval: int = 20  # iterations between saves of the training state; 0 = at the end only
    # also keep each save as ckpt_<iteration>.pt: the policy along training
    keep_saves: bool = False
    # held-out prompts JSONL: the policy's score on them now and then
    probe_prompts: str | None = None
    probe_interval: int = 10  # iterations between probes (and at the start and the end)
    probe_size: int = 200  # the first N of --probe-prompts
    frozen_bf16: bool = True  # on CUDA, the frozen reference and RM in bf16 (fp32 on a CPU)

    def __post_init__(self):
        super().__post_init__()  # the shared settings' ranges (common.RunConfig)
        rl.check_config(self)  # and PPO's (lib/rl.py)


# --- the five steps of an iteration -------------------------------------------------------------
@dataclass
class Rollouts:
    """One iteration's episodes: left-padded queries with their sampled responses."""
    seq: torch.Tensor  # (B, T + R) token ids: the query, then the response (padding after its end)
    response_start: int  # T: every response starts at column T
    query_mask: torch.Tensor  # (B, T) 1 on real query tokens (0 on the left padding)
    response_mask: torch.Tensor  # (B, R) 1 on the response through its end-of-text
    ended: torch.Tensor  # (B,) True where the response emitted end-of-text
    attention_mask: torch.Tensor = field(init=False)  # (B, T + R): 0 on padding on either side

    def __post_init__(self):
        self.attention_mask = torch.cat([self.query_mask, self.response_mask], dim=1)

    def decode(self, tok):  # the response texts, each up to and including its end-of-text
        T = self.response_start
        return [tok.decode(self.seq[b, T:T + n].tolist())
                for b, n in enumerate(self.response_mask.sum(1).tolist())]


def rollout(policy, queries, tok, cfg, d, generator):
    """Step 1: sample a response to each query (token ids) with the KV cache until end-of-text.
    Every process has the same `generator`: it draws the noise of the whole global batch and each
    process uses its rows (rank, rank + N, ...), so N processes sample exactly what one would."""
    query, query_mask = pad_left(queries, tok.pad_token)
    query, query_mask = query.to(d.device), query_mask.to(d.device)
    rows = (torch.arange(d.rank, cfg.batch_size, d.world_size), cfg.batch_size)
    policy.eval()
    with torch.no_grad(), d.autocast():
        seq = policy.generate(query, cfg.max_new_tokens, temperature=cfg.temperature,
                              attention_mask=query_mask, eos_token_id=tok.eot_token,
                              pad_token_id=tok.pad_token, generator=generator, rows=rows)
    response = seq[:, query.size(1):]  # (B, R)
    return Rollouts(seq, query.size(1), query_mask, rl.mask_through_eos(response, tok.eot_token),
                    (response == tok.eot_token).any(1))


@torch.no_grad()
def score(reward_model, ro, prompts, tok, cfg, d):
    """Step 2: r_theta(x, y), the RM at the response's last real token; with --rm gold (reward_model
    None) the gold judge on the B prompt strings and the response texts (data.judge.gold_reward). A
    response that never ended gets the fixed --unended-score (lib.sampling.unended_rule). (B,)"""
    if reward_model is None:
        gold = [gold_reward(p, text) for p, text in zip(prompts, ro.decode(tok))]
        scores = torch.tensor(gold, device=ro.seq.device)
    else:
        last = ro.response_start - 1 + ro.response_mask.sum(1)
        with d.autocast():
            first = torch.full_like(last, ro.response_start)
            scores = reward_model.score(ro.seq, last, ro.attention_mask, first).float()
    return unended_rule(scores, ro.ended, cfg.unended_score)


@torch.no_grad()
def old_logprobs_and_values(policy, ref_policy, value_model, ro, cfg, d):
    """The rollouts' log-probs under pi_RL and pi_SFT and their value estimates, each from one
    forward pass at the sampling temperature, and two statistics: the full-vocabulary KL per
    response and the mean entropy per token. (B, R) x 3 (values None without a value model), (B,)
    and a scalar."""
    seq, attention_mask, T = ro.seq, ro.attention_mask, ro.response_start
    with d.autocast():
        logprobs, logits = forward_response(policy, seq, attention_mask, T, cfg.temperature)
        ref_logprobs, ref_logits = forward_response(ref_policy, seq, attention_mask, T,
                                                    cfg.temperature)
        values = (value_of_response(value_model, seq, attention_mask, T)
                  if value_model is not None else None)
    exact_kl, entropy = rl.kl_and_entropy(logits, ref_logits, ro.response_mask.float())
    return logprobs, ref_logprobs, values, exact_kl, entropy


# exercise: compute_rewards
def compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Step 3: per-token rewards of the objective, the KL penalty at every response token and the RM
    score added at the last one:
        kl_t             = log pi_RL(y_t | x, y_<t) - log pi_SFT(y_t | x, y_<t)    (the k1 estimate)
        non_score_reward = -kl_coef * kl_t
        rewards_t        = non_score_reward_t + [t = last] * score
    scores (B,), the rest (B, R). Returns rewards, kl, non_score_reward, all (B, R) and 0 past the
    end."""
    kl = (logprobs - ref_logprobs) * mask
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    last = mask.sum(1).long() - 1  # (B,): index of each response's last real token
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores
    return rewards, kl, non_score_reward


# exercise: compute_gae
def compute_gae(rewards, values, mask, discount, lam):
    """Step 4: generalised advantage estimation (Schulman et al. 2016), last token to first:
        delta_t   = r_t + discount * V_{t+1} - V_t          (V after the last token = 0)
        A_t       = delta_t + discount * lam * A_{t+1}      (A after the last token = 0)
        returns_t = A_t + V_t                               (the value model's targets)
    rewards, values, mask: (B, R); tokens after the end (mask 0) carry no reward and no value.
    Returns (advantages, returns), each (B, R) and 0 after the end."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])  # (B,) V_{t+1}
    next_advantage = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
    for t in reversed(range(rewards.size(1))):
        delta = (rewards[:, t] + discount * next_value - values[:, t]) * mask[:, t]
        next_advantage = delta + discount * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages * mask, (advantages + values) * mask


# exercise: group_advantages
def group_advantages(total_rewards, group_size, estimator):
    """Step 4 of GRPO and RLOO: each response's total reward R_i (B,) against the other responses to
    its prompt, the batch being groups of group_size G consecutive responses to one prompt:
        grpo  A_i = (R_i - mean_j R_j) / (std_j R_j + 1e-8)      (std: the sample standard dev.)
        rloo  A_i = R_i - 1/(G - 1) * sum_{j != i} R_j           (the leave-one-out mean)
    Returns (B,)."""
    r = total_rewards.view(-1, group_size)  # (B / G, G)
    if estimator == "grpo":
        advantages = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-8)
    else:
        advantages = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return advantages.view(-1)


def advantages_and_returns(rewards, values, mask, cfg, d):
    """Step 4. PPO: GAE on the value model's estimates, the advantages then whitened over the batch.
    GRPO / RLOO (values None): no value model and no returns; a response's advantage, at each of its
    tokens, is group_advantages of its total reward (score + non_score_reward). (B, R) each."""
    if values is not None:
        advantages, returns = compute_gae(rewards, values, mask, cfg.discount, cfg.lam)
        return rl.masked_whiten(advantages, mask, d), returns
    # (batch_size,): groups span processes
    total_rewards = d.all_rows(rewards.sum(1), cfg.batch_size)
    advantages = group_advantages(total_rewards, cfg.group_size, cfg.advantage)
    return advantages[d.rank::d.world_size, None] * mask, None


# exercise: ppo_losses
def ppo_losses(new_logprobs, old_logprobs, advantages, vpred, old_values, returns, mask, cfg,
               n_tokens=None):
    """The clipped surrogate and the clipped value loss (Schulman et al. 2017), means per token:
        pg_loss = E[ max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) ]
        ratio   = pi(y_t) / pi_old(y_t)
        vf_loss = 0.5 * E[ max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2) ]
    eps = cfg.cliprange, eps_v = cfg.cliprange_value; all tensors (B, R). The means divide by
    n_tokens when given (the global token count under DDP), else by mask.sum(). Returns pg_loss,
    vf_loss and the stats {approx_kl, clipfrac, vf_clipfrac}: means over this process's tokens."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    clipped_ratio = ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange)
    pg_losses = torch.max(-advantages * ratio, -advantages * clipped_ratio)
    pg_loss = rl.masked_mean(pg_losses, mask, n_tokens)
    value_change = (vpred - old_values).clamp(-cfg.cliprange_value, cfg.cliprange_value)
    vpred_clipped = old_values + value_change
    vf_losses = torch.max((vpred - returns) ** 2, (vpred_clipped - returns) ** 2)
    vf_loss = 0.5 * rl.masked_mean(vf_losses, mask, n_tokens)
    clipped = (torch.abs(ratio - 1) > cfg.cliprange).float()
    vf_clipped = (torch.abs(vpred - old_values) > cfg.cliprange_value).float()
    stats = {"approx_kl": rl.masked_mean(0.5 * (new_logprobs - old_logprobs) ** 2, mask).item(),
             "clipfrac": rl.masked_mean(clipped, mask).item(),
             "vf_clipfrac": rl.masked_mean(vf_clipped, mask).item()}
    return pg_loss, vf_loss, stats


# exercise: ptx_loss
def ptx_loss(policy, windows, device):
    """PPO-ptx's term -E_{x ~ D_pretrain}[log pi_RL(x)]: the policy's next-token loss per token on
    windows of pretraining text, (ids, 0) pairs of seq_len + 1 tokens (every token counts)."""
    x = torch.tensor([w[:-1] for w, _ in windows], device=device)
    y = torch.tensor([w[1:] for w, _ in windows], device=device)
    _, loss = policy(x, y)
    return loss


def ppo_update(policy, value_model, optimizers, guard, ro, old, it, cfg, d, ptx_tokens=None,
               ptx_seq_len=0):
    """Step 5: cfg.ppo_epochs passes over the rollouts in minibatches, each one gradient step of
        policy loss = pg_loss + ptx_coef * ptx_loss   (ptx with pretraining tokens only: PPO-ptx)
        value loss  = vf_loss                         (a separate model with its own optimiser)
    old: the rollouts' logprobs, values, advantages and returns, (B, R) each; ptx_tokens:
    pretraining text (1-D), cut into windows of ptx_seq_len + 1 tokens. value_model None (GRPO,
    RLOO): the policy alone trains. The models may be DDP-wrapped. Returns the mean statistics."""
    models = [m for m in (policy, value_model) if m is not None]
    mask = ro.response_mask.float()
    ptx_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
    names = ["pg_loss", "approx_kl", "clipfrac"] + ["ptx_loss"] * (ptx_tokens is not None)
    sums = dict.fromkeys(names + ["vf_loss", "vf_clipfrac"] * (value_model is not None), 0.0)
    n_steps = 0
    for m in models:
        m.train()
    for epoch in range(cfg.ppo_epochs):
        for mb in rl.minibatches(it, epoch, cfg, d):
            seq, attention_mask, start, R = rl.trim_padding(ro, mb)
            # means per token over the global minibatch; x world_size undoes DDP's gradient average
            n_tokens = d.all_reduce_mean(mask[mb].sum()) * d.world_size
            with d.autocast():
                new_logprobs, logits = forward_response(policy, seq, attention_mask, start,
                                                        cfg.temperature)
                if value_model is not None:
                    vpred = value_of_response(value_model, seq, attention_mask, start)
            del logits
            if value_model is not None:
                old_values, returns = old["values"][mb, :R], old["returns"][mb, :R]
            else:  # GRPO, RLOO: the value terms, on zeros, are 0 and left out of the stats
                vpred = old_values = returns = torch.zeros_like(new_logprobs)
            old_logprobs, advantages = old["logprobs"][mb, :R], old["advantages"][mb, :R]
            pg_loss, vf_loss, stats = ppo_losses(new_logprobs, old_logprobs, advantages, vpred,
                                                 old_values, returns, mask[mb, :R], cfg, n_tokens)
            loss = pg_loss * d.world_size
            if ptx_tokens is not None:
                # the global batch of windows, drawn alike on every process; each takes its share
                windows = text_windows(ptx_tokens, cfg.ptx_batch_size, ptx_seq_len, ptx_gen)
                with d.autocast():
                    ptx = ptx_loss(policy, windows[d.rank::d.world_size], d.device)
                loss = loss + cfg.ptx_coef * ptx
                sums["ptx_loss"] += ptx.item()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            if value_model is not None:
                (vf_loss * d.world_size).backward()
            max_norm = cfg.grad_clip or math.inf  # inf: no clip
            grad_norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm) for m in models]
            if guard.ok(it, loss, vf_loss, *grad_norms):
                for opt in optimizers:
                    opt.step()
            for key, v in {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), **stats}.items():
                if key in sums:
                    sums[key] += v
            n_steps += 1
    return {key: v / n_steps for key, v in sums.items()}


# exercise: adaptive_kl_coef
def adaptive_kl_coef(kl_coef, kl, kl_target, kl_horizon, n_episodes):
    """kl_coef that follows the measured KL towards a target (Ziegler et al. 2019, section 2.2):
    after an iteration of n_episodes whose mean KL per response is `kl` (nats), the new kl_coef is
        error   = clip(kl / kl_target - 1, -0.2, 0.2)
        kl_coef = kl_coef * (1 + error * n_episodes / kl_horizon)"""
    error = max(-0.2, min(0.2, kl / kl_target - 1))
    return kl_coef * (1 + error * n_episodes / kl_horizon)


def load_rl_models(cfg, d):
    """The models of RL (3.5, C.4): the policy and the frozen reference pi_SFT from cfg.sft, the
    frozen RM and the value model from cfg.rm (--rm gold: no RM, the value model from SFT's trunk;
    GRPO, RLOO: no value model), the policy's EMA if cfg.ema_decay > 0 (else None), the tokenizer.
    """
    sft_ckpt = load_checkpoint(cfg.sft, kind="lm")
    rm_ckpt = None if cfg.rm == "gold" else load_checkpoint(cfg.rm, kind="scalar")
    rl.check_checkpoints(cfg, sft_ckpt, rm_ckpt)

    def build(ckpt, head=None):
        return model_from_checkpoint(ckpt, head=head, dropout=0.0).to(d.device)
    policy, ref_policy = build(sft_ckpt, "lm"), build(sft_ckpt, "lm").eval().requires_grad_(False)
    reward_model = build(rm_ckpt).eval().requires_grad_(False) if rm_ckpt is not None else None
    value_model = build(rm_ckpt or sft_ckpt, "scalar") if cfg.advantage == "gae" else None
    ema = copy.deepcopy(policy).requires_grad_(False) if cfg.ema_decay > 0 else None
    for name, p in policy.named_parameters() if cfg.rl_params == "norms" else ():
        p.requires_grad_(".ln_" in name)  # --rl-params norms: the LayerNorm gains and biases only
    tok = get_tokenizer(sft_ckpt["tokenizer"])
    return policy, ref_policy, reward_model, value_model, ema, tok


def main():
    cfg = parse_config(PPOConfig)
    d = Dist(cfg.device, cfg.dtype)
    rl.check_inputs(cfg, d)
    set_seed(cfg.seed)
    policy, ref_policy, reward_model, value_model, ema, tok = load_rl_models(cfg, d)
    resumed = rl.prepare_models(cfg, d, policy, ref_policy, reward_model, value_model, ema)
    prompts, queries, ptx_tokens = rl.load_data(cfg, tok, policy.config.block_size)
    ptx_seq_len = min(cfg.ptx_seq_len, policy.config.block_size)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-5,
                                    weight_decay=0.0)  # each model its own learning rate (C.4)
                  for m, lr in ((policy, cfg.lr), (value_model, cfg.vf_lr)) if m is not None]
    # the plumbing: log, --resume, saves, Ctrl-C, non-finite steps, the probe, warmup (lib/rl.py)
    run = rl.RLRun(cfg, d, tok, policy, value_model, ema, optimizers, resumed)
    ddp_policy = d.wrap(policy)
    ddp_value_model = d.wrap(value_model) if value_model is not None else None
    G = cfg.group_size if value_model is None else 1  # samples of each prompt in a batch
    for it in run.steps(len(queries), G, ptx_tokens is not None):
        probed = run.probe(it, policy, reward_model)  # the policy before this iteration's update
        t0 = time.time()
        n_prompts = cfg.batch_size // G
        prompt_ids = shuffled_indices(len(queries), it * n_prompts, n_prompts, cfg.seed)
        batch = [i for i in prompt_ids for _ in range(G)][d.rank::d.world_size]  # G times each

        ro = rollout(policy, [queries[i] for i in batch], tok, cfg, d, run.sample_gen)  # 1.
        t_gen = time.time() - t0
        scores = score(reward_model, ro, [prompts[i] for i in batch], tok, cfg, d)  # 2.
        logprobs, ref_logprobs, values, exact_kl, entropy = old_logprobs_and_values(
            policy, ref_policy, value_model, ro, cfg, d)
        mask = ro.response_mask.float()
        rewards, kl, non_score_reward = compute_rewards(  # 3.
            scores, logprobs, ref_logprobs, mask, run.kl_coef)
        advantages, returns = advantages_and_returns(rewards, values, mask, cfg, d)  # 4.
        t_score = time.time() - t0 - t_gen
        old = {"logprobs": logprobs, "values": values, "advantages": advantages, "returns": returns}
        stats = ppo_update(ddp_policy, ddp_value_model, optimizers, run.guard, ro, old, it, cfg, d,
                           ptx_tokens, ptx_seq_len)  # 5.
        if ema is not None:
            update_ema(ema, policy, cfg.ema_decay)
        stats.update(rl.logprob_change(policy, ro, logprobs, advantages, cfg, d))
        t_train = time.time() - t0 - t_gen - t_score

        metrics = rl.iteration_metrics(d, ro, scores, kl, non_score_reward, exact_kl, entropy,
                                       values, returns)
        run.log_iteration(it, metrics, stats, probed, t_gen, t_score, t_train)
        if cfg.adaptive_kl and math.isfinite(metrics["kl"]):  # a NaN KL would stick in kl_coef
            run.kl_coef = adaptive_kl_coef(run.kl_coef, metrics["kl"], cfg.kl_target,
                                           cfg.kl_horizon, cfg.batch_size)
        run.show_samples(it, [prompts[i] for i in batch], ro.decode(tok), scores, kl)
    run.finish(ema if ema is not None else policy, reward_model)


if __name__ == "__main__":
    cli(main)
