"""Evaluation: win rate against the SFT model on held-out prompts (the paper's Figure 1), accuracy,
the baselines a skeptic asks for, honesty and harmlessness rates, and checks of the reward model.
docs/evaluation.md defines every measure and every model of the report.

Each model answers every held-out prompt once, sampled at --temperature with a generator seeded by
--seed (the same random numbers for every model, so a model identical to SFT gives SFT's responses:
win rate 0.5, KL 0). The gold judge (data/judge.py) compares each response with SFT's response to
the same prompt (win_rate_vs_sft), scores it 0..1 (gold_score) and checks its content (accuracy);
the RM scores it by the rule PPO maximised (rm_score); kl_vs_sft is the k1 estimate of KL(pi ||
pi_SFT) on the model's own samples. Every mean has a 95% interval (mean +- 1.96 s / sqrt(n)); a
difference from SFT is paired per prompt (paired_vs_sft). The models: base, base_prompted
(few-shot), constant and family_constant (trivial policies), sft_greedy, sft, the trained policies
(ppo, ppo_ptx, ppo_gold, dpo, grpo, rloo) and best_of_n (N SFT samples, the RM's favourite kept).
With the gold judge the report also checks the RM (rm_checks).

    python evaluate.py --prompts runs/world/test_prompts.jsonl --sft runs/sft/ckpt.pt \\
        --rm runs/rm/ckpt.pt --ppo runs/ppo/ckpt.pt --out-dir runs/eval          # and more models
    python evaluate.py ... --device cuda --batch-size 256                         # one GPU

Writes report.json, report.md, winrate.png (winrate.txt without matplotlib) and samples.jsonl.
Without a gold judge (HH-RLHF), --judge rm compares RM scores instead. Everything runs in fp32: the
KL is a difference of two large log-probabilities.
"""
import json
import math
import random
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data.batches import pad_left
from data.formats import encode_chat, load_prompts, load_sft, load_text, write_jsonl, write_text
from data.judge import assess, by_family, gold_score, judge_pair
from data.tokenizer import get_tokenizer
from data.world import REFUSAL, gold_answer, is_false_premise, parse_prompt, wrong_answer
from lib.common import (autodetect_device, check_max_new_tokens, check_ranges, load_checkpoint,
                        model_from_checkpoint)
from lib.config import cli, parse_config
from lib.report import checkpoint_ids, markdown_table, train_seconds
from lib.sampling import (UNENDED_SCORE, decode_response, encode_queries, load_policy,
                          make_generator, sample_responses, score_responses, unended_rule)
from tools.plot import plot_win_rates

MODELS = ("base", "base_prompted", "constant", "family_constant", "sft_greedy", "sft", "ppo",
          "ppo_ptx", "ppo_gold", "dpo", "grpo", "rloo", "best_of_n")  # the report's order
# trained policies: each also decoded greedily
POLICIES = ("ppo", "ppo_ptx", "ppo_gold", "dpo", "grpo", "rloo")


@dataclass
class EvalConfig:
    prompts: str = "runs/world/test_prompts.jsonl"  # held-out prompts (JSONL with a "prompt" field)
    sft: str = "runs/sft/ckpt.pt"  # the SFT checkpoint: the baseline of every win rate and KL
    rm: str = "runs/rm/ckpt.pt"  # the reward model checkpoint (scalar head)
    base: str | None = None  # the pretrained base checkpoint: evaluates base (and base_prompted)
    ppo: str | None = None  # the PPO checkpoint
    ppo_ptx: str | None = None  # the PPO-ptx checkpoint
    # PPO with the gold judge as its reward (ppo.py --rm gold): RLHF's ceiling
    ppo_gold: str | None = None
    dpo: str | None = None  # the DPO checkpoint (dpo.py)
    grpo: str | None = None  # the GRPO checkpoint (ppo.py --advantage grpo)
    rloo: str | None = None  # the RLOO checkpoint (ppo.py --advantage rloo)
    # demonstrations for base_prompted's few-shot prefix (needs --base)
    few_shot_data: str | None = None
    few_shot_k: int = 3  # demonstrations in the few-shot prefix
    pretrain_val: str | None = None  # held-out pretraining text for the alignment tax
    # windows of block_size tokens of --pretrain-val to average the loss over
    pretrain_windows: int = 128
    best_of: int = 4  # N of best_of_n; 0 = leave best_of_n out
    out_dir: str = "runs/eval"  # where the report, the chart and the samples go
    max_prompts: int = 600  # use the first N prompts; 0 = all
    temperature: float = 1.0  # sampling temperature of every model (the KL is computed at it too)
    # longest response, in tokens (as ppo.py; at least the longest demonstration)
    max_new_tokens: int = 128
    batch_size: int = 64  # sequences per generation / scoring batch
    seed: int = 0  # seed of the sampler (the same for every model) and of the few-shot examples
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    judge: str = "gold"  # "gold": the world's gold judge; "rm": RM-score comparisons (real data)
    val_prompts: str | None = None  # prompts the constant baselines are chosen on (gold judge only)
    # the score of a response without end-of-text (as ppo.py's)
    unended_score: float = UNENDED_SCORE

    def __post_init__(self):
        if self.judge not in ("gold", "rm"):
            raise ValueError(f"--judge must be 'gold' or 'rm', got {self.judge!r}")
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0: the KL is computed at the sampling "
                             "temperature")
        # best_of 0: best_of_n left out; max_prompts 0: all prompts
        check_ranges(self, ("max_new_tokens", "batch_size", "few_shot_k", "pretrain_windows"),
                     ("best_of", "max_prompts"))
        if self.few_shot_data and not self.base:
            raise ValueError("--few-shot-data prompts the base model: give --base too")


# --- the metrics ----------------------------------------------------------------------------------
def mean_ci(values):
    """(mean, [lo, hi]) of per-prompt values (win outcomes 1 / 0.5 / 0, accuracies 0 / 1, scores):
    the 95% normal-approximation interval mean +- 1.96 * s / sqrt(n), s the sample standard
    deviation; clipped to [0, 1], where every value here lies."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, [0.0, 1.0]
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = 1.96 * s / math.sqrt(n)
    return mean, [max(0.0, mean - half), min(1.0, mean + half)]


def paired_ci(values, reference):
    """(mean, [lo, hi]) of the per-prompt differences values[i] - reference[i]: the 95%
    normal-approximation interval mean +- 1.96 * s / sqrt(n), s the sample standard deviation of the
    differences (not clipped)."""
    diffs = [a - b for a, b in zip(values, reference)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, [-1.0, 1.0]
    s = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = 1.96 * s / math.sqrt(n)
    return mean, [mean - half, mean + half]


def best_of_n_kl(n):
    """KL(best-of-n || base policy) = log n - (n - 1) / n (Stiennon et al. 2020), an upper bound."""
    return math.log(n) - (n - 1) / n


@torch.no_grad()
def response_logprobs(model, contexts, responses, temperature, batch_size):
    """sum_t log pi(y_t | context, y_<t) of each response, under softmax(logits / temperature)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(contexts), batch_size):
        resp = responses[i:i + batch_size]
        idx, mask = pad_left([c + r for c, r in zip(contexts[i:i + batch_size], resp)], 0)  # (B, T)
        lp = model.token_logprobs(idx.to(device), mask.to(device), temperature).cpu()  # (B, T-1)
        # left-padded rows end together: the last len(r) tokens are the response, predicted at the
        # columns T-1-len(r) .. T-2 of lp
        first = idx.size(1) - 1 - torch.tensor([len(r) for r in resp])  # (B,)
        counted = torch.arange(lp.size(1))[None, :] >= first[:, None]  # (B, T-1)
        out += torch.where(counted, lp, 0.0).sum(1).tolist()
    return out


def pretrain_windows(tok, path, block_size, n):
    """Up to n windows of block_size + 1 consecutive tokens of the text file at path, side by side
    from its start: pretrain_loss's input."""
    text = torch.tensor(tok.encode(load_text(path)))
    L = min(block_size, len(text) - 1)
    starts = range(0, len(text) - L, L)
    return torch.stack([text[i:i + L + 1] for i in starts][:n])


@torch.no_grad()
def pretrain_loss(model, windows, batch_size):
    """Mean next-token cross-entropy over the held-out windows (every token counts); None without
    them."""
    if windows is None:
        return None
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size].to(device)  # (B, L + 1)
        total += model(w[:, :-1], w[:, 1:])[1].item() * w.size(0)
    return total / len(windows)


# --- the models' responses ------------------------------------------------------------------------
def few_shot_contexts(tok, demos, queries, k, seed, max_len):
    """Each query after k fixed demonstrations (query + response + end-of-text each, the SFT
    sequences). Where they do not all fit in max_len tokens, the earliest whole demonstrations are
    left out."""
    shots = [sum(encode_chat(tok, d["prompt"], d["response"]), [])
             for d in random.Random(seed).sample(demos, min(k, len(demos)))]
    out, used = [], []
    for q in queries:
        j = 0
        while j < len(shots) and sum(len(s) for s in shots[j:]) + len(q) > max_len:
            j += 1
        out.append([t for s in shots[j:] for t in s] + q)
        used.append(len(shots) - j)
    if min(used) < len(shots):
        fewer = sum(u < len(shots) for u in used)
        print(f"warning: base_prompted: {fewer} of {len(queries)} queries have fewer than "
              f"{len(shots)} demonstrations to fit the context (mean {sum(used) / len(used):.2f})",
              file=sys.stderr)
    return out


def load_like(path, sft, tokenizer, device):
    """A policy checkpoint that shares the SFT model's tokenizer and fits its context."""
    model, other, _ = load_policy(path, device)
    if other != tokenizer or model.config.block_size < sft.config.block_size:
        raise ValueError(f"{path} does not match --sft (tokenizer {other!r} vs {tokenizer!r}, "
                         f"block_size {model.config.block_size} vs {sft.config.block_size})")
    return model


def scores_by_the_rule(rm, queries, responses, tok, cfg):
    """What PPO maximises: the RM's score, or --unended-score for a response that never ended."""
    scores = torch.tensor(score_responses(rm, queries, responses, cfg.batch_size))
    ended = torch.tensor([r[-1:] == [tok.eot_token] for r in responses])
    return unended_rule(scores, ended, cfg.unended_score).tolist()


def run_policy(name, model, contexts, queries, sft, rm, tok, cfg, temperature=None):
    """Sample one response per query from model (conditioned on contexts; temperature 0 is greedy)
    and score it with the RM and the KL to the SFT model (conditioned on the plain queries)."""
    t0 = time.time()
    temperature = cfg.temperature if temperature is None else temperature
    device = next(model.parameters()).device
    responses = sample_responses(model, contexts, tok, cfg.max_new_tokens, temperature,
                                 cfg.batch_size, make_generator(device, cfg.seed), desc=name)
    logp_sft = response_logprobs(sft, queries, responses, cfg.temperature, cfg.batch_size)
    if temperature == 0:  # deterministic: log pi(y) = 0
        logp = [0.0] * len(responses)
    else:
        logp = (logp_sft if model is sft else
                response_logprobs(model, contexts, responses, temperature, cfg.batch_size))
    # kl = sum_t log pi(y_t) - log pi_SFT(y_t): the k1 estimate on the policy's own samples
    return {"responses": responses, "rm": scores_by_the_rule(rm, queries, responses, tok, cfg),
            "kl": [a - b for a, b in zip(logp, logp_sft)], "seconds": time.time() - t0}


def run_fixed(texts, prompts, queries, sft, rm, tok, cfg):
    """A deterministic policy given by its answer texts: scored like run_policy, with KL = -log
    pi_SFT(y)."""
    t0 = time.time()
    responses = [encode_chat(tok, p, t)[1] for p, t in zip(prompts, texts)]  # " text" + end-of-text
    logp_sft = response_logprobs(sft, queries, responses, cfg.temperature, cfg.batch_size)
    return {"responses": responses, "rm": scores_by_the_rule(rm, queries, responses, tok, cfg),
            "kl": [-lp for lp in logp_sft], "seconds": time.time() - t0}


def best_constants(val_prompts):
    """The best fixed answer overall, and per task family, by mean gold score on the val prompts.
    The candidates are the val prompts' gold answers and the refusal."""
    candidates = sorted({gold_answer(parse_prompt(p)) for p in val_prompts} | {REFUSAL})
    family_prompts = defaultdict(list)
    for p in val_prompts:
        family_prompts[parse_prompt(p).family].append(p)

    def best(prompts):
        return max(candidates, key=lambda c: (sum(gold_score(p, c) for p in prompts), c))
    return best(val_prompts), {f: best(ps) for f, ps in sorted(family_prompts.items())}


def run_best_of_n(sft, rm, queries, tok, cfg):
    """N SFT samples per prompt, the highest score by the rule kept (rejection sampling against the
    RM)."""
    t0, N = time.time(), cfg.best_of
    device = next(sft.parameters()).device
    # (n_prompts * N) contexts, each prompt N times in a row
    repeated = [q for q in queries for _ in range(N)]
    samples = sample_responses(sft, repeated, tok, cfg.max_new_tokens, cfg.temperature,
                               cfg.batch_size, make_generator(device, cfg.seed), desc="best_of_n")
    scores = scores_by_the_rule(rm, repeated, samples, tok, cfg)
    best = [max(range(i * N, (i + 1) * N), key=scores.__getitem__) for i in range(len(queries))]
    return {"responses": [samples[j] for j in best], "rm": [scores[j] for j in best],
            "kl": [best_of_n_kl(N)] * len(queries), "seconds": time.time() - t0}


def rm_checks(rm, prompts, tok, cfg):
    """How often the RM scores each held-out prompt's gold answer above (a) a wrong answer in the
    same style and (b) the gold answer of another prompt (a different one, drawn with --seed),
    overall and per family. An RM that fails (a) cannot teach correctness; one that fails (b) scores
    answers without reading the prompt, and a policy can then give one answer to everything."""
    rng = random.Random(f"{cfg.seed}/rm_checks")
    tasks = [parse_prompt(p) for p in prompts]
    golds = [gold_answer(t) for t in tasks]
    wrong = [wrong_answer(t, rng) for t in tasks]
    other = []
    for g in golds:
        o = rng.choice(golds)
        while o == g and len(set(golds)) > 1:
            o = rng.choice(golds)
        other.append(o)
    queries = encode_queries(tok, prompts, rm.config.block_size - cfg.max_new_tokens)

    def scores(texts):
        responses = [encode_chat(tok, p, t)[1] for p, t in zip(prompts, texts)]
        return score_responses(rm, queries, responses, cfg.batch_size)
    s_gold, s_wrong, s_other = scores(golds), scores(wrong), scores(other)
    out = {}
    for check, s_alt in (("gold_over_wrong", s_wrong), ("gold_over_other_prompt", s_other)):
        right = [a > b for a, b in zip(s_gold, s_alt)]
        out[check] = {"all": sum(right) / len(right), **by_family(prompts, right)}
    return out


def honesty(tasks, parts):
    """Rates of the paper's honesty and harmlessness failures (Figures 4-6), each over the prompts
    where it can happen (None when the evaluated prompts have none)."""
    def rate(flags):
        return sum(flags) / len(flags) if flags else None
    pairs = list(zip(tasks, parts))
    return {
        "false_premise_accepted": rate([p["accepted_premise"] for t, p in pairs
                                        if is_false_premise(t)]),
        "harmful_compliance": rate([not p["refused"] for t, p in pairs if t.kind == "forbidden"]),
        "benign_refusal": rate([p["refused"] for t, p in pairs if t.kind == "benign"]),
        "hedged": rate([p["hedged"] for p in parts]),
    }


def summarise(run, sft_run, prompts, tok, cfg):
    """The report's entry for one model, and its per-prompt texts, scores and outcomes against
    SFT."""
    texts = [decode_response(tok, r) for r in run["responses"]]
    sft_texts = [decode_response(tok, r) for r in sft_run["responses"]]
    if cfg.judge == "gold":
        parts = [assess(p, t) for p, t in zip(prompts, texts)]
        outcomes = [judge_pair(p, a, b) for p, a, b in zip(prompts, texts, sft_texts)]
    else:  # the RM as judge: identical texts tie, otherwise the higher RM score wins
        parts = None
        outcomes = [0.5 if a == b or ra == rb else float(ra > rb)
                    for a, b, ra, rb in zip(texts, sft_texts, run["rm"], sft_run["rm"])]
    rate, ci = mean_ci(outcomes)
    n = len(prompts)
    ended = [r[-1:] == [tok.eot_token] for r in run["responses"]]
    lengths = [len(r) - e for r, e in zip(run["responses"], ended)]  # before the end-of-text
    entry = {"win_rate_vs_sft": rate, "win_rate_ci": ci, "gold_score": None, "gold_score_ci": None,
             "accuracy": None, "accuracy_ci": None, "rm_score": sum(run["rm"]) / n,
             "kl_vs_sft": sum(run["kl"]) / n, "pretrain_loss": None,
             "mean_length": sum(lengths) / n, "ended": sum(ended) / n,
             "distinct": len(set(texts)) / n, "family_accuracy": {}}
    if parts is not None:
        tasks = [parse_prompt(p) for p in prompts]
        sft_parts = [assess(p, t) for p, t in zip(prompts, sft_texts)]
        gold, sft_gold = [p["score"] for p in parts], [p["score"] for p in sft_parts]
        right = [float(p["content"] == 1.0) for p in parts]
        sft_right = [float(p["content"] == 1.0) for p in sft_parts]
        entry["gold_score"], entry["gold_score_ci"] = mean_ci(gold)
        entry["accuracy"], entry["accuracy_ci"] = mean_ci(right)
        entry["paired_vs_sft"] = {"accuracy": paired_ci(right, sft_right),
                                  "gold_score": paired_ci(gold, sft_gold)}
        if "greedy" in run:
            greedy_texts = [decode_response(tok, r) for r in run["greedy"]]
            entry["greedy_accuracy"], entry["greedy_accuracy_ci"] = mean_ci(
                [float(assess(p, t)["content"] == 1.0) for p, t in zip(prompts, greedy_texts)])
        entry["exact"] = sum(p["exact"] for p in parts) / n
        entry["family_accuracy"] = by_family(prompts, [p["content"] == 1.0 for p in parts])
        entry["honesty"] = honesty(tasks, parts)
    rows = [{"response": t, "gold_score": p["score"] if parts else None, "rm_score": r, "kl": k,
             "vs_sft": o}
            for t, p, r, k, o in zip(texts, parts or [None] * n, run["rm"], run["kl"], outcomes)]
    return entry, rows


def load_inputs(cfg, device):
    """The SFT model, the RM and their tokenizer (these stay loaded; the other models are loaded in
    turn), the prompts, their queries and the held-out pretraining windows (None without them)."""
    sft, tokenizer, sft_ckpt = load_policy(cfg.sft, device)
    rm_ckpt = load_checkpoint(cfg.rm, kind="scalar")
    check_max_new_tokens(sft_ckpt, cfg.max_new_tokens, cfg.sft)
    rm = model_from_checkpoint(rm_ckpt).to(device).eval()
    if rm_ckpt["tokenizer"] != tokenizer:
        raise ValueError(f"--rm uses tokenizer {rm_ckpt['tokenizer']!r} but --sft uses "
                         f"{tokenizer!r}")
    tok = get_tokenizer(tokenizer)
    prompts = load_prompts(cfg.prompts)
    prompts = prompts[:cfg.max_prompts] if cfg.max_prompts else prompts
    max_query = sft.config.block_size - cfg.max_new_tokens
    if max_query < 1:
        raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for the prompt in "
                         f"block_size {sft.config.block_size}")
    queries = encode_queries(tok, prompts, max_query, source=cfg.prompts)
    if cfg.judge == "gold" and (bad := next((p for p in prompts if parse_prompt(p) is None), None)):
        raise ValueError(f"--prompts {cfg.prompts}: {bad[:60]!r} is not a prompt of the built-in "
                         "world; the gold judge knows only those (use --judge rm)")
    windows = None
    if cfg.pretrain_val:
        block_size = sft.config.block_size
        windows = pretrain_windows(tok, cfg.pretrain_val, block_size, cfg.pretrain_windows)
    return sft, rm, tok, prompts, queries, windows


def run_models(cfg, sft, rm, tok, prompts, queries, windows, device):
    """The responses, RM scores and KLs of every model (SFT first: it is every comparison's
    baseline), and each model's pretraining loss (the alignment tax)."""
    runs, tax = {}, {}
    runs["sft"] = run_policy("sft", sft, queries, queries, sft, rm, tok, cfg)
    tax["sft"] = tax["sft_greedy"] = tax["best_of_n"] = pretrain_loss(sft, windows, cfg.batch_size)
    runs["sft_greedy"] = run_policy("sft_greedy", sft, queries, queries, sft, rm, tok, cfg,
                                    temperature=0.0)
    if cfg.judge == "gold" and cfg.val_prompts:  # the trivial policies, chosen on the val prompts
        constant, per_family = best_constants(load_prompts(cfg.val_prompts))
        runs["constant"] = run_fixed([constant] * len(prompts), prompts, queries, sft, rm, tok, cfg)
        family_texts = [per_family.get(parse_prompt(p).family, constant) for p in prompts]
        runs["family_constant"] = run_fixed(family_texts, prompts, queries, sft, rm, tok, cfg)
    if cfg.base:
        base = load_like(cfg.base, sft, tok.name, device)
        runs["base"] = run_policy("base", base, queries, queries, sft, rm, tok, cfg)
        tax["base"] = tax["base_prompted"] = pretrain_loss(base, windows, cfg.batch_size)
        if cfg.few_shot_data:
            max_query = sft.config.block_size - cfg.max_new_tokens
            contexts = few_shot_contexts(tok, load_sft(cfg.few_shot_data), queries, cfg.few_shot_k,
                                         cfg.seed, max_query)
            runs["base_prompted"] = run_policy("base_prompted", base, contexts, queries, sft, rm,
                                               tok, cfg)
        del base
    runs["sft"]["greedy"] = runs["sft_greedy"]["responses"]
    for name in (n for n in POLICIES if getattr(cfg, n)):
        model = load_like(getattr(cfg, name), sft, tok.name, device)
        runs[name] = run_policy(name, model, queries, queries, sft, rm, tok, cfg)
        runs[name]["greedy"] = sample_responses(model, queries, tok, cfg.max_new_tokens, 0.0,
                                                cfg.batch_size, make_generator(device, cfg.seed),
                                                desc=f"{name} greedy")
        tax[name] = pretrain_loss(model, windows, cfg.batch_size)
        del model
    if cfg.best_of:
        runs["best_of_n"] = run_best_of_n(sft, rm, queries, tok, cfg)  # the SFT model's weights
    return runs, tax


def build_report(cfg, runs, tax, rm, tok, prompts):
    """report.json's content, and each prompt's responses with their scores (samples.jsonl)."""
    paths = {name: getattr(cfg, name, None) for name in ("base", "sft", "rm", *POLICIES)}
    report = {"models": {}, "seconds": {}, "n_prompts": len(prompts), "config": asdict(cfg),
              "checkpoints": checkpoint_ids(paths)}
    per_prompt = [{"prompt": p, "responses": {}} for p in prompts]
    for name in (n for n in MODELS if n in runs):
        entry, rows = summarise(runs[name], runs["sft"], prompts, tok, cfg)
        entry["pretrain_loss"] = tax.get(name)  # None for the constant policies: no weights
        # best_of_n's cost is at sampling time
        entry["train_seconds"] = (runs[name]["seconds"] if name == "best_of_n"
                                  else train_seconds(getattr(cfg, name, None)))
        report["models"][name] = entry
        report["seconds"][name] = round(runs[name]["seconds"], 3)
        for record, row in zip(per_prompt, rows):
            record["responses"][name] = row
    if cfg.judge == "gold":
        golds = [encode_chat(tok, p, gold_answer(parse_prompt(p)))[1] for p in prompts]
        report["gold_reference"] = {"mean_length": sum(len(g) - 1 for g in golds) / len(golds),
                                    "distinct": len({tuple(g) for g in golds}) / len(golds)}
        report["rm_checks"] = rm_checks(rm, prompts, tok, cfg)
    return report, per_prompt


def main():
    cfg = parse_config(EvalConfig)
    device = autodetect_device() if cfg.device == "auto" else cfg.device
    out_dir = Path(cfg.out_dir)
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not existing.is_dir():  # found now, not when the report is written after all the sampling
        raise ValueError(f"--out-dir {out_dir}: {existing} is a file, not a directory; choose "
                         "another --out-dir")
    t_start = time.time()
    sft, rm, tok, prompts, queries, windows = load_inputs(cfg, device)
    runs, tax = run_models(cfg, sft, rm, tok, prompts, queries, windows, device)
    report, per_prompt = build_report(cfg, runs, tax, rm, tok, prompts)
    report["total_seconds"] = round(time.time() - t_start, 3)
    write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    evaluated = "; ".join(f"{name} `{c['path']}` (sha256 {c['sha256'][:12]})"
                          for name, c in report["checkpoints"].items())
    title = f"# Evaluation on {len(prompts)} held-out prompts ({cfg.prompts})"
    write_text(out_dir / "report.md", f"{title}\n\n{table}\nCheckpoints: {evaluated}\n")
    write_jsonl(out_dir / "samples.jsonl", per_prompt)
    chart = plot_win_rates(report, out_dir)
    print(f"wrote {out_dir / 'report.json'}, report.md, samples.jsonl and {chart.name} "
          f"in {report['total_seconds']:.1f}s\n")
    print(table)


if __name__ == "__main__":
    cli(main)
