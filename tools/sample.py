"""Sample responses from trained checkpoints and look at them side by side.

Compare checkpoints on the same prompts (the same seed for every model, so a model identical to another
gives identical samples):

    python -m tools.sample --ckpt runs/sft/ckpt.pt --ckpt runs/ppo/ckpt.pt --prompts runs/world/test_prompts.jsonl
    python -m tools.sample --ckpt runs/sft/ckpt.pt,runs/ppo/ckpt.pt --prompt "Reverse the word stone."

Any JSONL with a "prompt" field serves as --prompts (prompts, rankings, demonstrations);
data/collect.py collects SFT samples for the labelers. On a GPU add
--device cuda and a larger --batch-size. Loading, encoding, sampling and decoding are lib/sampling.py's.
"""
import sys
from dataclasses import dataclass

from data.formats import load_prompts
from data.tokenizer import get_tokenizer
from lib.common import autodetect_device, check_ranges
from lib.config import cli, join_repeated, parse_config
from lib.sampling import (decode_response, encode_queries, load_policy, make_generator, model_names,
                          sample_responses)


@dataclass
class SampleConfig:
    ckpt: str = "runs/sft/ckpt.pt"  # checkpoint(s) to compare: repeat --ckpt or separate paths with commas
    prompts: str | None = None  # JSONL with a "prompt" field (prompts, rankings or demonstrations)
    prompt: str | None = None  # one ad-hoc prompt instead of --prompts
    n: int = 8  # prompts shown: the first n of --prompts
    temperature: float = 1.0  # sampling temperature; 0 = greedy
    max_new_tokens: int = 128  # longest response, in tokens
    batch_size: int = 64  # sequences per generation batch
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    seed: int = 0  # seed of the sampler (the same for every checkpoint)

    def __post_init__(self):
        check_ranges(self, ("n", "max_new_tokens", "batch_size"))
        if (self.prompts is None) == (self.prompt is None):
            raise ValueError("give either --prompts FILE or --prompt TEXT")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not any(self.ckpt.split(",")):
            raise ValueError(f"--ckpt {self.ckpt!r} names no checkpoint")


def compare(cfg):
    device = autodetect_device() if cfg.device == "auto" else cfg.device
    prompts = [cfg.prompt] if cfg.prompt is not None else load_prompts(cfg.prompts)[:cfg.n]
    paths = [p for p in cfg.ckpt.split(",") if p]
    answers, tokenizers = {}, set()
    for name, path in zip(model_names(paths), paths):
        model, tokenizer, _ = load_policy(path, device)
        if cfg.max_new_tokens >= model.config.block_size:
            context = f"the context of {path} ({model.config.block_size} tokens)"
            raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for the prompt "
                             f"in {context}; lower it")
        tokenizers.add(tokenizer)
        tok = get_tokenizer(tokenizer)
        queries = encode_queries(tok, prompts, model.config.block_size - cfg.max_new_tokens,
                                 source=cfg.prompts or "--prompt")
        responses = sample_responses(model, queries, tok, cfg.max_new_tokens, cfg.temperature, cfg.batch_size,
                                     make_generator(device, cfg.seed), desc=name)
        answers[name] = [decode_response(tok, r) for r in responses]
    if len(tokenizers) > 1:
        print(f"note: the checkpoints use different tokenizers {sorted(tokenizers)}", file=sys.stderr)
    width = max(len(n) for n in answers)
    for i, prompt in enumerate(prompts):
        print(f"\n[{i + 1}] {prompt}")
        for name, texts in answers.items():
            print(f"  {name:<{width}} | {texts[i]!r}")


def main():
    compare(parse_config(SampleConfig, join_repeated(sys.argv[1:], "--ckpt")))


if __name__ == "__main__":
    cli(main)
