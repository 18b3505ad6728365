"""Collect K = 4..9 samples per prompt from the SFT model: the input of the simulated labelers (the
paper's labelers rank K = 4..9 model outputs per prompt, section 3.5).

    python -m data.collect --ckpt runs/sft/ckpt.pt --prompts runs/world/rankings_train.jsonl \\
                           --out runs/samples_train.jsonl
    python -m data.world rank --samples runs/samples_train.jsonl --out runs/rankings_sft.jsonl

Any JSONL with a "prompt" field serves as --prompts. On a GPU add --device cuda and a larger
--batch-size.
"""
import os
import random
from dataclasses import dataclass

from data.formats import load_prompts, write_jsonl
from data.tokenizer import get_tokenizer
from lib.common import autodetect_device, check_max_new_tokens, check_ranges
from lib.config import cli, parse_config
from lib.sampling import (decode_response, encode_queries, load_policy, make_generator,
                          sample_responses)


@dataclass
class CollectConfig:
    ckpt: str = "runs/sft/ckpt.pt"  # the policy to sample from (the paper: SFT, then later ones)
    prompts: str = "runs/world/rankings_train.jsonl"  # JSONL with a "prompt" field
    out: str = "runs/samples_train.jsonl"  # JSONL {"prompt", "responses"} for data.world rank
    k_min: int = 4  # fewest samples per prompt (the paper: 4)
    k_max: int = 9  # most samples per prompt (the paper: 9)
    max_prompts: int = 0  # use the first N prompts; 0 = all
    temperature: float = 1.0  # sampling temperature (the paper samples at 1)
    max_new_tokens: int = 128  # longest response (at least the longest demonstration)
    batch_size: int = 64  # sequences per generation batch
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    seed: int = 0  # seed of K and of the sampler

    def __post_init__(self):
        check_ranges(self, ("max_new_tokens", "batch_size"), ("max_prompts",))  # max_prompts 0: all
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"need 1 <= --k-min <= --k-max, got {self.k_min}, {self.k_max}")
        if self.temperature <= 0:
            raise ValueError("--temperature must be > 0: greedy decoding gives K identical "
                             "responses")


def collect(cfg):
    if os.path.isdir(cfg.out):  # found before any sampling, not after it
        raise ValueError(f"--out {cfg.out} is a directory; give a file name")
    device = autodetect_device() if cfg.device == "auto" else cfg.device
    prompts = load_prompts(cfg.prompts)
    prompts = prompts[:cfg.max_prompts] if cfg.max_prompts else prompts
    model, tokenizer, ckpt = load_policy(cfg.ckpt, device)
    check_max_new_tokens(ckpt, cfg.max_new_tokens, cfg.ckpt)
    tok = get_tokenizer(tokenizer)
    rng = random.Random(f"{cfg.seed}/k")
    ks = [rng.randint(cfg.k_min, cfg.k_max) for _ in prompts]  # K ~ uniform on [k_min, k_max]
    max_query = model.config.block_size - cfg.max_new_tokens
    queries = encode_queries(tok, prompts, max_query, source=cfg.prompts)
    contexts = [q for q, k in zip(queries, ks) for _ in range(k)]  # each prompt K times, in order
    responses = sample_responses(model, contexts, tok, cfg.max_new_tokens, cfg.temperature,
                                 cfg.batch_size, make_generator(device, cfg.seed), desc="collect")
    records, start = [], 0
    for prompt, k in zip(prompts, ks):
        texts = [decode_response(tok, r) for r in responses[start:start + k]]
        records.append({"prompt": prompt, "responses": texts})
        start += k
    write_jsonl(cfg.out, records)
    empty = sum(not r for rec in records for r in rec["responses"])
    print(f"wrote {len(contexts)} samples for {len(records)} prompts (K {cfg.k_min}..{cfg.k_max}, "
          f"{empty} empty) -> {cfg.out}")


def main():
    collect(parse_config(CollectConfig))


if __name__ == "__main__":
    cli(main)
