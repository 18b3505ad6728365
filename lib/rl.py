"""What ppo.py's loop needs beside the algorithm: its checkpoints checked and its models prepared
(--resume, bf16, compile), its data, masked statistics, minibatches over processes, the padding
trimmed, the held-out probe, the metrics of an iteration, and RLRun (log, --resume, saves, Ctrl-C,
non-finite steps, warmup). Skip on a first read."""
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.formats import load_prompts, load_text
from data.judge import assess, gold_reward
from data.world import parse_prompt
from lib.common import RunLog, atomic_copy, check_max_new_tokens, load_checkpoint, save_checkpoint
from lib.reliability import Interrupt, NonFiniteGuard, preflight, resume_training, training_state
from lib.sampling import (decode_response, encode_queries, make_generator, sample_responses,
                          sample_table, score_responses, unended_rule)
from model import forward_response


def check_config(cfg):
    """PPOConfig's own checks (ppo.py), after the shared settings' ranges."""
    if cfg.batch_size % cfg.minibatch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is not a multiple of --minibatch-size "
                         f"{cfg.minibatch_size}")
    if cfg.total_episodes < cfg.batch_size:
        raise ValueError(f"--total-episodes {cfg.total_episodes} is less than one iteration's "
                         f"--batch-size {cfg.batch_size}: no iteration would run")
    if cfg.kl_coef < 0 or cfg.ptx_coef < 0:
        raise ValueError("--kl-coef and --ptx-coef must be >= 0")
    if cfg.temperature <= 0:
        raise ValueError("--temperature must be > 0: PPO needs the sampling distribution's "
                         "log-probs")
    if cfg.advantage not in ("gae", "grpo", "rloo"):
        raise ValueError(f"--advantage must be gae, grpo or rloo, got {cfg.advantage!r}")
    if cfg.advantage != "gae" and (cfg.group_size < 2 or cfg.batch_size % cfg.group_size):
        raise ValueError(f"--group-size {cfg.group_size} must be >= 2 and divide --batch-size "
                         f"{cfg.batch_size}: a group baseline needs two or more samples of each "
                         "prompt in the batch")
    if cfg.rl_params not in ("all", "norms"):
        raise ValueError(f"--rl-params must be all or norms, got {cfg.rl_params!r}")


def check_inputs(cfg, d):
    if cfg.batch_size % d.world_size or cfg.minibatch_size % d.world_size \
            or cfg.ptx_batch_size % d.world_size:
        raise ValueError("--batch-size, --minibatch-size and --ptx-batch-size must be multiples of "
                         f"{d.world_size}")
    inputs = {"--sft": cfg.sft, "--rm": cfg.rm if cfg.rm != "gold" else None,
              "--prompts": cfg.prompts, "--ptx-data": cfg.ptx_data,
              "--probe-prompts": cfg.probe_prompts}
    preflight(cfg, inputs, d)


def mask_through_eos(response, eos):
    """(B, R) 1 on the response's real tokens: everything up to and including the first
    end-of-text."""
    is_eos = (response == eos).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


def load_data(cfg, tok, block_size):
    """The prompts, their queries (token ids in the chat template, room left for the response) and,
    for PPO-ptx, the pretraining text's tokens (else None)."""
    prompts = load_prompts(cfg.prompts)
    queries = encode_queries(tok, prompts, block_size - cfg.max_new_tokens, source=cfg.prompts)
    if cfg.rm == "gold" and (bad := next((p for p in prompts if parse_prompt(p) is None), None)):
        raise ValueError(f"--rm gold: --prompts {cfg.prompts} holds {bad[:60]!r}, not a prompt of "
                         "the built-in world; the gold judge knows only those")
    ptx_tokens = None
    if cfg.ptx_data and cfg.ptx_coef > 0:
        ptx_tokens = torch.tensor(tok.encode(load_text(cfg.ptx_data)))
    return prompts, queries, ptx_tokens


def kl_and_entropy(logits, ref_logits, mask):
    """From the policy's and the reference's logits (B, R, V): the full-vocabulary KL per response
    (B,) and the mean entropy per response token."""
    logp_all, ref_logp_all = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)
    exact_kl = ((logp_all.exp() * (logp_all - ref_logp_all)).sum(-1) * mask).sum(1)
    entropy = (-(logp_all.exp() * logp_all).sum(-1) * mask).sum() / mask.sum()
    return exact_kl, entropy


def masked_mean(x, mask, n=None):
    """Mean of x over mask == 1; n overrides the count (the global count under DDP)."""
    return (x * mask).sum() / (mask.sum() if n is None else n)


def masked_whiten(x, mask, d):
    """(x - mean) / std over the masked entries of the whole global batch (all ranks)."""
    stats = d.all_reduce_mean(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]))
    mean = stats[0] / stats[2]
    var = stats[1] / stats[2] - mean ** 2
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def minibatches(it, epoch, cfg, d):
    """The row indices of each minibatch of an epoch. Minibatches are fixed slices of the batch (its
    prompts are already in random order), visited in a new order each epoch. Process r holds the
    batch's rows r, r + N, ...: its slice k is its part of the global slice k, so N processes take
    exactly the gradient steps of one."""
    local = cfg.minibatch_size // d.world_size
    seed = cfg.seed + 7919 * it + epoch
    order = torch.randperm(cfg.batch_size // cfg.minibatch_size,
                           generator=torch.Generator().manual_seed(seed))
    for k in order.tolist():
        yield torch.arange(k * local, (k + 1) * local, device=d.device)


def trim_padding(ro, rows):
    """Rows of the rollouts without the columns that are padding in all of them: the left padding
    their prompts share and the response columns after their longest response (position ids skip
    padding, so log-probs and values do not change). Returns the tokens, the attention mask, the
    column where the responses start and the number R of response columns kept."""
    lo = int((1 - ro.query_mask[rows]).sum(1).min())
    R = int(ro.response_mask[rows].sum(1).max())
    columns = slice(lo, ro.response_start + R)
    return ro.seq[rows, columns], ro.attention_mask[rows, columns], ro.response_start - lo, R


@torch.no_grad()
def probe(policy, reward_model, prompts, queries, tok, cfg, d):
    """The held-out probe: the policy's responses to fixed prompts, sampled with the same noise at
    every probe (so that two probes differ only by the policy), scored by the reward PPO maximises
    (probe_score). On prompts of the built-in world also their accuracy by the gold judge, sampled
    and greedy: a measurement for the curves, never a learning signal."""
    policy.eval()
    out = {}
    world = all(parse_prompt(p) is not None for p in prompts)
    for prefix, temperature in (("probe_", cfg.temperature), ("probe_greedy_", 0.0)):
        if prefix == "probe_greedy_" and not world:
            break
        with d.autocast():
            responses = sample_responses(policy, queries, tok, cfg.max_new_tokens, temperature,
                                         cfg.batch_size, make_generator(d.device, cfg.seed))
        texts = [decode_response(tok, r) for r in responses]
        if prefix == "probe_":
            ended = torch.tensor([r[-1:] == [tok.eot_token] for r in responses])
            if reward_model is None:
                scores = torch.tensor([gold_reward(p, t) for p, t in zip(prompts, texts)])
            else:
                with d.autocast():
                    scores = score_responses(reward_model, queries, responses, cfg.batch_size)
                scores = torch.tensor(scores)
            out["probe_score"] = unended_rule(scores, ended, cfg.unended_score).mean().item()
        if world:
            right = [assess(p, t)["content"] == 1.0 for p, t in zip(prompts, texts)]
            out[prefix + "accuracy"] = sum(right) / len(right)
    return out


def iteration_metrics(d, ro, scores, kl, non_score_reward, exact_kl, entropy, values, returns):
    """What metrics.jsonl records of an iteration: means over the global batch, KL and rewards per
    response; with a value model also the share of the returns' variance its values explain."""
    def mean(x):
        return d.all_reduce_mean(x.float().mean()).item()
    out = {"score": mean(scores), "kl": mean(kl.sum(1)), "exact_kl": mean(exact_kl),
           "non_score_reward": mean(non_score_reward.sum(1)), "entropy": mean(entropy),
           "response_length": mean(ro.response_mask.sum(1)), "ended": mean(ro.ended)}
    if values is not None:
        real = ro.response_mask.bool()
        unexplained = (returns - values)[real].var() / returns[real].var().clamp(min=1e-8)
        out["explained_variance"] = (1 - unexplained).item()
    return out


@torch.no_grad()
def logprob_change(policy, ro, old_logprobs, advantages, cfg, d):
    """What an update did to the rollouts it learnt from: the mean change of log pi(y|x) (summed
    over each response's tokens, nats) over the responses whose advantages sum above 0, and over
    those below 0. A step that learns raises the first and lowers the second; what both lose went to
    responses nobody sampled."""
    mask = ro.response_mask.float()
    with d.autocast():
        new_logprobs, _ = forward_response(policy, ro.seq, ro.attention_mask, ro.response_start,
                                           cfg.temperature)
    change = ((new_logprobs.float() - old_logprobs) * mask).sum(1)  # (B,)
    direction = (advantages * mask).sum(1)  # (B,)
    pos, neg = (direction > 0).float(), (direction < 0).float()
    sums = torch.stack([(change * pos).sum(), pos.sum(), (change * neg).sum(), neg.sum()])
    sums = d.all_reduce_mean(sums)
    return {"logprob_change_pos": (sums[0] / sums[1].clamp(min=1)).item(),
            "logprob_change_neg": (sums[2] / sums[3].clamp(min=1)).item()}


def check_checkpoints(cfg, sft_ckpt, rm_ckpt):
    """The SFT model and the RM share a tokenizer, and --max-new-tokens lets the policy say its
    longest demonstration."""
    if rm_ckpt is not None and sft_ckpt["tokenizer"] != rm_ckpt["tokenizer"]:
        raise ValueError(f"{cfg.sft} uses tokenizer {sft_ckpt['tokenizer']} but {cfg.rm} uses "
                         f"{rm_ckpt['tokenizer']}")
    check_max_new_tokens(sft_ckpt, cfg.max_new_tokens, cfg.sft)


def prepare_models(cfg, d, policy, ref_policy, reward_model, value_model, ema):
    """With --resume, the interrupted run's policy, value model and EMA (returns its checkpoint,
    else None); then gradient checkpointing, bf16 weights for the frozen models on CUDA, and
    torch.compile, as configured."""
    resumed = None
    if cfg.resume:  # ckpt.pt's "model" is the EMA when there is one
        path = f"{cfg.out_dir}/ckpt.pt"
        resumed = load_checkpoint(path, quiet=True)  # no note that --resume finishes it
        try:
            policy.load_state_dict(resumed.get("policy", resumed["model"]))
            if value_model is not None:
                value_model.load_state_dict(resumed["value_model"])
            if ema is not None and "policy" in resumed:
                ema.load_state_dict(resumed["model"])
        except RuntimeError:  # torch's message lists every tensor that differs, one per line
            raise ValueError(f"--resume: the shapes of the models in {path} differ from those "
                             "built from --sft and --rm (another model size); resume with the "
                             "checkpoints its run started from, or run without --resume") from None
    trained = [m for m in (policy, value_model) if m is not None]
    frozen = [m for m in (ref_policy, reward_model) if m is not None]
    for m in trained:
        m.gradient_checkpointing = cfg.grad_checkpointing
    if cfg.frozen_bf16 and d.device_type == "cuda":  # inference only: bf16 halves their memory
        for m in frozen:
            m.to(torch.bfloat16)
    for m in (*trained, *frozen) if cfg.compile else ():
        m.compile()
    return resumed


class RLRun:
    """ppo.py's plumbing around its loop: the metrics log; --resume (the step, the optimisers, the
    sampler's RNG and the adaptive kl_coef where they had got to); saves of the policy (its EMA when
    enabled) and the value model every --save-interval iterations and at the end (--keep-saves keeps
    each); Ctrl-C and non-finite steps (lib/reliability.py); the held-out probe."""

    def __init__(self, cfg, d, tok, policy, value_model, ema, optimizers, resumed):
        self.cfg, self.d, self.tok = cfg, d, tok
        self.policy, self.value_model, self.ema = policy, value_model, ema
        self.optimizers = optimizers
        self.n_iters = cfg.total_episodes // cfg.batch_size
        device = d.device if d.device_type == "cuda" else "cpu"
        self.sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)
        max_query = policy.config.block_size - cfg.max_new_tokens
        self.probe_prompts = []
        if cfg.probe_prompts:
            self.probe_prompts = load_prompts(cfg.probe_prompts)[:cfg.probe_size]
        self.probe_queries = encode_queries(tok, self.probe_prompts, max_query,
                                            source=cfg.probe_prompts)
        # opened only now that inputs and models have loaded: a failed fresh start keeps the old log
        self.log = RunLog(cfg.out_dir, enabled=d.master, resume=cfg.resume)
        self.start = 0
        if cfg.resume:
            state = [self.sample_gen]
            self.start = resume_training(resumed, cfg, self.n_iters, d, self.log, optimizers, state)
        self.kl_coef = cfg.kl_coef  # changes only with --adaptive-kl
        if cfg.resume and cfg.adaptive_kl:
            self.kl_coef = resumed.get("kl_coef", self.kl_coef)
        self.interrupt, self.guard = Interrupt(d), NonFiniteGuard(cfg.max_bad_steps, d)

    def steps(self, n_prompts, G, ptx):
        """The iterations still to run, with a progress bar: sets the learning rates before each
        (a linear warmup, then constant) and saves every --save-interval after it."""
        cfg, d = self.cfg, self.d
        if d.master:
            print(f"PPO: {n_prompts} prompts, {self.n_iters} iterations of {cfg.batch_size} "
                  f"rollouts ({cfg.batch_size // G} prompts x {G}), advantage {cfg.advantage}, "
                  f"ptx_coef {cfg.ptx_coef}, device {d.device}, {d.world_size} process(es)")
        desc = ("ppo" if G == 1 else cfg.advantage) + ("-ptx" if ptx else "")
        for it in tqdm(self.interrupt.steps(self.start, self.n_iters), total=self.n_iters,
                       initial=self.start, desc=desc, disable=not d.master):
            # linear warmup, then constant
            for opt, lr in zip(self.optimizers, (cfg.lr, cfg.vf_lr)):
                warm = min(1.0, (it + 1) / cfg.warmup_iters) if cfg.warmup_iters else 1.0
                opt.param_groups[0]["lr"] = lr * warm
            yield it
            if cfg.save_interval and (it + 1) % cfg.save_interval == 0 and it + 1 < self.n_iters:
                self.save(it + 1)

    def probe(self, it, policy, reward_model):
        """The probe's metrics every --probe-interval iterations (not counted in the iteration's
        time)."""
        if not (self.d.master and self.probe_prompts and it % self.cfg.probe_interval == 0):
            return {}
        return probe(policy, reward_model, self.probe_prompts, self.probe_queries, self.tok,
                     self.cfg, self.d)

    def show_samples(self, it, prompts, responses, scores, kl):
        if self.d.master and (it % self.cfg.sample_interval == 0 or it == self.n_iters - 1):
            sample_table(prompts, responses, {"score": scores, "kl": kl.sum(1)})

    def log_iteration(self, it, metrics, stats, probed, t_gen, t_score, t_train):
        self.log.log(it, **metrics, kl_coef=self.kl_coef, **stats, **probed, time_generate=t_gen,
                     time_score=t_score, time_train=t_train, **self.guard.stats(),
                     echo=it % 5 == 0 or it == self.n_iters - 1)

    def save(self, step):
        """The policy for evaluation (its EMA when enabled), the value model, what --resume
        needs."""
        cfg, d, value_model = self.cfg, self.d, self.value_model
        extra = {"policy": self.policy} if self.ema is not None else {}
        if value_model is not None:
            extra.update(value_model=value_model, value_model_config=asdict(value_model.config))
        state = training_state(d, self.optimizers, [self.sample_gen])
        if d.master:
            model = self.ema if self.ema is not None else self.policy
            save_checkpoint(f"{cfg.out_dir}/ckpt.pt", model, cfg, self.tok.name, iter=step,
                            max_iters=self.n_iters, kl_coef=self.kl_coef, **extra, **state)
            if cfg.keep_saves:
                atomic_copy(f"{cfg.out_dir}/ckpt.pt", f"{cfg.out_dir}/ckpt_{step}.pt")

    def finish(self, policy, reward_model):
        """The probe of the trained policy, then the last save (after Ctrl-C too: the state to
        --resume from) and the exit (lib/reliability.Interrupt)."""
        if self.d.master and self.probe_prompts and self.interrupt.done == self.n_iters:
            self.log.log(self.n_iters, **probe(policy, reward_model, self.probe_prompts,
                                               self.probe_queries, self.tok, self.cfg, self.d))
        self.interrupt.finish(self.save, self.cfg.out_dir)
