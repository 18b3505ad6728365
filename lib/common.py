"""What every stage needs besides its algorithm: the settings they share, the device and DDP, checkpoints
(and the four models of RL fine-tuning), the metrics log, the learning-rate schedule. Command lines are
lib/config.py's; resuming, Ctrl-C and non-finite steps are lib/reliability.py's; batching is data/batches.py's.
"""
import dataclasses
import json
import math
import os
import pickle
import shutil
import struct
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data.formats import atomic_open, write_text
from model import GPT, GPTConfig, load_lm_into


# --- the settings every training stage shares ---------------------------------------------------------------
# settings of one name in several stages, and the ranges RunConfig checks them against
POSITIVE = ("batch_size", "micro_batch_size", "minibatch_size", "ptx_batch_size", "epochs", "total_episodes",
            "ppo_epochs", "max_new_tokens", "seq_len", "ptx_seq_len", "lr", "vf_lr", "log_interval",
            "eval_interval", "sample_interval", "probe_interval", "max_bad_steps")
NON_NEGATIVE = ("max_iters", "warmup_iters", "save_interval")  # 0 means: derived, none, at the end only


@dataclass
class RunConfig:
    """Where and how a stage runs, and its safety plumbing (lib/reliability.py); each stage's config adds its own."""
    save_interval: int = 100  # steps between saves of the resumable training state to ckpt.pt; 0 = at the end only
    resume: bool = False  # continue the interrupted run in out_dir from its ckpt.pt (weights, optimisers, step, RNGs)
    overwrite: bool = False  # start afresh in an out_dir that holds an unfinished run, replacing it
    max_bad_steps: int = 5  # NaN/inf optimiser steps (each skipped) in a row after which the run stops
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # matmul precision: bf16 (autocast), fp32, or auto = bf16 on CUDA, fp32 elsewhere
    compile: bool = False  # torch.compile the model(s)
    grad_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower
    seed: int = 0  # seed of the run: initialisation, data order, sampling

    def __post_init__(self):
        """The ranges of the settings that stages share by name (each stage's __post_init__ calls this
        first): a batch size of 0 or a negative warmup is a one-line error (exit code 2), not a
        ZeroDivisionError or a run that silently trains nothing."""
        check_ranges(self, POSITIVE, NON_NEGATIVE)
        if hasattr(self, "micro_batch_size") and self.batch_size % self.micro_batch_size:
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size "
                             f"{self.micro_batch_size}")


def check_ranges(cfg, positive, non_negative=()):
    """Raise a one-line ValueError (exit code 2 through config.cli) for the first of these settings of cfg
    out of its range; a name cfg does not have is skipped."""
    for name in positive + non_negative:
        value = getattr(cfg, name, None)
        if value is None:
            continue
        if name in positive and not value > 0:  # `not >`: NaN is refused too
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if name in non_negative and not value >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


# --- device, precision, distributed -----------------------------------------------------------------------
def autodetect_device():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device):
    """A one-line error (exit code 2) for a --device this machine does not have, before anything loads."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():  # 0 without CUDA
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         "visible to torch; use --device auto or cpu")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS (Apple GPU) is not available here; use --device auto or cpu")


class Dist:
    """Who this process is: rank, world size, device. Single-process runs have rank 0 of 1."""

    def __init__(self, device="auto", dtype="auto"):
        self.ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        device = autodetect_device() if device == "auto" else device
        check_device(device)
        if self.ddp and device.startswith("cuda"):
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(device)
        self.device = device
        self.device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
        if dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--dtype must be auto, bf16 or fp32, got {dtype!r}")
        self.dtype = ("bf16" if self.device_type == "cuda" else "fp32") if dtype == "auto" else dtype
        if self.ddp:
            dist.init_process_group(backend="nccl" if self.device_type == "cuda" else "gloo")
        self.master = self.rank == 0

    def wrap(self, model):
        """The model for training: inside DistributedDataParallel under torchrun, itself otherwise."""
        if not self.ddp:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[self.local_rank] if self.device_type == "cuda" else None)

    def autocast(self):
        """bf16 autocast (the matmuls in bf16, reductions and weights in fp32) when dtype is bf16: the
        default on CUDA, and --dtype bf16 on a CPU with bf16 matrix units (AMX); full fp32 otherwise."""
        if self.dtype == "bf16":
            return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16)
        return nullcontext()

    def all_reduce_mean(self, x):
        """Mean of a tensor over all ranks (identity in a single process)."""
        if self.ddp:
            x = x.clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x /= self.world_size
        return x

    def all_rows(self, x, n):
        """(n,) the whole batch's values on every rank, from this rank's rows rank, rank + N, ... of it."""
        full = torch.zeros(n, dtype=x.dtype, device=x.device)
        full[self.rank::self.world_size] = x
        return self.all_reduce_mean(full) * self.world_size

    def peak_memory(self):
        """', peak GPU memory N GiB' on CUDA (the most this process's tensors held at once), '' elsewhere."""
        if self.device_type != "cuda":
            return ""
        return f", peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"

    def close(self):
        if self.ddp:
            dist.destroy_process_group()


def set_seed(seed):
    """Seed torch's global generator (weight init, dropout); data order and sampling have their own."""
    torch.manual_seed(seed)


# --- checkpoints: atomic writes, pickle-free loads ---------------------------------------------------------
class _WriteErrors:
    """A file object that keeps the first OSError of its writes: torch.save reports a failed write
    (disk full) as a RuntimeError about zip offsets, and atomic_save raises the OSError itself
    instead."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self.f.flush()


def atomic_save(obj, path):
    """torch.save through data.formats.atomic_open: a crash mid-save leaves the previous file intact."""
    with atomic_open(path) as f:
        out = _WriteErrors(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def atomic_copy(src, dst):
    """Copy a file through data.formats.atomic_open, as atomic_save: a crash mid-copy leaves no partial dst."""
    with open(src, "rb") as f, atomic_open(dst) as out:
        shutil.copyfileobj(f, out)


def _finite_weights(model, path):
    state = {k: v.detach().cpu() for k, v in getattr(model, "module", model).state_dict().items()}  # unwrap DDP
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"not saving {path}: non-finite weights in {bad[:3]}")
    return state


def save_checkpoint(path, model, config, tokenizer, **extra):
    """Save the model's weights with its architecture, the stage config that made it and the tokenizer
    name. Refuses non-finite weights, so a diverged run never overwrites a good checkpoint; so are other
    models passed in extra (stored as their state dicts)."""
    model = getattr(model, "module", model)
    state = _finite_weights(model, path)
    extra = {k: _finite_weights(v, path) if isinstance(v, torch.nn.Module) else v for k, v in extra.items()}
    ckpt = {"model": state, "model_config": dataclasses.asdict(model.config),
            "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
            "tokenizer": tokenizer, **extra}
    atomic_save(ckpt, path)


HEADS = {"lm": "a policy (language-model head: base, SFT or PPO)",
         "scalar": "a reward or value model (scalar head)"}


def load_checkpoint(path, kind=None, map_location="cpu", quiet=False):
    """Load a checkpoint dict without unpickling code (weights_only=True), or raise a one-line ValueError
    that says what is wrong with the file: truncated or not a checkpoint, a pickle that would run code, a
    checkpoint of another kind than `kind` ("lm" or "scalar"). Says so (unless quiet) when it is the periodic
    save of a run that has not finished (stopped by Ctrl-C or a crash)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # RuntimeError, EOFError, KeyError, ... for a cut or foreign file
        # torch's own message for a pickle with code in it suggests weights_only=False: never say that
        if isinstance(e, pickle.UnpicklingError) and "weights only load failed" in str(e).lower():
            raise ValueError(f"{path}: refusing to load: it contains code objects (a pickle that is not plain "
                             "tensors); only load checkpoints this project saved") from None
        raise ValueError(f"{path}: not a checkpoint this project can load (truncated or corrupt)") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "tokenizer"} <= ckpt.keys():
        raise ValueError(f"{path}: not a checkpoint of this project (it holds no model weights with their "
                         "config; sft.py, reward.py and ppo.py write those)")
    head = ckpt["model_config"].get("head", "lm")
    if kind is not None and head != kind:
        raise ValueError(f"{path} is {HEADS.get(head, head)}, but {HEADS[kind]} is expected here")
    if unfinished(ckpt) and not quiet:
        print(f"note: {path} is from an unfinished run (step {ckpt['iter']} of {ckpt['max_iters']}); "
              "its stage's --resume finishes it", file=sys.stderr)
    return ckpt


def unfinished(ckpt):
    """A periodic save of a run that has not done all its steps (stopped by Ctrl-C or a crash)."""
    return ckpt.get("iter", 0) < ckpt.get("max_iters", 0)


def stage_finished(path):
    """Whether train.sh may skip the stage that writes this checkpoint: it loads and its run did all its
    steps. A truncated or foreign file says so and gets its stage run again."""
    try:
        return not unfinished(load_checkpoint(path, quiet=True))
    except ValueError as e:
        print(f"note: {e}: running its stage again", file=sys.stderr)
        return False


def check_max_new_tokens(ckpt, max_new_tokens, path):
    """Refuse a response budget shorter than the longest demonstration the policy was fine-tuned on (its
    correct answers would be cut off mid-sentence and scored as unended), or one that leaves no room for the
    prompt in the policy's context. ckpt None (GPT-2 weights): no check."""
    longest = ckpt.get("max_response_tokens", 0) if ckpt else 0
    if max_new_tokens < longest:
        fix = (f"raise it to at least {longest}, or drop longer demonstrations in SFT "
               "(sft.py --max-response-tokens)")
        raise ValueError(f"--max-new-tokens {max_new_tokens} is shorter than the longest demonstration {path} "
                         f"learnt ({longest} tokens with its end-of-text); {fix}")
    block_size = ckpt["model_config"]["block_size"] if ckpt else max_new_tokens + 1
    if max_new_tokens >= block_size:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the context of {path} "
                         f"({block_size} tokens); lower it")


def load_model(init, head, dropout, kind=None, score_logprob=False):
    """(tokenizer name, model, checkpoint or None) from a checkpoint of this project (*.pt; of the head
    `kind`, when given) or GPT-2 weights (a name such as gpt2, or a Hugging Face directory), with the given
    head."""
    if init.endswith(".pt"):
        ckpt = load_checkpoint(init, kind)
        return ckpt["tokenizer"], model_from_checkpoint(ckpt, head, dropout, score_logprob), ckpt
    tokenizer, meta = "gpt2", Path(init) / "instructgpt.json"
    try:
        # a directory of tools/export.py: its own tokenizer (the world's is not GPT-2's) and head
        if meta.is_file():
            info = json.loads(meta.read_text(encoding="utf-8"))
            tokenizer, exported = info["tokenizer"], info["model_config"]["head"]
            if kind is not None and exported != kind:
                found = HEADS.get(exported, exported)
                raise ValueError(f"{init} is {found}, but {HEADS[kind]} is expected here")
        return tokenizer, GPT.from_pretrained(init, head, dropout, score_logprob), None
    except (KeyError, TypeError, AssertionError, RuntimeError, struct.error, UnicodeDecodeError,
            json.JSONDecodeError) as e:  # a truncated or foreign file in the directory
        layout = "the Hugging Face layout (config.json, model.safetensors)"
        raise ValueError(f"{init}: not a GPT-2 directory in {layout} that this project can read "
                         f"({type(e).__name__}: {e})") from None


def model_from_checkpoint(ckpt, head=None, dropout=None, score_logprob=False):
    """Build a GPT from a checkpoint dict. head="scalar" on an LM checkpoint gives a reward/value
    model with the LM's trunk and a fresh scalar head (the paper's RM init); with score_logprob, an
    RM that keeps the LM head too (model.response_score). A head given drops the checkpoint's
    score_logprob unless asked: the value model starts from the RM's trunk and scalar head only."""
    cfg = dict(ckpt["model_config"])
    if head is not None:
        cfg["head"], cfg["score_logprob"] = head, score_logprob
    if dropout is not None:
        cfg["dropout"] = dropout
    model = GPT(GPTConfig(**cfg))
    load_lm_into(model, ckpt["model"])
    return model


def prepare_model(model, cfg, d):
    """The model on the device, with gradient checkpointing and torch.compile as configured; returns it and
    the handle to train through (the model inside DistributedDataParallel under torchrun, else itself)."""
    model.to(d.device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    if cfg.compile:
        model.compile()
    return model, d.wrap(model)


@torch.no_grad()
def update_ema(ema, model, decay):
    """One step of an exponential moving average of a model's weights: ema += (1 - decay) * (w - ema)."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - decay)


# --- logging -----------------------------------------------------------------------------------------------
class RunLog:
    """Metrics as JSON lines in out_dir/metrics.jsonl and one fixed-format line per logged step."""

    def __init__(self, out_dir, enabled=True, resume=False):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.t0 = time.time()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not resume:  # a fresh run in an old out_dir starts a fresh log, not the old run's continuation
                self.path.unlink(missing_ok=True)

    def forget_from(self, step):
        """Drop the records of steps >= step, which a resumed run logs again (an interrupted run may have
        logged them after its last save), and a torn last line left by a crash."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                if json.loads(line)["step"] < step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        write_text(self.path, "".join(kept))

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


# --- learning-rate schedule ------------------------------------------------------------------
def cosine_lr(it, max_iters, lr, min_lr, warmup_iters=0):
    """Linear warmup, then cosine decay from lr to min_lr at max_iters (the paper decays to 10% of peak)."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
