"""Assignment mode: a student copy of this repository in which the exercises are left to write.

A function is an exercise when the line directly above it (above its first decorator, if any) is the comment
`# exercise: NAME`. In the student copy each exercise keeps that comment, its decorators, its signature and
its docstring (which states the equation); the rest of its body becomes one line,
`raise NotImplementedError("exercise NAME: see docs/assignments.md")`. Every other line of every file is
copied byte for byte, so the rest of the project runs unchanged once the exercises are written.

    python -m tools.assignment --out ../student               # the student copy (a new or empty directory)
    python -m tools.assignment --reference-into ../student    # put this repository's bodies back into a copy
    python -m tools.assignment --reference-into ../student --only attention,dpo_loss   # some keys
    python -m tools.assignment --reference-into ../student --except dpo_loss    # all keys but one
    python -m tools.assignment --solutions solutions.md     # every reference function, in one file
    python -m tools.assignment grade ../student --junit grades.xml   # tests passed, points

Students run `python -m pytest tests/test_assignments.py -k NAME`; docs/assignments.md is their handout.
--reference-into (the function insert_reference) matches the bodies by exercise name: the teacher's check,
tests/test_assignment_mode.py, uses it to prove that every stub fails its tests and every reference passes.
`grade` grades the bodies of the marked functions only: it puts a student's bodies into a fresh
stubbed copy of this repository and runs this repository's tests/test_assignments.py there, so edits
anywhere else (the tests included) change nothing; an exercise scores its points when all its tests
pass.
"""
import ast
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tokenize
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from lib.config import cli, parse_config

ROOT = Path(__file__).resolve().parent.parent  # the repository
SKIPPED_DIRS = {"runs", "exported", "__pycache__"}  # and every directory whose name starts with "."
MARKER = re.compile(r"# exercise: (\w+)")
# each exercise's points (100 in all; docs/assignments.md lists them with the time each takes)
POINTS = {"attention": 10, "sft_loss_mask": 5, "ranking_loss": 10, "compute_rewards": 10,
          "compute_gae": 15, "ppo_losses": 15, "ptx_loss": 5, "adaptive_kl_coef": 5,
          "group_advantages": 10, "dpo_loss": 15}


@dataclass
class AssignmentConfig:
    out: str | None = None  # write the student copy here (a directory that does not exist or is empty)
    reference_into: str | None = None  # instead: put the reference bodies back into this student copy
    only: str | None = None  # with --reference-into: these exercises only (comma-separated names)
    except_: str | None = None  # with --reference-into: every exercise but these (comma-separated)
    solutions: str | None = None  # instead: write every exercise's reference function to this file

    def __post_init__(self):
        if sum(x is not None for x in (self.out, self.reference_into, self.solutions)) != 1:
            raise ValueError("give one of --out DIR (make a student copy), --reference-into DIR "
                             "and --solutions FILE")
        if (self.only or self.except_) and self.reference_into is None:
            raise ValueError("--only and --except choose the keys --reference-into puts in")
        if self.only and self.except_:
            raise ValueError("give --only or --except, not both")


@dataclass
class GradeConfig:
    students: list[str]  # the students' copies of the repository, one directory each
    junit: str | None = None  # also write the grades as JUnit XML (a test case per exercise)


def repo_files(root, skip=None):
    """Relative paths of the files a copy takes: all but dot-directories, runs/, exported/, caches, *.pyc,
    the directory `skip` and any other copy of the repository (a directory with its own tools/assignment.py), so
    that a student copy made inside the repository is neither copied again nor taken for the reference."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIPPED_DIRS
                             and Path(dirpath, d).resolve() != skip and not Path(dirpath, d, "tools/assignment.py").exists())
        yield from (Path(dirpath, f).relative_to(root) for f in sorted(filenames) if not f.endswith(".pyc"))


def exercises(source, path):
    """{name: (first, last, indent)} of the exercises in a Python source: lines first..last (0-based, both
    included) are the function's body after its docstring, indent is the docstring's indentation."""
    markers = {}  # number (1-based) of the line after a marker comment -> the exercise's name
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and (m := MARKER.fullmatch(tok.string)) and tok.line.strip() == tok.string:
            markers[tok.start[0] + 1] = m.group(1)
    if not markers:
        return {}
    found = {}
    for node in ast.walk(ast.parse(source, str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        name = markers.pop(min([node.lineno] + [d.lineno for d in node.decorator_list]), None)
        if name is None:
            continue
        doc = node.body[0]
        if ast.get_docstring(node) is None or (len(node.body) > 1 and node.body[1].lineno == doc.end_lineno):
            raise ValueError(f"{path}:{node.lineno}: exercise {name} needs a docstring on lines of its own")
        if name in found:
            raise ValueError(f"{path}: exercise {name} is marked twice")
        found[name] = (doc.end_lineno, node.end_lineno - 1, " " * doc.col_offset)
    for line, name in markers.items():
        raise ValueError(f"{path}:{line - 1}: the marker of exercise {name} is not directly above a def")
    return found


def replace_bodies(path, bodies=None, names=None):
    """Rewrite the exercises in the file at `path` (those in `names`, when given): after each
    docstring, the stub (bodies None) or the lines bodies[name]. Returns the names of the exercises
    rewritten; every other line stays byte for byte."""
    source = path.read_bytes().decode("utf-8")
    lines = source.splitlines(keepends=True)
    found = {name: where for name, where in exercises(source, path).items()
             if names is None or name in names}
    for name, (first, last, indent) in sorted(found.items(), key=lambda item: -item[1][0]):  # bottom up
        if bodies is None:
            newline = lines[last][len(lines[last].rstrip("\r\n")):] or "\n"  # the file's own line ending
            lines[first:last + 1] = [f'{indent}raise NotImplementedError("exercise {name}: see docs/assignments.md")'
                                     f"{newline}"]
        elif name in bodies:
            lines[first:last + 1] = bodies[name]
        else:
            raise ValueError(f"{path}: exercise {name} has no reference body")
    if found:
        path.write_bytes("".join(lines).encode("utf-8"))
    return list(found)


def reference_bodies(root, skip=None):
    """{name: the lines of its body after the docstring} of every exercise in the repository at root."""
    bodies, where = {}, {}
    for rel in repo_files(root, skip):
        if rel.suffix != ".py":
            continue
        source = (root / rel).read_bytes().decode("utf-8")
        lines = source.splitlines(keepends=True)
        for name, (first, last, _) in exercises(source, rel).items():
            if name in bodies:
                raise ValueError(f"{root}: exercise {name} is marked in {where[name]} and in {rel}")
            bodies[name], where[name] = lines[first:last + 1], rel
    return bodies


def copy_repository(out, root=ROOT):
    """Copy the repository at root to out (new or empty), byte for byte. Returns the files
    copied."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory: give a new or empty one")
    files = list(repo_files(root, skip=out))
    for rel in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, out / rel)  # copy2 keeps the mode: train.sh stays executable
    return files


def make_student_copy(out, root=ROOT):
    """Copy the repository at root to out (new or empty) with every exercise stubbed. Returns the
    files copied and {file: names of its exercises}."""
    files, stubbed = copy_repository(out, root), {}
    for rel in files:
        if rel.suffix == ".py" and (names := replace_bodies(Path(out) / rel)):
            stubbed[rel] = names
    return files, stubbed


def insert_reference(reference_root, student_root, names=None):
    """Put the reference repository's exercise bodies (those in `names`, when given) into the
    student copy at student_root, matched by exercise name (a student's own solutions are
    overwritten). Returns the names."""
    reference_root, student_root = Path(reference_root).resolve(), Path(student_root).resolve()
    if not student_root.is_dir():
        raise FileNotFoundError(f"{student_root}: no such directory (make a student copy with --out first)")
    bodies = reference_bodies(reference_root, skip=student_root)
    return [name for rel in repo_files(student_root) if rel.suffix == ".py"
            for name in replace_bodies(student_root / rel, bodies, names)]


def chosen(cfg, known):
    """The exercise names --only / --except select (None: all), each checked against `known`."""
    given = cfg.only or cfg.except_
    if not given:
        return None
    names = {n.strip() for n in given.split(",") if n.strip()}
    if unknown := sorted(names - set(known)):
        raise ValueError(f"unknown exercise {', '.join(unknown)}; the exercises are "
                         f"{', '.join(known)}")
    return names if cfg.only else set(known) - names


def in_points_order(name):
    return list(POINTS).index(name) if name in POINTS else len(POINTS)


def write_solutions(path, root=ROOT):
    """Every exercise's reference function (marker, signature, docstring and body), in the order of
    POINTS, as one Markdown file for the teacher: a key kept apart from any student copy."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--solutions {path} is a directory; give a file name")
    functions = {}
    for rel in repo_files(root):
        if rel.suffix != ".py":
            continue
        source = (root / rel).read_text()
        lines = source.splitlines(keepends=True)
        for name, (_, last, _) in exercises(source, rel).items():
            marker = f"# exercise: {name}"
            start = next(i for i in range(last, -1, -1) if lines[i].strip() == marker)
            functions[name] = (rel, "".join(lines[start:last + 1]))
    parts = ["# Solutions to the exercises (the reference bodies; keep apart from the students)\n"]
    for name in sorted(functions, key=in_points_order):
        rel, code = functions[name]
        parts.append(f"\n## {name} ({rel}, {POINTS.get(name, 0)} points)\n\n```python\n{code}```\n")
    path.write_text("".join(parts))
    return list(functions)


def grade(student, root=ROOT):
    """Grade the exercise bodies in the student copy `student`: they go into a fresh stubbed copy of
    the repository at root, where root's tests/test_assignments.py runs. Returns {name: (passed,
    total)}."""
    student = Path(student).resolve()
    if not student.is_dir():
        raise FileNotFoundError(f"{student}: no such directory")
    bodies = reference_bodies(student)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        make_student_copy(work, root)
        for rel in repo_files(work):
            if rel.suffix == ".py":
                replace_bodies(work / rel, bodies, set(bodies) & set(exercises_in(work / rel)))
        xml = Path(tmp) / "results.xml"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(work)}
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                  f"--junitxml={xml}", "tests/test_assignments.py"]
        subprocess.run(pytest, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        cases = []
        for case in ET.parse(xml).getroot().iter("testcase"):
            bad = any(case.find(k) is not None for k in ("failure", "error", "skipped"))
            cases.append((case.get("name"), not bad))
    results = {}
    for name in POINTS:
        mine = [ok for test, ok in cases if test.startswith(f"test_{name}_")]
        results[name] = (sum(mine), len(mine))
    return results


def exercises_in(path):
    return exercises(path.read_text(), path)


def write_junit(path, grades):
    """{student: results} as JUnit XML: a test suite per student, a test case per exercise, failed
    unless all its tests passed."""
    suites = ET.Element("testsuites")
    for student, results in grades.items():
        failed = sum(p < t or t == 0 for p, t in results.values())
        suite = ET.SubElement(suites, "testsuite", name=student, tests=str(len(results)),
                              failures=str(failed))
        for name, (passed, total) in results.items():
            case = ET.SubElement(suite, "testcase", classname=student, name=name)
            if passed < total or total == 0:
                ET.SubElement(case, "failure", message=f"{passed} of {total} tests passed")
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


def grade_main(argv):
    cfg = parse_config(GradeConfig, argv, prog="python -m tools.assignment grade")
    grades = {}
    for student in cfg.students:
        grades[student] = results = grade(student)
        print(f"{student}\n{'exercise':<18} {'tests':>7} {'points':>7}")
        score = 0
        for name, (passed, total) in results.items():
            points = POINTS[name] if total and passed == total else 0
            score += points
            print(f"{name:<18} {passed:>3}/{total:<3} {points:>3}/{POINTS[name]:<3}")
        solved = sum(t > 0 and p == t for p, t in results.values())
        print(f"{solved} of {len(results)} exercises solved, {score} of {sum(POINTS.values())} "
              "points\n")
    if cfg.junit:
        write_junit(cfg.junit, grades)


def main():
    if sys.argv[1:2] == ["grade"]:
        return grade_main(sys.argv[2:])
    cfg = parse_config(AssignmentConfig)
    if cfg.out is not None:
        files, stubbed = make_student_copy(cfg.out)
        for rel, names in stubbed.items():
            print(f"{rel}: stubbed {', '.join(names)}")
        print(f"wrote {len(files)} files to {cfg.out}, {sum(map(len, stubbed.values()))} exercises stubbed")
    elif cfg.solutions is not None:
        names = write_solutions(cfg.solutions)
        print(f"wrote the reference functions of {len(names)} exercises to {cfg.solutions}")
    else:
        known = sorted(reference_bodies(ROOT), key=in_points_order)
        names = insert_reference(ROOT, cfg.reference_into, chosen(cfg, known))
        print(f"put the reference bodies of {len(names)} exercises into {cfg.reference_into} ({', '.join(names)})")


if __name__ == "__main__":
    cli(main)
