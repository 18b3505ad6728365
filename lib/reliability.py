"""The parts of a training loop that keep a run safe, gathered here so that the stage scripts read as their
algorithm (skip this file on a first read):

- preflight: missing inputs, an unwritable or busy --out-dir and an unfinished run in it are found before
  minutes of loading; the run then owns its --out-dir (one run per directory);
- training_state / resume_training: --resume continues an interrupted run exactly where it stopped;
- Interrupt: a first Ctrl-C finishes the step, saves the state and exits with code 130;
- NonFiniteGuard: a NaN/inf step is skipped, too many in a row stop the run.
"""
import fcntl
import os
import signal
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from lib.common import load_checkpoint, unfinished


def preflight(cfg, inputs, d):
    """Catch the mistakes that would otherwise surface after minutes of loading: a missing input file
    (inputs: {flag: path or None}), an output directory that cannot be written or that another run is using,
    --resume with nothing to resume, a fresh start over an unfinished run (without --overwrite). Raises
    FileNotFoundError/ValueError: one line and exit code 2 through cli(). Then the run owns cfg.out_dir
    (lock_out_dir) and removes the temporary files a writer killed there left behind."""
    for flag, path in inputs.items():
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    out_dir, ckpt = Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt.pt"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise ValueError(f"--out-dir {out_dir} is not a writable directory ({e.strerror}); choose another") from None
    if d.master:  # under torchrun, rank 0 speaks for the run
        lock_out_dir(out_dir)
        for tmp in out_dir.glob(".*.tmp*"):  # data.formats.atomic_open's; we hold the lock, so their writer died
            tmp.unlink(missing_ok=True)
    if cfg.resume and not ckpt.is_file():
        raise FileNotFoundError(f"--resume: no {ckpt} to continue from; run without --resume")
    if not (cfg.resume or cfg.overwrite) and ckpt.is_file() and (step := unfinished_step(ckpt)) is not None:
        raise ValueError(f"--out-dir {out_dir} holds an unfinished run (stopped at step {step}): continue it "
                         "with --resume, or start afresh over it with --overwrite")


def unfinished_step(path):
    """The step at which the run that saved this checkpoint stopped short of its end; None when it finished
    (or when the file is not a checkpoint that --resume could continue)."""
    try:
        ckpt = load_checkpoint(path, quiet=True)
    except ValueError:
        return None
    return ckpt["iter"] if unfinished(ckpt) else None


_LOCKS = {}  # out_dir -> its lock file, open (and so held) until this process exits


def lock_out_dir(out_dir):
    """Make this process the only run writing to out_dir: an exclusive flock on out_dir/.lock, which holds
    this process's pid. The operating system releases it when the process ends, however it ends, so the
    lock of a killed run is never stale. A second run on the same directory is refused, naming the pid."""
    key = Path(out_dir).resolve()
    if key in _LOCKS:  # already ours (tests run several stages' main() in one process)
        return
    f = open(key / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"  # "?": the holder has locked it but not yet written its pid
        f.close()
        raise ValueError(f"--out-dir {out_dir} is in use by another run (pid {holder}); wait for it to end "
                         "or choose another --out-dir") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[key] = f


def training_state(d, optimizers, generators=()):
    """What --resume needs besides the weights: the optimisers' moments and torch's RNG states (the data
    order follows from the step alone). Tensors and plain values only, so that it loads with
    weights_only=True. `generators` are the ones every process keeps alike (PPO's sampler)."""
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state(d.device) if d.device_type == "cuda" else None,
           "generators": [g.get_state() for g in generators]}
    return {"optimizers": [opt.state_dict() for opt in optimizers], "rng": rng}


def resume_training(ckpt, cfg, max_iters, d, log, optimizers, generators=()):
    """Restore an interrupted run's optimisers and RNGs from its checkpoint (its weights are already in the
    models), drop the metrics it logged after that save, and return the step to continue from."""
    path = Path(cfg.out_dir) / "ckpt.pt"
    if "optimizers" not in ckpt:
        raise ValueError(f"--resume: {path} holds weights but no training state; run without --resume")
    if ckpt["iter"] >= max_iters:
        length = "--total-episodes" if hasattr(cfg, "total_episodes") else "--max-iters"  # ppo.py's, the others'
        raise ValueError(f"--resume: {path} has finished all {max_iters} steps; raise {length} to train on")
    changed = sorted(k for k, v in ckpt["config"].items()
                     if k not in ("resume", "overwrite") and getattr(cfg, k, v) != v)
    if changed and d.master:
        print(f"warning: resuming with settings changed since the checkpoint: {', '.join(changed)}", file=sys.stderr)
    for opt, state in zip(optimizers, ckpt["optimizers"], strict=True):
        opt.load_state_dict(state)
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and d.device_type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], d.device)
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

    def finish(self, save, out_dir):
        """The end of a stage: save (after Ctrl-C too: the state to --resume from), say where, close DDP,
        and exit with code 130 when Ctrl-C stopped the run."""
        save(self.done)
        if self.d.master:
            print(f"saved {out_dir}/ckpt.pt{self.d.peak_memory()}")
        self.d.close()
        self.exit_if_requested(out_dir)

    def exit_if_requested(self, out_dir):
        if self.requested:
            if self.d.master:
                print(f"stopped by Ctrl-C after step {self.done} of {self.total}; the training state is in "
                      f"{out_dir}/ckpt.pt: the same command with --resume continues", file=sys.stderr)
            sys.exit(130)


class TrainingDiverged(FloatingPointError):
    """Too many non-finite steps in a row: the run stops without saving (exit code 1 through config.cli)."""


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
