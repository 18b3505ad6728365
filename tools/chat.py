"""Talk to a trained model: type a prompt, watch the answer stream in, keep the conversation going.

    python -m tools.chat --ckpt runs/ppo_ptx/ckpt.pt                           # one model
    python -m tools.chat --ckpt runs/sft/ckpt.pt --ckpt runs/ppo_ptx/ckpt.pt   # two models answer each prompt
    python -m tools.chat --ckpt runs/hh/ppo_ptx/ckpt.pt --device cuda --temperature 0.7 --top-p 0.9
    echo "Add 7 and 5." | python -m tools.chat --ckpt runs/sft/ckpt.pt --temperature 0   # scripted

Each turn is written in the chat template every stage trains on ("\\n\\nHuman: ...\\n\\nAssistant: ...", see
data/formats.py), with the earlier turns in front: when the conversation no longer fits the context
(block_size minus --max-new-tokens), the oldest turns are dropped, and a single prompt that is still too long
loses tokens on the left, as in training. With two models each keeps its own conversation (its own answers)
and samples with its own generator seeded by --seed, so two identical checkpoints answer identically.
The built-in world's models were trained on single-turn prompts only: talk to them with --no-history;
multi-turn talk is for GPT-2-based runs (train.sh hh). Type /reset to forget the conversation; Ctrl-D or
Ctrl-C at the prompt quits, Ctrl-C during an answer stops that answer.
"""
import codecs
import sys
from dataclasses import dataclass

import torch

from data.formats import ASSISTANT, HUMAN, encode_chat, truncate_left
from data.tokenizer import get_tokenizer
from lib.common import autodetect_device
from lib.config import cli, join_repeated, parse_config
from lib.sampling import decode_response, load_policy, model_names


@dataclass
class ChatConfig:
    ckpt: str = "runs/ppo_ptx/ckpt.pt"  # a policy checkpoint (or gpt2, a Hugging Face directory); repeat --ckpt for two
    temperature: float = 1.0  # sampling temperature (evaluate.py's sampled rows use 1); 0 = greedy
    top_k: int | None = None  # sample among the k most likely tokens only
    top_p: float | None = None  # sample among the smallest set of tokens with probability >= p (nucleus)
    max_new_tokens: int = 128  # longest answer, in tokens
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    seed: int = 0  # seed of each model's sampler
    history: bool = True  # show the model the earlier turns (--no-history: every prompt on its own)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


class Conversation:
    """One model's side of the chat: its earlier turns, and how to turn them into a query that fits."""

    def __init__(self, name, model, tok, room):
        self.name, self.model, self.tok, self.room = name, model, tok, room
        self.turns = []  # [(prompt, answer)] of earlier turns

    def query(self, prompt):
        """Token ids of the whole conversation plus the new prompt, cut to fit: a multi-turn prompt is every
        turn joined in the template, first human message without its "\\n\\nHuman: " (data/formats.py)."""
        turns, cut = list(self.turns), False
        while True:
            text = "".join(f"{p}{ASSISTANT} {a}{HUMAN}" for p, a in turns) + prompt
            ids = encode_chat(self.tok, text)[0]
            if len(ids) <= self.room or not turns:
                break
            turns, cut = turns[1:], True  # the oldest turn goes first
        ids, cut_left = truncate_left(ids, self.room)
        if cut or cut_left:
            print(f"({self.name}: the conversation is cut to its last {len(ids)} tokens to fit the context)",
                  file=sys.stderr)
        return ids


# control characters other than newline and tab, shown as \x1b and so on: a model's ESC sequences must not
# move the cursor, clear the screen or retitle the user's terminal
CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0)) if chr(c) not in "\n\t"}


class Printer:
    """Prints a row's tokens as they arrive. Bytes are decoded incrementally, so a character split over
    several tokens appears once complete; the template's leading space is not shown, control characters
    are escaped (CONTROL_ESCAPES)."""

    def __init__(self, tok):
        self.tok, self.ended, self.started = tok, False, False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, tokens):  # tokens: (1,) the token just sampled
        token = tokens[0].item()
        if self.ended or token in (self.tok.eot_token, self.tok.pad_token):
            self.ended = True
            return
        text = self.decoder.decode(self.tok.enc.decode_single_token_bytes(token))
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        print(text.translate(CONTROL_ESCAPES), end="", flush=True)


@torch.no_grad()
def answer(conv, prompt, cfg, generator):
    """Stream one answer to prompt; returns its text (what decode_response gives for the same tokens)."""
    idx = torch.tensor([conv.query(prompt)], device=next(conv.model.parameters()).device)  # (1, T)
    printer = Printer(conv.tok)
    tokens = conv.model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                 top_p=cfg.top_p, eos_token_id=conv.tok.eot_token, pad_token_id=conv.tok.pad_token,
                                 generator=generator, streamer=printer)
    print(printer.decoder.decode(b"", final=True).translate(CONTROL_ESCAPES), flush=True)
    return decode_response(conv.tok, tokens[0, idx.size(1):].tolist())


def main():
    cfg = parse_config(ChatConfig, join_repeated(sys.argv[1:], "--ckpt"))
    device = autodetect_device() if cfg.device == "auto" else cfg.device
    paths = [p for p in cfg.ckpt.split(",") if p]
    convs, generators = [], []
    for name, path in zip(model_names(paths), paths):
        model, tokenizer, _ = load_policy(path, device)
        room = model.config.block_size - cfg.max_new_tokens
        if room < 1:
            raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for the prompt in {path}'s "
                             f"context of {model.config.block_size} tokens; lower it")
        convs.append(Conversation(name, model, get_tokenizer(tokenizer), room))
        generators.append(torch.Generator(device=device).manual_seed(cfg.seed))
        print(f"{name}: {path}, {model.get_num_params(non_embedding=False) / 1e6:.2f}M parameters, {tokenizer} "
              f"tokenizer, context {model.config.block_size}")
    if cfg.history and any(conv.tok.name == "byte" for conv in convs):
        print("note: the built-in world's models learnt single-turn prompts only; --no-history keeps to those")
    print(f"temperature {cfg.temperature}; /reset forgets the conversation; Ctrl-D or Ctrl-C quits")
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    sys.stdin.reconfigure(errors="replace")  # a stray non-UTF-8 byte becomes U+FFFD, not the end of the chat
    while True:
        try:
            prompt = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if prompt == "/reset":
            for conv in convs:
                conv.turns = []
            print("(conversation forgotten)")
            continue
        if not prompt:
            continue
        for conv, generator in zip(convs, generators):
            if len(convs) > 1:
                print(f"[{conv.name}] ", end="", flush=True)
            try:
                text = answer(conv, prompt, cfg, generator)
                if cfg.history:
                    conv.turns.append((prompt, text))
            except KeyboardInterrupt:  # stop this answer, keep the conversation as it was
                print(" [stopped]")


if __name__ == "__main__":
    cli(main)
