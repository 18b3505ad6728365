"""chat.py driven through stdin: the streamed answers are exactly what non-streamed generation gives with the
same seed, turn after turn, with control characters escaped; a non-UTF-8 byte of input, end-of-input or
Ctrl-C at the prompt leave cleanly."""
import os
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
import torch

from data.formats import ASSISTANT, HUMAN
from data.tokenizer import get_tokenizer
from lib.common import load_checkpoint, model_from_checkpoint, save_checkpoint
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


def chat(args, stdin, cwd):
    """chat.py's stdout for stdin (text, or bytes as they are)."""
    stdin = stdin if isinstance(stdin, bytes) else stdin.encode()
    out = subprocess.run([sys.executable, "-m", "tools.chat", *args], input=stdin, cwd=cwd, env=ENV,
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    assert b"Traceback" not in out.stderr
    return out.stdout.decode("utf-8")


def write_tiny_policy(path):
    """A policy with random weights: any bytes, invalid UTF-8 included, may come out."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=128, vocab_size=get_tokenizer("byte").n_vocab, n_layer=1, n_head=2, n_embd=32)
    model = GPT(cfg)
    with torch.no_grad():  # larger weights than GPT-2's init: the answers then depend on the whole context
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    save_checkpoint(path, model, {}, tokenizer="byte")


def escaped(text):
    """text as chat.py shows it: control characters (Unicode category Cc) but newline and tab as \\x1b etc."""
    return "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" and c not in "\n\t" else c
                   for c in text)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("history,device", [(True, "cpu"), (False, "cpu"), pytest.param(True, "cuda", marks=CUDA)])
def test_streamed_chat_equals_generation_with_the_same_seed(tmp_path, history, device):
    write_tiny_policy(tmp_path / "sft.pt")
    prompts = ["Reverse the word stone.", "And apple?"]
    stdout = chat(["--ckpt", "sft.pt", "--max-new-tokens", "16", "--temperature", "0.9", "--top-k", "50",
                   "--seed", "3", "--device", device, "--history" if history else "--no-history"],
                  "\n".join(prompts) + "\n", tmp_path)

    # the same two turns, generated without streaming: the second query holds the first turn in the template
    model, tok = model_from_checkpoint(load_checkpoint(tmp_path / "sft.pt")).to(device).eval(), get_tokenizer("byte")
    generator, transcript, expected = torch.Generator(device).manual_seed(3), "", []
    for prompt in prompts:
        transcript = (transcript if history else "") + f"{HUMAN}{prompt}{ASSISTANT}"
        idx = torch.tensor([tok.encode(transcript)], device=device)
        assert idx.size(1) <= 128 - 16  # it fits: no turn dropped
        out = model.generate(idx, 16, temperature=0.9, top_k=50, eos_token_id=tok.eot_token,
                             pad_token_id=tok.pad_token, generator=generator)[0, idx.size(1):].tolist()
        text = tok.decode(out[:out.index(tok.eot_token)] if tok.eot_token in out else out)
        expected.append(escaped(text.lstrip()))  # the stream hides the template's leading space
        transcript += " " + text.strip()
    assert stdout.endswith(f"> {expected[0]}\n> {expected[1]}\n> \n"), (stdout, expected)


def test_non_utf8_input_does_not_end_the_chat_and_control_characters_are_escaped(tmp_path):
    write_tiny_policy(tmp_path / "sft.pt")
    stdout = chat(["--ckpt", "sft.pt", "--max-new-tokens", "64", "--device", "cpu", "--no-history"],
                  b"caf\xe9?\nReverse the word stone.\n", tmp_path)  # \xe9: Latin-1, not UTF-8
    assert stdout.endswith("\n> \n")  # both prompts answered, then end of input
    answers = stdout.split("> ", 1)[1]
    assert "\\x" in answers  # the random policy says control characters: they are shown escaped
    assert not [c for c in answers if unicodedata.category(c) == "Cc" and c not in "\n\t"]


def test_two_models_side_by_side(tmp_path):
    write_tiny_policy(tmp_path / "sft.pt")
    for name in ("a", "b"):  # the same weights under two names: the same answers, each from its own generator
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "sft.pt", tmp_path / name / "ckpt.pt")
    args = ["--ckpt", "a/ckpt.pt", "--ckpt", "b/ckpt.pt", "--max-new-tokens", "12", "--device", "cpu"]
    stdout = chat(args, "Reverse the word stone.\nAnd apple?\n", tmp_path)
    for turn in stdout.split("> ")[1:3]:
        a, b = turn.split("\n[b] ")
        assert a.startswith("[a] ") and a[len("[a] "):] + "\n" == b


def test_ctrl_c_at_the_prompt_quits_cleanly(tmp_path):
    write_tiny_policy(tmp_path / "sft.pt")
    proc = subprocess.Popen([sys.executable, "-m", "tools.chat", "--ckpt", "sft.pt", "--max-new-tokens", "8",
                             "--device", "cpu"], cwd=tmp_path, env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    deadline = time.time() + 60
    while not seen.endswith(b"> ") and time.time() < deadline:  # wait for the prompt
        seen += os.read(proc.stdout.fileno(), 1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()
