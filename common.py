"""Plumbing shared by every stage: config parsing, device and DDP setup, checkpoints, logging.

Kept in one place so that sft.py, reward.py and ppo.py differ mainly in their algorithm.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import time
import typing
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from model import GPT, GPTConfig


# --- config: a dataclass whose field comments become the --help text ---------------------------------------
def _field_comments(cls):
    """{field: comment} from lines like `lr: float = 3e-4  # peak learning rate` in the class source."""
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^=\n]+=[^#\n]*#\s*(.+)$", src, re.M):
            comments[m.group(1)] = m.group(2).strip()
    return comments


def parse_config(cls, argv=None):
    """Build the stage's config dataclass from the command line; `--help` lists every field and default."""
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    parser = argparse.ArgumentParser(description=doc.split("\n")[0] if doc else None,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        optional = typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
            and type(None) in typing.get_args(kind)
        if optional:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        name = "--" + f.name.replace("_", "-")
        help_text = comments.get(f.name, " ")
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(name, type=kind, default=f.default, help=help_text, dest=f.name)
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args))
    except ValueError as e:  # __post_init__ validation: one line, exit code 2
        parser.error(str(e))


# --- device, precision, distributed -----------------------------------------------------------------------
def autodetect_device():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class Dist:
    """Who this process is: rank, world size, device. Single-process runs have rank 0 of 1."""

    def __init__(self, device="auto"):
        self.ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        device = autodetect_device() if device == "auto" else device
        if self.ddp and device.startswith("cuda"):
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        self.device = device
        self.device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
        if self.ddp:
            dist.init_process_group(backend="nccl" if self.device_type == "cuda" else "gloo")
        self.master = self.rank == 0

    def autocast(self):
        """bf16 autocast on CUDA (the matmuls in bf16, reductions in fp32); full fp32 elsewhere."""
        if self.device_type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def all_reduce_mean(self, x):
        """Mean of a tensor over all ranks (identity in a single process)."""
        if self.ddp:
            x = x.clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x /= self.world_size
        return x

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def close(self):
        if self.ddp:
            dist.destroy_process_group()


def set_seed(seed):
    torch.manual_seed(seed)
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed)


# --- checkpoints: atomic writes, pickle-free loads ---------------------------------------------------------
def atomic_save(obj, path):
    """torch.save to a temporary file in the same directory, fsync, then rename: a crash mid-save leaves
    the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path, model, config, tokenizer, **extra):
    """Save the model's weights with its architecture, the stage config that made it and the tokenizer
    name. Refuses non-finite weights, so a diverged run never overwrites a good checkpoint."""
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"not saving {path}: non-finite weights in {bad[:3]}")
    ckpt = {"model": state, "model_config": dataclasses.asdict(model.config),
            "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
            "tokenizer": tokenizer, **extra}
    atomic_save(ckpt, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict without unpickling code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    return torch.load(path, map_location=map_location, weights_only=True)


def model_from_checkpoint(ckpt, head=None, dropout=None):
    """Build a GPT from a checkpoint dict. head="scalar" on an LM checkpoint gives a reward/value model
    with the LM's trunk and a fresh scalar head (the paper's RM init)."""
    from model import load_lm_into
    cfg = dict(ckpt["model_config"])
    if head is not None:
        cfg["head"] = head
    if dropout is not None:
        cfg["dropout"] = dropout
    model = GPT(GPTConfig(**cfg))
    load_lm_into(model, ckpt["model"])
    return model


# --- logging -----------------------------------------------------------------------------------------------
class RunLog:
    """Metrics as JSON lines in out_dir/metrics.jsonl and one fixed-format line per logged step."""

    def __init__(self, out_dir, enabled=True):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.t0 = time.time()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step, echo=True, **metrics):
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self.t0, 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            parts = [f"step {step:5d}"] + [f"{k} {_fmt(v)}" for k, v in metrics.items()]
            tqdm.write(" | ".join(parts))  # above the progress bar, not through it


def _fmt(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else (f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}")
    return str(v)


# --- training plumbing shared by the stages ------------------------------------------------------------------
def cosine_lr(it, max_iters, lr, min_lr, warmup_iters=0):
    """Linear warmup, then cosine decay from lr to min_lr at max_iters (the paper decays to 10% of peak)."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def shuffled_indices(n, start, count, seed):
    """Positions start .. start+count-1 of an endless stream of epochs, each a fresh permutation of
    range(n) seeded by (seed, epoch): every rank computes the same global batch from the step alone."""
    out, perms = [], {}
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out.append(perms[epoch][i])
    return out


def text_windows(tokens, n, seq_len, generator):
    """n random windows of seq_len + 1 tokens from a 1-D tensor of pretraining text, as (ids, 0) examples
    (0 query tokens: every token counts)."""
    offsets = torch.randint(len(tokens) - seq_len - 1, (n,), generator=generator)
    return [(tokens[o:o + seq_len + 1].tolist(), 0) for o in offsets.tolist()]


def encode_example(tok, prompt, response, max_len, stats):
    """Token ids of `prompt` + `response` in the chat template and the number of query tokens, in at most
    max_len tokens. An over-long prompt loses tokens from the left (stats["truncated"] counts them); an
    example whose response alone does not fit is dropped (stats["dropped"]) and None is returned."""
    from data.formats import encode_chat, truncate_left
    query, resp = encode_chat(tok, prompt, response)
    if len(resp) >= max_len:
        stats["dropped"] = stats.get("dropped", 0) + 1
        return None
    query, cut = truncate_left(query, max_len - len(resp))
    stats["truncated"] = stats.get("truncated", 0) + int(cut)
    return query + resp, len(query)


def warn_counts(name, stats, total):
    """Say how many examples were truncated or dropped: never silently."""
    for what in ("truncated", "dropped"):
        if stats.get(what):
            print(f"warning: {name}: {stats[what]} of {total} examples {what} to fit the context", file=sys.stderr)


def pad_right(seqs, pad_value):
    """(B, T) tensor of right-padded rows; causal attention never looks right, so no mask is needed."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def pad_left(seqs, pad_value):
    """(B, T) left-padded ids and their attention mask (1 = real): prompts of different lengths end at the
    same column, so generation appends to all rows at once."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            idx[i, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
    return idx, mask


def cli(main):
    """Run a stage's main(); data and config errors end with one line and exit code 2."""
    from data.formats import DataError
    try:
        main()
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
