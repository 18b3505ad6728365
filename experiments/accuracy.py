"""Accuracy of policies on held-out prompts by the gold judge, overall and per family, sampled or greedy.

    python -m experiments.accuracy runs/sft/ckpt.pt runs/ppo_gold/ckpt_*.pt --prompts runs/world/test_prompts.jsonl

A quick look without evaluate.py's win rates, baselines and RM checks: one line per checkpoint.
"""
from dataclasses import dataclass, field

from data.formats import load_prompts
from data.judge import assess, by_family
from data.tokenizer import get_tokenizer
from lib.config import cli, parse_config
from lib.sampling import (decode_response, encode_queries, load_policy, make_generator,
                          sample_responses)


@dataclass
class AccuracyConfig:
    ckpts: list[str] = field(default_factory=list)  # policy checkpoints
    prompts: str = "runs/world/test_prompts.jsonl"  # prompts JSONL of the built-in world
    temperature: float = 1.0  # 0 decodes greedily
    max_new_tokens: int = 128
    batch_size: int = 600
    seed: int = 0
    device: str = "cpu"


def main():
    cfg = parse_config(AccuracyConfig)
    prompts = load_prompts(cfg.prompts)
    for path in cfg.ckpts:
        model, tokenizer, _ = load_policy(path, cfg.device)
        tok = get_tokenizer(tokenizer)
        queries = encode_queries(tok, prompts, model.config.block_size - cfg.max_new_tokens, source=cfg.prompts)
        responses = [decode_response(tok, r) for r in sample_responses(
            model, queries, tok, cfg.max_new_tokens, cfg.temperature, cfg.batch_size,
            make_generator(cfg.device, cfg.seed))]
        parts = [assess(p, r) for p, r in zip(prompts, responses)]
        right = [a["content"] == 1.0 for a in parts]
        gold = sum(a["score"] for a in parts) / len(parts)
        print(f"{path}: accuracy {sum(right) / len(right):.3f} gold {gold:.3f} distinct "
              f"{len(set(responses)) / len(responses):.2f} "
              + " ".join(f"{f} {v:.2f}" for f, v in by_family(prompts, right).items()), flush=True)


if __name__ == "__main__":
    cli(main)
