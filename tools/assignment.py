"""Assignment mode: a student copy of this repository in which the exercises are left to write.

A function is an exercise when the line directly above it (above its first decorator, if any) is the comment
`# exercise: NAME`. In the student copy each exercise keeps that comment, its decorators, its signature and
its docstring (which states the equation); the rest of its body becomes one line,
`raise NotImplementedError("exercise NAME: see docs/assignments.md")`. Every other line of every file is
copied byte for byte, so the rest of the project runs unchanged once the exercises are written.

    python -m tools.assignment --out ../student               # the student copy (a new or empty directory)
    python -m tools.assignment --reference-into ../student    # put this repository's bodies back into a copy

Students run `python -m pytest tests/test_assignments.py -k NAME`; docs/assignments.md is their handout.
--reference-into (the function insert_reference) matches the bodies by exercise name: the teacher's check,
tests/test_assignment_mode.py, uses it to prove that every stub fails its tests and every reference passes.
"""
import ast
import io
import os
import re
import shutil
import tokenize
from dataclasses import dataclass
from pathlib import Path

from lib.config import cli, parse_config

ROOT = Path(__file__).resolve().parent.parent  # the repository
SKIPPED_DIRS = {"runs", "exported", "__pycache__"}  # and every directory whose name starts with "."
MARKER = re.compile(r"# exercise: (\w+)")


@dataclass
class AssignmentConfig:
    out: str | None = None  # write the student copy here (a directory that does not exist or is empty)
    reference_into: str | None = None  # instead: put the reference bodies back into this student copy

    def __post_init__(self):
        if (self.out is None) == (self.reference_into is None):
            raise ValueError("give one of --out DIR (make a student copy) and --reference-into DIR")


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


def replace_bodies(path, bodies=None):
    """Rewrite the exercises in the file at `path`: after each docstring, the stub (bodies None) or the lines
    bodies[name]. Returns the exercises' names; every other line stays byte for byte."""
    source = path.read_bytes().decode("utf-8")
    lines = source.splitlines(keepends=True)
    found = exercises(source, path)
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


def make_student_copy(out, root=ROOT):
    """Copy the repository at root to out (new or empty) with every exercise stubbed. Returns the files
    copied and {file: names of its exercises}."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory: give a new or empty one")
    files, stubbed = list(repo_files(root, skip=out)), {}
    for rel in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, out / rel)  # copy2 keeps the mode: train.sh stays executable
        if rel.suffix == ".py" and (names := replace_bodies(out / rel)):
            stubbed[rel] = names
    return files, stubbed


def insert_reference(reference_root, student_root):
    """Put the reference repository's exercise bodies into the student copy at student_root, matched by
    exercise name (a student's own solutions are overwritten). Returns the names."""
    reference_root, student_root = Path(reference_root).resolve(), Path(student_root).resolve()
    if not student_root.is_dir():
        raise FileNotFoundError(f"{student_root}: no such directory (make a student copy with --out first)")
    bodies = reference_bodies(reference_root, skip=student_root)
    return [name for rel in repo_files(student_root) if rel.suffix == ".py"
            for name in replace_bodies(student_root / rel, bodies)]


def main():
    cfg = parse_config(AssignmentConfig)
    if cfg.out is not None:
        files, stubbed = make_student_copy(cfg.out)
        for rel, names in stubbed.items():
            print(f"{rel}: stubbed {', '.join(names)}")
        print(f"wrote {len(files)} files to {cfg.out}, {sum(map(len, stubbed.values()))} exercises stubbed")
    else:
        names = insert_reference(ROOT, cfg.reference_into)
        print(f"put the reference bodies of {len(names)} exercises into {cfg.reference_into} ({', '.join(names)})")


if __name__ == "__main__":
    cli(main)
