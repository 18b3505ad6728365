"""File formats of the pipeline: the chat template, validating loaders and atomic writers.

Chat template (Anthropic HH-RLHF's, used for every model and data source):

    "\\n\\nHuman: {prompt}\\n\\nAssistant: {response}" + <|endoftext|> (appended by id, never as text)

Multi-turn prompts: a "prompt" is everything the human side of the template wraps, i.e. an HH transcript
up to its last "\\n\\nAssistant:" with the leading "\\n\\nHuman: " removed. A single-turn prompt is then
just the human's message (exactly what the built-in world writes), a multi-turn one still contains its
earlier "\\n\\nAssistant: ... \\n\\nHuman: ..." turns, and in both cases
format_query(prompt) + " " + response reproduces the transcript.

Files (JSONL is one JSON object per line; ".jsonl.gz" is read and written the same way; a ".json" or
".json.gz" file holding one JSON array of the same objects, such as Alpaca's alpaca_data.json, is read too):

    pretraining text  .txt, or JSONL {"text": ...}                                 load_text
    demonstrations    {"prompt", "response"} or Alpaca {"instruction", "input", "output"}   load_sft
    rankings          {"prompt", "responses": [K strings], "ranking": [indices, best first]},
                      or pairwise {"prompt", "chosen", "rejected"} (K = 2),
                      or HH-RLHF {"chosen", "rejected"} full transcripts            load_rankings
    prompts           {"prompt"}                                                    load_prompts
    samples           {"prompt", "responses": [strings]} (unranked model samples)   load_samples

Loaders stop at the first bad line with DataError("{file}:{line}: {what is wrong}"); in a JSON array the
line is where the record starts and the message names the record ("record 17: ..."). Blank lines are
skipped, extra fields are ignored, and a file with no records is an error reported at line 0 (the file as
a whole). Writers (and download) are atomic: a crash leaves either the old file or the complete new one.
"""
import gzip
import hashlib
import io
import json
import os
import re
import tempfile
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

HUMAN = "\n\nHuman: "
ASSISTANT = "\n\nAssistant:"


class DataError(ValueError):
    """A bad input file, located for the user: str(e) == "{file}:{line}: {what}"."""

    def __init__(self, file, line: int, what: str):
        self.file, self.line, self.what = str(file), line, what
        super().__init__(f"{self.file}:{line}: {what}")


# --- chat template --------------------------------------------------------------------------------------
def format_query(prompt: str) -> str:
    """The text the model is conditioned on: "\\n\\nHuman: {prompt}\\n\\nAssistant:"."""
    return f"{HUMAN}{prompt}{ASSISTANT}"


def encode_chat(tok, prompt: str, response: str | None = None) -> tuple[list[int], list[int]]:
    """(query_ids, response_ids); the response gets its leading space and the end-of-text token by id.

    The space belongs to the response (as in HH-RLHF's "Assistant: text"), so a policy samples it and the
    query ends exactly at "Assistant:". response=None gives [] for the response (a prompt to sample from).
    """
    query = tok.encode(format_query(prompt))
    if response is None:
        return query, []
    return query, tok.encode(" " + response) + [tok.eot_token]


def split_transcript(text: str) -> tuple[str, str]:
    """Split an HH transcript at its last "\\n\\nAssistant:" into (prompt, response); see the module doc.

    Raises ValueError (without a location; loaders add it) when the text is not an HH transcript.
    """
    if not text.startswith(HUMAN):
        raise ValueError('transcript does not start with "\\n\\nHuman: "')
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError('transcript has no "\\n\\nAssistant:" turn')
    prompt = text[len(HUMAN):cut]
    response = text[cut + len(ASSISTANT):].strip()
    return prompt, response


def truncate_left(ids: list[int], max_len: int) -> tuple[list[int], bool]:
    """Keep the last max_len ids, and say whether any were dropped.

    Prompts are cut on the left: the end holds the latest human turn and the "Assistant:" cue, which the
    response must follow; the start of a long multi-turn conversation matters least.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if len(ids) <= max_len:
        return list(ids), False
    return list(ids[-max_len:]), True


def split_of(prompt: str, val: float = 0.1, test: float = 0.1) -> str:
    """"train", "val" or "test", fixed by a hash of the prompt text: splits never share a prompt string."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 10_000 / 10_000
    return "test" if bucket < test else "val" if bucket < test + val else "train"


# --- reading --------------------------------------------------------------------------------------------
def _open_bytes(path: Path):
    if not path.is_file():
        raise DataError(path, 0, "no such file")
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _read_text(path: Path) -> str:
    """The whole file as UTF-8 text (gunzipped for .gz); DataError at the line of the first bad byte."""
    with _open_bytes(path) as f:
        try:
            return f.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(path, e.object[:e.start].count(b"\n") + 1, "not valid UTF-8") from None
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(path, 0, f"cannot read the file ({e})") from None


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def _is_json_array(path: Path) -> bool:
    return path.name.endswith((".json", ".json.gz"))


_WHITESPACE = re.compile(r"[ \t\r\n]*")


def _read_json_array(path: Path):
    """Yield (line_number, object) for each element of a file holding one JSON array, the line being where
    the element starts: the array is decoded element by element, so an error points into the file."""
    text = _read_text(path)
    decoder = json.JSONDecoder()
    skip = lambda pos: _WHITESPACE.match(text, pos).end()  # noqa: E731
    line, counted = 1, 0

    def line_of(pos):  # positions only grow: count the newlines once
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, pos), pos
        return line

    pos = skip(0)
    if not text.startswith("[", pos):
        raise DataError(path, line_of(pos), "expected a JSON array of records ([{...}, {...}])")
    pos, index = skip(pos + 1), 0
    while not (index == 0 and text.startswith("]", pos)):  # "[]" has no records
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, f"record {index}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(path, line_of(pos), f"record {index}: invalid JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise DataError(path, line_of(pos), f"record {index}: expected a JSON object, got {type(obj).__name__}")
        yield line_of(pos), obj
        pos, index = skip(end), index + 1
        if text.startswith("]", pos):
            break
        if not text.startswith(",", pos):
            raise DataError(path, line_of(pos), f"record {index - 1}: expected ',' or ']' after it")
        pos = skip(pos + 1)
    if skip(pos + 1) < len(text):
        raise DataError(path, line_of(skip(pos + 1)), "unexpected text after the JSON array")


def read_jsonl(path):
    """Yield (line_number, object) for every non-blank line of a JSONL file, or every element of a .json
    array; DataError on bad UTF-8, bad JSON, non-objects."""
    path = Path(path)
    if _is_json_array(path):
        n_records = 0
        for n_records, item in enumerate(_read_json_array(path), start=1):
            yield item
        if n_records == 0:
            raise DataError(path, 0, "the file has no records")
        return
    if not _is_jsonl(path):
        raise DataError(path, 0, "expected a .jsonl, .jsonl.gz or .json (one JSON array of records) file")
    n_records = 0
    with _open_bytes(path) as f:
        try:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(path, lineno, "not valid UTF-8") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
                except RecursionError:
                    raise DataError(path, lineno, "invalid JSON (nested too deeply)") from None
                if not isinstance(obj, dict):
                    raise DataError(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
                n_records += 1
                yield lineno, obj
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(path, 0, f"cannot read the file ({e})") from None
    if n_records == 0:
        raise DataError(path, 0, "the file has no records")


def _load(path, parse) -> list:
    """Parse every record of a JSONL file (or JSON array) with parse(obj), which raises ValueError(what) on a
    bad one."""
    out, array = [], _is_json_array(Path(path))
    for index, (lineno, obj) in enumerate(read_jsonl(path)):
        try:
            out.append(parse(obj))
        except ValueError as e:
            raise DataError(path, lineno, f"record {index}: {e}" if array else str(e)) from None
    return out


def _text(obj: dict, key: str) -> str:
    """obj[key] as a non-blank string, or ValueError saying what is wrong."""
    if key not in obj:
        raise ValueError(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value


def _string_list(obj: dict, key: str) -> list[str]:
    if key not in obj:
        raise ValueError(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, list):
        raise ValueError(f"field {key!r} must be a list, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"{key}[{i}] must be a string, got {type(item).__name__}")
        if not item.strip():
            raise ValueError(f"{key}[{i}] is empty")
    return value


# --- one record of each kind (also used by data/hh_rlhf.py to skip bad records instead of stopping) -----
def parse_sft(obj: dict) -> dict:
    """{"prompt", "response"} from either the plain or the Alpaca layout."""
    if "instruction" in obj and "prompt" not in obj:
        # Alpaca: the optional input is context for the instruction, so it follows it in the prompt.
        prompt = _text(obj, "instruction")
        extra = obj.get("input", "")
        if not isinstance(extra, str):
            raise ValueError(f"field 'input' must be a string, got {type(extra).__name__}")
        if extra.strip():
            prompt = prompt + "\n\n" + extra
        return {"prompt": prompt, "response": _text(obj, "output")}
    return {"prompt": _text(obj, "prompt"), "response": _text(obj, "response")}


def parse_ranking(obj: dict) -> dict:
    """{"prompt", "responses", "ranking"} from the K-wise, pairwise or HH-RLHF layout."""
    if "responses" in obj:
        prompt, responses = _text(obj, "prompt"), _string_list(obj, "responses")
        if "ranking" not in obj:
            raise ValueError("missing field 'ranking'")
        ranking = obj["ranking"]
        if not isinstance(ranking, list) or not all(type(i) is int for i in ranking):
            raise ValueError("field 'ranking' must be a list of integers")
    elif "chosen" in obj:
        chosen, rejected = _text(obj, "chosen"), _text(obj, "rejected")
        if "prompt" in obj:
            prompt, responses = _text(obj, "prompt"), [chosen, rejected]
        else:  # HH-RLHF: two full transcripts that must share everything before the last answer
            (prompt, a), (prompt_b, b) = split_transcript(chosen), split_transcript(rejected)
            if prompt != prompt_b:
                raise ValueError("'chosen' and 'rejected' transcripts differ before the last Assistant turn")
            if not prompt.strip() or not a or not b:
                raise ValueError("empty prompt or response in the HH transcripts")
            responses = [a, b]
        ranking = [0, 1]
    else:
        raise ValueError("missing field 'responses' (expected {prompt, responses, ranking}, "
                         "{prompt, chosen, rejected} or HH-RLHF {chosen, rejected})")
    if len(responses) < 2:
        raise ValueError(f"need at least 2 responses to rank, got {len(responses)}")
    if len(set(responses)) != len(responses):
        raise ValueError("duplicate responses: each ranked response must be distinct")
    if sorted(ranking) != list(range(len(responses))):
        raise ValueError(f"'ranking' {ranking} is not a permutation of 0..{len(responses) - 1}")
    return {"prompt": prompt, "responses": responses, "ranking": ranking}


def parse_prompt(obj: dict) -> str:
    return _text(obj, "prompt")


def parse_samples(obj: dict) -> dict:
    """Unranked samples: {"prompt", "responses"}; duplicates and empty strings allowed (models make them)."""
    prompt = _text(obj, "prompt")
    responses = obj.get("responses")
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        raise ValueError("field 'responses' must be a non-empty list of strings")
    return {"prompt": prompt, "responses": responses}


# --- loaders --------------------------------------------------------------------------------------------
def load_text(path) -> str:
    """A plain-text corpus: a .txt file as is, or the "text" fields of a JSONL file joined by blank lines."""
    path = Path(path)
    if path.name.endswith((".txt", ".txt.gz")):
        text = _read_text(path)
        if not text.strip():
            raise DataError(path, 0, "the file is empty")
        return text
    if not (_is_jsonl(path) or _is_json_array(path)):
        raise DataError(path, 0, "expected a .txt, .txt.gz, .jsonl, .jsonl.gz or .json file")
    return "\n\n".join(_load(path, lambda obj: _text(obj, "text")))


def load_sft(path) -> list[dict]:
    """Demonstrations as [{"prompt", "response"}]."""
    return _load(path, parse_sft)


def load_rankings(path) -> list[dict]:
    """Rankings as [{"prompt", "responses", "ranking"}]; "ranking" lists response indices, best first."""
    return _load(path, parse_ranking)


def load_prompts(path) -> list[str]:
    return _load(path, parse_prompt)


def load_samples(path) -> list[dict]:
    """Model samples to be ranked, as [{"prompt", "responses"}]."""
    return _load(path, parse_samples)


# --- writing and downloading -------------------------------------------------------------------------------------
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextmanager
def atomic_open(path):
    """A binary file to write `path` through: a temporary file next to it, fsynced and renamed over path
    when the block ends (atomic on POSIX and NTFS); on any error, or Ctrl-C, it is removed and path is left
    as it was. Every writer of the project (data files, checkpoints, downloads) goes through here."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private; give it the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, a device gone: name the file (a failed write names none)
        Path(tmp).unlink(missing_ok=True)
        if e.errno is None or e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path, data: bytes) -> None:
    """Write bytes to path atomically."""
    with atomic_open(path) as f:
        f.write(data)


def _maybe_gzip(path, data: bytes) -> bytes:
    if not str(path).endswith(".gz"):
        return data
    buf = io.BytesIO()
    # mtime=0 and no file name in the header: the same records give byte-identical files.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def write_jsonl(path, records) -> None:
    """One JSON object per line, UTF-8, gzipped when path ends in .gz; atomic."""
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    write_bytes(path, _maybe_gzip(path, "".join(lines).encode("utf-8")))


def write_text(path, text: str) -> None:
    """UTF-8 text, gzipped when path ends in .gz; atomic."""
    write_bytes(path, _maybe_gzip(path, text.encode("utf-8")))


def download(url: str, dest, hint: str = "pass --source with a local copy") -> Path:
    """Fetch url to dest once (with a progress bar); later calls reuse the file. Atomic like the writers;
    a failure is a ConnectionError that ends with `hint`."""
    dest = Path(dest)
    if dest.is_file():
        return dest
    try:
        with urllib.request.urlopen(url, timeout=60) as r, atomic_open(dest) as f, \
                tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                     desc=dest.name) as bar:
            while chunk := r.read(1 << 16):
                f.write(chunk)
                bar.update(len(chunk))
    except OSError as e:  # URLError and socket errors are OSErrors
        raise ConnectionError(f"could not download {url} ({e}); {hint}") from None
    return dest
