"""assignment.py checked three ways: in the student copy it writes every exercise test fails (and the rest of the
suite still imports), and with the reference bodies put back every exercise test passes again: the stubs, the
tests and the reference agree."""
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tools import assignment

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = ["attention", "sft_loss_mask", "ranking_loss", "compute_rewards", "compute_gae", "ppo_losses",
             "ptx_loss", "adaptive_kl_coef", "group_advantages", "dpo_loss"]


def run(args, cwd):
    """A command in a subprocess on one thread; COLUMNS keeps pytest's one-line failure reasons whole."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def pytest_counts(res):
    """{"passed": n, "failed": n, ...} from the summary line of a pytest run."""
    summary = res.stdout.splitlines()[-1] if res.stdout else ""
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", summary)}


def test_student_copy_fails_every_exercise_test_and_the_reference_passes_them(tmp_path):
    if any("NotImplementedError" in "".join(body) for body in assignment.reference_bodies(ROOT).values()):
        pytest.skip("this is a student copy with exercises left: the check needs the reference bodies")
    student = tmp_path / "student"
    exercise_tests = ["-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "tests/test_assignments.py"]

    # (a) the student copy: the same files; the marked functions' bodies are the stub, all else is unchanged
    res = run(["-m", "tools.assignment", "--out", str(student)], ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{len(EXERCISES)} exercises stubbed" in res.stdout, res.stdout
    files = list(assignment.repo_files(ROOT))
    assert list(assignment.repo_files(student)) == files
    stubbed = []
    for rel in files:
        original, copy = (ROOT / rel).read_bytes(), (student / rel).read_bytes()
        marked = assignment.exercises(original.decode(), rel) if rel.suffix == ".py" else {}
        if not marked:
            assert copy == original, f"{rel} is not marked but changed"
            continue
        lines = copy.decode().splitlines(keepends=True)
        for name, (first, last, indent) in assignment.exercises(copy.decode(), rel).items():
            assert lines[first:last + 1] == [f'{indent}raise NotImplementedError("exercise {name}: '
                                             f'see docs/assignments.md")\n'], (rel, name)
            reference = original.decode().splitlines(keepends=True)[marked[name][0]:marked[name][1] + 1]
            assert "".join(reference) not in copy.decode(), f"the reference body of {name} is in the copy"
            stubbed.append(name)
    assert sorted(stubbed) == sorted(EXERCISES)
    again = run(["-m", "tools.assignment", "--out", str(student)], ROOT)  # a copy never overwrites a directory
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr

    # (b) in the copy, every exercise test fails, each on its own exercise's NotImplementedError
    res = run(exercise_tests, student)
    counts = pytest_counts(res)
    assert counts.get("failed", 0) > 0 and set(counts) == {"failed"}, res.stdout[-3000:]
    failures = [line for line in res.stdout.splitlines() if line.startswith("FAILED ")]
    assert len(failures) == counts["failed"]
    for name in EXERCISES:
        mine = [line for line in failures if f"::test_{name}_" in line]
        assert mine, f"no failing test of exercise {name}"
        assert all(f"NotImplementedError: exercise {name}:" in line for line in mine), mine

    # (c) in the copy, the rest of the suite still imports
    res = run(["-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "tests"], student)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]

    # (d) with the reference bodies put back, the copy is the repository again and every exercise test passes
    assert sorted(assignment.insert_reference(ROOT, student)) == sorted(EXERCISES)
    for rel in files:
        assert (student / rel).read_bytes() == (ROOT / rel).read_bytes(), rel
    res = run(exercise_tests, student)
    assert res.returncode == 0 and pytest_counts(res) == {"passed": counts["failed"]}, res.stdout[-3000:]


def test_partial_keys_and_the_grader(tmp_path):
    """--only puts in exactly the keys named, --except all others; `grade` scores each student's
    marked bodies against this repository's tests, whatever else the student changed, and writes
    JUnit XML."""
    one, three = tmp_path / "one", tmp_path / "three"
    for student in (one, three):
        assert run(["-m", "tools.assignment", "--out", str(student)], ROOT).returncode == 0
    key = ["-m", "tools.assignment", "--reference-into"]
    res = run([*key, str(one), "--only", "ranking_loss"], ROOT)
    assert res.returncode == 0 and "of 1 exercises" in res.stdout, res.stdout + res.stderr
    solved = ["attention", "ranking_loss", "compute_gae"]
    others = ",".join(n for n in EXERCISES if n not in solved)
    res = run([*key, str(three), "--except", others], ROOT)
    assert res.returncode == 0 and "of 3 exercises" in res.stdout, res.stdout + res.stderr
    # only the marked bodies count: a student who empties the tests gains nothing
    (three / "tests" / "test_assignments.py").write_text("def test_nothing():\n    pass\n")
    junit = tmp_path / "grades.xml"
    res = run(["-m", "tools.assignment", "grade", str(one), str(three), "--junit", str(junit)],
              ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    reports = res.stdout.split("\n\n")
    assert "1 of 10 exercises solved, 10 of 100 points" in reports[0], res.stdout
    assert "3 of 10 exercises solved, 35 of 100 points" in reports[1], res.stdout
    passed = {}
    for suite in ET.parse(junit).getroot().iter("testsuite"):
        passed[suite.get("name")] = [c.get("name") for c in suite.iter("testcase")
                                     if c.find("failure") is None]
    assert passed == {str(one): ["ranking_loss"], str(three): solved}


def test_solutions_file_holds_every_reference_function(tmp_path):
    """The key, apart from any student copy: each exercise's marker, signature, docstring, body."""
    out = tmp_path / "solutions.md"
    res = run(["-m", "tools.assignment", "--solutions", str(out)], ROOT)
    assert res.returncode == 0, res.stderr
    text = out.read_text()
    for name, body in assignment.reference_bodies(ROOT).items():
        assert f"## {name} (" in text and f"# exercise: {name}\n" in text and "".join(body) in text
    bad = run(["-m", "tools.assignment", "--reference-into", str(tmp_path), "--only", "nope"], ROOT)
    assert bad.returncode == 2 and "unknown exercise nope" in bad.stderr
