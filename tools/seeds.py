"""Mean and spread of several runs' evaluation reports: the table of `bash train.sh seeds`.

    python -m tools.seeds runs/seed0/eval/report.json runs/seed1/eval/report.json \\
        runs/seed2/eval/report.json
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

from evaluate import MODELS
from lib.config import cli, parse_config


@dataclass
class SeedsConfig:
    report: list[str]  # report.json of each run (runs/seed0/eval/report.json ...), two or more


def summarise_seeds(paths):
    """Mean and spread over runs with different seeds: the table of `bash train.sh seeds`."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    keys = ("win_rate_vs_sft", "gold_score", "accuracy", "kl_vs_sft")
    seeds = ", ".join(str(r["config"]["seed"]) for r in reports)
    header = "| model | " + " | ".join(k.replace("_", " ") for k in keys) + " |"
    title = f"Over {len(reports)} seeds ({seeds}): mean +- standard deviation [min, max]"
    lines = [title, "", header, "|---|" + "---|" * len(keys)]
    for name in MODELS:
        runs = [r["models"][name] for r in reports if name in r["models"]]
        if len(runs) < len(reports):
            continue
        cells = []
        for k in keys:
            v = [m[k] for m in runs]
            if any(x is None for x in v):
                cells.append("-")
                continue
            mean = sum(v) / len(v)
            std = math.sqrt(sum((x - mean) ** 2 for x in v) / max(1, len(v) - 1))
            cells.append(f"{mean:.3f} +- {std:.3f} [{min(v):.3f}, {max(v):.3f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    reports = parse_config(SeedsConfig).report
    if len(reports) < 2:
        raise ValueError("tools/seeds.py needs two or more report.json files "
                         "(runs/seed0/eval/report.json ...)")
    print(summarise_seeds(reports), end="")


if __name__ == "__main__":
    cli(main)
