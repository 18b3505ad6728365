"""Reward model overoptimisation (Gao, Schulman & Hilton 2022): gold and proxy scores against the KL from SFT.

Best-of-n and PPO against one or two proxy RMs, with the paper's functional forms fitted to the gold scores.

    python -m experiments.overoptimisation --sft runs/sft/ckpt.pt --rm runs/rm/ckpt.pt \\
        --ppo-dir runs/overopt/ppo --small-rm runs/overopt/rm_small/ckpt.pt \\
        --small-ppo-dir runs/overopt/ppo_small --prompts runs/world/test_prompts.jsonl --out-dir runs/overopt  # CPU
    python -m experiments.overoptimisation ... --device cuda --batch-size 512                           # one GPU

It only evaluates: the PPO dirs are runs of ppo.py with --keep-saves (ckpt_<iteration>.pt along training).
Per proxy RM, two curves, each point measured on the first --max-prompts held-out prompts:

    rl          the SFT model (iteration 0) and every ckpt_<iteration>.pt of its PPO run, one sample per prompt
                (the same sampler seed for every checkpoint); kl = mean over prompts of sum_t log pi(y_t) -
                log pi_SFT(y_t) on the policy's own samples (the k1 estimate, as evaluate.py)
    best_of_n   for n = 1, 2, 4, ..., --max-n: --max-n SFT samples per prompt (drawn once, shared by the
                proxies) split into max_n / n disjoint groups of n, the proxy's best of each group kept;
                kl = log n - (n - 1) / n, the analytic value (an upper bound on the true KL)
    proxy score the proxy RM's score by ppo.py's rule (--unended-score for a response that never ended)
    gold score  the world's gold judge (data/judge.py), 0..1, which no training stage sees; accuracy: the
                share of responses with the gold content; [95% CI] over prompts, as evaluate.py's

Fits, with d = sqrt(KL) and R measured from the curve's origin (n = 1; the SFT model), by least squares over
the points with d > 0: best-of-n R_gold(d) = d (alpha - beta d), peak at d* = alpha / (2 beta); RL R_gold(d) =
d (alpha - beta log d), peak at d* = exp(alpha / beta - 1) where R' = alpha - beta (log d + 1) = 0. A beta <= 0
has no peak: the gold score has not turned down within the points. The measured peak is the point with the
highest gold score. Writes overoptimisation.json, overoptimisation.md and overoptimisation.png (without
matplotlib, overoptimisation.txt, a text chart) to --out-dir.

It imports evaluate.py for its KL estimate, best-of-n KL, RM scoring rule and
checkpoint checks, so that these numbers are the very quantities of evaluate.py's report. Deviations from Gao et al.:
models of a few million parameters and RMs trained on a few thousand rankings, not 3M-3B; the gold RM is the
world's judge, not a 6B RM; one seed and a couple of hundred prompts, so a curve's bumps are noise of about
the gold score's CI; best-of-n by disjoint groups (each sample used once), not the unbiased estimator over
all subsets of the samples; PPO has its KL penalty (train.sh's low kl_coef), and its KL is estimated from
samples (it can come out slightly negative near 0: d is then taken as 0 and the point left out of the fit).

Cost on the 2-core CPU (one thread, shared with other jobs), 200 prompts, two proxies with 5 checkpoints each:
6 minutes, 4 of them CPU time (best-of-32 sampling 165 s, RM scoring 55 s, the RL curves 137 s); --max-n 64:
7 minutes, 5.6 of CPU time (sampling 207 s, scoring 90 s).
"""
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data.formats import load_prompts, write_text
from data.judge import assess
from data.tokenizer import get_tokenizer
from data.world import parse_prompt
from evaluate import best_of_n_kl, load_like, mean_ci, response_logprobs, scores_by_the_rule
from lib.common import check_max_new_tokens, load_checkpoint, model_from_checkpoint
from lib.config import cli, parse_config
from lib.sampling import (UNENDED_SCORE, decode_response, encode_queries, load_policy,
                          make_generator, sample_responses)

FORMS = {"best_of_n": "d (alpha - beta d)", "rl": "d (alpha - beta log d)"}  # R_gold(d), Gao et al. eq. 1-2


@dataclass
class OveroptConfig:
    sft: str = "runs/sft/ckpt.pt"  # the SFT checkpoint: the initial policy (KL 0) and best-of-n's sampler
    rm: str = "runs/rm/ckpt.pt"  # the proxy RM that --ppo-dir's PPO run maximised
    ppo_dir: str = "runs/overopt/ppo"  # a ppo.py --keep-saves run against --rm: its ckpt_<iteration>.pt
    small_rm: str | None = None  # optional second proxy RM (trained on fewer rankings); needs --small-ppo-dir
    small_ppo_dir: str | None = None  # a ppo.py --keep-saves run against --small-rm
    prompts: str = "runs/world/test_prompts.jsonl"  # held-out prompts of the built-in world
    max_prompts: int = 200  # use the first N prompts; 0 = all
    max_n: int = 32  # the largest n of best-of-n, a power of 2: max_n SFT samples per prompt
    temperature: float = 1.0  # sampling temperature of every policy (the KL is computed at it too)
    max_new_tokens: int = 128  # longest response, in tokens (as ppo.py)
    batch_size: int = 64  # sequences per generation / scoring batch
    seed: int = 0  # seed of the sampler: the same for every checkpoint
    device: str = "cpu"  # cpu, cuda, cuda:1, mps
    unended_score: float = UNENDED_SCORE  # the proxy score of a response without end-of-text (as ppo.py's)
    out_dir: str = "runs/overopt"  # where overoptimisation.json, .md and .png (or .txt) go

    def __post_init__(self):
        if self.max_n < 1 or self.max_n & (self.max_n - 1):
            raise ValueError(f"--max-n must be a power of 2 (1, 2, 4, ...), got {self.max_n}")
        if (self.small_rm is None) != (self.small_ppo_dir is None):
            raise ValueError("--small-rm and --small-ppo-dir go together: give both or neither")
        if self.temperature <= 0 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("--temperature must be > 0, --max-new-tokens and --batch-size >= 1")


# --- best-of-n and the fits ----------------------------------------------------------------------------------------
def best_of_n_groups(proxy, values, n):
    """Best-of-n by disjoint groups: each prompt's N samples (columns of proxy, (P, N)) split in order into
    N / n groups of n, the highest proxy score of each group picked (the first on ties). Returns each of
    `values` ({name: (P, N)}) at the picks, averaged per prompt over the groups: {name: (P,)}."""
    P, N = proxy.shape
    best = proxy.view(P, N // n, n).argmax(-1, keepdim=True)  # (P, N / n, 1)
    return {k: v.view(P, N // n, n).gather(-1, best).squeeze(-1).mean(1) for k, v in values.items()}  # (P,)


def fit_gold(d, delta_gold, form):
    """Least-squares alpha, beta of R(d) = alpha d - beta d^2 (best_of_n) or alpha d - beta d log d (rl) over
    the points with d > 0 (d = 0 says nothing: R(0) = 0 either way), and the fitted peak. None under 2 points."""
    pts = [(x, y) for x, y in zip(d, delta_gold) if x > 0]
    if len(pts) < 2:
        return None
    x, y = torch.tensor(pts, dtype=torch.float64).T  # (m,), (m,)
    # both forms are linear in (alpha, beta): R = [d, -g(d)] @ [alpha, beta], g = d^2 or d log d (< 0 for d < 1)
    X = torch.stack([x, -(x * x if form == "best_of_n" else x * x.log())], 1)  # (m, 2)
    alpha, beta = torch.linalg.lstsq(X, y[:, None]).solution[:, 0].tolist()
    fit = {"form": FORMS[form], "alpha": alpha, "beta": beta, "peak_sqrt_kl": None, "peak_kl": None,
           "peak_delta_gold": None}
    # R'(d) = alpha - 2 beta d = 0, or alpha - beta (log d + 1) = 0; a maximum only when beta > 0 (R'' < 0)
    peak = (alpha / (2 * beta) if form == "best_of_n" else math.exp(alpha / beta - 1)) if beta > 0 else 0.0
    if peak > 0:
        fit.update(peak_sqrt_kl=peak, peak_kl=peak ** 2, peak_delta_gold=fitted(fit, form, peak))
    return fit


def fitted(fit, form, d):
    """The fitted R_gold at d >= 0 (d log d -> 0 as d -> 0)."""
    return d * (fit["alpha"] - fit["beta"] * (d if form == "best_of_n" else math.log(d))) if d > 0 else 0.0


def curve(points, form):
    """A curve's points with their changes from the first (the origin), the fit and the measured peak."""
    for p in points:
        p["delta_gold"] = p["gold_score"] - points[0]["gold_score"]
        p["delta_proxy"] = p["proxy_score"] - points[0]["proxy_score"]
    top = max(points, key=lambda p: p["gold_score"])
    return {"points": points, "fit": fit_gold([p["sqrt_kl"] for p in points], [p["delta_gold"] for p in points], form),
            "measured_peak": {"at": top["at"], "kl": top["kl"], "gold_score": top["gold_score"]}}


def point(at, kl, proxy, gold, right):
    """One point of a curve from per-prompt values (lists or (P,) tensors)."""
    proxy, gold, right = (torch.as_tensor(v, dtype=torch.float64).tolist() for v in (proxy, gold, right))
    mean, ci = mean_ci(gold)
    return {"at": at, "kl": kl, "sqrt_kl": math.sqrt(max(kl, 0.0)), "proxy_score": sum(proxy) / len(proxy),
            "gold_score": mean, "gold_score_ci": ci, "accuracy": sum(right) / len(right)}


# --- sampling and measuring ----------------------------------------------------------------------------------------
def judged(prompts, responses, tok):
    """Gold scores and accuracies (gold content) of one response per prompt."""
    parts = [assess(p, decode_response(tok, r)) for p, r in zip(prompts, responses)]
    return [a["score"] for a in parts], [float(a["content"] == 1.0) for a in parts]


def proxy_scores(rm, queries, responses, tok, cfg):
    """evaluate.py's scores_by_the_rule, each distinct (query, response) scored once (of 64 SFT samples of a
    prompt about 40% are distinct), in batches of about one length (rows are right-padded to the longest)."""
    pairs = sorted({(tuple(q), tuple(r)) for q, r in zip(queries, responses)}, key=lambda p: len(p[0]) + len(p[1]))
    score = dict(zip(pairs, scores_by_the_rule(rm, [list(q) for q, _ in pairs], [list(r) for _, r in pairs], tok, cfg)))
    return [score[tuple(q), tuple(r)] for q, r in zip(queries, responses)]


def sample_with_kl(model, sft, queries, tok, cfg, desc):
    """One response per query, from the generator every policy shares, and its KL to SFT on it."""
    responses = sample_responses(model, queries, tok, cfg.max_new_tokens, cfg.temperature, cfg.batch_size,
                                 make_generator(cfg.device, cfg.seed), desc=desc)
    if model is sft:
        return responses, 0.0
    logp = response_logprobs(model, queries, responses, cfg.temperature, cfg.batch_size)
    logp_sft = response_logprobs(sft, queries, responses, cfg.temperature, cfg.batch_size)
    # kl = sum_t log pi(y_t) - log pi_SFT(y_t), averaged over prompts
    return responses, sum(a - b for a, b in zip(logp, logp_sft)) / len(queries)


def policy_checkpoints(ppo_dir):
    """[(iteration, path)] of the ckpt_<iteration>.pt in ppo_dir, by iteration."""
    found = sorted((int(m[1]), str(p)) for p in Path(ppo_dir).glob("ckpt_*.pt")
                   if (m := re.fullmatch(r"ckpt_(\d+)\.pt", p.name)))
    if not found:
        raise FileNotFoundError(f"no ckpt_<iteration>.pt in {ppo_dir}: run ppo.py there with --keep-saves")
    return found


def load_rm(path, tokenizer, device):
    """A proxy RM that reads the SFT model's tokens."""
    ckpt = load_checkpoint(path, kind="scalar")
    if ckpt["tokenizer"] != tokenizer:
        raise ValueError(f"{path} uses tokenizer {ckpt['tokenizer']!r} but --sft uses {tokenizer!r}")
    return model_from_checkpoint(ckpt).to(device).eval()


# --- the outputs ---------------------------------------------------------------------------------------------------
def markdown(report):
    lines = [f"# Overoptimisation on {report['n_prompts']} held-out prompts, best-of-n up to "
             f"{report['config']['max_n']}\n"]
    for proxy, methods in report["curves"].items():
        for method, c in methods.items():
            at = "n" if method == "best_of_n" else "iteration"
            lines += [f"## {method}, proxy {proxy}\n", f"| {at} | KL | sqrt(KL) | proxy score | gold score [95% CI] "
                      "| accuracy |", "|---|---|---|---|---|---|"]
            for p in c["points"]:
                lo, hi = p["gold_score_ci"]
                lines.append(f"| {p['at']} | {p['kl']:.3f} | {p['sqrt_kl']:.3f} | {p['proxy_score']:+.3f} | "
                             f"{p['gold_score']:.3f} [{lo:.3f}, {hi:.3f}] | {p['accuracy']:.3f} |")
            f, top, origin = c["fit"], c["measured_peak"], c["points"][0]["at"]
            if f is None:
                lines.append("\nfit: fewer than 2 points with KL > 0")
            else:
                peak = ("no peak (beta <= 0: no downturn within the points)" if f["peak_sqrt_kl"] is None else
                        f"peak at d* {f['peak_sqrt_kl']:.3f} (KL {f['peak_kl']:.3f}), {f['peak_delta_gold']:+.3f}")
                lines.append(f"\nfit: gold - gold({at} = {origin}) = {f['form']}, alpha {f['alpha']:+.4f}, "
                             f"beta {f['beta']:+.4f}; {peak}")
            lines.append(f"measured peak: {at} = {top['at']}, KL {top['kl']:.3f}, gold {top['gold_score']:.3f}\n")
    return "\n".join(lines)


def text_chart(report, width=50):
    """Per curve, a row per point: its values (fit: the fitted change in gold), then '*' at its change in gold
    and '+' in proxy score, on one scale for the whole chart, ':' at 0."""
    pts = [p for m in report["curves"].values() for c in m.values() for p in c["points"]]
    lo = min(0.0, *(min(p["delta_gold"], p["delta_proxy"]) for p in pts))
    hi = max(1e-9 + lo, *(max(p["delta_gold"], p["delta_proxy"]) for p in pts))

    def col(v):
        return round((v - lo) / (hi - lo) * (width - 1))
    lines = [f"change from the origin against sqrt(KL): '*' gold, '+' proxy, ':' 0; scale {lo:+.3f} .. {hi:+.3f}"]
    for proxy, methods in report["curves"].items():
        for method, c in methods.items():
            lines.append(f"\n{method}, proxy {proxy}\n  sqrtKL       KL   d gold      fit  d proxy")
            for p in c["points"]:
                fit = "-" if c["fit"] is None else f"{fitted(c['fit'], method, p['sqrt_kl']):+.3f}"
                row = [" "] * width
                row[col(0.0)] = ":"
                row[col(p["delta_proxy"])] = "+"
                row[col(p["delta_gold"])] = "*"
                lines.append(f"{p['sqrt_kl']:8.3f} {p['kl']:8.3f} {p['delta_gold']:+8.3f} {fit:>8} "
                             f"{p['delta_proxy']:+8.3f} |{''.join(row)}|")
    return "\n".join(lines) + "\n"


def plot(report, out_dir):
    """Change in gold (points, fitted curves as lines) and in proxy score against sqrt(KL). Returns the file."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        write_text(out_dir / "overoptimisation.txt", text_chart(report))
        return out_dir / "overoptimisation.txt"
    fig, (ax_gold, ax_proxy) = plt.subplots(1, 2, figsize=(11, 4.5))
    for color, (proxy, methods) in zip(("C0", "C1", "C2", "C3"), report["curves"].items()):
        for method, c in methods.items():
            marker, style = ("o", "--") if method == "best_of_n" else ("s", "-")
            d = [p["sqrt_kl"] for p in c["points"]]
            label = f"{method}, {proxy}"
            ax_gold.plot(d, [p["delta_gold"] for p in c["points"]], marker, color=color, label=label)
            if c["fit"] is not None:
                grid = [max(d) * i / 100 for i in range(101)]
                ax_gold.plot(grid, [fitted(c["fit"], method, x) for x in grid], style, color=color)
            ax_proxy.plot(d, [p["delta_proxy"] for p in c["points"]], marker + style, color=color, label=label)
    for ax, what in ((ax_gold, "gold score"), (ax_proxy, "proxy RM score")):
        ax.axhline(0, color="gray", linewidth=0.5)
        ax.set_xlabel("sqrt(KL from SFT), nats^0.5")
        ax.set_ylabel(f"{what} - its value at the origin")
        ax.legend(fontsize=8)
    fig.suptitle(f"overoptimisation, {report['n_prompts']} held-out prompts (lines: fits of Gao et al.)")
    fig.tight_layout()
    fig.savefig(out_dir / "overoptimisation.png", dpi=120)
    plt.close(fig)
    return out_dir / "overoptimisation.png"


def best_of_n_curves(sft, rms, prompts, queries, tok, cfg, seconds):
    """{proxy name: {"best_of_n": curve}}: N = --max-n SFT samples per prompt, scored once by every
    proxy RM and the gold judge, and for each n = 1, 2, 4, ... <= N the sample each proxy prefers
    among groups of n. Adds the sampling and scoring times to `seconds`."""
    t0, P, N = time.time(), len(prompts), cfg.max_n
    repeated = [q for q in queries for _ in range(N)]  # (P * N) contexts, each prompt N times in a row
    samples = sample_responses(sft, repeated, tok, cfg.max_new_tokens, cfg.temperature, cfg.batch_size,
                               make_generator(cfg.device, cfg.seed), desc=f"best-of-{N} samples")
    seconds["best_of_n_sampling"] = time.time() - t0
    judged_samples = judged([p for p in prompts for _ in range(N)], samples, tok)
    gold, right = (torch.tensor(v).view(P, N) for v in judged_samples)
    curves = {}
    for name, rm in rms.items():
        proxy = torch.tensor(proxy_scores(rm, repeated, samples, tok, cfg)).view(P, N)  # (P, N)
        picked = [best_of_n_groups(proxy, {"proxy": proxy, "gold": gold, "right": right}, 2 ** k)
                  for k in range(N.bit_length())]
        points = [point(2 ** k, best_of_n_kl(2 ** k), v["proxy"], v["gold"], v["right"])
                  for k, v in enumerate(picked)]
        curves[name] = {"best_of_n": curve(points, "best_of_n")}
    seconds["best_of_n_scoring"] = time.time() - t0 - seconds["best_of_n_sampling"]
    return curves


def main():
    # -- config and setup
    cfg = parse_config(OveroptConfig)
    out_dir, t_start, seconds = Path(cfg.out_dir), time.time(), {}

    # -- models: the SFT model and the proxy RMs; the PPO checkpoints are loaded in turn
    sft, tokenizer, sft_ckpt = load_policy(cfg.sft, cfg.device)
    check_max_new_tokens(sft_ckpt, cfg.max_new_tokens, cfg.sft)
    tok = get_tokenizer(tokenizer)
    pairs = {"rm": (cfg.rm, cfg.ppo_dir), **({"small_rm": (cfg.small_rm, cfg.small_ppo_dir)} if cfg.small_rm else {})}
    rms = {name: load_rm(rm, tokenizer, cfg.device) for name, (rm, _) in pairs.items()}
    ckpts = {name: policy_checkpoints(ppo_dir) for name, (_, ppo_dir) in pairs.items()}

    # -- data
    prompts = load_prompts(cfg.prompts)
    prompts = prompts[:cfg.max_prompts] if cfg.max_prompts else prompts
    if bad := next((p for p in prompts if parse_prompt(p) is None), None):
        raise ValueError(f"--prompts {cfg.prompts}: {bad[:60]!r} is not a prompt of the built-in world, "
                         "the only prompts the gold judge knows")
    queries = encode_queries(tok, prompts, sft.config.block_size - cfg.max_new_tokens, source=cfg.prompts)
    P = len(prompts)

    # -- best-of-n: N SFT samples per prompt, scored once by every proxy and the gold judge
    curves = best_of_n_curves(sft, rms, prompts, queries, tok, cfg, seconds)

    # -- RL: the SFT model (shared by the proxies) and each PPO checkpoint, one sample per prompt
    t0 = time.time()
    sft_responses, _ = sample_with_kl(sft, sft, queries, tok, cfg, desc="sft")
    sft_judged = judged(prompts, sft_responses, tok)
    for name, rm in rms.items():
        points = [point(0, 0.0, proxy_scores(rm, queries, sft_responses, tok, cfg), *sft_judged)]
        for it, path in ckpts[name]:
            policy = load_like(path, sft, tokenizer, cfg.device)
            responses, kl = sample_with_kl(policy, sft, queries, tok, cfg, desc=f"{name} {Path(path).name}")
            points.append(point(it, kl, proxy_scores(rm, queries, responses, tok, cfg),
                                *judged(prompts, responses, tok)))
        curves[name]["rl"] = curve(points, "rl")
    seconds["rl"] = time.time() - t0

    # -- report
    seconds["total"] = time.time() - t_start
    report = {"n_prompts": P, "curves": curves, "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "config": asdict(cfg)}
    write_text(out_dir / "overoptimisation.json", json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    write_text(out_dir / "overoptimisation.md", table)
    chart = plot(report, out_dir)
    print(f"wrote {out_dir / 'overoptimisation.json'}, overoptimisation.md and {chart.name} in {seconds['total']:.0f}s "
          f"(best-of-{cfg.max_n} sampling {seconds['best_of_n_sampling']:.0f}s, scoring {seconds['best_of_n_scoring']:.0f}s, "
          f"RL {seconds['rl']:.0f}s)\n")
    print(table)


if __name__ == "__main__":
    cli(main)
