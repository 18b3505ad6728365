"""HH-RLHF and plain-text preparation, offline, on small files the tests write themselves."""
import gzip
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from data import hh_rlhf, text_corpus
from data.formats import format_query, load_prompts, load_rankings, load_sft, load_text, split_of
from lib.config import cli
from model import GPT, GPTConfig
from test_pretrained import write_hf_dir
from test_stages import ROOT


def transcript(turns):
    return "".join(f"\n\n{who}: {text}" for who, text in turns)


def hh_line(i):
    """A pair like HH's: single-turn for even i, two turns for odd i."""
    turns = [("Human", f"Question number {i}?")]
    if i % 2:
        turns += [("Assistant", "Let me think."), ("Human", f"Please answer {i}.")]
    return {"chosen": transcript(turns + [("Assistant", f"Answer {i}.")]),
            "rejected": transcript(turns + [("Assistant", "I don't know.")])}


BAD_LINES = [
    {"chosen": transcript([("Human", "a"), ("Assistant", "x")]),
     "rejected": transcript([("Human", "b"), ("Assistant", "y")])},  # prompts differ
    {"chosen": transcript([("Human", "a"), ("Assistant", "same")]),
     "rejected": transcript([("Human", "a"), ("Assistant", "same")])},  # identical answers
    {"chosen": transcript([("Human", "a"), ("Assistant", "")]),
     "rejected": transcript([("Human", "a"), ("Assistant", "y")])},  # empty answer
]


def write_gz(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


@pytest.fixture
def hh_clone(tmp_path):
    """A miniature clone of the hh-rlhf repository: two subsets, train and test files."""
    root = tmp_path / "hh-rlhf"
    write_gz(root / "helpful-base" / "train.jsonl.gz", [hh_line(i) for i in range(600)] + BAD_LINES)
    write_gz(root / "helpful-base" / "test.jsonl.gz", [hh_line(i) for i in range(600, 700)])
    write_gz(root / "harmless-base" / "train.jsonl.gz", [hh_line(i) for i in range(700, 900)])
    write_gz(root / "harmless-base" / "test.jsonl.gz", [hh_line(i) for i in range(900, 950)])
    return root


def test_hh_preparation_writes_loadable_disjoint_splits(hh_clone, tmp_path):
    out = tmp_path / "hh"
    files = hh_rlhf.source_files(str(hh_clone), hh_rlhf.SUBSETS)
    assert len(files) == 4
    summary = hh_rlhf.prepare(files, out)
    assert sum(summary["skipped"].values()) == len(BAD_LINES)
    assert summary["counts"]["rankings_train"] + summary["counts"]["rankings_val"] \
        + summary["counts"]["rankings_test"] == 950
    prompts = {}
    for split, name in (("train", "ppo_prompts"), ("val", "val_prompts"), ("test", "test_prompts")):
        prompts[split] = set(load_prompts(out / f"{name}.jsonl"))
        rankings = load_rankings(out / f"rankings_{split}.jsonl")
        assert {r["prompt"] for r in rankings} == prompts[split]
        assert {split_of(p, hh_rlhf.VAL, hh_rlhf.TEST) for p in prompts[split]} == {split}
        assert all(r["ranking"] == [0, 1] and r["responses"][1] == "I don't know." for r in rankings)
    assert not (prompts["train"] & prompts["val"]) and not (prompts["train"] & prompts["test"])
    sft = load_sft(out / "sft_train.jsonl")
    assert {d["prompt"] for d in sft} == prompts["train"] and all(d["response"].startswith("Answer") for d in sft)
    # Multi-turn prompts keep their earlier turns, and the template rebuilds the original transcript.
    original = {hh_line(i)["chosen"] for i in range(950)}
    assert all(format_query(d["prompt"]) + " " + d["response"] in original for d in sft)
    assert any("\n\nAssistant: Let me think." in d["prompt"] for d in sft)


def test_hh_cli_with_a_single_file_and_max_examples(hh_clone, tmp_path, capsys):
    out = tmp_path / "hh"
    hh_rlhf.main(["--out", str(out), "--source", str(hh_clone / "helpful-base" / "train.jsonl.gz"),
                  "--max-examples", "500"])
    assert "rankings_train" in capsys.readouterr().out
    summary = json.loads((out / "hh_rlhf.json").read_text())
    assert sum(v for k, v in summary["counts"].items() if k.startswith("rankings_")) == 500
    with pytest.raises(SystemExit) as e:  # too few pairs to hold out val and test prompts
        cli(lambda: hh_rlhf.main(["--out", str(out), "--source", str(hh_clone), "--max-examples", "5"]))
    assert e.value.code == 2 and "too few" in capsys.readouterr().err


def test_data_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """Bad options exit 2, a failed download 1 (config.cli), each with one line on stderr."""
    monkeypatch.setenv("INSTRUCTGPT_CACHE", str(tmp_path / "cache"))  # nothing leaves tmp_path, even on a bug
    monkeypatch.setattr(hh_rlhf, "URL", "file:///nonexistent/{subset}/{split}.jsonl.gz")
    monkeypatch.setattr(text_corpus, "URL", "file:///nonexistent/input.txt")
    for argv, expected in ((["--out", str(tmp_path), "--subsets", "helpful-base,poetry"], "helpful-online"),
                           (["--subsets", "helpful-base"], "--out")):  # a wrong subset lists the choices
        with pytest.raises(SystemExit) as e:
            hh_rlhf.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and expected in err, err
    with pytest.raises(SystemExit) as e:
        cli(lambda: text_corpus.main(["--out", str(tmp_path / "text")]))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: could not download") and err.count("\n") == 1, err


def test_hh_download_goes_through_the_cache(hh_clone, tmp_path, monkeypatch):
    # file:// exercises the same urllib code path as https:// without a network.
    monkeypatch.setattr(hh_rlhf, "URL", f"file://{hh_clone}/{{subset}}/{{split}}.jsonl.gz")
    monkeypatch.setenv("INSTRUCTGPT_CACHE", str(tmp_path / "cache"))
    files = hh_rlhf.source_files(None, ["helpful-base"])
    assert [f.relative_to(tmp_path / "cache").as_posix() for f in files] == [
        "hh-rlhf/helpful-base/train.jsonl.gz", "hh-rlhf/helpful-base/test.jsonl.gz"]
    assert files[0].read_bytes() == (hh_clone / "helpful-base" / "train.jsonl.gz").read_bytes()
    monkeypatch.setattr(hh_rlhf, "URL", "file:///nonexistent/{subset}/{split}.jsonl.gz")
    assert hh_rlhf.source_files(None, ["helpful-base"]) == files  # cached: no second download
    with pytest.raises(ConnectionError, match="could not download .* pass --source"):
        hh_rlhf.source_files(None, ["harmless-base"])
    assert not list((tmp_path / "cache").rglob(".*.tmp*"))  # the failed download left no temporary file


def test_text_corpus_split_at_a_line_and_download(tmp_path, monkeypatch):
    lines = [f"Line {i}: some verse." for i in range(100)]
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(lines) + "\n")
    n_train, n_val = text_corpus.prepare(source, tmp_path / "out", val_fraction=0.1)
    train, val = load_text(tmp_path / "out" / "pretrain.txt"), load_text(tmp_path / "out" / "pretrain_val.txt")
    assert train + val == source.read_text() and (len(train), len(val)) == (n_train, n_val)
    assert train.endswith("\n") and val.startswith("Line ") and 0.05 < n_val / (n_train + n_val) < 0.15
    assert "".join(text_corpus.split_text("no line break to cut at", 0.1)) == "no line break to cut at"
    with pytest.raises(ValueError, match="too short"):
        text_corpus.split_text("x", 0.1)

    monkeypatch.setattr(text_corpus, "URL", source.as_uri())
    monkeypatch.setenv("INSTRUCTGPT_CACHE", str(tmp_path / "cache"))
    text_corpus.main(["--out", str(tmp_path / "dl")])
    assert (tmp_path / "cache" / "tinyshakespeare.txt").read_text() == source.read_text()
    assert (tmp_path / "dl" / "pretrain.txt").read_text() == train


def long_hh_line(i):
    """A pair with an HH-length chosen answer for i % 3 == 0 (about 30 to 200 tokens), short otherwise."""
    line = hh_line(i)
    if i % 3 == 0:
        line["chosen"] += " Here is some more detail on that." * (5 + i % 30)
    return line


def test_hh_pipeline_end_to_end_with_a_tiny_gpt2(tmp_path):
    """QUICK=1 bash train.sh hh: GPT-2-layout weights (tiny, random) -> SFT on HH -> RM -> PPO-ptx -> an
    RM-judged report and a side-by-side table, through the real command lines, all offline. A third of the
    answers are longer than the QUICK run's 16-token --max-new-tokens, as real HH answers are longer than
    the full run's 128: SFT drops them (saying how many), and PPO runs instead of refusing the budget."""
    hh_clone = tmp_path / "hh-rlhf"
    write_gz(hh_clone / "helpful-base" / "train.jsonl.gz", [long_hh_line(i) for i in range(600)])
    write_gz(hh_clone / "helpful-base" / "test.jsonl.gz", [long_hh_line(i) for i in range(600, 700)])
    torch.manual_seed(0)
    write_hf_dir(tmp_path / "tiny-gpt2", GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)))
    (tmp_path / "corpus.txt").write_text("The cat sat on the mat. It was a sunny day.\n" * 200)
    env = {**os.environ, "QUICK": "1", "RUNS": str(tmp_path / "runs"), "MODEL": str(tmp_path / "tiny-gpt2"),
           "HH_SOURCE": str(hh_clone), "TEXT_SOURCE": str(tmp_path / "corpus.txt"), "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "train.sh"), "hh"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert re.search(r"sft_train.jsonl: \d+ of \d+ demonstrations \(\d+%\) dropped: their response is longer "
                     r"than --max-response-tokens 16", res.stderr), res.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "hh" / "eval" / "report.json").read_text())
    assert set(report["models"]) == {"base", "sft_greedy", "sft", "ppo_ptx", "best_of_n"}
    assert report["config"]["judge"] == "rm" and report["models"]["ppo_ptx"]["gold_score"] is None
    assert report["models"]["sft"]["win_rate_vs_sft"] == 0.5  # SFT against itself: every prompt a tie
    side = (tmp_path / "runs" / "hh" / "eval" / "side_by_side.txt").read_text()
    assert "ppo_ptx" in side and "sft" in side
