"""Prepare Anthropic's HH-RLHF preference data (Bai et al. 2022) in the pipeline's formats.

    python -m data.hh_rlhf --out data/hh                                # download all four subsets
    python -m data.hh_rlhf --out data/hh --subsets helpful-base --max-examples 2000   # a quick run
    python -m data.hh_rlhf --out data/hh --source ~/hh-rlhf             # a local clone or one .jsonl(.gz)

Each HH line is {"chosen", "rejected"}: two full "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts that
share everything up to the last Assistant turn. Written to --out:

    rankings_{train,val,test}.jsonl   {"prompt", "chosen", "rejected"}    (K = 2 rankings)
    sft_{train,val}.jsonl             {"prompt", "response": chosen}
    ppo_prompts.jsonl, val_prompts.jsonl, test_prompts.jsonl   {"prompt"}, distinct prompts
    hh_rlhf.json                      the sources, counts and skipped lines

Deviations from the paper, on purpose:
- The paper's labelers rank K = 4..9 responses; HH compares two (K = 2).
- HH has no demonstrations: SFT uses the chosen response, a common stand-in (e.g. TRL's examples).
- HH's own train and test files can share a prompt (many first turns are generic), so all pairs are
  pooled and re-split by a hash of the prompt (95/2.5/2.5): train, val and test never share a prompt.
Lines that cannot be used (prompts that differ between chosen and rejected, identical or empty answers)
are skipped and counted rather than stopping the run; data/formats.py's loaders are the strict ones.
"""
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from data.formats import (DataError, download, parse_ranking, read_jsonl, split_of, write_jsonl,
                          write_text)
from data.tokenizer import cache_dir
from lib.config import cli, parse_config

SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
URL = "https://raw.githubusercontent.com/anthropics/hh-rlhf/master/{subset}/{split}.jsonl.gz"
VAL, TEST = 0.025, 0.025  # fractions of prompts held out


def source_files(source: str | None, subsets) -> list[Path]:
    """The HH files to read: downloaded to the cache, or found in a local file or directory."""
    if source is None:
        return [download(URL.format(subset=s, split=split), cache_dir() / "hh-rlhf" / s / f"{split}.jsonl.gz")
                for s in subsets for split in ("train", "test")]
    root = Path(source).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(root, 0, "no such file or directory")
    # A clone of the repository has <subset>/<split>.jsonl.gz; a flat folder just has the files.
    files = [f for s in subsets for split in ("train", "test") for ext in (".jsonl.gz", ".jsonl")
             if (f := root / s / f"{split}{ext}").is_file()]
    files = files or sorted(p for p in root.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
    if not files:
        raise DataError(root, 0, f"no HH-RLHF .jsonl(.gz) files for subsets {', '.join(subsets)}")
    return files


def read_pairs(path: Path, max_examples: int | None, skipped: Counter) -> list[dict]:
    """{"prompt", "chosen", "rejected"} for each usable line; the reason for each unusable one is counted."""
    pairs = []
    for _, obj in read_jsonl(path):
        if max_examples is not None and len(pairs) >= max_examples:
            break
        try:
            r = parse_ranking(obj)
        except ValueError as e:
            skipped[str(e)] += 1
            continue
        pairs.append({"prompt": r["prompt"], "chosen": r["responses"][0], "rejected": r["responses"][1]})
    return pairs


def prepare(files: list[Path], out, max_examples: int | None = None) -> dict:
    """Convert the HH files into the pipeline's files in `out`; returns the summary saved as hh_rlhf.json."""
    skipped, splits = Counter(), {"train": [], "val": [], "test": []}
    for path in files:
        for pair in read_pairs(path, max_examples, skipped):
            splits[split_of(pair["prompt"], VAL, TEST)].append(pair)
    if not splits["train"]:
        raise DataError(files[0], 0, "no usable HH-RLHF pairs: expected lines with 'chosen' and 'rejected'")
    if not splits["val"] or not splits["test"]:
        n = sum(len(p) for p in splits.values())
        raise ValueError(f"only {n} usable pairs, too few to hold out val and test prompts "
                         f"({VAL:.1%} each): use more examples")
    out = Path(out)
    counts = {}
    for split, pairs in splits.items():
        prompts = list(dict.fromkeys(p["prompt"] for p in pairs))
        name = {"train": "ppo_prompts", "val": "val_prompts", "test": "test_prompts"}[split]
        write_jsonl(out / f"{name}.jsonl", [{"prompt": p} for p in prompts])
        write_jsonl(out / f"rankings_{split}.jsonl", pairs)
        counts[f"rankings_{split}"], counts[name] = len(pairs), len(prompts)
        if split != "test":
            demos = list(dict.fromkeys((p["prompt"], p["chosen"]) for p in pairs))
            write_jsonl(out / f"sft_{split}.jsonl", [{"prompt": p, "response": r} for p, r in demos])
            counts[f"sft_{split}"] = len(demos)
    summary = {"sources": [str(f) for f in files], "max_examples": max_examples, "counts": counts,
               "skipped": dict(sorted(skipped.items()))}
    write_text(out / "hh_rlhf.json", json.dumps(summary, indent=2) + "\n")
    return summary


@dataclass
class HHConfig:
    """What to convert and where to write it."""
    out: str  # output directory
    source: str | None = None  # a local HH-RLHF .jsonl(.gz) file or directory (default: download into the cache)
    subsets: str = ",".join(SUBSETS)  # comma-separated HH subsets
    max_examples: int | None = None  # use at most N pairs from each file

    def __post_init__(self):
        unknown = [s for s in self.subset_list if s not in SUBSETS]
        if unknown or not self.subset_list:
            raise ValueError(f"--subsets: unknown {unknown}; choose from {','.join(SUBSETS)}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError("--max-examples must be at least 1")

    @property
    def subset_list(self) -> list[str]:
        return [s for s in self.subsets.split(",") if s]


def main(argv=None) -> None:
    cfg = parse_config(HHConfig, argv, prog="python -m data.hh_rlhf")
    summary = prepare(source_files(cfg.source, cfg.subset_list), cfg.out, cfg.max_examples)
    n_skipped = sum(summary["skipped"].values())
    print(f"wrote {cfg.out}: " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
          + f"; skipped {n_skipped} unusable lines")


if __name__ == "__main__":
    cli(main)
