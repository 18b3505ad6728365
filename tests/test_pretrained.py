"""GPT.from_pretrained on Hugging Face-layout checkpoints that the tests write (no download)."""
import json
import os
import struct

import pytest
import torch

from lib.weights import read_safetensors, write_safetensors
from model import GPT, GPTConfig

HF_CONFIG = dict(n_positions=32, vocab_size=61, n_layer=2, n_head=2, n_embd=16)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def require(module):
    """Import an optional test dependency; in CI (CI set) its absence is a failure, never a silent skip."""
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} must be installed in CI (requirements-dev.txt)")
        pytest.skip(f"{module} not installed")


def hf_state_dict(model):
    """Our weights under Hugging Face GPT-2 names: no `transformer.` prefix, Conv1D weights as (in, out)."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        name = k.removeprefix("transformer.")
        out[name] = v.t().contiguous() if name.endswith(CONV1D) else v.clone()
    T = model.config.block_size
    for i in range(model.config.n_layer):  # the causal-mask buffer old GPT-2 files carry
        out[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    return out


def write_hf_dir(path, model):
    """A Hugging Face GPT-2 directory (config.json, model.safetensors) holding the weights of `model`."""
    c = model.config
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": c.block_size,
                                                  "vocab_size": c.vocab_size, "n_layer": c.n_layer,
                                                  "n_head": c.n_head, "n_embd": c.n_embd}))
    write_safetensors(path / "model.safetensors", hf_state_dict(model))


def test_safetensors_reader_on_hand_built_bytes(tmp_path):
    a = torch.tensor([[1.0, 2.0], [3.0, -4.5]])
    b = torch.tensor([0.5, -2.0], dtype=torch.bfloat16)
    raw_a, raw_b = a.numpy().tobytes(), b.view(torch.int16).numpy().tobytes()
    header = {"__metadata__": {"format": "pt"},
              "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, len(raw_a)]},
              "b": {"dtype": "BF16", "shape": [2], "data_offsets": [len(raw_a), len(raw_a) + len(raw_b)]}}
    head = json.dumps(header).encode()
    (tmp_path / "t.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + raw_a + raw_b)
    t = read_safetensors(tmp_path / "t.safetensors")
    assert set(t) == {"a", "b"}
    torch.testing.assert_close(t["a"], a)
    torch.testing.assert_close(t["b"], b.float())


def test_from_pretrained_round_trip_and_key_mapping(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=61, n_layer=2, n_head=2, n_embd=16)
    ours = GPT(cfg).eval()
    write_hf_dir(tmp_path / "ckpt", ours)
    names = set(read_safetensors(tmp_path / "ckpt" / "model.safetensors"))
    expected = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"} | {
        f"h.{i}.{n}" for i in range(2) for n in (
            "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
            "attn.c_proj.bias", "attn.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
            "mlp.c_proj.weight", "mlp.c_proj.bias")}
    assert names == expected
    loaded = GPT.from_pretrained(str(tmp_path / "ckpt")).eval()
    assert loaded.state_dict()["transformer.h.0.attn.c_attn.weight"].shape == (48, 16)  # (out, in) again
    idx = torch.randint(0, 61, (2, 20))
    torch.testing.assert_close(loaded(idx)[0], ours(idx)[0])
    rm = GPT.from_pretrained(str(tmp_path / "ckpt"), head="scalar")  # the RM's trunk from GPT-2 weights
    torch.testing.assert_close(rm.transformer.wte.weight, ours.transformer.wte.weight)


def test_from_pretrained_rejects_unknown_names_and_missing_tensors(tmp_path):
    with pytest.raises(ValueError, match="neither a directory"):
        GPT.from_pretrained("gpt3")
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=32, vocab_size=61, n_layer=2, n_head=2, n_embd=16))
    sd = hf_state_dict(ours)
    del sd["h.1.mlp.c_fc.bias"]
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    write_safetensors(tmp_path / "model.safetensors", sd)
    with pytest.raises(KeyError, match="h.1.mlp.c_fc.bias"):
        GPT.from_pretrained(str(tmp_path))


def test_logits_match_huggingface_gpt2(tmp_path):
    transformers = require("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CONFIG)).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 61, (3, 24))
    with torch.no_grad():
        ref = hf(idx).logits
        torch.testing.assert_close(ours(idx)[0], ref, atol=1e-5, rtol=1e-4)
        # left padding: Hugging Face needs explicit position ids that skip the pad, as ours computes
        mask = torch.ones_like(idx)
        mask[0, :5] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = hf(idx, attention_mask=mask, position_ids=pos).logits
        got = ours(idx, attention_mask=mask)[0]
        torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-4)
