"""Tokenisation with tiktoken: a byte-level encoding for the built-in world, and GPT-2's BPE.

    tok = get_tokenizer("byte")   # 256 byte tokens + <|endoftext|> + <|pad|>, fully offline
    tok = get_tokenizer("gpt2")   # GPT-2's 50257-token BPE (for GPT-2 weights and real data)

Text is always encoded as ordinary text: a user string that happens to contain "<|endoftext|>" becomes
plain bytes, never the special token, so data cannot inject control tokens. The end-of-text token is
appended by the chat template code (data/formats.py), by id.

GPT-2's ranks are looked up, in order, in $GPT2_TIKTOKEN (a file in tiktoken's base64 format, e.g.
whisper/assets/gpt2.tiktoken from the openai-whisper sdist), in the cache directory
(<cache>/gpt2.tiktoken), and finally through tiktoken's own downloader (needs the internet).
"""
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import tiktoken

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"


def cache_dir() -> Path:
    """Where downloads (GPT-2 weights, tokenizer ranks, datasets) are kept: $INSTRUCTGPT_CACHE or ~/.cache."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "instructgpt"
    return Path(os.environ.get("INSTRUCTGPT_CACHE", default))


@dataclass(frozen=True)
class Tokenizer:
    """A tiktoken encoding plus the two ids the pipeline needs (end-of-text, padding)."""
    name: str
    enc: tiktoken.Encoding
    eot_token: int
    pad_token: int

    @property
    def n_vocab(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        """Decode ids to text; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        ids = [int(i) for i in ids]
        n_ordinary = self.enc.n_vocab - len(self.enc.special_tokens_set)
        return self.enc.decode([i for i in ids if i < n_ordinary], errors="replace")


def byte_encoding() -> tiktoken.Encoding:
    # 256 single-byte tokens and no merges: every UTF-8 byte is one token. The split pattern only keeps
    # pieces short; with no merges any pattern gives the same ids.
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding(
        name="byte",
        pat_str=r"""\s?[^\s]{1,32}|\s+""",
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 256, PAD: 257},
    )


def gpt2_encoding() -> tiktoken.Encoding:
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    for path in (os.environ.get("GPT2_TIKTOKEN"), cache_dir() / "gpt2.tiktoken"):
        if path and Path(path).is_file():
            return tiktoken.Encoding(
                name="gpt2",
                pat_str=r50k_pat_str,
                mergeable_ranks=load_tiktoken_bpe(str(path)),
                special_tokens={ENDOFTEXT: 50256},
                explicit_n_vocab=50257,
            )
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline and no local ranks file
        raise RuntimeError(
            f"GPT-2 tokenizer ranks not found: set GPT2_TIKTOKEN to a gpt2.tiktoken file or put one at "
            f"{cache_dir() / 'gpt2.tiktoken'} (tiktoken's download failed: {e})"
        ) from e


@lru_cache(maxsize=None)
def get_tokenizer(name: str = "byte") -> Tokenizer:
    """The tokenizer called `name` ("byte" or "gpt2"); checkpoints store this name."""
    if name == "byte":
        enc = byte_encoding()
        return Tokenizer("byte", enc, eot_token=256, pad_token=257)
    if name == "gpt2":
        enc = gpt2_encoding()
        # GPT-2 has no pad token; padded positions are masked out, so end-of-text serves.
        return Tokenizer("gpt2", enc, eot_token=50256, pad_token=50256)
    raise ValueError(f"unknown tokenizer {name!r}: choose 'byte' or 'gpt2'")
