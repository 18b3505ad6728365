"""Shared plumbing: config parsing, checkpoints that load without pickle and never hold NaNs."""
import dataclasses
import json
import pickle

import pytest
import torch

from lib.common import load_checkpoint, model_from_checkpoint, save_checkpoint
from lib.config import parse_config
from model import GPT, GPTConfig


@dataclasses.dataclass
class DemoConfig:
    lr: float = 3e-4  # peak learning rate
    steps: int = 10  # optimisation steps
    compile: bool = False  # torch.compile the model
    init: str | None = None  # checkpoint to start from


def test_parse_config_types_defaults_and_help(capsys):
    cfg = parse_config(DemoConfig, ["--lr", "0.1", "--compile", "--init", "x.pt"])
    assert cfg == DemoConfig(lr=0.1, steps=10, compile=True, init="x.pt")
    assert parse_config(DemoConfig, []) == DemoConfig()
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--help"])
    help_text = capsys.readouterr().out
    assert "peak learning rate" in help_text and "optimisation steps" in help_text and "--no-compile" in help_text


class Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_checkpoint_round_trip_and_crafted_pickle_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=8))
    save_checkpoint(tmp_path / "ok.pt", model, DemoConfig(), tokenizer="byte", step=3)
    ckpt = load_checkpoint(tmp_path / "ok.pt")
    assert ckpt["tokenizer"] == "byte" and ckpt["step"] == 3 and ckpt["config"]["lr"] == 3e-4
    again = model_from_checkpoint(ckpt)
    idx = torch.randint(0, 20, (1, 8))
    torch.testing.assert_close(again(idx)[0], model(idx)[0])

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": Exploit()}, f)
    with pytest.raises(ValueError, match="refusing to load: it contains code objects"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=8))
    save_checkpoint(tmp_path / "ckpt.pt", model, DemoConfig(), tokenizer="byte")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        save_checkpoint(tmp_path / "ckpt.pt", model, DemoConfig(), tokenizer="byte")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_a_fresh_run_starts_a_fresh_log_and_a_resumed_one_keeps_it(tmp_path):
    from lib.common import RunLog
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 9.0}\n{"step": 1, "loss": 8.0}\n')
    RunLog(tmp_path, resume=True).log(2, echo=False, loss=7.0)
    assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [0, 1, 2]
    RunLog(tmp_path).log(0, echo=False, loss=1.0)
    assert [json.loads(l)["loss"] for l in open(tmp_path / "metrics.jsonl")] == [1.0]
