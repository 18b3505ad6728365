"""Command lines, one way for every script: a dataclass config becomes the parser, and cli() runs a main.

A field `lr: float = 3e-4  # peak learning rate` becomes `--lr` with that default and that help text; a
bool becomes --flag / --no-flag; `str | None = None` an optional path; a field without a default a
required option; `path: list[str]` one or more positional arguments (PATH [PATH ...]). __post_init__
checks the values, and its ValueError is an argparse error. This module imports nothing of the project, so
every script, data/ included, can use it.
"""
import argparse
import dataclasses
import errno
import inspect
import os
import re
import sys
import types
import typing


def _field_comments(cls):
    """{field: help} from the class source: the comment after a field (`lr: float = 3e-4  # peak learning
    rate`), or, for a field without one, the comment lines directly above it."""
    comments = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        above = []
        for line in src.splitlines():
            if m := re.match(r"^\s+#\s*(.*)$", line):
                above.append(m.group(1).strip())
            elif m := re.match(r"^\s+(\w+)\s*:[^=\n#]+(?:=[^#\n]*)?(?:#\s*(.+))?$", line):
                text = m.group(2) or " ".join(above)
                if text:
                    comments[m.group(1)] = text.strip()
                above = []
            else:
                above = []
    return comments


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit code 2, like every other error of the project."""

    def error(self, message):  # one line and exit code 2, without argparse's full usage text
        self.exit(2, f"error: {message} (see --help)\n")


def parse_config(cls, argv=None, prog=None, epilog=None):
    """Build the config dataclass `cls` from the command line (sys.argv[1:] by default); `--help` lists every
    field with its comment and default. The description is the first line of the module's docstring."""
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    parser = Parser(prog=prog, description=doc.split("\n")[0] if doc else None, epilog=epilog,
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))  # `str | None` -> str
        name = "--" + f.name.rstrip("_").replace("_", "-")  # except_ (a Python keyword): --except
        help_text = comments.get(f.name, " ").replace("%", "%%")  # argparse formats help with %
        required = f.default is dataclasses.MISSING
        if typing.get_origin(kind) is list:  # `paths: list[str]  # ...`: one or more positional arguments
            parser.add_argument(f.name, nargs="+", type=typing.get_args(kind)[0], metavar=f.name.upper(),
                                help=help_text)
        elif kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif required:
            parser.add_argument(name, type=kind, required=True, help=help_text, dest=f.name)
        else:
            parser.add_argument(name, type=kind, default=f.default, help=help_text, dest=f.name)
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args))
    except ValueError as e:  # __post_init__ validation: one line, exit code 2
        parser.error(str(e))


def join_repeated(argv, flag):
    """argparse keeps only the last of a repeated option: join every `flag X` (or `flag=X`) with commas."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
            continue
        if argv[i].startswith(flag + "="):
            values.append(argv[i][len(flag) + 1:])
        else:
            rest.append(argv[i])
        i += 1
    return rest + ([flag, ",".join(values)] if values else [])


def cli(main):
    """Run a script's main() and exit with the project's codes: bad data, paths or settings
    (ValueError, data.formats.DataError among them, FileNotFoundError) and files that cannot be
    written (OSError: disk full, permissions) one line and 2; a diverged run, a refused non-finite
    checkpoint (FloatingPointError) or a failed download (ConnectionError) one line and 1; Ctrl-C
    during setup, or a second Ctrl-C in training, 130 (a first Ctrl-C in training saves first: see
    reliability.Interrupt)."""
    code = 0
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except (FloatingPointError, ConnectionError) as e:  # diverged, or a download that failed
        print(f"error: {e}", file=sys.stderr)
        code = 1
    # disk full, no permission, a device gone: the file and what to do, not a traceback
    except OSError as e:
        free = "; free some space and run again"
        resume = " (a training stage continues from its last save with --resume)"
        advice = {errno.ENOSPC: free + resume, errno.EDQUOT: free}.get(e.errno, "")
        print(f"error: {e.filename or ''}: {e.strerror or e}{advice}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("aborted by Ctrl-C: nothing saved since the last checkpoint", file=sys.stderr)
        code = 130
    except SystemExit as e:  # argparse errors (2), Ctrl-C after saving (130)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    if "RANK" in os.environ:
        # under torchrun, skip the interpreter's final clean-up: after a run that finished and saved, gloo's
        # destructors (torch 2.13, CPU) abort the process ("terminate called without an active exception")
        # in about one run in five on a busy machine, which torchrun reports as a failure
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
