"""experiments/gpu_check.sh in TINY mode on the CPU: every step runs or says why not, and the
figures it parses from bench.py's JSON and train.sh's log and reports are there and finite."""
import json
import math
import os
import subprocess
import sys

import torch

from test_stages import ROOT


def finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_gpu_check_tiny_on_cpu_records_every_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "TINY": "1", "DEVICE": "cpu", "OUT": str(out), "WORK": str(work),
           "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_check.sh")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert md.strip() in res.stdout  # the markdown is printed too
    assert summary["device"] == "cpu" and summary["tiny"] is True and summary["torch"]
    steps = summary["steps"]
    assert list(steps) == ["bench", "world", "preset", "hh"]
    for name, step in steps.items():
        assert step["ok"] or step.get("skipped"), f"{name}: {step['error']}"
        assert finite(step["seconds"]) and step["seconds"] <= step["limit_s"]
        assert f"| {name} | {'yes' if step['ok'] else 'skipped'} |" in md
    assert "STEPS=hh" in steps["hh"]["skipped"]  # TINY leaves the GPT-2-layout hh pipeline out

    bench = steps["bench"]
    figures = [*bench["train_tokens_per_s"].values(), *bench["decode_tokens_per_s"].values(),
               *bench["decode_vs_transformers"].values(), bench["ppo_iteration_s"]]
    assert figures and all(finite(v) and v > 0 for v in figures), figures
    assert {"ours", "nocache"} <= set(bench["decode_tokens_per_s"])
    assert 0 < bench["ppo_generate_share"] < 1
    assert bench["mfu"] is None and bench["mfu_reason"]  # no peak FLOP/s for a CPU
    if summary["transformers"]:
        assert set(bench["decode_vs_transformers"]) == {"eager", "sdpa"}
    else:
        assert bench["decode_vs_transformers_reason"] == "transformers not installed"

    world, preset = steps["world"], steps["preset"]
    stages = {"pretrain", "sft", "reward model", "ppo", "ppo-ptx", "evaluate"}
    assert stages <= set(world["stages_s"])
    assert all(finite(s) for s in world["stages_s"].values()) and finite(world["pipeline_s"])
    assert "reward model" in preset["reused"] and "reward model" not in preset["stages_s"]
    assert {"ppo", "ppo-ptx", "evaluate"} <= set(preset["stages_s"])
    for step in (world, preset):
        ppo = step["models"]["ppo"]
        for key in ("accuracy", "accuracy_minus_sft", "greedy_accuracy"):
            ci = ppo[key + "_ci"]
            assert finite(ppo[key]) and len(ci) == 2 and all(map(finite, ci))
        assert step["models"]["sft"]["accuracy_minus_sft"] == 0.0  # SFT against itself
    assert (out / "world" / "report.md").exists() and (out / "preset" / "report.json").exists()
    # the preset's PPO arguments reached ppo.py
    config = torch.load(work / "preset" / "ppo" / "ckpt.pt", weights_only=True)["config"]
    assert (config["batch_size"], config["minibatch_size"]) == (32, 16)
