"""Reliability: checkpoints that survive SIGKILL, --resume equal to an uninterrupted run, Ctrl-C that saves,
NaN/inf steps skipped and then stopped, one-line config errors, pickle-free loads, loaders that survive
hostile files. Runs of the stage scripts use tiny models and run side by side to stay fast."""
import ast
import dataclasses
import gzip
import json
import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import zipfile
from hypothesis import HealthCheck, example, given, settings, strategies as st
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data.batches import encode_example
from data.formats import DataError, load_prompts, load_rankings, load_samples, load_sft, load_text
from data.tokenizer import get_tokenizer
from lib.common import (Dist, atomic_copy, atomic_save, load_checkpoint, model_from_checkpoint,
                        save_checkpoint)
from lib.reliability import Interrupt, lock_out_dir, preflight
from lib.weights import read_safetensors, write_safetensors
from model import GPT, GPTConfig
from test_stages import TINY_MODEL, write_tiny_data

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start(args, cwd, **env):
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env={**ENV, **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc, code=0):
    """Wait for a run; check its exit code and return its stderr."""
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == code, err[-3000:]
    return err


def metrics(path, key):
    """{step: value} of one metric in a metrics.jsonl."""
    return {r["step"]: r[key] for r in map(json.loads, open(path)) if key in r}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# --- 1. atomic checkpoints ---------------------------------------------------------------------------------
def save_forever(path, done):
    torch.set_num_threads(1)  # a forked child that enters the OpenMP pool its parent has used hangs there
    w = torch.zeros(512, 1024)  # 2 MiB: saving is almost all the loop's time, so kills land inside writes
    while True:
        i = done.value + 1
        atomic_save({"model": {}, "model_config": {}, "tokenizer": "byte", "i": i, "w": w.fill_(i)}, path)
        done.value = i


@pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL")
def test_checkpoint_survives_sigkill_while_saving(tmp_path):
    path, rng = tmp_path / "ckpt.pt", random.Random(0)
    ctx = multiprocessing.get_context("fork")
    done = ctx.Value("q", 0, lock=False)  # no lock: a child killed while holding it would hang the next read
    for _ in range(10):
        saver = ctx.Process(target=save_forever, args=(path, done))
        saver.start()
        before, deadline = done.value, time.monotonic() + 60
        while done.value < before + 2:  # a complete save in this life, then kill it at a random moment
            assert saver.is_alive() and time.monotonic() < deadline, "the saver died or hung"
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.05))
        os.kill(saver.pid, signal.SIGKILL)
        saver.join()
        ckpt = load_checkpoint(path)
        # the last save reported complete, or the next one if the kill came between its rename and the report
        assert ckpt["i"] in (done.value, done.value + 1)
        assert (ckpt["w"] == ckpt["i"]).all()
        done.value = ckpt["i"]
    assert list(tmp_path.glob(".ckpt.pt.tmp*")), "no kill landed inside a write: the test proved nothing"


def copy_forever(src, out_dir, done):
    while True:
        i = done.value + 1
        atomic_copy(src, out_dir / f"ckpt_{i}.pt")  # what ppo.py --keep-saves does after each save
        done.value = i


@pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL")
def test_kept_saves_survive_sigkill_and_a_dead_writers_temporary_files_go(tmp_path):
    """A kept save (ckpt_<it>.pt) is complete or absent whenever its writer dies; the temporary files a killed
    writer leaves are removed when the next run starts in that directory."""
    src, out, rng = tmp_path / "ckpt.pt", tmp_path / "out", random.Random(0)
    data = rng.randbytes(2 << 20)
    src.write_bytes(data)
    out.mkdir()
    ctx = multiprocessing.get_context("fork")
    done = ctx.Value("q", 0, lock=False)
    for _ in range(5):
        copier = ctx.Process(target=copy_forever, args=(src, out, done))
        copier.start()
        before, deadline = done.value, time.monotonic() + 60
        while done.value < before + 2:
            assert copier.is_alive() and time.monotonic() < deadline, "the copier died or hung"
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.02))
        os.kill(copier.pid, signal.SIGKILL)
        copier.join()
        for kept in out.glob("ckpt_*.pt"):
            assert kept.read_bytes() == data, f"{kept.name} is a partial copy"
            kept.unlink()
    assert list(out.glob(".ckpt_*.pt.tmp*")), "no kill landed inside a copy: the test proved nothing"
    preflight(SimpleNamespace(out_dir=out, resume=False, overwrite=False), {}, Dist("cpu"))  # the next run starts
    assert not list(out.glob(".*.tmp*"))


def test_stage_scripts_write_files_only_through_the_atomic_writers():
    """sft.py, reward.py, ppo.py and dpo.py write through common's atomic writers (save_checkpoint, atomic_copy;
    RunLog appends lines) and never open, copy or save a file themselves."""
    for script in ("sft.py", "reward.py", "ppo.py", "dpo.py"):
        for node in ast.walk(ast.parse((ROOT / script).read_text())):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                writes = name in ("open", "torch.save") or name.startswith("shutil.") or \
                    name.endswith((".write_text", ".write_bytes"))
                assert not writes, f"{script}:{node.lineno}: {name}(...) writes around the atomic writers"


# --- 2. --resume continues exactly where the interrupted run stopped -------------------------------------------
RESUMABLE = {  # dropout: the RNG state matters; --min-lr-ratio 1: the schedule does not depend on --max-iters
    "sft": ["sft.py", "--sft-data", "sft.jsonl", "--text-data", "text.txt", "--ptx-fraction", "0.25",
            "--batch-size", "8", "--micro-batch-size", "4", *TINY_MODEL],
    "reward": ["reward.py", "--init", "sft.pt", "--data", "rank.jsonl", "--batch-size", "4", "--micro-batch-size", "2",
               "--device", "cpu"],
}


@pytest.mark.parametrize("stage", RESUMABLE)
def test_resume_equals_uninterrupted_run(tmp_path, stage):
    write_tiny_data(tmp_path)
    write_tiny_policy_and_rm(tmp_path)
    with open(tmp_path / "sft.jsonl", "a") as f:  # an over-long prompt is cut, an over-long response dropped
        f.write(json.dumps({"prompt": "x" * 200, "response": "ok."}) + "\n")
        f.write(json.dumps({"prompt": "hi", "response": "y" * 200}) + "\n")
    with open(tmp_path / "rank.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "hi", "responses": ["ok.", "y" * 200], "ranking": [0, 1]}) + "\n")
    args = [ROOT / RESUMABLE[stage][0], *RESUMABLE[stage][1:], "--log-interval", "1", "--dropout", "0.1",
            "--min-lr-ratio", "1.0"]
    whole = start([*args, "--max-iters", "8", "--out-dir", "whole"], tmp_path)
    finish(start([*args, "--max-iters", "3", "--out-dir", "parts"], tmp_path))
    with open(tmp_path / "parts" / "metrics.jsonl", "a") as f:  # logged after the save by a run that crashed
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n" + '{"step": 4, "lo')
    finish(start([*args, "--max-iters", "8", "--out-dir", "parts", "--resume"], tmp_path))
    err = finish(whole)
    if stage == "sft":
        assert "1 of 34 examples truncated" in err and "1 of 34 examples dropped" in err
    else:
        assert "1 of 17 rankings dropped" in err
    assert metrics(tmp_path / "parts" / "metrics.jsonl", "loss") == \
        pytest.approx(metrics(tmp_path / "whole" / "metrics.jsonl", "loss"), rel=1e-6)
    assert_same_weights(load_checkpoint(tmp_path / "whole" / "ckpt.pt")["model"],
                        load_checkpoint(tmp_path / "parts" / "ckpt.pt")["model"])


def write_tiny_policy_and_rm(d):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=get_tokenizer("byte").n_vocab, n_layer=1, n_head=2, n_embd=32)
    save_checkpoint(d / "sft.pt", GPT(cfg), {}, tokenizer="byte")
    save_checkpoint(d / "rm.pt", GPT(dataclasses.replace(cfg, head="scalar")), {}, tokenizer="byte")
    with open(d / "prompts.jsonl", "w") as f:
        for w in ["stone", "apple", "river", "cloud", "green", "table", "house", "light", "x" * 100]:
            f.write(json.dumps({"prompt": f"Reverse the word {w}."}) + "\n")


PPO_TINY = ["--sft", "sft.pt", "--rm", "rm.pt", "--prompts", "prompts.jsonl", "--batch-size", "8",
            "--minibatch-size", "4", "--ppo-epochs", "2", "--max-new-tokens", "8", "--device", "cpu"]


def test_ppo_resume_equals_uninterrupted_run(tmp_path):
    write_tiny_policy_and_rm(tmp_path)
    write_tiny_data(tmp_path)
    # everything --resume must restore: adaptive kl_coef, the EMA, the sampling generator, ptx windows, warmup
    args = [ROOT / "ppo.py", *PPO_TINY, "--adaptive-kl", "--kl-target", "0.1", "--kl-horizon", "50",
            "--ema-decay", "0.5", "--ptx-data", "text.txt", "--ptx-coef", "0.5", "--ptx-seq-len", "32",
            "--ptx-batch-size", "2", "--warmup-iters", "4", "--lr", "1e-3", "--sample-interval", "1000"]
    whole = start([*args, "--total-episodes", "40", "--out-dir", "whole"], tmp_path)
    finish(start([*args, "--total-episodes", "16", "--out-dir", "parts"], tmp_path))  # 2 of the 5 iterations
    finish(start([*args, "--total-episodes", "40", "--out-dir", "parts", "--resume"], tmp_path))
    err = finish(whole)
    assert "1 of 9 examples truncated" in err
    for key in ("score", "kl", "kl_coef", "pg_loss", "vf_loss", "ptx_loss", "entropy"):
        a, b = metrics(tmp_path / "whole" / "metrics.jsonl", key), metrics(tmp_path / "parts" / "metrics.jsonl", key)
        assert len(a) == 5 and b == pytest.approx(a, rel=1e-5, abs=1e-6), key
    whole, parts = load_checkpoint(tmp_path / "whole" / "ckpt.pt"), load_checkpoint(tmp_path / "parts" / "ckpt.pt")
    for key in ("model", "policy", "value_model"):  # the EMA, the policy, the value model
        assert_same_weights(whole[key], parts[key])


# --- 3. Ctrl-C ---------------------------------------------------------------------------------------------
def test_ctrl_c_finishes_the_step_saves_and_exits_130(tmp_path):
    write_tiny_data(tmp_path)
    run = start([ROOT / "sft.py", "--sft-data", "sft.jsonl", "--max-iters", "100000", "--batch-size", "4",
                 "--micro-batch-size", "4", "--log-interval", "1", "--out-dir", "out", *TINY_MODEL], tmp_path)
    log = tmp_path / "out" / "metrics.jsonl"
    while not (log.is_file() and log.read_text()) and run.poll() is None:  # training has started
        time.sleep(0.01)
    run.send_signal(signal.SIGINT)
    err = finish(run, 130)
    assert "stopped by Ctrl-C after step" in err.splitlines()[-1] and "--resume" in err.splitlines()[-1]
    ckpt = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert 1 <= ckpt["iter"] < 100000 and ckpt["max_iters"] == 100000
    assert {"optimizers", "rng"} <= ckpt.keys() and ckpt["optimizers"][0]["state"]
    model_from_checkpoint(ckpt)


def test_second_ctrl_c_aborts_at_once():
    previous = signal.getsignal(signal.SIGINT)
    try:
        interrupt = Interrupt(Dist("cpu"))
        steps = interrupt.steps(0, 10)
        assert next(steps) == 0
        signal.raise_signal(signal.SIGINT)  # the first: the loop ends after this step
        with pytest.raises(StopIteration):
            next(steps)
        assert interrupt.requested and interrupt.done == 1
        with pytest.raises(KeyboardInterrupt):  # the second: at once
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


# --- 4. NaN/inf steps are skipped, then the run stops without touching the last checkpoint -------------------
def test_diverging_runs_skip_then_stop_and_leave_the_checkpoint(tmp_path):
    write_tiny_data(tmp_path)
    write_tiny_policy_and_rm(tmp_path)
    runs = {  # lr 1e30: the first step's update overflows every later forward pass
        "sft": ["sft.py", "--sft-data", "sft.jsonl", "--max-iters", "20", "--batch-size", "4",
                "--micro-batch-size", "4", "--log-interval", "1", *TINY_MODEL],
        "reward": ["reward.py", "--init", "sft.pt", "--data", "rank.jsonl", "--max-iters", "20", "--batch-size", "2",
                   "--micro-batch-size", "2", "--device", "cpu"],
        "ppo": ["ppo.py", *PPO_TINY, "--total-episodes", "32", "--warmup-iters", "0", "--minibatch-size", "2"],
    }
    procs = {}
    for name, args in runs.items():
        model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=8))
        save_checkpoint(tmp_path / name / "ckpt.pt", model, {}, tokenizer="byte")  # the last good checkpoint
        procs[name] = start([ROOT / args[0], *args[1:], "--lr", "1e30",
                             "--max-bad-steps", "3", "--out-dir", name], tmp_path)
    for name, proc in procs.items():
        before = load_checkpoint(tmp_path / name / "ckpt.pt")
        err = finish(proc, 1)
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: step ") and "3 steps in a row" in last and "learning rate" in last, err
        assert err.count("optimiser step skipped") == 3, err
        assert_same_weights(load_checkpoint(tmp_path / name / "ckpt.pt")["model"], before["model"])
    skipped = [r.get("skipped_steps") for r in map(json.loads, open(tmp_path / "sft" / "metrics.jsonl"))]
    assert skipped[-2:] == [1, 2]  # counted in the log (the third skip raised before its log line)


# --- 5. config mistakes: exit code 2 and one line, before any work ---------------------------------------------
def test_config_errors_are_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    write_tiny_data(tmp_path)
    write_tiny_policy_and_rm(tmp_path)
    (tmp_path / "k1.jsonl").write_text(json.dumps({"prompt": "p", "responses": ["a"], "ranking": [0]}) + "\n")
    ckpt = load_checkpoint(tmp_path / "sft.pt")
    ckpt["max_response_tokens"] = 20  # an SFT model taught answers of up to 20 tokens
    torch.save(ckpt, tmp_path / "sft_long.pt")
    (tmp_path / "done").mkdir()  # a PPO run of 16 episodes (2 iterations of 8) that has finished
    torch.save({**load_checkpoint(tmp_path / "sft.pt"), "iter": 2, "max_iters": 2, "optimizers": [],
                "value_model": load_checkpoint(tmp_path / "rm.pt")["model"]}, tmp_path / "done" / "ckpt.pt")
    narrow = GPTConfig(block_size=64, vocab_size=get_tokenizer("byte").n_vocab, n_layer=1, n_head=2, n_embd=16)
    (tmp_path / "narrow").mkdir()  # an unfinished run of a smaller model than sft.pt's
    save_checkpoint(tmp_path / "narrow" / "ckpt.pt", GPT(narrow), {}, "byte", iter=1, max_iters=2)
    cases = {  # args, words the message must contain, extra environment
        "world size": (["sft.py", "--text-data", "text.txt", "--batch-size", "8", "--micro-batch-size", "4"],
                       "multiple of --micro-batch-size x processes", {"WORLD_SIZE": "3"}),  # no RANK: no process group
        "context": (["ppo.py", *PPO_TINY, "--max-new-tokens", "64"], "leaves no room for the prompt", {}),
        "kl_coef": (["ppo.py", *PPO_TINY, "--kl-coef", "-0.1"], "must be >= 0", {}),
        "rl_params": (["ppo.py", *PPO_TINY, "--rl-params", "heads"], "--rl-params must be all or norms", {}),
        "cut-off answers": (["ppo.py", *PPO_TINY, "--sft", "sft_long.pt"],
                            "--max-new-tokens 8 is shorter than the longest demonstration sft_long.pt learnt (20", {}),
        "cut-off answers (evaluate)": (["evaluate.py", "--sft", "sft_long.pt", "--rm", "rm.pt", "--prompts",
                                        "prompts.jsonl", "--max-new-tokens", "8"], "raise it to at least 20", {}),
        "K < 2": (["reward.py", "--init", "sft.pt", "--data", "k1.jsonl", "--device", "cpu"],
                  "k1.jsonl:1: need at least 2 responses", {}),
        "missing file": (["ppo.py", *PPO_TINY, "--ptx-data", "nowhere.txt"], "--ptx-data nowhere.txt: no such", {}),
        "out dir": (["sft.py", "--text-data", "text.txt", "--out-dir", "text.txt/run"], "not a writable directory", {}),
        "resume": (["sft.py", "--text-data", "text.txt", "--out-dir", "fresh", "--resume"], "no fresh/ckpt.pt", {}),
        # --prompts k1.jsonl: no over-long prompt, whose warning would be a second line
        "resume finished": (["ppo.py", *PPO_TINY, "--prompts", "k1.jsonl", "--total-episodes", "16", "--out-dir",
                             "done", "--resume"],
                            "has finished all 2 steps; raise --total-episodes to train on", {}),
        "resume other size": (["ppo.py", *PPO_TINY, "--out-dir", "narrow", "--resume"],
                              "the shapes of the models in narrow/ckpt.pt differ", {}),
    }
    procs = {}
    for i, (name, (args, _, env)) in enumerate(cases.items()):
        own_dir = [] if "--out-dir" in args else ["--out-dir", f"out{i}"]  # side by side: one run per directory
        procs[name] = start([ROOT / args[0], *args[1:], *own_dir], tmp_path, **env)
    for name, proc in procs.items():
        err = finish(proc, 2)
        assert err.count("\n") == 1 and err.startswith("error: ") and cases[name][1] in err, (name, err)
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()
    # numbers out of range (common.RunConfig) and a device this machine lacks (common.check_device): found
    # before anything loads, so run in this process (fast) through the scripts' cli()
    early = {
        "warmup": (["ppo.py", *PPO_TINY, "--warmup-iters", "-1"], "--warmup-iters must be >= 0, got -1"),
        "micro-batch": (["sft.py", "--text-data", "text.txt", "--micro-batch-size", "0"],
                        "--micro-batch-size must be > 0"),
        "minibatch": (["ppo.py", *PPO_TINY, "--minibatch-size", "0"], "--minibatch-size must be > 0"),
        "ppo epochs": (["ppo.py", *PPO_TINY, "--ppo-epochs", "0"], "--ppo-epochs must be > 0"),
        "episodes": (["ppo.py", *PPO_TINY, "--total-episodes", "4"], "no iteration would run"),
        "lr": (["reward.py", "--init", "sft.pt", "--data", "rank.jsonl", "--lr", "nan"], "--lr must be > 0"),
        "epochs": (["dpo.py", "--sft", "sft.pt", "--data", "rank.jsonl", "--epochs", "0"], "--epochs must be > 0"),
        "device": (["sft.py", "--text-data", "text.txt", "--device", f"cuda:{torch.cuda.device_count()}"],
                   "CUDA device(s) visible to torch"),  # --device cuda on a machine without one
        "sample tokens": (["tools/sample.py", "--prompt", "hi", "--max-new-tokens", "-5"],
                          "--max-new-tokens must be > 0, got -5"),
        "sample n": (["tools/sample.py", "--prompt", "hi", "--n", "0"], "--n must be > 0, got 0"),
        "collect batch": (["data/collect.py", "--batch-size", "0"], "--batch-size must be > 0, got 0"),
        "evaluate prompts": (["evaluate.py", "--max-prompts", "-1"], "--max-prompts must be >= 0, got -1"),
        "evaluate tokens": (["evaluate.py", "--max-new-tokens", "0"], "--max-new-tokens must be > 0, got 0"),
        # before --sft (runs/sft/ckpt.pt, not here) is loaded
        "evaluate out dir": (["evaluate.py", "--out-dir", "text.txt"], "text.txt is a file, not a directory"),
    }
    monkeypatch.chdir(tmp_path)
    for name, ((script, *argv), words) in early.items():
        own_dir = [] if script.startswith(("tools/", "data/")) or "--out-dir" in argv else ["--out-dir", name]  # these have none
        code, err = run_cli(script, [*argv, *own_dir], monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, (name, err)
        assert not (tmp_path / name).exists()


# --- 6. --out-dir: one run at a time, and nothing of an earlier run lost ---------------------------------------
def test_a_second_run_on_the_same_out_dir_is_refused(tmp_path):
    write_tiny_data(tmp_path)
    args = [ROOT / "sft.py", "--sft-data", "sft.jsonl", "--batch-size", "4", "--micro-batch-size", "4",
            "--log-interval", "1", "--out-dir", "out", *TINY_MODEL]
    first = start([*args, "--max-iters", "100000", "--save-interval", "0"], tmp_path)  # no ckpt.pt before its end
    log = tmp_path / "out" / "metrics.jsonl"
    while not (log.is_file() and log.read_text()) and first.poll() is None:  # training: it holds the lock
        time.sleep(0.01)
    err = finish(start([*args, "--max-iters", "2"], tmp_path), 2)
    assert err == f"error: --out-dir out is in use by another run (pid {first.pid}); wait for it to end or " \
                  "choose another --out-dir\n"
    first.send_signal(signal.SIGINT)
    finish(first, 130)
    steps = list(metrics(log, "loss"))
    assert steps == list(range(len(steps))) and load_checkpoint(tmp_path / "out" / "ckpt.pt")["iter"] == len(steps)


def test_the_out_dir_lock_is_released_when_its_holder_is_killed(tmp_path):
    ctx = multiprocessing.get_context("fork")
    locked = ctx.Event()

    def hold():
        lock_out_dir(tmp_path)
        locked.set()
        time.sleep(60)
    holder = ctx.Process(target=hold)
    holder.start()
    assert locked.wait(30)
    with pytest.raises(ValueError, match=rf"in use by another run \(pid {holder.pid}\)"):
        lock_out_dir(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # no clean-up of its own: the stale lock is the OS's to release
    holder.join()
    lock_out_dir(tmp_path)
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"


def test_a_fresh_run_refuses_an_unfinished_out_dir(tmp_path, monkeypatch, capsys):
    """A periodic save (Ctrl-C, a crash) is kept from a fresh start unless --resume or --overwrite says what to do
    with it; a finished run's directory may be rerun (train.sh FORCE=1)."""
    monkeypatch.chdir(tmp_path)
    write_tiny_data(tmp_path)
    out, model = tmp_path / "out", GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=8))
    save_checkpoint(out / "ckpt.pt", model, {}, "byte", iter=3, max_iters=10)  # stopped at step 3 of 10
    (out / "metrics.jsonl").write_text('{"step": 0, "loss": 5.0}\n')
    before = {p: p.read_bytes() for p in out.iterdir()}
    code, err = run_cli("sft.py", ["--text-data", "text.txt", "--out-dir", "out", *TINY_MODEL], monkeypatch, capsys)
    assert code == 2 and err == "error: --out-dir out holds an unfinished run (stopped at step 3): continue it " \
                                "with --resume, or start afresh over it with --overwrite\n"
    assert all(p.read_bytes() == b for p, b in before.items())
    for resume, overwrite in ((True, False), (False, True)):
        preflight(SimpleNamespace(out_dir=out, resume=resume, overwrite=overwrite), {}, Dist("cpu"))
    save_checkpoint(out / "ckpt.pt", model, {}, "byte", iter=10, max_iters=10)
    preflight(SimpleNamespace(out_dir=out, resume=False, overwrite=False), {}, Dist("cpu"))


def test_train_sh_reruns_an_unfinished_stage_with_overwrite(tmp_path):
    """train.sh reruns an interrupted stage from the start, as it says: its stage() passes --overwrite."""
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=8))
    save_checkpoint(tmp_path / "unfinished.pt", model, {}, "byte", iter=3, max_iters=10)
    save_checkpoint(tmp_path / "finished.pt", model, {}, "byte", iter=10, max_iters=10)
    sh = (ROOT / "train.sh").read_text()
    functions = sh[sh.index("finished() {"):sh.index("if [[ $MODE == hh ]]")]  # finished() and stage()
    script = f"""PY={sys.executable} FORCE=0 ALGOS=
{functions}
stage a unfinished.pt echo run; stage b finished.pt echo run; stage c new.pt echo run
FORCE=1; stage d finished.pt echo run"""
    res = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    runs = [line for line in res.stdout.splitlines() if not line.startswith("== ")]
    assert res.returncode == 0 and runs == ["run --overwrite", "run", "run --overwrite"], res.stdout + res.stderr
    assert "== b: finished.pt exists, skipped" in res.stdout


def test_a_fresh_start_that_fails_keeps_the_previous_runs_log(tmp_path, monkeypatch, capsys):
    """The old metrics.jsonl is cleared when the new run starts training, not before its inputs have loaded."""
    monkeypatch.chdir(tmp_path)
    write_tiny_data(tmp_path)
    write_tiny_policy_and_rm(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "unclosed\n')
    stages = {"sft.py": ["--sft-data", "bad.jsonl", *TINY_MODEL], "ppo.py": [*PPO_TINY, "--prompts", "bad.jsonl"],
              "reward.py": ["--init", "sft.pt", "--data", "bad.jsonl"], "dpo.py": ["--sft", "sft.pt", "--data", "bad.jsonl"]}
    old_log = '{"step": 0, "loss": 5.0}\n{"step": 1, "loss": 4.0}\n'
    for script, argv in stages.items():
        (tmp_path / script).mkdir()
        (tmp_path / script / "metrics.jsonl").write_text(old_log)  # a finished run's
        code, err = run_cli(script, [*argv, "--device", "cpu", "--out-dir", script], monkeypatch, capsys)
        assert code == 2 and err.startswith("error: bad.jsonl:1: "), (script, err)
        assert (tmp_path / script / "metrics.jsonl").read_text() == old_log, script


# --- 7. no pickle: every torch.load in the project loads tensors only ---------------------------------------
def test_every_torch_load_uses_weights_only():
    calls = 0
    for path in ROOT.rglob("*.py"):
        if any(part.startswith(".") or part in ("runs", "site-packages") for part in path.relative_to(ROOT).parts):
            continue  # virtual environments, caches and run directories are not the project's code
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                assert ok, f"{path.relative_to(ROOT)}:{node.lineno}: torch.load without weights_only=True"
    assert calls >= 1


class Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def run_cli(script, argv, monkeypatch, capsys):
    """(exit code, stderr) of a script's main() run in this process through config.cli: fast, for the
    error paths that end before any work."""
    import importlib
    from lib.config import cli
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        cli(importlib.import_module(script.removesuffix(".py").replace("/", ".")).main)
    return e.value.code, capsys.readouterr().err


def test_bad_checkpoints_are_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    """Truncated, crafted, foreign and wrong-kind checkpoints, given to each script: one line, exit code 2, no
    advice to turn weights_only off, no code run."""
    monkeypatch.chdir(tmp_path)
    write_tiny_data(tmp_path)
    write_tiny_policy_and_rm(tmp_path)
    good = (tmp_path / "sft.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[:len(good) // 2])  # an interrupted copy
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": Exploit()}, f, protocol=2)
    torch.save({"model": Exploit()}, tmp_path / "evil_zip.pt")  # the same inside torch's zip format
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as z:
        z.writestr("archive/notes.txt", "a zip, but not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "tensors.pt")
    corrupt, code = "not a checkpoint this project can load (truncated or corrupt)", "refusing to load: it contains code"
    cases = [  # script, arguments, words the message must contain
        ("tools/sample.py", ["--ckpt", "cut.pt", "--prompt", "hi"], f"cut.pt: {corrupt}"),
        ("sft.py", ["--init", "cut.pt", "--text-data", "text.txt"], f"cut.pt: {corrupt}"),
        ("ppo.py", [*PPO_TINY, "--rm", "evil.pt"], f"evil.pt: {code}"),
        ("evaluate.py", ["--sft", "evil_zip.pt", "--rm", "rm.pt", "--prompts", "prompts.jsonl"], f"evil_zip.pt: {code}"),
        ("reward.py", ["--init", "other.pt", "--data", "rank.jsonl"], f"other.pt: {corrupt}"),
        ("tools/sample.py", ["--ckpt", "tensors.pt", "--prompt", "hi"], "tensors.pt: not a checkpoint of this project"),
        ("tools/sample.py", ["--ckpt", "rm.pt", "--prompt", "hi"], "rm.pt is a reward or value model (scalar head), but a policy"),
        ("ppo.py", [*PPO_TINY, "--rm", "sft.pt"], "sft.pt is a policy (language-model head: base, SFT or PPO), but a reward"),
        ("evaluate.py", ["--sft", "sft.pt", "--rm", "sft.pt", "--prompts", "prompts.jsonl"], "but a reward or value model"),
        ("tools/chat.py", ["--ckpt", "rm.pt"], "rm.pt is a reward or value model (scalar head), but a policy"),
        ("tools/export.py", ["--ckpt", "cut.pt", "--out", "exported"], f"cut.pt: {corrupt}"),
    ]
    for script, argv, words in cases:
        exit_code, err = run_cli(script, argv, monkeypatch, capsys)
        assert exit_code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, (script, err)
        assert "weights_only" not in err
    assert not (tmp_path / "PWNED").exists()


def test_inputs_found_bad_after_loading_are_one_line(tmp_path, monkeypatch, capsys):
    """Data with nothing that fits the context, corrupt Hugging Face directories, and output paths that are
    directories: each one line naming the file, exit code 2, no traceback."""
    monkeypatch.chdir(tmp_path)
    write_tiny_data(tmp_path)
    write_tiny_policy_and_rm(tmp_path)
    long = "y" * 300  # longer than sft.pt's 64-token context
    (tmp_path / "long_sft.jsonl").write_text(json.dumps({"prompt": "p", "response": long}) + "\n")
    (tmp_path / "long_rank.jsonl").write_text(
        json.dumps({"prompt": "p", "responses": ["ok", long], "ranking": [0, 1]}) + "\n")
    export_dir = tmp_path / "exported"
    assert run_cli("tools/export.py", ["--ckpt", "sft.pt", "--out", export_dir], monkeypatch, capsys)[0] == 0
    for name in ("bad_json", "cut_weights", "wrong_shape"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_bytes((export_dir / "config.json").read_bytes())
    (tmp_path / "bad_json" / "config.json").write_text('{"n_positions": 64')
    (tmp_path / "cut_weights" / "model.safetensors").write_bytes((export_dir / "model.safetensors").read_bytes()[:200])
    tensors = read_safetensors(export_dir / "model.safetensors")
    write_safetensors(tmp_path / "wrong_shape" / "model.safetensors", {k: v[:1] for k, v in tensors.items()})
    (tmp_path / "empty").mkdir()
    not_hf = "not a GPT-2 directory in the Hugging Face layout"
    cases = [  # script, arguments, words the message must contain
        ("sft.py", ["--init", "sft.pt", "--sft-data", "long_sft.jsonl"],
         "long_sft.jsonl: none of its 1 examples fits in a context of 64 tokens"),
        ("reward.py", ["--init", "sft.pt", "--data", "long_rank.jsonl"],
         "long_rank.jsonl: none of its 1 rankings fits in a context of 64 tokens"),
        ("dpo.py", ["--sft", "sft.pt", "--data", "long_rank.jsonl"], "long_rank.jsonl: none of its 1 rankings"),
        ("tools/sample.py", ["--ckpt", "bad_json", "--prompt", "hi", "--max-new-tokens", "8"], f"bad_json: {not_hf}"),
        ("sft.py", ["--init", "cut_weights", "--text-data", "text.txt"], f"cut_weights: {not_hf}"),
        ("reward.py", ["--init", "wrong_shape", "--data", "rank.jsonl"], f"wrong_shape: {not_hf}"),
        ("data/collect.py", ["--ckpt", "sft.pt", "--prompts", "prompts.jsonl", "--out", "."],
         "--out . is a directory; give a file name"),
        ("tools/sample.py", ["--ckpt", ",", "--prompt", "hi"], "--ckpt ',' names no checkpoint"),
        ("tools/sample.py", ["--ckpt", "exported", "--prompt", "hi", "--max-new-tokens", "100"],
         "--max-new-tokens 100 leaves no room for the prompt in the context of exported (64 tokens)"),
    ]
    for script, argv, words in cases:
        own_dir = script.startswith(("tools/", "data/"))  # these have no --out-dir
        out = [] if own_dir else ["--out-dir", f"out_{len(os.listdir())}"]
        exit_code, err = run_cli(script, [*argv, *out], monkeypatch, capsys)
        assert exit_code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, (script, err)
    monkeypatch.chdir(tmp_path / "empty")  # the export replaces --out by a rename: never the directory one is in
    exit_code, err = run_cli("tools/export.py", ["--ckpt", "../sft.pt", "--out", "."], monkeypatch, capsys)
    assert exit_code == 2 and "--out . is the current directory" in err and not os.listdir(), err


def test_an_export_loads_back_with_its_own_tokenizer(tmp_path, monkeypatch, capsys):
    """export.py's directory as --init / --ckpt: the world's byte tokenizer, not GPT-2's (whose ids would
    index past the byte model's 258-row embedding), and the same weights."""
    from lib.common import load_model
    monkeypatch.chdir(tmp_path)
    write_tiny_policy_and_rm(tmp_path)
    assert run_cli("tools/export.py", ["--ckpt", "sft.pt", "--out", "exported"], monkeypatch, capsys)[0] == 0
    tokenizer, model, _ = load_model("exported", "lm", 0.0, kind="lm")
    assert tokenizer == "byte"
    assert_same_weights(model.state_dict(), load_checkpoint(tmp_path / "sft.pt")["model"])
    with pytest.raises(ValueError, match="is a policy .* but a reward"):
        load_model("exported", "scalar", 0.0, kind="scalar")
    exit_code, err = run_cli("tools/sample.py", ["--ckpt", "exported", "--prompt", "hi", "--max-new-tokens", "4",
                                           "--device", "cpu"], monkeypatch, capsys)
    assert exit_code == 0, err


def test_disk_full_during_a_save_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    """A write that fails (ENOSPC) inside torch.save surfaces as torch's RuntimeError about zip
    offsets; the project reports the file and what to do, exit code 2, and leaves neither a
    checkpoint nor a temporary file behind."""
    import errno
    import data.formats
    real_fdopen = os.fdopen

    class Full:  # a disk with 1000 bytes free
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            if self.written + len(b) > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(data.formats.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    monkeypatch.chdir(tmp_path)
    write_tiny_data(tmp_path)
    exit_code, err = run_cli("sft.py", ["--text-data", "text.txt", "--out-dir", "run", "--max-iters", "1",
                                        *TINY_MODEL], monkeypatch, capsys)
    assert exit_code == 2 and err.splitlines()[-1] == (
        "error: run/ckpt.pt: No space left on device; free some space and run again (a training stage continues "
        "from its last save with --resume)"), err
    assert sorted(os.listdir("run")) == [".lock", "metrics.jsonl"]


def test_training_state_loads_without_pickle(tmp_path):
    """What --resume saves (optimiser moments, RNG states of torch and the generators) is plain data."""
    from lib.reliability import training_state
    model = GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=8))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 20, (2, 8)), torch.randint(0, 20, (2, 8)))[1].backward()
    opt.step()
    save_checkpoint(tmp_path / "ckpt.pt", model, {}, "byte", **training_state(Dist("cpu"), [opt], [torch.Generator()]))
    assert load_checkpoint(tmp_path / "ckpt.pt")["optimizers"][0]["state"]


# --- 8. hostile data: a located DataError, never another exception --------------------------------------------
LOADERS = [load_text, load_sft, load_rankings, load_prompts, load_samples]


def check_loaders(path):
    """Every loader either reads the file or raises DataError("{file}:{line}: ...") on one line."""
    for load in LOADERS:
        try:
            load(path)
        except DataError as e:
            assert str(e).startswith(f"{path}:") and str(e.line) == str(e).split(":")[1] and "\n" not in e.what
        # anything else propagates and fails the test


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters()),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                     max_size=4), max_leaves=8)
FIELDS = ["prompt", "response", "responses", "ranking", "chosen", "rejected", "text", "instruction", "input", "output"]
unicode = st.text(st.characters(exclude_categories=()), max_size=30)  # includes lone surrogates, NUL, RTL marks
SETTINGS = dict(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(**SETTINGS)
@given(data=st.binary(max_size=300), ext=st.sampled_from([".jsonl", ".txt", ".json"]))
@example(data=b"", ext=".jsonl")
@example(data=b" \n\n\t\n", ext=".jsonl")
@example(data=b"\xff\xfe{}", ext=".txt")
@example(data=b'{"prompt": "a\x00b"}\n', ext=".jsonl")
@example(data=b'[{"prompt": "a"}, [], 1]', ext=".json")
def test_loaders_on_random_bytes(tmp_path, data, ext):
    path = tmp_path / f"f{ext}"
    path.write_bytes(data)
    check_loaders(path)


@settings(**SETTINGS)
@given(records=st.lists(st.one_of(json_values, st.dictionaries(st.sampled_from(FIELDS), json_values | unicode,
                                                               max_size=4)), min_size=1, max_size=3))
def test_loaders_on_wrong_json_types(tmp_path, records):
    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    check_loaders(path)
    path = tmp_path / "f.json"  # the same records as one JSON array
    path.write_text(json.dumps(records, indent=1))
    check_loaders(path)


@settings(**SETTINGS)
@given(prompt=unicode, response=unicode)
@example(prompt="\ud800 lone surrogate", response="\u202eRTL\u200f mark\x00NUL")
@example(prompt="\udfff", response="\U0001F600\ufeff")
def test_unicode_edge_cases_load_and_encode(tmp_path, prompt, response):
    """Lone surrogates (escaped in the JSON), NUL, RTL marks: loaded as given or refused with a location,
    and whatever loads also encodes (the byte tokenizer covers every string)."""
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "response": response}) + "\n")  # ensure_ascii: \ud800 escapes
    try:
        records = load_sft(path)
    except DataError as e:
        assert str(e).startswith(f"{path}:1: ")
        return
    tok, stats = get_tokenizer("byte"), {}
    encoded = encode_example(tok, records[0]["prompt"], records[0]["response"], 64, stats)
    assert encoded is None or len(encoded[0]) <= 64


def test_very_long_lines(tmp_path):
    path = tmp_path / "long.jsonl"
    long = "z" * 5_000_000
    path.write_text(json.dumps({"prompt": "p", "response": long}) + "\n" + "{" + long + "\n")
    with pytest.raises(DataError, match=r"long.jsonl:2: invalid JSON") as e:
        load_sft(path)
    assert len(str(e.value)) < 200


@pytest.mark.parametrize("name,data", [
    ("nested.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n"),
    ("nested.json", b"[" * 100_000 + b"]" * 100_000),
    ("corrupt.jsonl.gz", bytes(b ^ 0xFF if i == 10 else b  # one flipped byte in the deflate stream
                               for i, b in enumerate(gzip.compress(b'{"prompt": "p", "response": "r"}\n' * 200)))),
    ("truncated.txt.gz", gzip.compress(b"some text " * 200)[:-12]),
    ("notgzip.txt.gz", b"plain text, not gzip"),
], ids=["nested", "nested-array", "corrupt-gz", "truncated-gz", "not-gz"])
def test_loaders_on_corrupt_compressed_and_deeply_nested_files(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    check_loaders(path)


def test_over_long_examples_are_cut_or_dropped_and_counted():
    tok, stats = get_tokenizer("byte"), {}
    ids, n_query = encode_example(tok, "p" * 500, "ok", 64, stats)  # the prompt loses its start
    assert len(ids) == 64 and tok.decode(ids[n_query:-1]) == " ok" and stats == {"truncated": 1}
    assert encode_example(tok, "p", "r" * 500, 64, stats) is None and stats == {"truncated": 1, "dropped": 1}
