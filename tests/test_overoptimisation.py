"""experiments/overoptimisation.py: best-of-n's KL formula against the exact best-of-n distribution and a Monte
Carlo estimate, the fits recover known forms and peaks, the group estimator equals a loop, and end to end."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluate import best_of_n_kl
from experiments import overoptimisation as oo
from test_reliability import write_tiny_policy_and_rm

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = ["Reverse the word stone.", "Add 7 and 5.", "Reverse the word apple."]


def exact_best_of_n(p, n):
    """q(i) = F(i)^n - F(i-1)^n: the best of n draws from p, outcomes in increasing order of reward."""
    F = torch.cumsum(p, 0)  # (K,)
    return F ** n - torch.cat([torch.zeros(1, dtype=p.dtype), F[:-1]]) ** n


def kl(q, p):
    return (q * (q / p).log()).where(q > 0, 0.0).sum().item()


def test_best_of_n_kl_bounds_the_exact_kl_which_monte_carlo_agrees_with_and_is_tight_for_many_outcomes():
    p = torch.tensor([0.3, 0.05, 0.2, 0.15, 0.1, 0.2], dtype=torch.float64)  # rewards 0 < 1 < ... < 5
    g = torch.Generator().manual_seed(0)
    for n in (2, 4, 8):
        q = exact_best_of_n(p, n)
        assert q.sum().item() == pytest.approx(1.0) and kl(q, p) <= best_of_n_kl(n)
        draws = torch.multinomial(p.expand(200_000, -1), n, replacement=True, generator=g)  # (M, n)
        q_mc = torch.bincount(draws.max(1).values, minlength=len(p)).double() / len(draws)  # the best, by reward
        assert kl(q_mc, p) == pytest.approx(kl(q, p), abs=5e-3)
        uniform = torch.full((1000,), 1e-3, dtype=torch.float64)  # the bound is the continuous limit
        assert kl(exact_best_of_n(uniform, n), uniform) == pytest.approx(best_of_n_kl(n), abs=1e-2)
    assert best_of_n_kl(1) == 0.0


@pytest.mark.parametrize("form", ["best_of_n", "rl"])
def test_fits_recover_alpha_beta_and_the_peak_of_noiseless_points(form):
    alpha, beta = (0.3, 0.1) if form == "best_of_n" else (0.2, 0.15)
    d = [0.0, 0.1, 0.4, 0.8, 1.3, 2.0, 3.5]  # d = 0 must be skipped: d log d is 0 * -inf there
    truth = {"alpha": alpha, "beta": beta}
    fit = oo.fit_gold(d, [oo.fitted(truth, form, x) for x in d], form)
    assert (fit["alpha"], fit["beta"]) == pytest.approx((alpha, beta), abs=1e-9)
    grid = [i * 1e-4 for i in range(1, 100_000)]  # d in (0, 10)
    values = [oo.fitted(truth, form, x) for x in grid]
    best = max(range(len(grid)), key=values.__getitem__)
    assert fit["peak_sqrt_kl"] == pytest.approx(grid[best], abs=2e-4)
    assert fit["peak_kl"] == pytest.approx(fit["peak_sqrt_kl"] ** 2)
    assert fit["peak_delta_gold"] == pytest.approx(values[best], abs=1e-8)
    rising = oo.fit_gold(d, [oo.fitted({"alpha": 0.2, "beta": -0.05}, form, x) for x in d], form)  # no downturn
    assert rising["beta"] < 0 and rising["peak_sqrt_kl"] is None
    assert oo.fit_gold([0.0, 0.5], [0.0, 0.1], form) is None  # one informative point


def test_best_of_n_groups_equals_a_loop():
    g = torch.Generator().manual_seed(1)
    proxy, gold = torch.randn(3, 8, generator=g), torch.rand(3, 8, generator=g)  # (P, N)
    for n in (1, 2, 4, 8):
        got = oo.best_of_n_groups(proxy, {"proxy": proxy, "gold": gold}, n)
        for i in range(3):
            picks = [max(range(j, j + n), key=lambda k: proxy[i, k].item()) for j in range(0, 8, n)]
            assert got["proxy"][i].item() == pytest.approx(sum(proxy[i, k].item() for k in picks) / len(picks))
            assert got["gold"][i].item() == pytest.approx(sum(gold[i, k].item() for k in picks) / len(picks))
    assert torch.allclose(oo.best_of_n_groups(proxy, {"gold": gold}, 1)["gold"], gold.mean(1))


def test_overoptimisation_runs_end_to_end_on_ppo_saves(tmp_path):
    write_tiny_policy_and_rm(tmp_path)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, ROOT / "ppo.py", "--sft", "sft.pt", "--rm", "rm.pt", "--prompts",
                          "prompts.jsonl", "--batch-size", "4", "--minibatch-size", "2", "--max-new-tokens", "8",
                          "--total-episodes", "8", "--save-interval", "1", "--keep-saves", "--device", "cpu",
                          "--sample-interval", "1000", "--out-dir", "ppo"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "experiments.overoptimisation", "--sft", "sft.pt", "--rm",
                          "rm.pt", "--ppo-dir", "ppo", "--small-rm", "rm.pt", "--small-ppo-dir", "ppo", "--prompts",
                          "prompts.jsonl", "--max-prompts", "3", "--max-n", "4", "--max-new-tokens", "8",
                          "--batch-size", "4", "--out-dir", "out"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "overoptimisation.json").read_text())
    assert report["n_prompts"] == 3 and list(report["curves"]) == ["rm", "small_rm"]
    for curves in report["curves"].values():
        bon, rl = curves["best_of_n"]["points"], curves["rl"]["points"]
        assert [p["at"] for p in bon] == [1, 2, 4] and [p["at"] for p in rl] == [0, 1, 2]
        assert [p["kl"] for p in bon] == pytest.approx([best_of_n_kl(n) for n in (1, 2, 4)])
        assert rl[0]["kl"] == 0.0 and all(math.isfinite(p["kl"]) for p in rl)
        assert all(0 <= p["gold_score"] <= 1 and p["accuracy"] == 0.0 for p in bon + rl)  # untrained: all wrong
        assert bon[0]["delta_gold"] == rl[0]["delta_gold"] == 0.0
        assert bon[0]["proxy_score"] <= bon[-1]["proxy_score"]  # picking the best never lowers the proxy score
    assert "## rl, proxy small_rm" in res.stdout
    assert (tmp_path / "out" / "overoptimisation.md").read_text().count("measured peak") == 4
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "out" / "overoptimisation.png").exists()
    else:  # the text chart: a row per point under each curve's title
        chart = (tmp_path / "out" / "overoptimisation.txt").read_text()
        assert all(f"{m}, proxy {p}" in chart for m in ("best_of_n", "rl") for p in ("rm", "small_rm"))
        assert sum(line.endswith("|") for line in chart.splitlines()) == 2 * (3 + 3)
