"""Plumbing shared by every stage: config parsing, device and DDP setup, checkpoints, logging.

Kept in one place so that sft.py, reward.py and ppo.py differ mainly in their algorithm.
"""
import argparse
import dataclasses
import inspect
import json
import math
import os
import pickle
import re
import signal
import sys
import tempfile
import time
import typing
import warnings
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


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit code 2, like every other error of the project."""

    def error(self, message):  # one line and exit code 2, without argparse's full usage text
        self.exit(2, f"error: {message} (see --help)\n")


def parse_config(cls, argv=None):
    """Build the stage's config dataclass from the command line; `--help` lists every field and default."""
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    parser = Parser(description=doc.split("\n")[0] if doc else None,
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
        help_text = comments.get(f.name, " ").replace("%", "%%")  # argparse formats help with %
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

    def __init__(self, device="auto", dtype="auto"):
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

    def peak_memory(self):
        """', peak GPU memory N GiB' on CUDA (the most this process's tensors held at once), '' elsewhere."""
        if self.device_type != "cuda":
            return ""
        return f", peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.2f} GiB"

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
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # an error or a second Ctrl-C: no temporary file left behind
        tmp.unlink(missing_ok=True)
        raise


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


def load_checkpoint(path, kind=None, map_location="cpu"):
    """Load a checkpoint dict without unpickling code (weights_only=True), or raise a one-line ValueError
    that says what is wrong with the file: truncated or not a checkpoint, a pickle that would run code, a
    checkpoint of another kind than `kind` ("lm" or "scalar"). Says so when it is the periodic save of a run
    that has not finished (stopped by Ctrl-C or a crash)."""
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
    if ckpt.get("iter", 0) < ckpt.get("max_iters", 0):
        print(f"note: {path} is from an unfinished run (step {ckpt['iter']} of {ckpt['max_iters']}); "
              "its stage's --resume finishes it", file=sys.stderr)
    return ckpt


def check_max_new_tokens(ckpt, max_new_tokens, path):
    """Refuse a response budget shorter than the longest demonstration the policy was fine-tuned on: its
    correct answers would be cut off mid-sentence and scored as unended. ckpt None (GPT-2 weights): no check."""
    longest = ckpt.get("max_response_tokens", 0) if ckpt else 0
    if max_new_tokens < longest:
        raise ValueError(f"--max-new-tokens {max_new_tokens} is shorter than the longest demonstration {path} "
                         f"learnt ({longest} tokens with its end-of-text); raise it to at least {longest}")


def load_model(init, head, dropout, kind=None):
    """(tokenizer name, model, checkpoint or None) from a checkpoint of this project (*.pt; of the head
    `kind`, when given) or GPT-2 weights (a name such as gpt2, or a Hugging Face directory), with the given
    head."""
    if init.endswith(".pt"):
        ckpt = load_checkpoint(init, kind)
        return ckpt["tokenizer"], model_from_checkpoint(ckpt, head=head, dropout=dropout), ckpt
    return "gpt2", GPT.from_pretrained(init, head=head, dropout=dropout), None


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
        from data.formats import write_text
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


# --- reliability: up-front checks, resumable training state, Ctrl-C, non-finite steps ---------------------
def preflight(out_dir, inputs, resume=False):
    """Catch the mistakes that would otherwise surface after minutes of loading: a missing input file
    (inputs: {flag: path or None}), an output directory that cannot be written, --resume with nothing to
    resume. Raises FileNotFoundError/ValueError: one line and exit code 2 through cli()."""
    for flag, path in inputs.items():
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise ValueError(f"--out-dir {out_dir} is not a writable directory ({e.strerror}); choose another") from None
    if resume and not (Path(out_dir) / "ckpt.pt").is_file():
        raise FileNotFoundError(f"--resume: no {Path(out_dir) / 'ckpt.pt'} to continue from; run without --resume")


def training_state(d, optimizers, generators=()):
    """What --resume needs besides the weights: the optimisers' moments and every RNG's state (the data
    order follows from the step alone). Tensors and plain values only, so that it loads with
    weights_only=True. `generators` are the ones every process keeps alike (PPO's sampler)."""
    import random
    import numpy as np
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(d.device) if d.device_type == "cuda" else None,
           "python": (py_version, torch.tensor(py_state), py_gauss),
           "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                     float(np_gauss)),
           "generators": [g.get_state() for g in generators]}
    return {"optimizers": [opt.state_dict() for opt in optimizers], "rng": rng}


def resume_training(ckpt, cfg, max_iters, d, log, optimizers, generators=()):
    """Restore an interrupted run's optimisers and RNGs from its checkpoint (its weights are already in the
    models), drop the metrics it logged after that save, and return the step to continue from."""
    import random
    import numpy as np
    path = Path(cfg.out_dir) / "ckpt.pt"
    if "optimizers" not in ckpt:
        raise ValueError(f"--resume: {path} holds weights but no training state; run without --resume")
    if ckpt["iter"] >= max_iters:
        raise ValueError(f"--resume: {path} has finished all {max_iters} steps; raise --max-iters to train on")
    changed = sorted(k for k, v in ckpt["config"].items() if k != "resume" and getattr(cfg, k, v) != v)
    if changed and d.master:
        print(f"warning: resuming with settings changed since the checkpoint: {', '.join(changed)}", file=sys.stderr)
    for opt, state in zip(optimizers, ckpt["optimizers"], strict=True):
        opt.load_state_dict(state)
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and d.device_type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], d.device)
    random.setstate((rng["python"][0], tuple(rng["python"][1].tolist()), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
    for g, state in zip(generators, rng["generators"], strict=True):
        g.set_state(state)
    log.forget_from(ckpt["iter"])
    if d.master:
        print(f"resuming {path} at step {ckpt['iter']} of {max_iters}")
    return ckpt["iter"]


class Interrupt:
    """Ctrl-C for a training loop. The first SIGINT lets the current step finish; the loop then ends, the
    stage saves its training state as at the end of a run, and exits with code 130 (not 0: `set -e` scripts
    such as train.sh stop instead of starting the next stage on a half-trained model). A second SIGINT
    aborts at once (KeyboardInterrupt) without saving."""

    def __init__(self, d):
        self.d, self.requested, self.done, self.total = d, False, 0, 0
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # os.write, not print: a signal handler may interrupt a print in progress
        os.write(2, b"\nCtrl-C: finishing this step, then saving the training state (Ctrl-C again aborts)\n")

    def steps(self, start, stop):
        """range(start, stop) that ends after the step during which Ctrl-C came; self.done counts the
        steps completed."""
        self.done, self.total = start, stop
        for it in range(start, stop):
            yield it
            self.done = it + 1
            if self.d.ddp:  # every rank stops after the same step, or the next collective would hang
                flag = torch.tensor(float(self.requested), device=self.d.device)
                self.requested = self.d.all_reduce_mean(flag).item() > 0
            if self.requested:
                return

    def exit_if_requested(self, out_dir):
        if self.requested:
            if self.d.master:
                print(f"stopped by Ctrl-C after step {self.done} of {self.total}; the training state is in "
                      f"{out_dir}/ckpt.pt: the same command with --resume continues", file=sys.stderr)
            sys.exit(130)


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row: the run stops without saving."""


class NonFiniteGuard:
    """Skips optimiser steps whose loss or gradient norm is NaN or inf: one bad batch (an overflow, a broken
    example) then costs a step instead of poisoning the weights and Adam's moments. max_bad such steps in a
    row stop the run (TrainingDiverged, exit code 1), since a learning rate that is too high makes every
    step non-finite; the last checkpoint is left as it was."""

    def __init__(self, max_bad, d):
        self.max_bad, self.d, self.in_a_row, self.skipped = max_bad, d, 0, 0

    def ok(self, step, *values):
        """True when the optimiser may step: every value (losses, gradient norms) is finite on every rank."""
        finite = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all().float()
        if self.d.all_reduce_mean(finite).item() == 1.0:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.d.master:
            shown = ", ".join(f"{v.detach().float().sum().item():.3g}" for v in values)
            tqdm.write(f"warning: step {step}: non-finite loss or gradient norm ({shown}): optimiser step skipped "
                       f"({self.skipped} skipped so far)", file=sys.stderr)
        if self.in_a_row >= self.max_bad:
            raise TrainingDiverged(
                f"step {step}: loss or gradient norm NaN/inf in {self.in_a_row} steps in a row, so the run stops "
                "unsaved; the learning rate is likely too high (lower --lr, add --warmup-iters, keep --grad-clip) "
                "or the data has a broken example; --resume continues from the last saved state")
        return False

    def stats(self):
        """{"skipped_steps": n} for the log once any step was skipped."""
        return {"skipped_steps": self.skipped} if self.skipped else {}


def cli(main):
    """Run a stage's main(). Data and config errors end with one line and exit code 2; a diverged run (or
    one refused a non-finite checkpoint) with one line and exit code 1; Ctrl-C during setup or a second
    Ctrl-C in training with exit code 130 (a first Ctrl-C in training saves first: see Interrupt)."""
    from data.formats import DataError
    code = 0
    try:
        main()
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except (TrainingDiverged, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("aborted by Ctrl-C: nothing saved since the last checkpoint", file=sys.stderr)
        code = 130
    except SystemExit as e:  # argparse errors (2), Ctrl-C after saving (130)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    if "RANK" in os.environ:
        # under torchrun, skip the interpreter's final clean-up: after a run that finished and saved, gloo's
        # destructors (torch 2.13, CPU) abort the process ("terminate called without an active exception")
        # in about one run in five on a busy machine, which torchrun reports as a failure
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
