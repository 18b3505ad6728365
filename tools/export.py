"""Export a checkpoint of this project as a Hugging Face GPT-2 directory that `transformers` loads.

    python -m tools.export --ckpt runs/ppo_ptx/ckpt.pt --out exported/ppo_ptx   # a policy (SFT, PPO): GPT2LMHeadModel
    python -m tools.export --ckpt runs/rm/ckpt.pt --out exported/rm             # a reward model: GPT2Model + head
    python -m tools.export --ckpt runs/ppo/ckpt.pt --value-model --out exported/value   # PPO's value model, likewise

    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained("exported/ppo_ptx")           # the logits of model.py (tested)

The directory holds config.json and model.safetensors in GPT-2's layout (written without pickle), a
README.md on the tokens, the chat template and how to run the model, and instructgpt.json with what
transformers has no place for (tokenizer name, model config, the stage config, the step). CPU only, seconds.
Where GPT-2's layout cannot hold a checkpoint exactly:
- bias=False checkpoints: GPT-2 always has biases; zero biases are written (the same function);
- a scalar head (reward / value model): GPT2ForSequenceClassification's `score` has no bias and pools at
  the last non-pad token (with GPT-2's tokenizer, whose pad is end-of-text, the token before the one the
  reward is read at), so it cannot hold our head; the trunk is exported as a GPT2Model and the head as
  score_head.safetensors (score.weight (1, C), score.bias (1,)), and README.md shows how to compute r(x, y);
- the byte tokenizer has no transformers class: README.md says how to encode (token id = byte value).
"""
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from string import Template

import torch

from data.tokenizer import get_tokenizer
from lib.common import load_checkpoint, model_from_checkpoint
from lib.config import cli, parse_config
from lib.weights import write_safetensors

META = "instructgpt.json"  # marks a directory as an export: only such a directory is replaced
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # HF Conv1D: weight stored (in, out)


@dataclass
class ExportConfig:
    ckpt: str = "runs/ppo_ptx/ckpt.pt"  # checkpoint of any stage: base, sft, rm, ppo
    value_model: bool = False  # export the value model of a PPO checkpoint instead of its policy
    out: str = "exported/ppo_ptx"  # output directory: new, empty, or a previous export (then replaced)


def special_ids(tokenizer):
    """(end-of-text, pad) ids. GPT-2's are fixed by its vocabulary, so its ranks file is not needed here."""
    if tokenizer == "gpt2":
        return 50256, 50256  # GPT-2 has no pad token; end-of-text serves (data/tokenizer.py)
    tok = get_tokenizer(tokenizer)
    return tok.eot_token, tok.pad_token


def gpt2_tensors(model, prefix):
    """The trunk's weights under GPT-2's names (prefix "transformer." for GPT2LMHeadModel, "" for GPT2Model)."""
    sd = model.state_dict()
    out = {prefix + "wte.weight": sd["transformer.wte.weight"], prefix + "wpe.weight": sd["transformer.wpe.weight"]}
    parts = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    for name in [f"h.{i}.{p}" for i in range(model.config.n_layer) for p in parts] + ["ln_f"]:
        w = sd[f"transformer.{name}.weight"]  # nn.Linear (out, in); LayerNorm (C,)
        out[prefix + name + ".weight"] = w.t() if name.endswith(CONV1D) else w  # Conv1D: (in, out)
        # bias=False: a zero bias computes the same function as none
        out[prefix + name + ".bias"] = sd.get(f"transformer.{name}.bias", torch.zeros(w.size(0), dtype=w.dtype))
    return out  # lm_head is tied to wte: not stored


def hf_config(model, architecture, eot, pad):
    """config.json for transformers' GPT2Config, read off the model so that it computes what model.py does."""
    c, block = model.config, model.transformer.h[0]
    return {"model_type": "gpt2", "architectures": [architecture], "vocab_size": c.vocab_size,
            "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
            "n_head": c.n_head, "n_inner": None,  # None = 4 * n_embd, as model.py's MLP
            "activation_function": {"tanh": "gelu_new", "none": "gelu"}[block.mlp.gelu.approximate],
            "layer_norm_epsilon": block.ln_1.eps, "scale_attn_weights": True,  # q k^T / sqrt(hs)
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,  # training dropout: in instructgpt.json
            "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot,
            "pad_token_id": pad if pad != eot else None}


README = Template(r"""# Exported from `$ckpt`

A GPT-2-shaped model ($n_layer layers, $n_head heads, width $n_embd, context $block_size tokens) trained with
the InstructGPT-from-scratch project; instructgpt.json holds its tokenizer name and training config.

## Tokens and chat template

$tokens

Training used HH-RLHF's chat template: the query is `"\n\nHuman: {prompt}\n\nAssistant:"`, the response
is `" " + response` followed by the end-of-text token $eot, appended by id (never spelled as text).
Left-padded batches: pass `attention_mask` and `position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)`,
the positions model.py uses (its first real token is at position 0).

## $title

```python
$code```
""")

TOKENS = {
    "byte": "The project's byte tokenizer: token id = the value of one UTF-8 byte (0-255), $eot = end-of-text, "
            "$pad = padding; no merges, and no transformers tokenizer class, so encode with "
            "`list(text.encode(\"utf-8\"))`.",
    "gpt2": "GPT-2's BPE, not included here: `GPT2TokenizerFast.from_pretrained(\"gpt2\")` (transformers) or "
            "`tiktoken.get_encoding(\"gpt2\")`, both fetched once from the internet. End-of-text $eot also pads.",
}
CODEC = {  # encode() and decode() in the README's code (GPT2TokenizerFast is imported with the model class)
    "byte": 'def encode(text):\n    return list(text.encode("utf-8"))\n\n\n'
            'def decode(ids):\n    return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")',
    "gpt2": 'tok = GPT2TokenizerFast.from_pretrained("gpt2")\n\n\n'
            'def encode(text):\n    return tok(text).input_ids\n\n\n'
            'def decode(ids):\n    return tok.decode(ids, skip_special_tokens=True)',
}
LM_CODE = r"""import torch
from transformers import GPT2LMHeadModel$imports


$codec


model = GPT2LMHeadModel.from_pretrained($path).eval()
query = encode("\n\nHuman: Add 7 and 5.\n\nAssistant:")
out = model.generate(torch.tensor([query]), max_new_tokens=model.config.n_positions - len(query),
                     do_sample=True, top_k=0, eos_token_id=$eot, pad_token_id=$pad)
print(decode(out[0, len(query):].tolist()))
"""
RM_CODE = r"""import torch
from safetensors.torch import load_file
from transformers import GPT2Model$imports


$codec


trunk = GPT2Model.from_pretrained($path).eval()
head = load_file($path + "/score_head.safetensors")  # score.weight (1, C), score.bias (1,)


def reward(prompt, response):
    # r(x, y) is read at the response's last token, its end-of-text (model.py: GPT.score)
    ids = encode("\n\nHuman: " + prompt + "\n\nAssistant:") + encode(" " + response) + [$eot]
    with torch.no_grad():
        h = trunk(torch.tensor([ids])).last_hidden_state[0, -1]  # (C,), after the final layer norm
    return (h @ head["score.weight"].T + head["score.bias"]).item()


print(reward("Add 7 and 5.", "7 plus 5 is 12."))
"""


def readme(cfg, c, tokenizer, eot, pad):
    """The export's README.md: the tokens, the chat template, and code that runs the model in transformers."""
    ids = dict(eot=eot, pad=pad, path=json.dumps(cfg.out))  # path as a Python string literal
    lm = c.head == "lm"
    imports = ", GPT2TokenizerFast" if tokenizer == "gpt2" else ""
    code = Template(LM_CODE if lm else RM_CODE).substitute(codec=CODEC[tokenizer], imports=imports, **ids)
    return README.substitute(ckpt=cfg.ckpt, tokens=Template(TOKENS[tokenizer]).substitute(ids), code=code,
                             title="Generate" if lm else "Score (scalar head: reward or value model)", **ids, **vars(c))


def check_out(out):
    """Refuse an --out that holds anything but a previous export, before any work is done."""
    if Path.cwd().is_relative_to(out.resolve()):  # the export replaces --out by a rename
        raise ValueError(f"--out {out} is the current directory or one above it; "
                         "give a new directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / META).is_file():
        raise ValueError(f"--out {out} is a non-empty directory that is not an export (no {META}); "
                         "give a new or empty directory")


@contextmanager
def staging(out):
    """A fresh directory beside `out` to write into; renamed to `out` only once complete (a previous export
    is replaced), so an interrupted export leaves the old directory or none, never half of one."""
    tmp, old = out.with_name(f".{out.name}.tmp{os.getpid()}"), out.with_name(f".{out.name}.old{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():  # on disk before the rename makes them visible
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None):
    cfg = parse_config(ExportConfig, argv)
    out = Path(cfg.out)
    check_out(out)
    ckpt = load_checkpoint(cfg.ckpt)
    if cfg.value_model:  # PPO saves its value model (a scalar head on the RM's trunk) next to the policy
        if "value_model_config" not in ckpt:
            raise ValueError(f"--value-model: {cfg.ckpt} holds no value model (only ppo.py's checkpoints do)")
        ckpt = {**ckpt, "model": ckpt["value_model"], "model_config": ckpt["value_model_config"]}
    model = model_from_checkpoint(ckpt).eval()
    if model.config.score_logprob:
        raise ValueError(f"{cfg.ckpt}: an RM with reward.py --score-logprob has no Hugging Face "
                         "layout; export the policies it trained instead")
    c, tokenizer = model.config, ckpt["tokenizer"]
    eot, pad = special_ids(tokenizer)
    lm = c.head == "lm"
    architecture = "GPT2LMHeadModel" if lm else "GPT2Model"
    # transformers' own layouts: GPT2LMHeadModel saves "transformer."-prefixed names, GPT2Model bare ones
    tensors = gpt2_tensors(model, prefix="transformer." if lm else "")
    # all but the weights and the training state (optimisers, RNGs): tokenizer, configs, step, PPO's kl_coef
    meta = {k: v for k, v in ckpt.items() if k in ("model_config", "config") or isinstance(v, (str, int, float))}
    with staging(out) as tmp:
        write_safetensors(tmp / "model.safetensors", tensors)
        if not lm:
            write_safetensors(tmp / "score_head.safetensors",
                              {"score.weight": model.score_head.weight, "score.bias": model.score_head.bias})
        (tmp / "config.json").write_text(json.dumps(hf_config(model, architecture, eot, pad), indent=2) + "\n")
        (tmp / META).write_text(json.dumps({**meta, "eot_token": eot, "pad_token": pad}, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(readme(cfg, c, tokenizer, eot, pad))
        written = ", ".join(sorted(f.name for f in tmp.iterdir()))
    how = "" if lm else f" with {out / 'score_head.safetensors'} as in its README.md"
    print(f"exported {cfg.ckpt} to {out}/ ({written}): transformers.{architecture}.from_pretrained({str(out)!r}){how}")


if __name__ == "__main__":
    cli(main)
