"""export.py: a checkpoint exported to the Hugging Face GPT-2 layout gives model.py's outputs in transformers
(GPT2LMHeadModel; GPT2Model + score_head.safetensors for a scalar head), round-trips through
GPT.from_pretrained, documents runnable code, and is written whole or not at all."""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.formats import encode_chat
from data.tokenizer import get_tokenizer
from lib.common import save_checkpoint
from lib.config import cli
from lib.weights import read_safetensors
from model import GPT, GPTConfig
from tools import export

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=16)
STAGE_CONFIG = {"out_dir": "runs/test", "lr": 1e-3, "seed": 3}


def export_tiny(tmp_path, tokenizer="byte", **model_kw):
    """A tiny random GPT saved as a checkpoint and exported; returns (model, export dir)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **model_kw})).eval()
    with torch.no_grad():  # GPT's init has zero biases and unit LayerNorm gains: randomise, so a lost one shows
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    save_checkpoint(tmp_path / "ckpt.pt", model, STAGE_CONFIG, tokenizer, iter=7)
    out = tmp_path / "export"
    export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(out)])
    return model, out


def left_padded(vocab, B=3, T=24):
    """Random ids with rows left-padded to different lengths, their mask, and model.py's position ids."""
    idx = torch.randint(0, vocab, (B, T))
    mask = torch.ones_like(idx)
    mask[0, :5], mask[1, :17] = 0, 0
    return idx, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def readme_code(out):
    return "\n".join(re.findall(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S))


@pytest.mark.parametrize("bias", [True, False])
def test_lm_logits_match_transformers(tmp_path, bias):
    ours, out = export_tiny(tmp_path, bias=bias)
    idx, mask, pos = left_padded(300)
    for attn in ("eager", "sdpa"):
        hf = transformers.GPT2LMHeadModel.from_pretrained(out, attn_implementation=attn).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-5, rtol=1e-4)
            got = hf(idx, attention_mask=mask, position_ids=pos).logits
            torch.testing.assert_close(got[mask.bool()], ours(idx, attention_mask=mask)[0][mask.bool()],
                                       atol=1e-5, rtol=1e-4)
    if not bias:  # GPT-2 always has biases: zeros stand in for none
        biases = [v for k, v in read_safetensors(out / "model.safetensors").items() if k.endswith(".bias")]
        assert len(biases) == 2 * 6 + 1 and all((b == 0).all() for b in biases)


def test_round_trip_through_from_pretrained(tmp_path):
    ours, out = export_tiny(tmp_path)
    back = GPT.from_pretrained(str(out)).eval()
    sd, sd_back = ours.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k  # bit-exact: export only renames and transposes


def test_reward_model_recipe_in_transformers(tmp_path):
    ours, out = export_tiny(tmp_path, head="scalar", block_size=64)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2Model"]
    head = read_safetensors(out / "score_head.safetensors")
    trunk = transformers.GPT2Model.from_pretrained(out, attn_implementation="eager").eval()
    idx, mask, pos = left_padded(300)
    with torch.no_grad():
        h = trunk(idx, attention_mask=mask, position_ids=pos).last_hidden_state  # (B, T, C)
        got = (h @ head["score.weight"].T + head["score.bias"]).squeeze(-1)  # (B, T): a value per position
        torch.testing.assert_close(got[mask.bool()], ours(idx, attention_mask=mask)[0][mask.bool()],
                                   atol=1e-5, rtol=1e-4)
        # the recipe in the export's README.md, run as written, against model.py at the end-of-text token
        namespace = {}
        exec(readme_code(out), namespace)
        query, response = encode_chat(get_tokenizer("byte"), "Add 7 and 5.", "7 plus 5 is 12.")
        values, _ = ours(torch.tensor([query + response]))
        assert namespace["reward"]("Add 7 and 5.", "7 plus 5 is 12.") == pytest.approx(values[0, -1].item(), abs=1e-5)
    back = GPT.from_pretrained(str(out), head="scalar")  # trunk from the export, head from score_head
    back.score_head.load_state_dict({"weight": head["score.weight"], "bias": head["score.bias"]})
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())


def test_readme_generate_snippet_runs(tmp_path):
    _, out = export_tiny(tmp_path, block_size=64)
    torch.manual_seed(0)
    namespace = {}
    exec(readme_code(out), namespace)  # samples a response and prints it
    query, _ = encode_chat(get_tokenizer("byte"), "Add 7 and 5.")
    assert namespace["query"] == query  # the README's chat template is data/formats.py's
    assert namespace["out"][0, :len(query)].tolist() == query and namespace["out"].size(1) > len(query)


def test_config_and_metadata(tmp_path):
    ours, out = export_tiny(tmp_path)
    hf = json.loads((out / "config.json").read_text())
    assert hf["n_positions"] == 32 and hf["vocab_size"] == 300 and hf["activation_function"] == "gelu_new"
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (256, 256, 257)
    meta = json.loads((out / "instructgpt.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["config"] == STAGE_CONFIG and meta["iter"] == 7
    assert meta["model_config"] == vars(ours.config)
    assert "id = the value of one UTF-8 byte" in (out / "README.md").read_text()
    # GPT-2's tokenizer: its ids without its ranks file (nothing downloaded); no separate pad token
    _, out = export_tiny(tmp_path, tokenizer="gpt2", vocab_size=50257)
    hf = json.loads((out / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (50256, 50256, None)
    assert 'GPT2TokenizerFast.from_pretrained("gpt2")' in (out / "README.md").read_text()


def test_interrupted_export_leaves_the_previous_one(tmp_path, monkeypatch):
    _, out = export_tiny(tmp_path)
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def crash(path, tensors):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(out)])
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    with pytest.raises(KeyboardInterrupt):
        export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "new")])
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ckpt.pt", "export"]  # no temporary directory left
    monkeypatch.undo()
    renames, replace = [], os.replace

    def fail_second_rename(src, dst):  # the previous export is moved aside, the new one fails to move in
        renames.append(src)
        if len(renames) == 2:
            raise OSError("no space left on device")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second_rename)
    with pytest.raises(OSError):
        export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(out)])
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ckpt.pt", "export"]


def test_cli_one_line_results_and_errors(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = subprocess.Popen([sys.executable, "-m", "tools.export", "--ckpt", str(tmp_path / "nope.pt"), "--out",
                               str(tmp_path / "hf2")], cwd=ROOT, env=env, text=True, stderr=subprocess.PIPE)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt.pt", GPT(GPTConfig(**TINY)), STAGE_CONFIG, "byte")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")

    def run(out):  # as `python export.py` runs it, in this process
        with pytest.raises(SystemExit) as e:
            cli(lambda: export.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(out)]))
        return (e.value.code, *capsys.readouterr())

    code, stdout, _ = run(tmp_path / "hf")
    assert code == 0 and len(stdout.splitlines()) == 1 and "GPT2LMHeadModel.from_pretrained" in stdout
    for out, what in ((tmp_path / "mine", "not an export"), (tmp_path / "mine" / "notes.txt", "is a file")):
        code, _, stderr = run(out)
        assert code == 2 and len(stderr.splitlines()) == 1 and what in stderr, stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    _, stderr = script.communicate(timeout=120)
    assert script.returncode == 2 and len(stderr.splitlines()) == 1 and "nope.pt" in stderr, stderr
    assert not (tmp_path / "hf2").exists()


def test_value_model_of_a_ppo_checkpoint(tmp_path):
    """--value-model exports the value model that ppo.py saves next to the policy, with its own architecture
    (here a different width and head count from the policy's), bit-exact; a checkpoint without one is refused."""
    torch.manual_seed(0)
    policy = GPT(GPTConfig(**TINY))
    value_model = GPT(GPTConfig(**{**TINY, "n_embd": 48, "n_head": 3, "head": "scalar"}))
    save_checkpoint(tmp_path / "ppo.pt", policy, STAGE_CONFIG, "byte", value_model=value_model,
                    value_model_config=dataclasses.asdict(value_model.config))
    export.main(["--ckpt", str(tmp_path / "ppo.pt"), "--value-model", "--out", str(tmp_path / "value")])
    back = GPT.from_pretrained(str(tmp_path / "value"), head="scalar")
    head = read_safetensors(tmp_path / "value" / "score_head.safetensors")
    back.score_head.load_state_dict({"weight": head["score.weight"], "bias": head["score.bias"]})
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in value_model.state_dict().items())
    save_checkpoint(tmp_path / "sft.pt", policy, STAGE_CONFIG, "byte")
    with pytest.raises(ValueError, match="holds no value model"):
        export.main(["--ckpt", str(tmp_path / "sft.pt"), "--value-model", "--out", str(tmp_path / "none")])
