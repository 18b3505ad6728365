"""What a sign error looks like in each stage, next to the correct code, on a finished run of
train.sh.

Each error of FLIPS is one line of this repository with a sign flipped, the mistake a student makes.
For each, the stage it breaks runs again with train.sh's own command line for that stage, from the
run's inputs, in a copy of the repository with that one line changed; the table then puts the
number docs/assignments.md tells students to watch for the run next to the same number for the
flipped stage.

    CLASS=1 bash train.sh                                   # the reference run, in runs/
    CLASS=1 python -m experiments.sign_flips --runs runs    # about 4 more minutes on 2 cores

Give the same preset variables (CLASS=1, QUICK=1 or none) as the run: the command lines are
train.sh's, printed by a dry run of it. Writes RUNS/sign_flips/ (the flipped stages, their logs and
sign_flips.md)."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lib.config import cli, parse_config

ROOT = Path(__file__).resolve().parent.parent

# One sign error per stage: name -> (file, the reference text, the same with the sign flipped, the
# stages it breaks: train.sh's output directories)
FLIPS = {
    "sft": ("sft.py", "scaled = loss * mask.sum() / n_global",
            "scaled = -loss * mask.sum() / n_global", ("base", "sft")),
    "ranking_loss": ("reward.py", "diff = scores[:, :, None] - scores[:, None, :]",
                     "diff = scores[:, None, :] - scores[:, :, None]", ("rm",)),
    "compute_rewards": ("ppo.py", "kl = (logprobs - ref_logprobs) * mask",
                        "kl = (ref_logprobs - logprobs) * mask", ("ppo",)),
    "ppo_losses": ("ppo.py", "torch.max(-advantages * ratio, -advantages * clipped_ratio)",
                   "torch.max(advantages * ratio, advantages * clipped_ratio)", ("ppo",)),
    "ptx_loss": ("ppo.py", "_, loss = policy(x, y)\n    return loss",
                 "_, loss = policy(x, y)\n    return -loss", ("ppo_ptx",)),
}


def first_last(v, digits=2):
    return f"{v[0]:.{digits}f} -> {v[-1]:.{digits}f}"


def first_last_5(v):  # the mean over the first 5 iterations -> over the last 5
    return f"{sum(v[:5]) / 5:+.2f} -> {sum(v[-5:]) / 5:+.2f}"


def mean_last(v):
    return f"mean {sum(v) / len(v):+.2f}, last {v[-1]:+.2f}"


# What docs/assignments.md tells students to watch, per error: (stage, metric, how it is shown).
# ptx_loss's diagnostic, the loss on held-out text of PPO-ptx against PPO, is computed in rows().
WATCH = {
    "sft": [("base", "val_text_loss", first_last), ("sft", "val_loss", first_last)],
    "ranking_loss": [("rm", "val_accuracy", lambda v: first_last(v, 3))],
    "compute_rewards": [("ppo", "kl", mean_last)],
    "ppo_losses": [("ppo", "score", first_last_5), ("ppo", "probe_score", first_last)],
}


@dataclass
class SignFlipsConfig:
    runs: str = "runs"  # a finished run of train.sh (the same preset variables as now)
    only: str | None = None  # these errors only (comma-separated names of FLIPS)


def repository_copy(dest, flip=None):
    """A copy of this repository in dest (new or empty), with the sign error FLIPS[flip] if
    given."""
    from tools.assignment import copy_repository
    dest = Path(dest)
    copy_repository(dest, ROOT)
    if flip:
        path, old, new, _ = FLIPS[flip]
        source = (dest / path).read_text()
        if source.count(old) != 1:
            raise ValueError(f"{path} does not hold {old!r} exactly once: FLIPS flips lines of the "
                             "reference code (in a student's copy, after --reference-into), and "
                             "needs updating if they moved")
        (dest / path).write_text(source.replace(old, new))
    return dest


def stage_commands(runs):
    """{output directory name: argv} of train.sh's training stages for this run directory, from a
    dry run (PYTHON=echo, every stage forced) over an empty directory: the preset variables are the
    environment's."""
    runs = Path(runs).resolve()
    if " " in str(runs):
        raise ValueError(f"--runs {runs}: a path with a space is not supported")
    with tempfile.TemporaryDirectory() as tmp:
        for d in ("world", "base", "sft", "rankings", "rm", "ppo", "ppo_ptx", "ppo_gold", "eval"):
            (Path(tmp) / d).mkdir()  # where the dry run writes each stage's OUTPUT.inputs
        for f in ("world/rankings_train.jsonl", "rankings/rankings_train.jsonl"):
            (Path(tmp) / f).touch()  # train.sh concatenates them
        env = {**os.environ, "PYTHON": "echo", "FORCE": "1", "RUNS": tmp, "ALGOS": ""}
        env.pop("LAUNCH", None)
        dry_run = ["bash", str(ROOT / "train.sh")]
        out = subprocess.run(dry_run, env=env, capture_output=True, text=True)
        if out.returncode:
            raise ValueError(f"the dry run of train.sh failed: {out.stderr.strip()[-500:]}")
        commands = {}
        for line in out.stdout.splitlines():
            argv = line.replace(tmp, str(runs)).split()
            if "--out-dir" in argv and argv[0].endswith(".py"):
                out_dir = Path(argv[argv.index("--out-dir") + 1])
                commands[out_dir.name] = argv
    return commands


def metric(path, key):
    """The values of one metric in a metrics.jsonl, in step order."""
    return [r[key] for r in map(json.loads, Path(path).read_text().splitlines()) if key in r]


def held_out_text_loss(ckpts, text_path):
    """evaluate.py's pretrain loss of each checkpoint on the same held-out windows."""
    from data.tokenizer import get_tokenizer
    from evaluate import EvalConfig, pretrain_loss, pretrain_windows
    from lib.common import load_checkpoint, model_from_checkpoint
    models = [model_from_checkpoint(load_checkpoint(c)).eval() for c in ckpts]
    tok = get_tokenizer(load_checkpoint(ckpts[0]).get("tokenizer", "byte"))
    block_size = models[0].config.block_size
    windows = pretrain_windows(tok, text_path, block_size, EvalConfig.pretrain_windows)
    return [pretrain_loss(m, windows, 32) for m in models]


def start_flipped(flip, stage, argv, out):
    """Start train.sh's command argv of one stage in the repository copy with FLIPS[flip], writing
    to out/FLIP_STAGE; PPO stages take one thread each, as in train.sh, to run side by side."""
    repo = out / f"repo_{flip}"
    if not repo.exists():  # one copy per error and run of this script (main removes old ones)
        repository_copy(repo, flip)
    dest = out / f"{flip}_{stage}"
    shutil.rmtree(dest, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    if stage.startswith("ppo"):
        env["OMP_NUM_THREADS"] = "1"
    args = [a for a in argv[1:] if a != "--overwrite"] + ["--out-dir", str(dest)]
    with open(out / f"{flip}_{stage}.log", "w") as log:
        return subprocess.Popen([sys.executable, str(repo / argv[0]), *args], cwd=repo, env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def wait(flip, stage, proc, out):
    if proc.wait():
        raise SystemExit(f"error: {stage} with the {flip} sign error failed (exit code "
                         f"{proc.returncode}); see {out}/{flip}_{stage}.log")


def rows(runs, out, names, commands):
    """The table: per error, each diagnostic of the run and of the flipped stage."""
    table = []
    for flip in names:
        for stage, key, show in WATCH.get(flip, []):
            good = metric(runs / stage / "metrics.jsonl", key)
            bad = metric(out / f"{flip}_{stage}" / "metrics.jsonl", key)
            table.append((flip, stage, key, show(good), show(bad)))
        if flip == "ptx_loss":
            argv = commands["ppo_ptx"]
            text = Path(argv[argv.index("--ptx-data") + 1])
            val = text.with_name("pretrain_val.txt")
            flipped = out / "ptx_loss_ppo_ptx/ckpt.pt"
            ckpts = [runs / "ppo/ckpt.pt", runs / "ppo_ptx/ckpt.pt", flipped]
            ppo, ptx, bad = held_out_text_loss(ckpts, val if val.exists() else text)
            label = f"held-out text loss (PPO's: {ppo:.3f})"
            table.append((flip, "ppo_ptx", label, f"{ptx:.3f}", f"{bad:.3f}"))
    return table


def main(argv=None):
    cfg = parse_config(SignFlipsConfig, argv)
    runs = Path(cfg.runs)
    names = cfg.only.split(",") if cfg.only else list(FLIPS)
    if unknown := [n for n in names if n not in FLIPS]:
        raise ValueError(f"--only: unknown {', '.join(unknown)}; the errors are {', '.join(FLIPS)}")
    commands = stage_commands(runs)
    for flip in names:
        for stage in FLIPS[flip][3]:
            if not (runs / stage / "ckpt.pt").exists():
                ckpt = runs / stage / "ckpt.pt"
                raise FileNotFoundError(f"{ckpt}: run train.sh first (the same preset)")
    out = runs / "sign_flips"
    out.mkdir(exist_ok=True)
    for flip in names:
        shutil.rmtree(out / f"repo_{flip}", ignore_errors=True)
    ppo = []
    for flip in names:
        for stage in FLIPS[flip][3]:
            proc = start_flipped(flip, stage, commands[stage], out)
            if stage.startswith("ppo"):
                ppo.append((flip, stage, proc))
            else:  # one at a time, with every thread
                print(f"== {flip}: {stage}", flush=True)
                wait(flip, stage, proc, out)
    print(f"== {', '.join(f for f, _, _ in ppo)}: PPO side by side", flush=True)
    for flip, stage, proc in ppo:
        wait(flip, stage, proc, out)
    lines = ["| sign error | stage | diagnostic | the run | with the sign flipped |",
             "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(runs, out, names, commands)]
    (out / "sign_flips.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    cli(main)
