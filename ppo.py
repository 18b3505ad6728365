"""Stage 3: PPO against the reward model, with a per-token KL penalty to the SFT policy, and PPO-ptx.

Each episode is a bandit: a random prompt, a sampled response, the RM's score, the end (section 3.5).
The objective (equation 2 of the paper), maximised over the policy pi_RL:

    objective = E_{(x,y) ~ pi_RL} [ r_theta(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x)) ]
                + gamma_ptx * E_{x ~ D_pretrain} [ log pi_RL(x) ]

gamma_ptx = 0 is "PPO"; gamma_ptx > 0 is "PPO-ptx" (InstructGPT). The policy starts from SFT, the value
model from the RM (separate weights and learning rate). Every iteration reads as numbered steps:
1. rollout, 2. score, 3. KL and rewards, 4. GAE, 5. PPO update (+ ptx).

    python ppo.py --sft runs/sft/ckpt.pt --rm runs/rm/ckpt.pt --prompts runs/world/ppo_prompts.jsonl   # CPU
    python ppo.py ... --ptx-data runs/world/pretrain.txt --ptx-coef 1.0 --out-dir runs/ppo_ptx       # PPO-ptx
    torchrun --nproc_per_node=4 ppo.py ...                                                           # GPUs
    python ppo.py ... --resume    # after Ctrl-C (which saves) or a crash: continue from out_dir/ckpt.pt

Deviations from the paper (tiny models, minutes on a CPU): batch 64 rollouts and minibatch 16 (paper 512
and 64), 2 PPO epochs per batch (paper 1) for sample efficiency, a policy learning rate suited to a
~1M-parameter model, minibatches that are fixed slices of the (randomly drawn) batch visited in a new
order each epoch rather than reshuffled (so that N processes split every minibatch evenly), and gamma_ptx
re-scaled: the paper's 27.8 multiplies a pretraining log-likelihood summed over tokens against a
per-episode reward; here both losses are means per token, so gamma_ptx is how strongly each ptx token
pulls against each RL token. train.sh uses 1.0: on the built-in world it undoes the pretraining loss that
SFT and PPO add (the alignment tax) while keeping PPO's win rate. EMA of the policy (paper
0.992) is optional, off by default: with 100 iterations it would mostly average the SFT weights in.
"""
import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (Dist, Interrupt, NonFiniteGuard, RunLog, check_max_new_tokens, cli, load_checkpoint,
                    model_from_checkpoint, pad_left, parse_config, preflight, resume_training, save_checkpoint,
                    set_seed, shuffled_indices, text_windows, training_state, warn_counts)
from data.formats import encode_chat, load_prompts, load_text, truncate_left
from data.tokenizer import get_tokenizer
from model import logprobs_from_logits
from reward import UNENDED_SCORE, rm_scores, unended_rule


@dataclass
class PPOConfig:
    out_dir: str = "runs/ppo"  # where ckpt.pt, value.pt and metrics.jsonl go
    sft: str = "runs/sft/ckpt.pt"  # SFT checkpoint: the policy's init and the frozen reference pi_SFT
    rm: str = "runs/rm/ckpt.pt"  # reward model checkpoint: frozen scorer and the value model's init
    prompts: str = "runs/world/ppo_prompts.jsonl"  # RL prompts, JSONL {"prompt"}
    ptx_data: str | None = None  # pretraining text for PPO-ptx (.txt or JSONL {"text"})
    ptx_coef: float = 0.0  # gamma_ptx: weight of the pretraining loss (0 = plain PPO)
    ptx_batch_size: int = 4  # pretraining windows per minibatch, over all processes
    ptx_seq_len: int = 128  # tokens per pretraining window
    total_episodes: int = 6400  # prompts rolled out in all (paper 256k): 100 iterations of 64
    batch_size: int = 64  # rollouts per iteration, over all processes (paper 512)
    minibatch_size: int = 16  # rollouts per gradient step (paper 64)
    ppo_epochs: int = 2  # passes over each batch of rollouts (paper 1)
    max_new_tokens: int = 128  # longest response (as sample.py and evaluate.py; at least the longest demonstration)
    temperature: float = 1.0  # sampling temperature; log-probs are recomputed at the same temperature
    lr: float = 1e-5  # policy learning rate (constant after warmup, as the paper; 5e-5 drifts, see README)
    vf_lr: float = 1e-4  # value model learning rate
    warmup_iters: int = 10  # linear learning-rate warmup (paper: 10 iterations)
    kl_coef: float = 0.02  # beta: the per-token KL penalty to pi_SFT (paper 0.02)
    adaptive_kl: bool = False  # adapt beta towards kl_target (Ziegler et al. 2019) instead of fixing it
    kl_target: float = 6.0  # adaptive KL: target KL per response, in nats
    kl_horizon: int = 10000  # adaptive KL: horizon, in episodes
    gamma: float = 1.0  # GAE discount (paper 1)
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # PPO ratio clip (paper 0.2)
    cliprange_value: float = 0.2  # value clip around the rollout's value estimate
    unended_score: float = UNENDED_SCORE  # the score of a response that never emitted end-of-text (reward.py)
    grad_clip: float = 1.0  # clip each model's gradient norm; 0 = off
    ema_decay: float = 0.0  # EMA of the policy weights saved for evaluation (paper 0.992); 0 = off
    sample_interval: int = 10  # iterations between tables of sample responses
    save_interval: int = 20  # iterations between saves of the resumable training state to ckpt.pt; 0 = at the end only
    resume: bool = False  # continue the interrupted run in out_dir from its ckpt.pt (models, optimisers, RNGs, beta)
    max_bad_steps: int = 5  # NaN/inf minibatch steps (each skipped) in a row after which the run stops
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # matmul precision: bf16 (autocast), fp32, or auto = bf16 on CUDA, fp32 elsewhere
    compile: bool = False  # torch.compile the models
    grad_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower
    frozen_bf16: bool = True  # on CUDA, the frozen reference and RM in bf16 (half the memory; fp32 on CPU)
    seed: int = 0  # seed for prompt order and sampling

    def __post_init__(self):
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of --minibatch-size {self.minibatch_size}")
        if self.kl_coef < 0 or self.ptx_coef < 0:
            raise ValueError("--kl-coef and --ptx-coef must be >= 0")
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0: PPO needs the sampling distribution's log-probs")


class AdaptiveKLController:
    """beta follows the measured KL towards a target (Ziegler et al. 2019, section 2.2)."""

    def __init__(self, beta, target, horizon):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n_episodes):
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.beta *= 1 + error * n_episodes / self.horizon


def masked_mean(x, mask, n=None):
    """Mean of x over mask == 1; n overrides the count (the global count under DDP)."""
    return (x * mask).sum() / (mask.sum() if n is None else n)


def masked_whiten(x, mask, d, shift_mean=True):
    """(x - mean) / std over the masked entries of the whole global batch (all ranks)."""
    stats = d.all_reduce_mean(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]))
    mean = stats[0] / stats[2]
    var = stats[1] / stats[2] - mean ** 2
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def compute_rewards(scores, logprobs, ref_logprobs, mask, beta):
    """Per-token rewards of the objective: the KL penalty at every response token, the RM score added at
    the last one. kl_t = log pi_RL(y_t) - log pi_SFT(y_t) (the k1 estimate); non_score_reward = -beta * kl.
    scores (B,), the rest (B, R). Returns rewards, kl, non_score_reward, all (B, R) and 0 past the end."""
    kl = (logprobs - ref_logprobs) * mask
    non_score_reward = -beta * kl
    rewards = non_score_reward.clone()
    last = mask.sum(1).long() - 1  # (B,): index of each response's last real token
    rewards[torch.arange(rewards.size(0), device=rewards.device), last] += scores
    return rewards, kl, non_score_reward


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over response tokens (Schulman et al. 2016), vectorised:
        delta_t = r_t + gamma * V_{t+1} - V_t             (V after the last token = 0)
        A_t     = sum_{k >= t} (gamma * lam)^(k - t) * delta_k
        returns = A + V
    rewards, values, mask: (B, R). Tokens after the end (mask 0) carry no reward and no value."""
    values = values * mask
    next_values = F.pad(values[:, 1:], (0, 1))  # (B, R): V_{t+1}, 0 past the end
    deltas = (rewards + gamma * next_values - values) * mask  # (B, R)
    R = rewards.size(1)
    t = torch.arange(R, device=rewards.device)
    power = (t[None, :] - t[:, None]).clamp(min=0).to(rewards.dtype)  # (R, R): k - t
    discount = (gamma * lam) ** power * (t[None, :] >= t[:, None])  # (R, R): [t, k] = (gamma*lam)^(k-t), k >= t
    advantages = deltas @ discount.T  # (B, R): A_t = sum_k discount[t, k] * delta_k
    return advantages * mask, (advantages + values) * mask


def ppo_losses(new_logprobs, old_logprobs, advantages, vpred, old_values, returns, mask, cfg, n_tokens=None):
    """The clipped surrogate and the clipped value loss (Schulman et al. 2017), means per response token:
        pg_loss = E[ max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) ],  ratio = pi(y_t) / pi_old(y_t)
        vf_loss = 0.5 * E[ max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2) ]"""
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


def response_mask(response, eos):
    """(B, R) 1 on the response's real tokens: everything up to and including the first end-of-text."""
    is_eos = (response == eos).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


def forward_response(model, seq, attn, n_query, temperature):
    """Per response token: the log-probs under `model` and its logits, from one forward pass. Position
    n_query - 1 + t predicts response token t."""
    logits, _ = model(seq, attention_mask=attn)
    logits = logits[:, n_query - 1:-1].float() / temperature  # (B, R, V)
    return logprobs_from_logits(logits, seq[:, n_query:]), logits


def value_of_response(value_model, seq, attn, n_query):
    """V(state before response token t) for every t: the value head at position n_query - 1 + t."""
    values, _ = value_model(seq, attention_mask=attn)
    return values[:, n_query - 1:-1].float()  # (B, R)


def main():
    # -- config and setup
    cfg = parse_config(PPOConfig)
    d = Dist(cfg.device, cfg.dtype)
    if cfg.batch_size % d.world_size or cfg.minibatch_size % d.world_size or cfg.ptx_batch_size % d.world_size:
        raise ValueError(f"--batch-size, --minibatch-size and --ptx-batch-size must be multiples of the "
                         f"{d.world_size} processes")
    preflight(cfg.out_dir, {"--sft": cfg.sft, "--rm": cfg.rm, "--prompts": cfg.prompts, "--ptx-data": cfg.ptx_data},
              cfg.resume)
    set_seed(cfg.seed)
    log = RunLog(cfg.out_dir, enabled=d.master, resume=cfg.resume)
    # the same sampling generator on every process: generate() draws the noise of the whole global batch and
    # each process uses its rows, so N processes sample exactly what one would
    sample_gen = torch.Generator(device=d.device if d.device_type == "cuda" else "cpu").manual_seed(cfg.seed)

    # -- models: policy and reference from SFT; the RM frozen; the value model from the RM
    sft_ckpt, rm_ckpt = load_checkpoint(cfg.sft, kind="lm"), load_checkpoint(cfg.rm, kind="scalar")
    if sft_ckpt["tokenizer"] != rm_ckpt["tokenizer"]:
        raise ValueError(f"{cfg.sft} uses tokenizer {sft_ckpt['tokenizer']} but {cfg.rm} uses {rm_ckpt['tokenizer']}")
    check_max_new_tokens(sft_ckpt, cfg.max_new_tokens, cfg.sft)
    if cfg.max_new_tokens >= sft_ckpt["model_config"]["block_size"]:
        raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for the prompt in the policy's context "
                         f"of {sft_ckpt['model_config']['block_size']} tokens; lower it")
    tok = get_tokenizer(sft_ckpt["tokenizer"])
    policy = model_from_checkpoint(sft_ckpt, head="lm", dropout=0.0).to(d.device)
    ref_policy = model_from_checkpoint(sft_ckpt, head="lm", dropout=0.0).to(d.device).eval().requires_grad_(False)
    reward_model = model_from_checkpoint(rm_ckpt, dropout=0.0).to(d.device).eval().requires_grad_(False)
    value_model = model_from_checkpoint(rm_ckpt, dropout=0.0).to(d.device)
    ema = copy.deepcopy(policy).requires_grad_(False) if cfg.ema_decay > 0 else None
    if cfg.resume:  # the interrupted run's models; ckpt.pt's "model" is the EMA when there is one
        resumed = load_checkpoint(f"{cfg.out_dir}/ckpt.pt")
        policy.load_state_dict(resumed.get("policy", resumed["model"]))
        value_model.load_state_dict(resumed["value_model"])
        if ema is not None and "policy" in resumed:
            ema.load_state_dict(resumed["model"])
    policy.gradient_checkpointing = value_model.gradient_checkpointing = cfg.grad_checkpointing
    if cfg.frozen_bf16 and d.device_type == "cuda":  # inference only: bf16 weights halve their memory
        ref_policy.to(torch.bfloat16)
        reward_model.to(torch.bfloat16)
    if cfg.compile:
        for m in (policy, ref_policy, reward_model, value_model):
            m.compile()
    policy_train, value_train = d.wrap(policy), d.wrap(value_model)

    # -- data: prompts in the chat template, truncated from the left to leave room for the response
    stats, prompts = {}, load_prompts(cfg.prompts)
    max_query = policy.config.block_size - cfg.max_new_tokens
    queries = []
    for p in prompts:
        q, cut = truncate_left(encode_chat(tok, p)[0], max_query)
        stats["truncated"] = stats.get("truncated", 0) + int(cut)
        queries.append(q)
    warn_counts(cfg.prompts, stats, len(prompts))
    ptx_tokens = torch.tensor(tok.encode(load_text(cfg.ptx_data))) if cfg.ptx_data and cfg.ptx_coef > 0 else None
    ptx_seq_len = min(cfg.ptx_seq_len, policy.config.block_size)

    # -- optimisers: separate models, separate learning rates (appendix C.4)
    opt_policy = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
    opt_value = torch.optim.AdamW(value_model.parameters(), lr=cfg.vf_lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.0)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    n_iters = cfg.total_episodes // cfg.batch_size
    local_mb = cfg.minibatch_size // d.world_size
    start = 0
    if cfg.resume:
        start = resume_training(resumed, cfg, n_iters, d, log, [opt_policy, opt_value], [sample_gen])
        kl_ctl.beta = resumed["kl_beta"]

    def save(step):  # the policy for evaluation (its EMA when enabled), and all that --resume needs
        extra = training_state(d, [opt_policy, opt_value], [sample_gen])
        if ema is not None:
            extra["policy"] = policy
        if d.master:
            save_checkpoint(f"{cfg.out_dir}/ckpt.pt", ema if ema is not None else policy, cfg, sft_ckpt["tokenizer"],
                            iter=step, max_iters=n_iters, value_model=value_model, kl_beta=kl_ctl.beta, **extra)
    if d.master:
        print(f"PPO: {len(queries)} prompts, {n_iters} iterations of {cfg.batch_size} rollouts, "
              f"ptx_coef {cfg.ptx_coef}, device {d.device}, {d.world_size} process(es)")

    interrupt, guard = Interrupt(d), NonFiniteGuard(cfg.max_bad_steps, d)  # Ctrl-C and NaN/inf: see common.py
    for it in tqdm(interrupt.steps(start, n_iters), total=n_iters, initial=start,
                   desc="ppo-ptx" if ptx_tokens is not None else "ppo", disable=not d.master):
        t0 = time.time()
        lr_scale = min(1.0, (it + 1) / cfg.warmup_iters) if cfg.warmup_iters else 1.0
        opt_policy.param_groups[0]["lr"], opt_value.param_groups[0]["lr"] = cfg.lr * lr_scale, cfg.vf_lr * lr_scale
        batch = shuffled_indices(len(queries), it * cfg.batch_size, cfg.batch_size, cfg.seed)[d.rank::d.world_size]

        # 1. rollout: left-padded prompts, sampled with the KV cache until end-of-text
        policy.eval()
        query, query_mask = pad_left([queries[i] for i in batch], tok.pad_token)
        query, query_mask = query.to(d.device), query_mask.to(d.device)
        n_query = query.size(1)
        with torch.no_grad(), d.autocast():
            seq = policy.generate(query, cfg.max_new_tokens, temperature=cfg.temperature, attention_mask=query_mask,
                                  eos_token_id=tok.eot_token, pad_token_id=tok.pad_token, generator=sample_gen,
                                  rows=(torch.arange(d.rank, cfg.batch_size, d.world_size), cfg.batch_size))
        response = seq[:, n_query:]  # (B, R)
        mask = response_mask(response, tok.eot_token)  # (B, R)
        attn = torch.cat([query_mask, mask], dim=1)  # (B, T + R): padding after the end is never attended
        ended = (response == tok.eot_token).any(1)
        t_gen = time.time() - t0

        with torch.no_grad(), d.autocast():
            # 2. score: the RM at the last real token; a fixed low score for a response that never ended
            last = n_query - 1 + mask.sum(1)
            scores = unended_rule(rm_scores(reward_model, seq, last, attention_mask=attn).float(), ended,
                                  cfg.unended_score)

            # 3. KL and rewards. Log-probs are recomputed by a forward pass at the sampling temperature
            logprobs, logits = forward_response(policy, seq, attn, n_query, cfg.temperature)
            ref_logprobs, ref_logits = forward_response(ref_policy, seq, attn, n_query, cfg.temperature)
            values = value_of_response(value_model, seq, attn, n_query)
        maskf = mask.float()
        rewards, kl, non_score_reward = compute_rewards(scores, logprobs, ref_logprobs, maskf, kl_ctl.beta)
        logp_all, ref_logp_all = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
        exact_kl = ((logp_all.exp() * (logp_all - ref_logp_all)).sum(-1) * maskf).sum(1)  # full-vocabulary KL
        entropy = (-(logp_all.exp() * logp_all).sum(-1) * maskf).sum() / maskf.sum()
        del logits, ref_logits, logp_all, ref_logp_all

        # 4. GAE over response tokens, then advantages whitened over the whole batch
        advantages, returns = compute_gae(rewards, values, maskf, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, maskf, d)
        t_score = time.time() - t0 - t_gen

        # 5. PPO epochs over minibatches: clipped surrogate, clipped value loss, and the ptx loss
        policy.train()
        value_model.train()
        acc = {"pg_loss": 0.0, "vf_loss": 0.0, "ptx_loss": 0.0, "approx_kl": 0.0, "clipfrac": 0.0, "vf_clipfrac": 0.0}
        n_steps = 0
        ptx_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + it)
        for epoch in range(cfg.ppo_epochs):
            # minibatches are fixed slices of the batch (its prompts are already in random order), visited in
            # a new order each epoch. Process r holds the batch's rows r, r + N, ...: its slice k is its part
            # of the global slice k, so N processes take exactly the gradient steps of one
            n_mb = cfg.batch_size // cfg.minibatch_size
            order = torch.randperm(n_mb, generator=torch.Generator().manual_seed(cfg.seed + 7919 * it + epoch))
            for k in order.tolist():
                mb = torch.arange(k * local_mb, (k + 1) * local_mb, device=d.device)
                # drop the minibatch's columns that are padding in all its rows: the left padding shared by
                # its prompts, the response columns after its longest response (position ids skip padding,
                # so the log-probs and values do not change)
                lo = int((1 - query_mask[mb]).sum(1).min())
                r = int(mask[mb].sum(1).max())
                mb_seq, mb_attn, mb_query = seq[mb, lo:n_query + r], attn[mb, lo:n_query + r], n_query - lo
                # means per token over the global minibatch; x world_size undoes DDP's gradient average
                n_tokens = d.all_reduce_mean(maskf[mb].sum()) * d.world_size
                with d.autocast():
                    new_logprobs, mb_logits = forward_response(policy_train, mb_seq, mb_attn, mb_query, cfg.temperature)
                    vpred = value_of_response(value_train, mb_seq, mb_attn, mb_query)
                del mb_logits
                pg_loss, vf_loss, st = ppo_losses(new_logprobs, logprobs[mb, :r], advantages[mb, :r], vpred,
                                                  values[mb, :r], returns[mb, :r], maskf[mb, :r], cfg, n_tokens)
                loss = pg_loss * d.world_size
                if ptx_tokens is not None:
                    # PPO-ptx: gamma_ptx * the LM loss on pretraining text, in the same gradient step
                    # the global batch of windows, drawn alike on every process; each takes its share
                    windows = text_windows(ptx_tokens, cfg.ptx_batch_size, ptx_seq_len, ptx_gen)[d.rank::d.world_size]
                    x = torch.tensor([w[:-1] for w, _ in windows], device=d.device)
                    y = torch.tensor([w[1:] for w, _ in windows], device=d.device)
                    with d.autocast():
                        _, ptx_loss = policy_train(x, y)
                    loss = loss + cfg.ptx_coef * ptx_loss
                    acc["ptx_loss"] += ptx_loss.item()
                opt_policy.zero_grad(set_to_none=True)
                opt_value.zero_grad(set_to_none=True)
                loss.backward()
                (vf_loss * d.world_size).backward()
                grad_norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip or math.inf)  # inf: no clip
                              for m in (policy, value_model)]
                if guard.ok(it, loss, vf_loss, *grad_norms):
                    opt_policy.step()
                    opt_value.step()
                acc["pg_loss"] += pg_loss.item()
                acc["vf_loss"] += vf_loss.item()
                for k, v in st.items():
                    acc[k] += v
                n_steps += 1
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), policy.parameters()):
                    pe.lerp_(p, 1 - cfg.ema_decay)
        t_train = time.time() - t0 - t_gen - t_score

        # -- log: means over the global batch
        def mean(x):
            return d.all_reduce_mean(x.float().mean()).item()
        kl_per_response = mean(kl.sum(1))
        if cfg.adaptive_kl and math.isfinite(kl_per_response):  # one NaN KL would stick in beta for good
            kl_ctl.update(kl_per_response, cfg.batch_size)
        var_returns = returns[mask.bool()].var()
        explained_var = 1 - (returns - values)[mask.bool()].var() / var_returns.clamp(min=1e-8)
        log.log(it, score=mean(scores), kl=kl_per_response, exact_kl=mean(exact_kl),
                non_score_reward=mean(non_score_reward.sum(1)), entropy=mean(entropy), beta=kl_ctl.beta,
                **{k: v / n_steps for k, v in acc.items() if k != "ptx_loss" or ptx_tokens is not None},
                explained_variance=explained_var.item(), response_length=mean(mask.sum(1)),
                ended=mean(ended), time_generate=t_gen, time_score=t_score, time_train=t_train, **guard.stats(),
                echo=it % 5 == 0 or it == n_iters - 1)
        if d.master and (it % cfg.sample_interval == 0 or it == n_iters - 1):
            rows = [f"{'score':>6} {'kl':>6}  prompt -> response"]
            for b in range(min(4, len(batch))):
                text = tok.decode(response[b, :mask[b].sum()].tolist()).strip()
                rows.append(f"{scores[b].item():6.2f} {kl[b].sum().item():6.2f}  {prompts[batch[b]]!r} -> {text!r}")
            tqdm.write("\n".join(rows))
        if cfg.save_interval and (it + 1) % cfg.save_interval == 0 and it + 1 < n_iters:
            save(it + 1)

    # -- save: the policy for evaluation (its EMA when enabled), the value model for inspection
    save(interrupt.done)
    if d.master:
        if interrupt.done == n_iters:
            save_checkpoint(f"{cfg.out_dir}/value.pt", value_model, cfg, sft_ckpt["tokenizer"], iter=n_iters)
        print(f"saved {cfg.out_dir}/ckpt.pt{d.peak_memory()}")
    d.close()
    interrupt.exit_if_requested(cfg.out_dir)


if __name__ == "__main__":
    cli(main)
