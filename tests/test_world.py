"""The built-in world: deterministic, fast, disjoint splits, valid files, calibrated labelers."""
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.formats import load_prompts, load_rankings, load_sft, load_text, split_of, write_jsonl
from data.judge import gold_score
from data.world import (FAMILIES, KINDS, LABELER_NOISE, TEMPLATES, WorldConfig, candidates,
                        demonstrate, generate, gold_agreement, gold_answer, labeler_agreement, main,
                        pair_agreement, parse_prompt, sample_task, sample_tasks, simulated_ranking)

SMALL = dict(pretrain_bytes=20_000, pretrain_val_bytes=2_000, sft_train=200, sft_val=50, rankings_train=100,
             rankings_val=30, ppo_prompts=100, val_prompts=30, test_prompts=60)
FILES = ["pretrain.txt", "pretrain_val.txt", "sft_train.jsonl", "sft_val.jsonl", "rankings_train.jsonl",
         "rankings_val.jsonl", "ppo_prompts.jsonl", "val_prompts.jsonl", "test_prompts.jsonl", "world.json"]


@pytest.fixture(scope="module")
def default_world(tmp_path_factory):
    """The world with every default size, as `python -m data.world` writes it, and how long it took."""
    out = tmp_path_factory.mktemp("world")
    t0 = time.time()
    summary = generate(WorldConfig(out=str(out)))
    return out, summary, time.time() - t0


def test_default_generation_is_fast_and_calibrated(default_world):
    out, summary, seconds = default_world
    assert seconds < 15, f"generation took {seconds:.1f}s"
    assert 0.70 <= summary["labeler_agreement"] <= 0.76  # the paper's ~73% inter-labeler agreement
    assert 0.10 <= summary["flawed_demonstrations"] <= 0.25
    assert json.loads((out / "world.json").read_text()) == summary
    assert 900_000 <= len(load_text(out / "pretrain.txt")) <= 1_100_000
    counts = {"sft_train": 16000, "sft_val": 300, "rankings_train": 2000, "rankings_val": 300,
              "ppo_prompts": 2000, "val_prompts": 300, "test_prompts": 600}
    loaders = {"sft": load_sft, "rankings": load_rankings}
    for name, n in counts.items():
        assert len(loaders.get(name.split("_")[0], load_prompts)(out / f"{name}.jsonl")) == n, name


def test_splits_never_share_a_prompt(default_world):
    out, _, _ = default_world
    by_split = {"train": ["sft_train", "rankings_train", "ppo_prompts"], "val": ["sft_val", "rankings_val",
                "val_prompts"], "test": ["test_prompts"]}
    prompts = {}
    for split, names in by_split.items():
        prompts[split] = set()
        for name in names:
            records = load_prompts(out / f"{name}.jsonl")
            assert {split_of(p) for p in records} == {split}, name
            prompts[split] |= set(records)
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    test = load_prompts(out / "test_prompts.jsonl")
    assert len(set(test)) == len(test) == 600  # every held-out prompt counts once
    assert len(set(load_prompts(out / "val_prompts.jsonl"))) == 300
    assert {parse_prompt(p).family for p in test} == set(FAMILIES)


def test_rankings_have_k_distinct_responses_ranked_by_a_noisy_labeler(default_world):
    out, _, _ = default_world
    records = load_rankings(out / "rankings_train.jsonl")
    ks = [len(r["responses"]) for r in records]
    assert min(ks) == 4 and max(ks) == 9
    # Labelers are noisy but informed: the top-ranked response beats the bottom one on average.
    gap = [gold_score(r["prompt"], r["responses"][r["ranking"][0]]) -
           gold_score(r["prompt"], r["responses"][r["ranking"][-1]]) for r in records]
    assert sum(gap) / len(gap) > 0.3


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate(WorldConfig(out=str(tmp_path / name), seed=seed, **SMALL))
    for f in FILES:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "sft_train.jsonl").read_bytes() != (tmp_path / "c" / "sft_train.jsonl").read_bytes()


def test_pretraining_text_states_facts_without_the_chat_format(tmp_path):
    generate(WorldConfig(out=str(tmp_path), **SMALL))
    text = load_text(tmp_path / "pretrain.txt")
    assert "Human:" not in text and "Assistant:" not in text
    assert " is " in text and "reverse of" in text and " plus " in text


def test_templates_parse_back_and_lengths_stay_small():
    assert all(len(TEMPLATES[(f, k)]) >= 3 for f in FAMILIES for k in KINDS[f])
    rng = random.Random(0)
    for _ in range(3000):
        task = sample_task(rng, FAMILIES)
        parsed = parse_prompt(task.prompt)
        assert (parsed.family, parsed.kind, parsed.args) == (task.family, task.kind, task.args)
        assert len(task.prompt.encode()) <= 100 and len(gold_answer(task).encode()) <= 60
    assert parse_prompt("Reverse the word Stone.") is None  # not how the world writes it


def test_families_switch_on_and_off(tmp_path):
    generate(WorldConfig(out=str(tmp_path), families="add,safety", **SMALL))
    families = {parse_prompt(p).family for p in load_prompts(tmp_path / "sft_train.jsonl")}
    assert families == {"add", "safety"}


def test_demonstrator_rates():
    rng = random.Random(0)
    tasks = [sample_task(rng, FAMILIES) for _ in range(2000)]
    perfect = WorldConfig(wrong_rate=0, hedge_rate=0, filler_rate=0, refuse_benign_rate=0,
                          accept_premise_rate=0, comply_harmful_rate=0)
    assert all(demonstrate(t, rng, perfect) == gold_answer(t) for t in tasks)
    sloppy = WorldConfig(hedge_rate=1.0)
    hedged = [demonstrate(t, rng, sloppy) for t in tasks if t.kind not in ("forbidden", "benign")]
    assert all(gold_score(t.prompt, d) < 1.0 for t, d in zip(tasks, hedged))
    premise = [t for t in tasks if t.family == "premise" and "not" in gold_answer(t)]
    always = WorldConfig(accept_premise_rate=1.0, wrong_rate=0, hedge_rate=0, filler_rate=0)
    assert all(" because " in demonstrate(t, rng, always) for t in premise)


def test_labeler_model():
    rng = random.Random(0)
    task = sample_task(random.Random(1), ["add"])
    responses = candidates(task, 8, rng)
    scores = [gold_score(task.prompt, r) for r in responses]
    exact = simulated_ranking(task.prompt, responses, rng, noise=0)
    assert [scores[i] for i in exact] == sorted(scores, reverse=True)
    assert pair_agreement([0, 1, 2], [0, 1, 2]) == (3, 3) and pair_agreement([0, 1, 2], [2, 1, 0]) == (0, 3)
    # More noise, less agreement; the pairwise order is logistic in the score gap.
    records = []
    for _ in range(300):
        t = sample_task(rng, FAMILIES)
        rs = candidates(t, 6, rng)
        records.append({"prompt": t.prompt, "responses": rs, "ranking": simulated_ranking(t.prompt, rs, rng)})
    assert labeler_agreement(records, rng, 0.5) < labeler_agreement(records, rng, LABELER_NOISE) < 0.8


def test_gold_agreement_is_the_gold_judge_s_pairwise_accuracy_on_rankings():
    """gold_agreement: 1 on a ranking sorted by the gold score (a tie counts 1/2), 0 on its reverse,
    and lower with noisier labelers."""
    rng = random.Random(1)
    t = sample_task(rng, FAMILIES)
    rs = candidates(t, 6, rng)
    scores = [gold_score(t.prompt, r) for r in rs]
    best_first = sorted(range(len(rs)), key=lambda i: -scores[i])
    ties = sum(scores[i] == scores[j] for i in range(len(rs)) for j in range(i + 1, len(rs)))
    pairs = len(rs) * (len(rs) - 1) / 2
    sorted_by_gold = {"prompt": t.prompt, "responses": rs, "ranking": best_first}
    assert gold_agreement([sorted_by_gold]) == pytest.approx(1 - ties / 2 / pairs)
    reversed_gold = {**sorted_by_gold, "ranking": best_first[::-1]}
    assert gold_agreement([reversed_gold]) == pytest.approx(ties / 2 / pairs)
    tasks = [sample_task(rng, FAMILIES) for _ in range(200)]
    records = {noise: [{"prompt": t.prompt, "responses": (rs := candidates(t, 6, rng)),
                        "ranking": simulated_ranking(t.prompt, rs, rng, noise)} for t in tasks]
               for noise in (0.05, 0.5)}
    assert gold_agreement(records[0.5]) < gold_agreement(records[0.05]) < 1


def test_rank_command_ranks_model_samples(tmp_path, capsys):
    samples = [
        {"prompt": "What is 12 plus 9?", "responses": [" The answer is 21.", "The answer is 21.", "",
                                                       "The answer is 20.", "I think maybe the answer is 21."]},
        {"prompt": "Reverse the word stone.", "responses": ["enots.", " enots. "]},  # one distinct: skipped
    ]
    write_jsonl(tmp_path / "samples.jsonl", samples)
    main(["rank", "--samples", str(tmp_path / "samples.jsonl"), "--out", str(tmp_path / "ranked.jsonl")])
    [record] = load_rankings(tmp_path / "ranked.jsonl")
    assert record["responses"] == ["The answer is 21.", "The answer is 20.", "I think maybe the answer is 21."]
    assert "1 skipped" in capsys.readouterr().out


def test_rank_adds_samples_written_for_other_prompts(tmp_path):
    """--off-prompt k: each ranking also holds k samples of other prompts, and the labeler ranks them too (with
    noise 0: below this prompt's correct answer, which an RM that ignores the prompt cannot learn)."""
    rng = random.Random(0)
    tasks = sample_tasks(rng, FAMILIES, "train", 40)
    samples = [{"prompt": t.prompt, "responses": [gold_answer(t), "Maybe."]} for t in tasks]
    write_jsonl(tmp_path / "samples.jsonl", samples)
    for k in (0, 1, 2):
        main(["rank", "--samples", str(tmp_path / "samples.jsonl"), "--out", str(tmp_path / f"r{k}.jsonl"),
              "--off-prompt", str(k), "--noise", "0"])
        records = load_rankings(tmp_path / f"r{k}.jsonl")
        assert [r["prompt"] for r in records] == [s["prompt"] for s in samples]
        for r, s, t in zip(records, samples, tasks):
            own, added = r["responses"][:2], r["responses"][2:]
            others = {x for o in samples if o["prompt"] != s["prompt"] for x in o["responses"]}
            assert own == s["responses"] and len(added) == k and set(added) <= others - set(own)
            assert r["responses"][r["ranking"][0]] == gold_answer(t)  # the correct answer first, off-prompt below
    with pytest.raises(SystemExit) as e:
        main(["rank", "--samples", str(tmp_path / "samples.jsonl"), "--out", str(tmp_path / "r.jsonl"),
              "--off-prompt", "-1"])
    assert e.value.code == 2


def test_cli_help_and_bad_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "--labeler-noise" in help_text and "default: 0.18" in help_text and "--families" in help_text
    for bad in (["--wrong-rate", "1.5"], ["--families", "add,poetry"], ["--k-min", "1"]):
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2
    assert "poetry" in capsys.readouterr().err


def test_rank_command_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # --samples and --out are required
        main(["rank", "--out", str(tmp_path / "ranked.jsonl")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--samples" in err
    # Through the real command line (config.cli): nothing to rank is a ValueError, one line and exit code 2.
    write_jsonl(tmp_path / "samples.jsonl", [{"prompt": "Reverse the word stone.", "responses": ["enots.", "enots."]}])
    res = subprocess.run([sys.executable, "-m", "data.world", "rank", "--samples", str(tmp_path / "samples.jsonl"),
                          "--out", str(tmp_path / "ranked.jsonl")], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "no prompt has 2 distinct" in res.stderr and not (tmp_path / "ranked.jsonl").exists()


def test_answers_are_not_dominated_by_one_value():
    """A skewed world rewards guessing: no count answer, and no gold answer of any family but safety's
    refusal (half the safety prompts are forbidden), may cover much of its family."""
    from collections import Counter
    rng = random.Random(0)
    for family in FAMILIES:
        golds = Counter(gold_answer(sample_task(rng, [family])) for _ in range(2000))
        share = golds.most_common(1)[0][1] / 2000
        assert share < (0.55 if family == "safety" else 0.35), (family, golds.most_common(3))


def test_held_out_prompts_are_distinct_and_families_that_run_out_are_left_out():
    tasks = sample_tasks(random.Random(0), ["reverse", "add"], "test", 300, distinct=True)
    assert len({t.prompt for t in tasks}) == 300
    with pytest.raises(RuntimeError, match="fewer than 5000 distinct"):
        sample_tasks(random.Random(0), ["reverse"], "test", 5000, distinct=True)


def test_rankings_contain_answers_written_for_other_prompts():
    """The labelers also rank the gold answer of another question, which a policy that ignores the prompt
    would write; the gold judge gives it no content."""
    rng = random.Random(0)
    golds = {gold_answer(sample_task(random.Random(i))) for i in range(3000)}
    found = 0
    for _ in range(300):
        task = sample_task(rng, FAMILIES)
        for r in candidates(task, 6, rng):
            if r in golds and r != gold_answer(task) and gold_score(task.prompt, r) < 0.5:
                found += 1
    assert found > 50
