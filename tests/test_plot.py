"""plot.py on a synthetic run of three stages: curves.txt without matplotlib (first/min/max/last against the
values written, sparklines that rise and fall with the series, the stage kinds, a torn last line skipped
with a warning, NaN and dict values survived), curves.png with matplotlib, and one-line errors."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import plot

ROOT = Path(__file__).resolve().parent.parent
KL = [0.5, 0.25, 2.0, 1.0]  # PPO's kl cycles through these: first 0.5, min 0.25, max 2.0, last (step 19) 1.0


def write_log(path, records, tail=""):
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


@pytest.fixture
def runs(tmp_path):
    """runs/sft (an LM stage with sparse val_loss and odd keys), runs/rm, runs/ppo (torn last line)."""
    runs = tmp_path / "runs"
    lm = [{"step": s, "time": s / 10, "loss": 3.0 - 0.025 * s, "lr": 1e-3, "ms": 100.0, "tokens_per_s": 1e4}
          for s in range(0, 100, 10)]
    lm += [{"step": s, "time": s / 10, "val_loss": v} for s, v in [(0, 3.5), (50, 3.0), (90, 2.5)]]
    lm += [{"step": 90, "time": 9.0, "by_k": {"2": 0.5}, "flag": True, "grad_norm": math.nan, "note": "x"}]
    write_log(runs / "sft" / "metrics.jsonl", lm)
    rm = [{"step": s, "time": s, "loss": 0.7 - 0.01 * s, "accuracy": 0.5 + 0.02 * s, "lr": 3e-4, "ms": 50.0}
          for s in range(10)]
    rm += [{"step": s, "time": s, "val_accuracy": 0.5 + 0.01 * s, "val_loss": 0.69, "val_accuracy_by_k": {"2": 0.6},
            "score_mean": 0.0, "score_std": 1.0} for s in (0, 10)]
    write_log(runs / "rm" / "metrics.jsonl", rm)
    ppo = [{"step": i, "time": i, "score": -1.0 + 0.1 * i, "kl": KL[i % 4], "exact_kl": KL[i % 4], "entropy": 0.2,
            "non_score_reward": -0.3 * KL[i % 4], "kl_coef": 0.3, "pg_loss": 0.01, "vf_loss": 1.0 / (i + 1),
            "clipfrac": 0.01, "explained_variance": 0.5, "response_length": 20.0 - 0.5 * i} for i in range(20)]
    write_log(runs / "ppo" / "metrics.jsonl", ppo, tail='{"step": 20, "time": 20, "score": 9')  # a crash mid-line
    return runs


def row(text, metric):
    """(n, first, min, max, last, sparkline) of a metric's line in curves.txt."""
    line = next(line for line in text.splitlines() if line.split()[:1] == [metric])
    n, first, low, high, last, spark = line.split()[1:7]
    return int(n), float(first), float(low), float(high), float(last), spark


def rises(spark):
    levels = [plot.SPARKS.index(c) for c in spark]
    return levels[0] == 0 and levels[-1] == len(plot.SPARKS) - 1 and levels == sorted(levels)


def test_text_summary_without_matplotlib(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as on CI
    plot.main([str(runs)])
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"wrote {runs / s / 'curves.txt'}" for s in ("ppo", "rm", "sft")]
    assert not list(runs.rglob("*.png"))
    # the torn last line: skipped, named in one warning (file and line number), and not counted
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {runs / 'ppo' / 'metrics.jsonl'}: skipped line 21: not a JSON record with a "
                        "step (torn by a crash?)"]
    assert "matplotlib is not installed" in err

    ppo = (runs / "ppo" / "curves.txt").read_text()
    assert ppo.startswith(f"PPO (ppo.py): {runs / 'ppo' / 'metrics.jsonl'}\n20 records, steps 0 to 19")
    n, first, low, high, last, spark = row(ppo, "score")
    assert (n, first, low, high, last) == (20, -1.0, -1.0, pytest.approx(0.9), pytest.approx(0.9))
    assert len(spark) == 40 and rises(spark)
    assert row(ppo, "kl")[:5] == (20, 0.5, 0.25, 2.0, 1.0)
    assert rises(row(ppo, "response_length")[5][::-1])  # shorter responses: a falling sparkline
    assert set(row(ppo, "kl_coef")[5]) == {"▄"}  # a constant: flat, mid-height
    assert [line.split()[0] for line in ppo.splitlines()[5:10]] == ["score", "kl", "exact_kl", "entropy",
                                                                    "response_length"]  # the panels' first

    sft = (runs / "sft" / "curves.txt").read_text()
    assert sft.startswith("language model")
    n, first, low, high, last, spark = row(sft, "loss")
    assert (n, first, high) == (10, 3.0, 3.0) and low == last == pytest.approx(3.0 - 0.025 * 90)
    assert rises(spark[::-1])
    n, first, low, high, last, spark = row(sft, "val_loss")
    assert (n, first, low, high, last) == (3, 3.5, 2.5, 3.5, 2.5) and rises(spark[::-1])
    assert len(set(spark)) == len(plot.SPARKS)  # 3 points, interpolated: a slope through every level, no steps
    assert "only NaN/inf (1 values)" in sft  # grad_norm: NaN is reported, not plotted
    assert "by_k" not in sft and "flag" not in sft and "note" not in sft

    rm = (runs / "rm" / "curves.txt").read_text()
    assert rm.startswith("reward model")
    assert row(rm, "accuracy")[:5] == (10, 0.5, 0.5, pytest.approx(0.68), pytest.approx(0.68))
    assert row(rm, "val_accuracy")[0] == 2 and "val_accuracy_by_k" not in rm


def test_png_with_matplotlib(runs):
    pytest.importorskip("matplotlib")
    txt, png = plot.plot_run(runs / "ppo" / "metrics.jsonl")
    assert txt == runs / "ppo" / "curves.txt" and png == runs / "ppo" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert sorted(p.name for p in png.parent.iterdir()) == ["curves.png", "curves.txt", "metrics.jsonl"]  # no temp


def test_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    res = subprocess.run([sys.executable, "-m", "tools.plot", str(missing)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == f"error: {missing}: no such file or directory\n"
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl in it or below"):
        plot.find_metrics([tmp_path])
    with pytest.raises(SystemExit) as e:
        plot.main([])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        plot.main(["--help"])
    assert e.value.code == 0 and "PATH [PATH ...]" in capsys.readouterr().out
