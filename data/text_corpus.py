"""Prepare a plain-text corpus for pretraining and for PPO-ptx's pretraining mix (tiny Shakespeare by default).

    python -m data.text_corpus --out data/shakespeare                  # download tiny Shakespeare (1.1 MB)
    python -m data.text_corpus --out data/text --source corpus.txt     # any .txt, or JSONL {"text"}

Writes pretrain.txt and pretrain_val.txt (the same names as the built-in world, so a stage pointed at
either folder finds its text). The validation part is the end of the corpus, cut at a line break, as in
nanoGPT's shakespeare_char: a contiguous tail rather than random lines, so no passage is in both.
"""
from dataclasses import dataclass
from pathlib import Path

from data.formats import download, load_text, write_text
from data.tokenizer import cache_dir
from lib.config import cli, parse_config

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): val is about the last val_fraction of the text, starting at a line boundary."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    cut = text.find("\n", int(len(text) * (1 - val_fraction)))
    if cut < 0 or cut + 1 >= len(text):
        cut = int(len(text) * (1 - val_fraction))  # no line break late enough: cut mid-line
    else:
        cut += 1
    train, val = text[:cut], text[cut:]
    if not train.strip() or not val.strip():
        raise ValueError("the text is too short to split into train and validation parts")
    return train, val


def prepare(source, out, val_fraction: float = 0.1) -> tuple[int, int]:
    """Write out/pretrain.txt and out/pretrain_val.txt from the source file; returns their sizes in characters."""
    train, val = split_text(load_text(source), val_fraction)
    write_text(Path(out) / "pretrain.txt", train)
    write_text(Path(out) / "pretrain_val.txt", val)
    return len(train), len(val)


@dataclass
class CorpusConfig:
    """Where the text comes from and where it goes."""
    out: str  # output directory
    source: str | None = None  # a local .txt or JSONL {text} file (default: download tiny Shakespeare)
    val_fraction: float = 0.1  # share of the text kept for validation

    def __post_init__(self):  # checked before a download, not after
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")


def main(argv=None) -> None:
    cfg = parse_config(CorpusConfig, argv, prog="python -m data.text_corpus")
    source = cfg.source or download(URL, cache_dir() / "tinyshakespeare.txt")
    n_train, n_val = prepare(source, cfg.out, cfg.val_fraction)
    print(f"wrote {cfg.out}/pretrain.txt ({n_train:,} chars) and pretrain_val.txt ({n_val:,} chars)")


if __name__ == "__main__":
    cli(main)
