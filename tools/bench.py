"""Throughput benchmark of model.GPT against Hugging Face's GPT2LMHeadModel of the same shape.

For each model shape (tiny: 4 layers, 4 heads, 128 wide, byte vocabulary 258, context 256; gpt2: the
124M GPT-2 shape, 12 layers, 12 heads, 768 wide, vocabulary 50257, context 1024), on one device:
- training tokens/s of a full step (forward + backward + AdamW from model.configure_optimizers) and MFU
  (estimate_mfu; nan where the peak FLOP/s is unknown, as on CPU), with the hand-written attention;
  with --compile also GPT(config, compile=True), warmed up (compiled) before timing, for decode too;
- decode tokens/s of model.generate with the KV cache (batch 16, 32-token random prompts, 128 new tokens,
  sampling at temperature 1, no top-k, no end-of-text): B * 128 new tokens / seconds (prefill included),
  and the same without the cache (use_cache=False). On CUDA also batch 64;
- the same for transformers' GPT2LMHeadModel (random init, dropout 0), with attn_implementation "eager"
  (hand-written attention, like ours) and "sdpa" (its default), printed as ratios ours / theirs.
  Decode there is hf.generate(max_new_tokens=128, min_new_tokens=128, do_sample=True, top_k=0).
- with --ppo, ppo.py's own iterations on random weights of the shape: the split of an iteration's time
  between generation, scoring and training (64 rollouts, ~64-token prompts, 128-token responses).
transformers is optional: without it those columns are skipped.

Timing: every function is warmed up, then all of them run round-robin (ours, theirs, ours, ...) in one
process and each figure is the median of the repeats, so that load on a shared machine affects all alike.
torch's default thread count; eval() and no_grad for decode, train() for training; on CUDA bf16 autocast
and torch.cuda.synchronize() around every timed call.

Run:
  python -m tools.bench                              # CPU or the GPU if present; both shapes (~4 min on 2 cores)
  python -m tools.bench --device cpu --quick         # smoke test: one repeat, few tokens, small batches
  python -m tools.bench --device cuda --compile      # GPU, bf16, also the torch.compile'd training step
  python -m tools.bench --configs tiny --compile     # CPU inductor needs gcc; compiling takes a while
  python -m tools.bench --device cuda --configs gpt2 --compile --ppo   # every GPU goal (a few minutes)
  python -m tools.bench ... --json-out b.json        # the figures also as JSON (experiments/gpu_check.sh)

Deliberate shortcuts: on CPU the gpt2 shape trains with B=4, T=256 (not the full 1024 context), and its
no-cache decode runs only 8 new tokens (128 would take minutes on 2 cores): since the no-cache cost per
token grows with length, the printed cache / no-cache ratio is then a lower bound of the 128-token one.
MFU counts attention FLOPs at the full context (estimate_mfu), so with T < block_size it is an
overestimate of the attention part.
"""
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from data.tokenizer import get_tokenizer
from lib.common import Dist, save_checkpoint
from lib.config import parse_config
from model import GPT, GPTConfig

try:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # its config warns about an unset loss_type on every model
except ImportError:
    GPT2LMHeadModel = None



# --- device peak FLOP/s, for MFU -------------------------------------------------------------------------
PEAK_BF16_FLOPS = {  # dense bf16 tensor-core peak per device name fragment (vendor data sheets)
    "H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "A10": 125e12,
    "L40S": 362e12, "L4": 121e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def peak_flops(device):
    """Peak bf16 FLOP/s of a CUDA device by name, or None when unknown (then MFU is reported as nan)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():  # ordered: "H100 PCIe" is tried before "H100"
        if key in name:
            return flops
    return None


def estimate_mfu(model, fwdbwd_per_iter, dt, device=None):
    """Model FLOPs utilisation: achieved FLOP/s (PaLM appendix B count) / the device's peak."""
    cfg = model.config
    L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
    flops_per_token = 6 * model.get_num_params() + 12 * L * H * Q * T
    flops_per_iter = flops_per_token * T * fwdbwd_per_iter
    peak = peak_flops(device if device is not None else next(model.parameters()).device)
    return flops_per_iter / dt / peak if peak else float("nan")

@dataclass
class BenchConfig:
    device: str = "auto"  # auto | cpu | cuda
    configs: str = "tiny,gpt2"  # comma-separated model shapes: tiny, gpt2
    compile: bool = False  # also time training of GPT(config, compile=True)
    quick: bool = False  # smoke test: one repeat, few tokens, small batches (figures not meaningful)
    ppo: bool = False  # also time ppo.py iterations (batch 64, ~64-token prompts, 128-token responses)
    repeats: int = 3  # timed repeats per measurement; the median is reported
    seed: int = 0  # seed for weights, prompts and sampling
    json_out: str | None = None  # also write every figure to this JSON file (nan, as CPU MFU: null)


SHAPES = {
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=258, block_size=256),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
}
# training (B, T) per (shape, device type): a few seconds a step on 2 CPU cores, the full context on a GPU
TRAIN_BT = {("tiny", "cpu"): (16, 256), ("gpt2", "cpu"): (4, 256),
            ("tiny", "cuda"): (32, 256), ("gpt2", "cuda"): (16, 1024)}
PROMPT_LEN, NEW_TOKENS = 32, 128
NOCACHE_TOKENS = {("gpt2", "cpu"): 8}  # new tokens of the no-cache decode where 128 is too slow


def sync(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()


def cpu_busy_s():
    """Seconds all cores have been busy since boot (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def interleaved(fns, repeats, device_type, min_total_s=5.0):
    """Median seconds of each zero-argument function, all run round-robin: at least `repeats` rounds, and
    more (up to 50) until min_total_s have passed, so that fast calls (the tiny model) get enough samples."""
    times = {name: [] for name in fns}
    start = time.perf_counter()
    while len(times["ours"]) < repeats or (time.perf_counter() - start < min_total_s and len(times["ours"]) < 50):
        for name, fn in fns.items():
            sync(device_type)
            t0 = time.perf_counter()
            fn()
            sync(device_type)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def adamw(model, device_type):
    """AdamW as model.configure_optimizers builds it (decay on matrices only), for any model."""
    return GPT.configure_optimizers(model, weight_decay=0.1, learning_rate=1e-4, betas=(0.9, 0.95),
                                    device_type=device_type)


def train_step(model, loss_fn, x, autocast, device_type):
    """A closure running one forward + backward + AdamW step on the batch x (B, T)."""
    model.train()
    opt = adamw(model, device_type)

    def step():
        with autocast():
            loss = loss_fn(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def hf_model(cfg, attn):
    """GPT2LMHeadModel of the shape of cfg, dropout 0, no special tokens (nothing stops generation early)."""
    hf_cfg = GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size,
                        n_positions=cfg.block_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None, attn_implementation=attn)
    return GPT2LMHeadModel(hf_cfg)


def bench_train(name, cfg, bc, dev, hfs):
    B, T = (2, 64) if bc.quick else TRAIN_BT[(name, dev.device_type)]
    x = torch.randint(0, cfg.vocab_size, (B, T), device=dev.device)  # (B, T)
    ours = GPT(cfg).to(dev.device)
    fns = {"ours": train_step(ours, lambda m, x: m(x, targets=x)[1], x, dev.autocast, dev.device_type)}
    if bc.compile:
        compiled = GPT(cfg, compile=True).to(dev.device)
        fns["compiled"] = train_step(compiled, lambda m, x: m(x, targets=x)[1], x, dev.autocast, dev.device_type)
    for attn, hf in hfs.items():
        fns[attn] = train_step(hf, lambda m, x: m(input_ids=x, labels=x).loss, x, dev.autocast, dev.device_type)
    for name, fn in fns.items():  # warm-up: optimizer state, first-touch memory; compilation (may recompile)
        for _ in range(2 if name == "compiled" else 1):
            fn()
    secs = interleaved(fns, 1 if bc.quick else bc.repeats, dev.device_type, 0.0 if bc.quick else 5.0)
    tok_s = {k: B * T / s for k, s in secs.items()}
    # estimate_mfu counts a step as fwdbwd_per_iter sequences of block_size tokens
    mfu = {k: estimate_mfu(ours, B * T / cfg.block_size, secs[k]) for k in ("ours", "compiled") if k in secs}
    del fns, ours
    return (B, T), tok_s, mfu


def bench_decode(name, cfg, bc, dev, hfs, B, ours, compiled=None):
    new = 16 if bc.quick else NEW_TOKENS
    new_nc = min(new, NOCACHE_TOKENS.get((name, dev.device_type), new))
    g = torch.Generator(device=dev.device).manual_seed(bc.seed)
    prompts = torch.randint(0, cfg.vocab_size, (B, PROMPT_LEN), device=dev.device)  # (B, T0)
    ones = torch.ones_like(prompts)

    def ours_fn(n, use_cache=True, model=ours):
        with dev.autocast():
            out = model.generate(prompts, n, temperature=1.0, top_k=None, use_cache=use_cache, generator=g)
        assert out.shape == (B, PROMPT_LEN + n)

    def hf_fn(hf, n):
        with torch.no_grad(), dev.autocast():
            out = hf.generate(input_ids=prompts, attention_mask=ones, max_new_tokens=n, min_new_tokens=n,
                              do_sample=True, top_k=0, pad_token_id=0)
        assert out.shape == (B, PROMPT_LEN + n), f"transformers stopped early: {tuple(out.shape)}"

    fns = {"ours": lambda n=new: ours_fn(n), "nocache": lambda n=new_nc: ours_fn(n, use_cache=False)}
    if compiled is not None:  # the same weights, forward torch.compile'd (the decode steps' shapes vary)
        fns["compiled"] = lambda n=new: ours_fn(n, model=compiled)
    fns.update({attn: (lambda n=new, hf=hf: hf_fn(hf, n)) for attn, hf in hfs.items()})
    for fn in fns.values():  # warm-up on a few tokens: every kernel and code path runs once
        fn(min(new, 8))
    secs = interleaved(fns, 1 if bc.quick else bc.repeats, dev.device_type, 0.0 if bc.quick else 5.0)
    return {k: B * (new_nc if k == "nocache" else new) / s for k, s in secs.items()}, new_nc


def bench_ppo(name, cfg, bc, dev):
    """ppo.py itself on random weights of the shape (policy = reference, RM = value init): a few iterations
    of 64 rollouts, prompts of about 64 tokens, 128-token responses (random weights rarely end early).
    Prints (and returns) how an iteration's time splits between generation, scoring and training,
    from its metrics."""
    tokenizer = "byte" if cfg.vocab_size == 258 else "gpt2"
    tok = get_tokenizer(tokenizer)
    batch, new, iters = (8, 16, 2) if bc.quick else (64, 128, 4)
    words = ["time", "water", "light", "river", "stone", "story", "garden", "number", "answer", "question"]
    rnd = random.Random(bc.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(bc.seed)
        save_checkpoint(tmp / "sft.pt", GPT(cfg), {}, tokenizer)
        save_checkpoint(tmp / "rm.pt", GPT(replace(cfg, head="scalar")), {}, tokenizer)
        prompts = []
        for _ in range(batch * iters):
            text = ""
            while len(tok.encode(text)) < 58:  # + the chat template's tokens: about 64
                text += rnd.choice(words) + " "
            prompts.append(json.dumps({"prompt": text.strip()}))
        (tmp / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
        cmd = [sys.executable, str(Path(__file__).resolve().parent.parent / "ppo.py"), "--sft", str(tmp / "sft.pt"), "--rm",
               str(tmp / "rm.pt"), "--prompts", str(tmp / "prompts.jsonl"), "--out-dir", str(tmp / "ppo"),
               "--total-episodes", str(batch * iters), "--batch-size", str(batch), "--minibatch-size",
               str(batch // 4), "--max-new-tokens", str(new), "--device", dev.device, "--save-interval", "0",
               "--sample-interval", "1000"] + (["--compile"] if bc.compile else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"error: ppo.py failed:\n{res.stderr[-3000:]}")
        rows = [json.loads(line) for line in open(tmp / "ppo" / "metrics.jsonl")][1:]  # the first warms up
    parts = {k: statistics.mean(r[f"time_{k}"] for r in rows) for k in ("generate", "score", "train")}
    total = sum(parts.values())
    print(f"\nPPO iteration ({name}, ppo.py, {batch} rollouts, ~64-token prompts, {new}-token responses, "
          f"mean of {len(rows)} after the first): {total:.2f} s = "
          + ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in parts.items()))
    if name == "gpt2" and dev.device_type == "cuda":
        print(f"  goal: generation <= 50% of the iteration: {'met' if parts['generate'] <= total / 2 else 'MISSED'}")
    return {"shape": name, "rollouts": batch, "new_tokens": new, "iterations": len(rows),
            "iteration_s": total, **{f"{k}_s": v for k, v in parts.items()},
            "generate_share": parts["generate"] / total}


def write_figures(path, head, train_rows, decode_rows, ppo_rows, bc):
    """Every figure of the tables (and of --ppo) as JSON, nan as null, for scripts to read."""
    def nums(figures):
        return {k: v if math.isfinite(v) else None for k, v in figures.items()}
    new = 16 if bc.quick else NEW_TOKENS
    train = [{"shape": name, "batch": B, "seq_len": T, "tokens_per_s": nums(t), "mfu": nums(mfu)}
             for name, (B, T), t, mfu in train_rows]
    decode = [{"shape": name, "batch": B, "new_tokens": new, "nocache_new_tokens": new_nc,
               "tokens_per_s": nums(d)} for name, B, d, new_nc in decode_rows]
    figures = {**head, "train": train, "decode": decode, "ppo": ppo_rows}
    Path(path).write_text(json.dumps(figures, indent=1) + "\n")


def ratio(a, b):
    return f"{a / b:.2f}x" if b else "-"


def main():
    bc = parse_config(BenchConfig)
    dev = Dist(bc.device)
    names = [n.strip() for n in bc.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"error: unknown --configs {unknown}; choose from {list(SHAPES)}")
    if dev.device_type not in ("cpu", "cuda"):
        raise SystemExit(f"error: no batch sizes for device {dev.device!r}; pass --device cpu or --device cuda")
    card = torch.cuda.get_device_name(dev.device) if dev.device_type == "cuda" else "cpu"
    print(f"device: {dev.device} ({card}), torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (", bf16 autocast" if dev.device_type == "cuda" else ", fp32"))
    if GPT2LMHeadModel is None:
        print("transformers not installed: skipping the comparison with GPT2LMHeadModel")
    busy0, own0, wall0 = cpu_busy_s(), time.process_time(), time.perf_counter()
    decode_batches = (16, 64) if dev.device_type == "cuda" else (16,)
    train_rows, decode_rows = [], []
    for name in names:
        cfg = SHAPES[name]
        torch.manual_seed(bc.seed)
        hfs = {} if GPT2LMHeadModel is None else {a: hf_model(cfg, a).to(dev.device) for a in ("eager", "sdpa")}
        t0 = time.perf_counter()
        bt, tok_s, mfu = bench_train(name, cfg, bc, dev, hfs)
        train_rows.append((name, bt, tok_s, mfu))
        for hf in hfs.values():
            hf.eval()
        ours = GPT(cfg).to(dev.device).eval()
        compiled = None
        if bc.compile:
            compiled = GPT(cfg).to(dev.device).eval()
            compiled.load_state_dict(ours.state_dict())
            compiled.compile()
        for B in decode_batches:
            dec, new_nc = bench_decode(name, cfg, bc, dev, hfs, B, ours, compiled)
            decode_rows.append((name, B, dec, new_nc))
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
        del hfs, ours
    print_tables(train_rows, decode_rows, bc)
    head = {"device": dev.device, "card": card, "torch": torch.__version__, "dtype": dev.dtype,
            "quick": bc.quick, "compile": bc.compile, "transformers": GPT2LMHeadModel is not None}
    if bc.json_out:  # now, so that a failing ppo.py still leaves these figures
        write_figures(bc.json_out, head, train_rows, decode_rows, [], bc)
    if busy0 is not None:
        others = (cpu_busy_s() - busy0 - (time.process_time() - own0)) / (time.perf_counter() - wall0)
        print(f"\nother processes used {others:.2f} of {os.cpu_count()} cores during the run"
              + (": contention slows many small ops more than few large ones, ratios are unreliable" if others > 0.2 else ""))
    if bc.ppo:  # after the load check: ppo.py runs as a separate process
        ppo_rows = [bench_ppo(name, SHAPES[name], bc, dev) for name in names]
        if bc.json_out:
            write_figures(bc.json_out, head, train_rows, decode_rows, ppo_rows, bc)


def print_tables(train_rows, decode_rows, bc):
    hf = GPT2LMHeadModel is not None
    head = f"{'shape':<6} {'B x T':>9} {'ours tok/s':>11} {'MFU':>6}"
    head += f" {'compiled':>10} {'MFU':>6}" if bc.compile else ""
    head += f" {'HF eager':>10} {'ours/eager':>10} {'HF sdpa':>10} {'ours/sdpa':>10}" if hf else ""
    print("\ntraining (forward + backward + AdamW)\n" + head)
    for name, (B, T), t, mfu in train_rows:
        line = f"{name:<6} {f'{B}x{T}':>9} {t['ours']:>11.0f} {mfu['ours']:>6.1%}"
        if bc.compile:
            line += f" {t['compiled']:>10.0f} {mfu['compiled']:>6.1%}"
        if hf:
            line += f" {t['eager']:>10.0f} {ratio(t['ours'], t['eager']):>10} {t['sdpa']:>10.0f}"
            line += f" {ratio(t['ours'], t['sdpa']):>10}"
        print(line)
    head = f"{'shape':<6} {'B':>3} {'ours tok/s':>11} {'no-cache':>9} {'(new)':>5} {'cache/no':>9}"
    head += f" {'compiled':>10}" if bc.compile else ""
    head += f" {'HF eager':>10} {'ours/eager':>10} {'HF sdpa':>10} {'ours/sdpa':>10}" if hf else ""
    print(f"\ndecode ({PROMPT_LEN}-token prompts, {16 if bc.quick else NEW_TOKENS} new tokens, KV cache)\n" + head)
    for name, B, d, new_nc in decode_rows:
        line = f"{name:<6} {B:>3} {d['ours']:>11.0f} {d['nocache']:>9.0f} {new_nc:>5} {ratio(d['ours'], d['nocache']):>9}"
        line += f" {d['compiled']:>10.0f}" if bc.compile else ""
        if hf:
            line += f" {d['eager']:>10.0f} {ratio(d['ours'], d['eager']):>10} {d['sdpa']:>10.0f}"
            line += f" {ratio(d['ours'], d['sdpa']):>10}"
        print(line)
    print_goals(train_rows, decode_rows, bc, hf)


def print_goals(train_rows, decode_rows, bc, hf):
    """The project's targets on 2 CPU cores; those against transformers are checked against each attention."""
    goals = []  # (what, ours / reference for each reference)
    for name, B, d, new_nc in decode_rows:
        if B != 16:
            continue
        goals.append((f"{name} decode >= 5x no-cache ({new_nc} new)", 5.0, {"": d["ours"] / d["nocache"]}))
        if hf:
            goals.append((f"{name} decode >= {1.5 if name == 'tiny' else 1.0}x transformers generate",
                          1.5 if name == "tiny" else 1.0, {a: d["ours"] / d[a] for a in ("eager", "sdpa")}))
    if hf:
        goals += [(f"{name} training (eager) >= 1.0x transformers", 1.0,
                   {a: t["ours"] / t[a] for a in ("eager", "sdpa")}) for name, _, t, _ in train_rows]
    for name, B, d, _ in decode_rows:  # the GPU goals (batch 64 is measured on CUDA only)
        if B == 64 and hf and bc.compile:
            goals.append((f"{name} decode B=64 compiled >= 3x transformers", 3.0,
                          {a: d["compiled"] / d[a] for a in ("eager", "sdpa")}))
    for name, (B, T), t, mfu in train_rows:
        if name == "gpt2" and T == 1024 and bc.compile:
            goals.append(("gpt2 training MFU (compiled, T=1024) >= 40%", 0.4, {"": mfu["compiled"]}))
    print("\ngoals" + (" (--quick: not meaningful)" if bc.quick else ""))
    for what, target, ratios in goals:
        shown = "  ".join(f"{r:5.2f}x{' vs ' + a if a else ''}" for a, r in ratios.items())
        met = [a for a, r in ratios.items() if r >= target]
        verdict = "met" if len(met) == len(ratios) else ("MISSED" if not met else f"met vs {met[0]} only")
        print(f"  {what:<48} {shown:<30} {verdict}")


if __name__ == "__main__":
    main()
