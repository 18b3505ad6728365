"""The RM checks of evaluate.py alone, without sampling any policy: how often a reward model scores
each held-out prompt's gold answer above a wrong answer in the same style, and above another
prompt's gold answer, overall and per family. Given a policy checkpoint (SFT) instead of an RM, it
scores each answer by the policy's own mean log-probability of the response: the judge an RM with
--score-logprob starts from.

    python -m experiments.rm_checks --ckpt runs/rm/ckpt.pt --prompts runs/world/test_prompts.jsonl
    python -m experiments.rm_checks --ckpt runs/sft/ckpt.pt --prompts runs/world/test_prompts.jsonl
"""
import json
from dataclasses import dataclass

import torch

from data.formats import load_prompts
from data.tokenizer import get_tokenizer
from evaluate import rm_checks
from lib.common import load_checkpoint, model_from_checkpoint
from lib.config import cli, parse_config


@dataclass
class ChecksConfig:
    ckpt: str  # a reward model, or a policy (scored by its mean log-probability of the response)
    prompts: str = "runs/world/test_prompts.jsonl"  # held-out prompts of the built-in world
    max_new_tokens: int = 128  # room kept for the answer, as evaluate.py
    batch_size: int = 64  # rows per forward pass
    seed: int = 0  # draws the wrong answers and the other prompts, as evaluate.py --seed


def main():
    cfg = parse_config(ChecksConfig)
    ckpt = load_checkpoint(cfg.ckpt)
    if ckpt["model_config"].get("head", "lm") == "lm":  # r = 0 * v_last + 1 * mean log p(response)
        model = model_from_checkpoint(ckpt, head="scalar", score_logprob=True)
        with torch.no_grad():
            model.score_head.weight.zero_()
            model.score_head.bias.zero_()
    else:
        model = model_from_checkpoint(ckpt)
    with torch.no_grad():
        tok = get_tokenizer(ckpt["tokenizer"])
        checks = rm_checks(model.eval(), load_prompts(cfg.prompts), tok, cfg)
    rounded = {name: {k: round(v, 3) for k, v in c.items()} for name, c in checks.items()}
    print(json.dumps(rounded, indent=1))


if __name__ == "__main__":
    cli(main)
