"""Training curves of every stage: a text summary always, and a figure when matplotlib is installed.

    python -m tools.plot runs/                             # every metrics.jsonl under runs/, recursively
    python -m tools.plot runs/ppo runs/ppo_ptx/metrics.jsonl

Next to each metrics.jsonl it writes curves.txt (for each metric its first, lowest, highest and last value
and a sparkline of its shape over the steps) and, with matplotlib (optional: `pip install matplotlib`),
curves.png, a grid of small panels with the step on x. The stage is recognised from the keys it logged:
a language model (sft.py: pretraining or SFT), the reward model (reward.py) or PPO (ppo.py). It reads the
log of a stage that is still running, or that crashed: a torn last line is skipped with a warning. Runs
on the CPU in seconds.

What to look for in PPO: `score` is the reward model's score, a proxy for the true preference. A score
that keeps rising while `kl` grows fast or `response_length` falls is the policy finding what the RM
over-rewards, not better answers ("reward goes up, quality goes down"): read the samples before believing
it (Gao, Schulman & Hilton 2022 measure this over-optimisation; InstructGPT's KL penalty limits it).
"""
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from data.formats import write_bytes, write_text
from lib.config import cli, parse_config

SPARKS = "▁▂▃▄▅▆▇█"

# Each stage kind: keys that identify it (checked in this order: the RM also logs val_loss), what to look
# for, and its panels as (title, keys drawn on the same axes). Metrics in no panel still get a line in
# curves.txt; a panel none of whose keys were logged (ptx_loss without --ptx-data) is left out. An LM's loss
# falls 10x or more, and on a linear axis the end of training, where train and val part, is a flat line:
# "log scale" in a title puts its y axis on one.
KINDS = [
    ("PPO (ppo.py)", {"pg_loss", "vf_loss", "non_score_reward"},
     "score is the RM's, a proxy: if it rises while kl grows fast or response_length falls, read the samples",
     [("score (RM)", ["score"]), ("kl vs SFT", ["kl", "exact_kl"]), ("entropy", ["entropy"]),
      ("response_length", ["response_length"]), ("clipfrac", ["clipfrac"]), ("ptx_loss", ["ptx_loss"]),
      ("vf_loss", ["vf_loss"]), ("explained_variance", ["explained_variance"])]),
    ("reward model (reward.py)", {"accuracy", "val_accuracy"},
     "accuracy: the share of ranked pairs ordered like the labelers (0.5 = chance); val_ on held-out rankings",
     [("loss", ["loss", "val_loss"]), ("accuracy", ["accuracy", "val_accuracy"]), ("lr", ["lr"])]),
    ("language model (sft.py: pretraining or SFT)", {"tokens_per_s", "val_loss", "val_text_loss"},
     "loss falls; val_loss rising while loss falls is overfitting (SFT: val_loss on held-out demonstrations)",
     [("loss (log scale)", ["loss", "val_loss", "val_text_loss"]), ("lr", ["lr"]), ("tokens/s", ["tokens_per_s"])]),
]
NOT_METRICS = {"step", "time"}


def find_metrics(paths):
    """Every metrics.jsonl the paths name: a file as given, a directory searched recursively."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(path.rglob("metrics.jsonl"))
            if not files:
                raise FileNotFoundError(f"{path}: no metrics.jsonl in it or below; give a run directory "
                                        "(a stage's --out-dir, such as runs/sft) or runs/ for all")
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
        found += [f for f in files if f not in found]
    return found


def read_metrics(path):
    """The records of a metrics.jsonl: JSON objects with a numeric step. Other lines (a line torn by a crash
    or read while being written) are skipped, and named in one warning."""
    records, bad = [], []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
        else:
            bad.append(n)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        print(f"warning: {path}: skipped line{'s' * (len(bad) > 1)} {shown}: not a JSON record with a step "
              "(torn by a crash?)", file=sys.stderr)
    return records


def curves(records):
    """{metric: [(step, value), ...]} in step order, for every key with a finite number in some record (lists
    and dicts such as val_accuracy_by_k are left out), and {metric: count of NaN/inf values} left out."""
    series, non_finite = {}, {}
    for r in sorted(records, key=lambda r: r["step"]):  # stable: a repeated step keeps the file's order
        for key, v in r.items():
            if key in NOT_METRICS or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(v):
                series.setdefault(key, []).append((r["step"], v))
            else:
                non_finite[key] = non_finite.get(key, 0) + 1
    return series, non_finite


def stage_kind(keys):
    """(name, hint, panels) of the first kind whose identifying keys were logged; else one panel per metric."""
    for name, marks, hint, panels in KINDS:
        if marks & keys:
            return name, hint, [(title, [k for k in ks if k in keys]) for title, ks in panels if set(ks) & keys]
    return "unknown stage", None, [(k, [k]) for k in sorted(keys)[:12]]


def sparkline(points, lo, hi, width=40):
    """The shape of a series in `width` characters. Steps lo..hi (shared by every metric of the run, so the
    columns line up) fall into equal bins, each the mean of its values; bins between two with values are
    interpolated (a val_loss every 100 steps still shows a slope), bins outside them left blank. The lowest
    bin is ▁ and the highest █."""
    sums, counts = [0.0] * width, [0] * width
    for step, v in points:
        b = min(width - 1, int((step - lo) / (hi - lo) * width)) if hi > lo else 0
        sums[b] += v
        counts[b] += 1
    means = {b: s / c for b, (s, c) in enumerate(zip(sums, counts)) if c}
    filled = sorted(means)
    bins = [None] * width
    for a, b in zip(filled, filled[1:]):
        for i in range(a, b):
            bins[i] = means[a] + (means[b] - means[a]) * (i - a) / (b - a)
    bins[filled[-1]] = means[filled[-1]]
    low, high = min(means.values()), max(means.values())
    if high == low:
        return "".join(" " if v is None else SPARKS[3] for v in bins)  # flat: mid-height, neither low nor high
    return "".join(" " if v is None else SPARKS[round((v - low) / (high - low) * (len(SPARKS) - 1))] for v in bins)


def summary(path, kind, hint, records, series, non_finite):
    """curves.txt: a header naming the stage and the file, then a line per metric: how many values it has
    (a sparse one, such as val_loss, is interpolated in the sparkline), first, min, max, last, its shape."""
    lo, hi = min(r["step"] for r in records), max(r["step"] for r in records)
    seconds = max((r["time"] for r in records if isinstance(r.get("time"), (int, float))), default=None)
    lines = [f"{kind}: {path}",
             f"{len(records)} records, steps {lo:g} to {hi:g}" + (f", {seconds:.0f} s" if seconds else "")]
    lines += [f"look for: {hint}"] if hint else []
    width = max(len(k) for k in [*series, *non_finite])
    lines += ["", f"{'metric':<{width}} {'n':>5} {'first':>10} {'min':>10} {'max':>10} {'last':>10}  shape over "
              f"steps {lo:g}..{hi:g}"]
    for key, points in series.items():
        values = [v for _, v in points]
        note = f"  ({non_finite[key]} NaN/inf left out)" if key in non_finite else ""
        lines.append(f"{key:<{width}} {len(values):>5} {values[0]:>10.4g} {min(values):>10.4g} {max(values):>10.4g} "
                     f"{values[-1]:>10.4g}  {sparkline(points, lo, hi)}{note}")
    lines += [f"{key:<{width}} {0:>5}  only NaN/inf ({n} values): diverged?" for key, n in non_finite.items()
              if key not in series]
    return "\n".join(lines) + "\n"


def draw(path, kind, panels, series):
    """curves.png: one small panel per (title, keys), step on x; None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.5 * nrows + 0.5), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            steps, values = zip(*series[key])
            ax.plot(steps, values, label=key, marker="." if len(steps) < 30 else None)  # sparse evals: dots
        ax.set_title(title, fontsize=10)
        if "log scale" in title and all(v > 0 for k in keys for _, v in series[k]):
            ax.set_yscale("log")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=8)
    fig.suptitle(f"{path.parent}: {kind}", fontsize=11)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    out = path.parent / "curves.png"
    write_bytes(out, png.getvalue())  # rendered in memory first: a failure leaves no half-written file
    return out


def plot_run(metrics_path):
    """Write curves.txt, and curves.png when matplotlib is installed, next to a metrics.jsonl; returns the
    files written (none, with a warning, when the log holds no numbers yet)."""
    path = Path(metrics_path)
    records = read_metrics(path)
    series, non_finite = curves(records)
    if not series:
        print(f"warning: {path}: no metrics logged yet, nothing written", file=sys.stderr)
        return []
    kind, hint, panels = stage_kind(set(series))
    first = [k for _, keys in panels for k in keys]
    series = {k: series[k] for k in first + [k for k in series if k not in first]}
    written = [path.parent / "curves.txt"]
    write_text(written[0], summary(path, kind, hint, records, series, non_finite))
    png = draw(path, kind, panels, series)
    return written + [png] if png else written


# --- evaluate.py's chart of its report ---------------------------------------------------------------------
def with_ci(value, ci):
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def text_chart(report, width=40):
    """Win rates as bars of '#', with '|' at 0.5 and the CI in brackets; accuracies likewise."""
    lines = [f"win rate vs SFT (judge: {report['config']['judge']}), '|' marks 0.5"]
    pad = max(len(n) for n in report["models"])
    for name, m in report["models"].items():
        bar = list("#" * round(m["win_rate_vs_sft"] * width) + " " * width)[:width]
        bar[width // 2] = "|"
        lines.append(f"{name:<{pad}} {''.join(bar)} {with_ci(m['win_rate_vs_sft'], m['win_rate_ci'])}")
    if any(m["accuracy"] is not None for m in report["models"].values()):
        lines.append("accuracy")
        for name, m in report["models"].items():
            if m["accuracy"] is not None:
                lines.append(f"{name:<{pad}} {'#' * round(m['accuracy'] * width):<{width}} "
                             f"{with_ci(m['accuracy'], m['accuracy_ci'])}")
    return "\n".join(lines) + "\n"


def plot_win_rates(report, out_dir):
    """Figure 1's analogue: win rate against SFT per model, 95% CI bars, 0.5 dashed; next to it the
    accuracy of each model and baseline (with the gold judge). Returns the file."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        chart = text_chart(report)
        print(chart)
        write_text(out_dir / "winrate.txt", chart)
        return out_dir / "winrate.txt"
    models = report["models"]
    panels = [("win_rate_vs_sft", "win_rate_ci", "win rate against SFT")]
    if any(m["accuracy"] is not None for m in models.values()):
        panels.append(("accuracy", "accuracy_ci", "accuracy (gold content)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (0.9 * len(models) + 2), 4), squeeze=False)
    for ax, (key, ci, label) in zip(axes[0], panels):
        names = [n for n in models if models[n][key] is not None]
        values = [models[n][key] for n in names]
        err = [[v - models[n][ci][0] for n, v in zip(names, values)],
               [models[n][ci][1] - v for n, v in zip(names, values)]]  # (2, n_models)
        ax.errorbar(range(len(names)), values, yerr=err, fmt="o", capsize=4)
        if key == "win_rate_vs_sft":
            ax.axhline(0.5, linestyle="--", color="gray")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_ylim(0, 1)
        ax.set_ylabel(label)
    fig.suptitle(f"{report['n_prompts']} held-out prompts, judge: {report['config']['judge']}, 95% CI")
    fig.tight_layout()
    fig.savefig(out_dir / "winrate.png", dpi=120)
    plt.close(fig)
    return out_dir / "winrate.png"


@dataclass
class PlotConfig:
    path: list[str]  # run directories (searched recursively for metrics.jsonl) or metrics.jsonl files


def main(argv=None):
    args = parse_config(PlotConfig, argv)
    written = []
    for path in find_metrics(args.path):
        for out in plot_run(path):
            print(f"wrote {out}")
            written.append(out)
    if written and not any(out.suffix == ".png" for out in written):
        print("note: matplotlib is not installed: text summaries only (pip install matplotlib for curves.png)",
              file=sys.stderr)


if __name__ == "__main__":
    cli(main)
