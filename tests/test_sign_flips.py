"""The diagnostics of docs/assignments.md tell a correct stage from one with a sign error, on a
shortened twin of the class preset (CLASS=1 bash train.sh; experiments/sign_flips.py runs the same
errors on the preset itself): each stage runs through its real command line, once in this repository
and once in a copy with one sign flipped (experiments.sign_flips.FLIPS), the error a student would
make, and the number the handout tells students to watch must point the right way for the first and
the wrong way for the second. Pretraining and SFT train a tiny model on tiny data; the RM and PPO
start from the tiny random policy of test_reliability, whose unended responses get the fixed low
score: learning to end them is the direction PPO's score must show."""
import json
from pathlib import Path

import pytest

from experiments.sign_flips import held_out_text_loss, metric, repository_copy
from test_reliability import finish, start, write_tiny_policy_and_rm
from test_stages import TINY_MODEL, write_tiny_data

ROOT = Path(__file__).resolve().parent.parent


def run_all(commands, cwd):
    """Run the stage command lines [(repository, [script, args...]), ...] side by side, one thread
    each, each with its repository's code."""
    procs = [start([repo / script, *args], cwd, PYTHONPATH=str(repo))
             for repo, (script, *args) in commands]
    for proc in procs:
        finish(proc)


@pytest.fixture
def repos(tmp_path):
    """The reference repository and a sign-flipped copy per name asked for."""
    def make(*flips):
        return [ROOT, *(repository_copy(tmp_path / f"repo_{f}", f) for f in flips)]
    return make


def test_pretraining_and_sft_losses_fall_and_rise_with_the_loss_flipped(tmp_path, repos):
    """Stage 0 and 1: the validation losses (here on the training data itself) fall; with the loss's
    sign flipped (gradient ascent) they rise."""
    write_tiny_data(tmp_path)
    ref, bad = repos("sft")
    common = ["--batch-size", "8", "--micro-batch-size", "8", "--lr", "3e-3",
              "--warmup-iters", "0", "--eval-interval", "5", "--max-iters", "20", *TINY_MODEL]
    pre = ["sft.py", "--text-data", "text.txt", "--val-text-data", "text.txt", *common]
    run_all([(ref, [*pre, "--out-dir", "base"]),
             (bad, [*pre, "--out-dir", "base_flipped"])], tmp_path)
    sft = ["sft.py", "--init", "base/ckpt.pt", "--sft-data", "sft.jsonl",
           "--val-sft-data", "sft.jsonl", *common]
    run_all([(ref, [*sft, "--out-dir", "sft"]),
             (bad, [*sft, "--out-dir", "sft_flipped"])], tmp_path)
    for out, key in (("base", "val_text_loss"), ("sft", "val_loss")):
        good = metric(tmp_path / out / "metrics.jsonl", key)
        flipped = metric(tmp_path / f"{out}_flipped" / "metrics.jsonl", key)
        assert good[-1] < good[0] - 0.5, (out, good)
        assert flipped[-1] > flipped[0], (out, flipped)


def test_rm_accuracy_above_half_and_below_with_the_ranking_loss_flipped(tmp_path, repos):
    """Stage 2: the RM orders held-out ranked pairs like the labelers more often than chance; with
    the ranking loss's difference reversed it orders them the other way."""
    write_tiny_policy_and_rm(tmp_path)
    words = ("stone apple river cloud green table house light paper horse water chair bread "
             "plant mouse sugar grape lemon tiger whale onion pearl").split()
    for split, chosen in (("train", words[:16]), ("val", words[16:])):  # held-out words
        with open(tmp_path / f"rank_{split}.jsonl", "w") as f:
            for w in chosen:  # the labelers' order: the answer, hedged, the word itself, a refusal
                responses = [f"{w[::-1]}.", f"I think {w[::-1]}.", f"{w}.", "No."]
                record = {"prompt": f"Reverse the word {w}.", "responses": responses,
                          "ranking": [0, 1, 2, 3]}
                f.write(json.dumps(record) + "\n")
    ref, bad = repos("ranking_loss")
    rm = ["reward.py", "--init", "sft.pt", "--data", "rank_train.jsonl",
          "--val-data", "rank_val.jsonl", "--max-iters", "30", "--batch-size", "4",
          "--micro-batch-size", "4", "--lr", "3e-3", "--eval-interval", "10", "--device", "cpu"]
    run_all([(ref, [*rm, "--out-dir", "rm"]),
             (bad, [*rm, "--out-dir", "rm_flipped"])], tmp_path)
    good = metric(tmp_path / "rm" / "metrics.jsonl", "val_accuracy")
    flipped = metric(tmp_path / "rm_flipped" / "metrics.jsonl", "val_accuracy")
    assert good[-1] > 0.65 and flipped[-1] < 0.35, (good, flipped)


def test_ppo_kl_positive_score_rising_and_ptx_loss_lower_than_ppo(tmp_path, repos):
    """Stage 3: PPO's kl is positive and its score rises; with compute_rewards' kl reversed the
    logged kl is negative, with ppo_losses' advantages reversed the score does not rise. PPO-ptx
    ends with a lower loss on the pretraining text than PPO; with ptx_loss's sign flipped, a higher
    one."""
    write_tiny_policy_and_rm(tmp_path)
    write_tiny_data(tmp_path)
    ref, bad_kl, bad_pg, bad_ptx = repos("compute_rewards", "ppo_losses", "ptx_loss")
    ppo = ["ppo.py", "--sft", "sft.pt", "--rm", "rm.pt", "--prompts", "prompts.jsonl",
           "--batch-size", "16", "--minibatch-size", "8", "--max-new-tokens", "8",
           "--lr", "3e-3", "--kl-coef", "0.05", "--total-episodes", "480", "--device", "cpu",
           "--sample-interval", "1000"]
    ptx = [*ppo, "--ptx-data", "text.txt", "--ptx-coef", "1", "--ptx-seq-len", "32",
           "--ptx-batch-size", "4"]
    run_all([(ref, [*ppo, "--out-dir", "ppo"]),
             (bad_kl, [*ppo, "--out-dir", "ppo_kl_flipped"]),
             (bad_pg, [*ppo, "--out-dir", "ppo_pg_flipped"]),
             (ref, [*ptx, "--out-dir", "ppo_ptx"]),
             (bad_ptx, [*ptx, "--out-dir", "ppo_ptx_flipped"])], tmp_path)

    def rise(out):  # the score's mean over the last 5 iterations minus its mean over the first 5
        scores = metric(tmp_path / out / "metrics.jsonl", "score")
        assert len(scores) == 30
        return sum(scores[-5:]) / 5 - sum(scores[:5]) / 5

    def mean_kl(out):
        kl = metric(tmp_path / out / "metrics.jsonl", "kl")
        return sum(kl) / len(kl)

    good_rise, flipped_rise = rise("ppo"), rise("ppo_pg_flipped")
    assert good_rise > 1.0 and flipped_rise < 0.3, (good_rise, flipped_rise)
    good_kl, flipped_kl = mean_kl("ppo"), mean_kl("ppo_kl_flipped")
    assert good_kl > 0.1 and flipped_kl < -0.1, (good_kl, flipped_kl)

    outs = ("ppo", "ppo_ptx", "ppo_ptx_flipped")
    ckpts = [tmp_path / out / "ckpt.pt" for out in outs]
    loss = dict(zip(outs, held_out_text_loss(ckpts, tmp_path / "text.txt")))
    ptx_lower = loss["ppo_ptx"] < loss["ppo"] - 0.5
    flipped_higher = loss["ppo_ptx_flipped"] > loss["ppo"] + 0.5
    assert ptx_lower and flipped_higher, loss


def test_the_flipped_stages_run_train_sh_s_command_lines(tmp_path, monkeypatch):
    """experiments.sign_flips reruns each stage with the command line train.sh gives it under the
    preset in the environment, from a dry run of train.sh."""
    from experiments.sign_flips import FLIPS, stage_commands
    monkeypatch.setenv("CLASS", "1")
    commands = stage_commands(tmp_path)
    assert {stage for *_, stages in FLIPS.values() for stage in stages} <= commands.keys()
    rm = commands["rm"]
    out_dir = rm[rm.index("--out-dir") + 1]
    assert rm[0] == "reward.py" and out_dir == str(tmp_path.resolve() / "rm")
    epochs = rm[rm.index("--epochs") + 1]
    assert epochs == "2" and "--no-score-logprob" in rm  # the class preset's RM
    assert "--ptx-data" in commands["ppo_ptx"] and "--ptx-data" not in commands["ppo"]
