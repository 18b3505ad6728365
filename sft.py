"""Stages 0 and 1: next-token training of a GPT, pretraining from scratch or supervised fine-tuning
(SFT).

With --sft-data (JSONL prompt/response, or Alpaca) the loss counts only the response tokens and the
end-of-text token (the paper's SFT, section 3.5); with --text-data alone (.txt or JSONL {"text"})
every token counts, which is how the built-in world's base model is pretrained from scratch. With
both, a fraction --ptx-fraction of each batch is pretraining text (the paper's PPO init was SFT with
10%).

    python sft.py --text-data runs/world/pretrain.txt --out-dir runs/base          # stage 0, CPU
    python sft.py --init runs/base/ckpt.pt --sft-data runs/world/sft_train.jsonl \\
                  --val-sft-data runs/world/sft_val.jsonl --out-dir runs/sft         # stage 1
    python sft.py --init gpt2 --sft-data hh/sft_train.jsonl --compile   # one GPU
    torchrun --nproc_per_node=4 sft.py ...                              # data-parallel
    python sft.py ... --resume   # after Ctrl-C (which saves) or a crash: continue the run

Deviations from the paper: tiny models and few epochs on the built-in world; the final SFT model is
the last one, not the one with the best RM score on a validation set (the paper selects by RM
score).
"""
import math
import sys
from dataclasses import dataclass

import torch

from data.batches import (encode_example, pad_right, shuffled_indices, text_windows, val_windows,
                          warn_counts)
from data.formats import load_sft, load_text
from data.tokenizer import get_tokenizer
from lib.common import Dist, check_ranges, load_model, prepare_model, set_seed
from lib.config import cli, parse_config
from lib.reliability import preflight
from lib.training import TrainConfig, TrainingRun, check_batch_size, micro_batches, optimizer_step
from lib.weights import GPT2_NAMES
from model import GPT, GPTConfig


@dataclass
class SFTConfig(TrainConfig):
    out_dir: str = "runs/sft"  # where ckpt.pt and metrics.jsonl go
    # "scratch", a checkpoint of this project, a GPT-2 name (gpt2, gpt2-medium, ...) or HF dir
    init: str = "scratch"
    # demonstrations: JSONL {"prompt","response"} (or Alpaca); loss on responses only
    sft_data: str | None = None
    val_sft_data: str | None = None  # held-out demonstrations for the validation loss
    text_data: str | None = None  # pretraining text (.txt or JSONL {"text"}); every token counts
    val_text_data: str | None = None  # held-out pretraining text for the validation loss
    # with both data kinds: fraction of each batch that is pretraining text
    ptx_fraction: float = 0.1
    # tokenizer for --init scratch ("byte" or "gpt2"); otherwise the checkpoint's
    tokenizer: str = "byte"
    n_layer: int = 4  # scratch model: layers
    n_head: int = 4  # scratch model: attention heads
    n_embd: int = 128  # scratch model: width
    seq_len: int = 256  # longest training sequence (pretraining: the length of each text window)
    max_response_tokens: int = 0  # drop demonstrations with longer responses; 0 = keep all
    block_size: int = 0  # scratch model: context length; 0 = --seq-len
    dropout: float = 0.0  # residual/attention dropout (the paper's SFT used 0.2)
    # passes over the SFT data (over the text, when pretraining); the paper used 16
    epochs: float = 1.0
    max_iters: int = 0  # optimiser steps; 0 = derived from epochs
    batch_size: int = 32  # sequences per optimiser step, over all processes
    micro_batch_size: int = 32  # sequences per forward pass; the rest is gradient accumulation
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.1  # AdamW weight decay on matrices
    eval_interval: int = 100  # steps between validation losses
    eval_batches: int = 20  # validation micro-batches per evaluation

    def __post_init__(self):
        super().__post_init__()  # the shared settings' ranges (common.RunConfig)
        if not self.sft_data and not self.text_data:
            raise ValueError("give --sft-data (demonstrations), --text-data (pretraining text) "
                             "or both")
        check_ranges(self, (), ("max_response_tokens",))
        if not 0.0 <= self.ptx_fraction < 1.0:
            raise ValueError(f"--ptx-fraction must be in [0, 1), got {self.ptx_fraction}")


class Batches:
    """The global batch of step `it`, the same on every rank: SFT examples in epoch-shuffled order
    and pretraining windows at random offsets. Derived from `it` alone, so any step can be
    reproduced."""

    def __init__(self, examples, text_tokens, cfg, seq_len):
        self.examples, self.text, self.seq_len, self.seed = examples, text_tokens, seq_len, cfg.seed
        if not examples:
            self.n_text = cfg.batch_size  # pretraining
        else:
            self.n_text = round(cfg.ptx_fraction * cfg.batch_size) if text_tokens is not None else 0
        self.n_sft = cfg.batch_size - self.n_text
        if text_tokens is not None and len(text_tokens) <= seq_len + 1:
            raise ValueError(f"pretraining text has {len(text_tokens)} tokens, fewer than "
                             f"--seq-len {seq_len} + 2")

    def iters_per_epoch(self):
        if self.examples:
            return math.ceil(len(self.examples) / self.n_sft)
        return math.ceil(len(self.text) / (self.seq_len * self.n_text))

    def __call__(self, it):
        batch = []
        if self.n_sft:
            order = shuffled_indices(len(self.examples), it * self.n_sft, self.n_sft, self.seed)
            batch += [self.examples[i] for i in order]
        if self.n_text:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + it)
            batch += text_windows(self.text, self.n_text, self.seq_len, g)
        return batch


# exercise: sft_loss_mask
def sft_loss_mask(targets, n_query):
    """(B, T) True on the targets the SFT loss counts: the response and its end-of-text, i.e. target
    positions >= n_query - 1 (position t predicts token t + 1), and never padding (target -1).
    Pretraining text has n_query = 0: every token counts. targets (B, T), n_query (B,)."""
    pos = torch.arange(targets.size(1), device=targets.device).unsqueeze(0)  # (1, T)
    return (pos >= n_query.unsqueeze(1) - 1) & (targets >= 0)


def collate(batch, device):
    """Inputs x, targets y (-1 at padding) and the loss mask of a list of (ids, n_query)
    examples."""
    x = pad_right([ids[:-1] for ids, _ in batch], 0)
    y = pad_right([ids[1:] for ids, _ in batch], -1)
    mask = sft_loss_mask(y, torch.tensor([nq for _, nq in batch]))
    return x.to(device), y.to(device), mask.to(device)


def encode_demonstrations(path, tok, seq_len, max_response_tokens=0):
    """(ids, n_query) of each demonstration in the chat template, in at most seq_len + 1 tokens, and
    with a response of at most max_response_tokens (when > 0; others are dropped, warned)."""
    records, stats = load_sft(path), {}
    out = [e for r in records if (e := encode_example(tok, r["prompt"], r["response"], seq_len + 1,
                                                      stats))]
    warn_counts(path, stats, len(records), max_len=seq_len)
    if max_response_tokens:
        kept = [(ids, n) for ids, n in out if len(ids) - n <= max_response_tokens]
        if len(kept) < len(out):
            cut = len(out) - len(kept)
            share = f"{cut} of {len(records)} demonstrations ({cut / len(records):.0%})"
            print(f"warning: {path}: {share} dropped: their response is longer than "
                  f"--max-response-tokens {max_response_tokens}", file=sys.stderr)
        if not kept:
            raise ValueError(f"{path}: no demonstration's response fits in --max-response-tokens "
                             f"{max_response_tokens}")
        out = kept
    return out


def train_step(ddp_model, optimizer, guard, batch, it, cfg, d):
    """One optimiser step on a global batch of (ids, n_query) examples; returns this process's part
    of the loss per counted token. The loss is normalised by the counted tokens of the whole global
    batch, so that it (and its gradient) is the same however the batch is split over micro-batches
    and processes."""
    # the targets sft_loss_mask counts
    n_global = sum(len(ids) - max(n_query, 1) for ids, n_query in batch)
    loss_sum = torch.zeros((), device=d.device)
    for examples in micro_batches(ddp_model, batch, cfg, d):
        x, y, mask = collate(examples, d.device)
        with d.autocast():
            _, loss = ddp_model(x, y, loss_mask=mask)
        # DDP averages gradients over processes: scale by world_size to get a sum over the global
        # batch
        scaled = loss * mask.sum() / n_global
        (scaled * d.world_size).backward()
        loss_sum += scaled.detach()
    optimizer_step(ddp_model, optimizer, guard, it, loss_sum, cfg.grad_clip)
    return loss_sum


@torch.no_grad()
def validation_loss(model, examples, cfg, d):
    """Mean loss per counted token over (up to eval_batches micro-batches of) the validation
    examples."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, min(len(examples), cfg.eval_batches * cfg.micro_batch_size),
                   cfg.micro_batch_size):
        x, y, mask = collate(examples[i:i + cfg.micro_batch_size], d.device)
        with d.autocast():
            _, loss = model(x, y, loss_mask=mask)
        total += loss.item() * mask.sum().item()
        count += mask.sum().item()
    model.train()
    return total / max(count, 1)


def init_model(cfg):
    """(tokenizer, model, checkpoint) to train: a fresh GPT of the configured shape (--init scratch;
    checkpoint None), or the weights of --init, or with --resume those of the interrupted run."""
    init = f"{cfg.out_dir}/ckpt.pt" if cfg.resume else cfg.init
    if init != "scratch":
        return load_model(init, "lm", cfg.dropout, kind="lm")
    config = GPTConfig(block_size=cfg.block_size or cfg.seq_len,
                       vocab_size=get_tokenizer(cfg.tokenizer).n_vocab, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout)
    return cfg.tokenizer, GPT(config), None


def main():
    # -- config, model (before the data: its tokenizer and context length decide its encoding)
    cfg = parse_config(SFTConfig)
    d = Dist(cfg.device, cfg.dtype)
    check_batch_size(cfg, d)
    preflight(cfg, {"--init": cfg.init if cfg.init not in ("scratch", *GPT2_NAMES) else None,
                    "--sft-data": cfg.sft_data, "--val-sft-data": cfg.val_sft_data,
                    "--text-data": cfg.text_data, "--val-text-data": cfg.val_text_data}, d)
    set_seed(cfg.seed)  # the same init on every rank
    tokenizer, model, ckpt = init_model(cfg)
    tok = get_tokenizer(tokenizer)
    seq_len = min(cfg.seq_len, model.config.block_size)
    model, ddp_model = prepare_model(model, cfg, d)
    if d.master:
        print(f"model: {model.get_num_params() / 1e6:.2f}M parameters, tokenizer {tokenizer}, "
              f"device {d.device}, {d.world_size} process(es)")

    # -- data: demonstrations (loss on the response) and/or pretraining text (loss on every token)
    def demonstrations(path):
        return encode_demonstrations(path, tok, seq_len, cfg.max_response_tokens) if path else []
    train_sft, val_sft = demonstrations(cfg.sft_data), demonstrations(cfg.val_sft_data)
    text = torch.tensor(tok.encode(load_text(cfg.text_data))) if cfg.text_data else None
    val_text = val_windows(torch.tensor(tok.encode(load_text(cfg.val_text_data))), seq_len,
                           cfg.eval_batches * cfg.micro_batch_size) if cfg.val_text_data else []
    # the longest response taught, with its end-of-text: ppo.py, evaluate.py and tools/sample.py
    # check that they let the policy say that much (an answer cut off is scored as unended)
    longest = {}
    if train_sft:
        longest["max_response_tokens"] = max(len(ids) - n_query for ids, n_query in train_sft)
    batches = Batches(train_sft, text, cfg, seq_len)
    max_iters = cfg.max_iters or max(1, round(cfg.epochs * batches.iters_per_epoch()))
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2),
                                           d.device_type)

    # -- training loop; its plumbing (log, --resume, saves, Ctrl-C, bad steps): lib/training.py
    desc = "sft" if cfg.sft_data else "pretrain"
    run = TrainingRun(cfg, d, model, tokenizer, optimizer, max_iters, ckpt, desc, **longest)
    for it in run.steps():
        batch = batches(it)
        loss = train_step(ddp_model, optimizer, run.guard, batch, it, cfg, d)
        if run.is_log_step(it):
            run.log_step(it, loss, tokens=sum(len(ids) - 1 for ids, _ in batch))
        if (val_sft or val_text) and run.is_eval_step(it):
            metrics = {}
            if val_sft:
                metrics["val_loss"] = validation_loss(model, val_sft, cfg, d)
            if val_text:
                metrics["val_text_loss"] = validation_loss(model, val_text, cfg, d)
            run.log.log(it, **metrics)
    run.finish()


if __name__ == "__main__":
    cli(main)
