"""The training loop that sft.py, reward.py and dpo.py share around their own train_step:
micro-batches and the optimiser step, and a TrainingRun that holds the plumbing (the metrics log,
--resume, saves, Ctrl-C, non-finite steps, the learning-rate schedule). Skip on a first read."""
import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from lib.common import RunConfig, RunLog, cosine_lr, save_checkpoint
from lib.reliability import Interrupt, NonFiniteGuard, resume_training, training_state


@dataclass
class TrainConfig(RunConfig):
    """The optimisation settings of sft.py, reward.py and dpo.py (AdamW, the cosine schedule of
    cosine_lr); each stage's config adds its data, batch sizes and peak learning rate."""
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of the peak (the paper: 10%)
    warmup_iters: int = 0  # linear warmup steps (the paper: none)
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    beta1: float = 0.9  # Adam beta1 (the paper: 0.9)
    beta2: float = 0.95  # Adam beta2 (the paper: 0.95)
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = off
    log_interval: int = 10  # steps between log lines


def check_batch_size(cfg, d):
    if cfg.batch_size % (cfg.micro_batch_size * d.world_size):
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size "
                         f"x processes ({cfg.micro_batch_size} x {d.world_size})")


def micro_batches(ddp_model, batch, cfg, d):
    """This process's rows of a global batch (rows rank, rank + N, ...), cfg.micro_batch_size at a
    time. Gradients accumulate over them; under DDP they are all-reduced once, on the last
    micro-batch."""
    mine = batch[d.rank::d.world_size]
    accum = cfg.batch_size // (cfg.micro_batch_size * d.world_size)
    for micro in range(accum):
        if d.ddp:
            ddp_model.require_backward_grad_sync = micro == accum - 1
        yield mine[micro * cfg.micro_batch_size:(micro + 1) * cfg.micro_batch_size]


def optimizer_step(ddp_model, optimizer, guard, it, loss, grad_clip):
    """Clip the gradient norm to grad_clip (0: no clip), step unless the loss or the norm is not
    finite (NonFiniteGuard skips the step), and clear the gradients."""
    grad_norm = torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), grad_clip or math.inf)
    if guard.ok(it, loss, grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class TrainingRun:
    """A stage's run of max_iters optimiser steps: steps() yields the steps still to run (all of
    them, or those after the last save with --resume) with a progress bar, sets the learning rate
    before each (cosine_lr) and saves every --save-interval steps after it; Ctrl-C stops after the
    step in progress; finish() saves the weights with **saved and the state --resume needs
    (lib/reliability.py)."""

    def __init__(self, cfg, d, model, tokenizer, optimizer, max_iters, ckpt, desc, **saved):
        self.cfg, self.d, self.model, self.tokenizer = cfg, d, model, tokenizer
        self.optimizer = optimizer
        self.max_iters, self.desc, self.saved = max_iters, desc, saved
        # opened only now that inputs and models have loaded: a failed fresh start keeps the old log
        self.log = RunLog(cfg.out_dir, enabled=d.master, resume=cfg.resume)
        self.start = 0
        if cfg.resume:
            self.start = resume_training(ckpt, cfg, max_iters, d, self.log, [optimizer])
        self.interrupt, self.guard = Interrupt(d), NonFiniteGuard(cfg.max_bad_steps, d)
        self.lr = cfg.lr
        self.t_last, self.it_last = time.time(), self.start - 1  # of the last log line

    def steps(self):
        cfg = self.cfg
        for it in tqdm(self.interrupt.steps(self.start, self.max_iters), total=self.max_iters,
                       initial=self.start, desc=self.desc, disable=not self.d.master):
            min_lr = cfg.lr * cfg.min_lr_ratio
            self.lr = cosine_lr(it, self.max_iters, cfg.lr, min_lr, cfg.warmup_iters)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            yield it
            if cfg.save_interval and (it + 1) % cfg.save_interval == 0 and it + 1 < self.max_iters:
                self.save(it + 1)

    def is_log_step(self, it):
        return it % self.cfg.log_interval == 0 or it == self.max_iters - 1

    def is_eval_step(self, it):
        return self.d.master and (it % self.cfg.eval_interval == 0 or it == self.max_iters - 1)

    def log_step(self, it, loss, metrics=(), tokens=None):
        """The training line of step it: the loss (this process's part, summed over processes), the
        stage's metrics, the learning rate, the time per step since the last line and, given the
        batch's tokens, tokens per second."""
        dt = (time.time() - self.t_last) / (it - self.it_last)
        self.t_last, self.it_last = time.time(), it
        loss = self.d.all_reduce_mean(loss).item() * self.d.world_size
        speed = {"tokens_per_s": tokens / dt} if tokens is not None else {}
        self.log.log(it, loss=loss, **dict(metrics), lr=self.lr, ms=dt * 1000, **speed,
                     **self.guard.stats())

    @property
    def finished(self):  # False after Ctrl-C
        return self.interrupt.done == self.max_iters

    def save(self, step):  # the weights and what --resume needs
        if self.d.master:
            save_checkpoint(f"{self.cfg.out_dir}/ckpt.pt", self.model, self.cfg, self.tokenizer,
                            iter=step, max_iters=self.max_iters, **self.saved,
                            **training_state(self.d, [self.optimizer]))

    def finish(self):
        """Save (after Ctrl-C too: the state to --resume from), then exit as reliability.Interrupt
        says."""
        self.interrupt.finish(self.save, self.cfg.out_dir)
