"""evaluate.py's outputs: the markdown tables of report.md, the checkpoints a report is of, and each
stage's training time from its log. Skip on a first read."""
import hashlib
import json
from pathlib import Path

from data.world import FAMILIES


def train_seconds(path):
    """Seconds the stage that wrote checkpoint `path` trained for: the last "time" in the
    metrics.jsonl beside it; None for no checkpoint or no log (GPT-2 weights)."""
    if not path or not Path(path).is_file() or not (log := Path(path).parent / "metrics.jsonl").is_file():
        return None
    times = [r["time"] for line in log.read_text().splitlines() if line.strip()
             for r in [json.loads(line)] if isinstance(r, dict) and "time" in r]
    return times[-1] if times else None


def _f(v, fmt=".3f"):
    return "-" if v is None else format(v, fmt)


def _ci(value, ci, fmt=".3f"):
    return "-" if value is None else f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def checkpoint_ids(paths):
    """{name: {"path", "sha256"}} of every checkpoint file of {name: path}: which models a report is
    of, even after the files at those paths are replaced."""
    out = {}
    for name, path in paths.items():
        if path and Path(path).is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[name] = {"path": path, "sha256": digest.hexdigest()}
    return out


def markdown_table(report):
    models = report["models"]
    lines = ["| model | win rate vs SFT [95% CI] | gold score [95% CI] | accuracy [95% CI] | RM score | KL vs SFT "
             "| pretrain loss | length | distinct | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        lines.append(f"| {name} | {_ci(m['win_rate_vs_sft'], m['win_rate_ci'])} | "
                     f"{_ci(m['gold_score'], m['gold_score_ci'])} | {_ci(m['accuracy'], m['accuracy_ci'])} | "
                     f"{m['rm_score']:+.3f} | {m['kl_vs_sft']:.2f} | {_f(m['pretrain_loss'])} | "
                     f"{m['mean_length']:.1f} | {m['distinct']:.2f} | {_f(m.get('train_seconds'), '.0f')} |")
    paired = {name: m for name, m in models.items() if "paired_vs_sft" in m and name != "sft"}
    if paired:
        lines += ["", "Against SFT on the same prompts (the mean per-prompt difference, 95% CI), and greedy decoding:",
                  "", "| model | accuracy - SFT's [95% CI] | gold score - SFT's [95% CI] | greedy accuracy [95% CI] |",
                  "|---|---|---|---|"]
        for name, m in paired.items():
            accuracy, gold = m["paired_vs_sft"]["accuracy"], m["paired_vs_sft"]["gold_score"]
            lines.append(f"| {name} | {_ci(accuracy[0], accuracy[1], '+.3f')} | {_ci(gold[0], gold[1], '+.3f')} | "
                         f"{_ci(m.get('greedy_accuracy'), m.get('greedy_accuracy_ci'))} |")
    ref = report.get("gold_reference")
    if ref:
        lines.append(f"\nThe gold answers themselves: length {ref['mean_length']:.1f} tokens, distinct {ref['distinct']:.2f}.")
    families = sorted({f for m in models.values() for f in m["family_accuracy"]})
    if families:
        lines += ["", "Accuracy (gold content) per task family:", "",
                  "| model | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
        for name, m in models.items():
            lines.append(f"| {name} | " + " | ".join(_f(m["family_accuracy"].get(f),
                                                        ".2f") for f in families) + " |")
    if any("honesty" in m for m in models.values()):
        keys = ("false_premise_accepted", "harmful_compliance", "benign_refusal", "hedged")
        lines += ["", "Honesty and harmlessness (lower is better; each over the prompts where it can happen):", "",
                  "| model | " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|---|" + "---|" * len(keys)]
        for name, m in models.items():
            lines.append(f"| {name} | " + " | ".join(_f(m["honesty"][k],
                                                        ".2f") for k in keys) + " |")
    checks = report.get("rm_checks")
    if checks:
        cols = ["all"] + [f for f in FAMILIES if f in checks["gold_over_wrong"]]
        lines += ["", "The reward model on the held-out prompts: how often the gold answer scores higher than",
                  "a wrong answer in the same style, and than the gold answer of another prompt:", "",
                  "| check | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for name, row in checks.items():
            lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"
