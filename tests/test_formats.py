"""The chat template round-trips, every kind of bad line is located as file:line, and writes are atomic."""
import gzip
import json
import os
import re

import pytest

from data import formats
from data.formats import (DataError, encode_chat, format_query, load_prompts, load_rankings,
                          load_sft, load_text, split_of, split_transcript, truncate_left,
                          write_jsonl, write_text)
from data.tokenizer import get_tokenizer


def test_encode_chat_is_the_hh_template_with_eot_by_id():
    tok = get_tokenizer("byte")
    query, response = encode_chat(tok, "Reverse the word stone.", "enots.")
    assert tok.decode(query) == "\n\nHuman: Reverse the word stone.\n\nAssistant:"
    assert response[-1] == tok.eot_token and tok.decode(response[:-1]) == " enots."
    assert encode_chat(tok, "hi") == (tok.encode(format_query("hi")), [])
    # Text that spells the special token stays plain bytes: only the template's eot is special.
    _, response = encode_chat(tok, "x", "<|endoftext|>")
    assert response.count(tok.eot_token) == 1


def test_split_transcript_agrees_with_format_query_single_and_multi_turn():
    single = "\n\nHuman: Reverse the word stone.\n\nAssistant: enots."
    assert split_transcript(single) == ("Reverse the word stone.", "enots.")
    multi = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Add 2 and 3.\n\nAssistant: The answer is 5."
    prompt, response = split_transcript(multi)
    assert prompt == "Hi\n\nAssistant: Hello!\n\nHuman: Add 2 and 3." and response == "The answer is 5."
    for text in (single, multi):
        prompt, response = split_transcript(text)
        assert format_query(prompt) + " " + response == text
    with pytest.raises(ValueError, match="Human"):
        split_transcript("Assistant: no human turn")


def test_truncate_left_keeps_the_end():
    assert truncate_left([1, 2, 3, 4], 2) == ([3, 4], True)
    assert truncate_left([1, 2], 5) == ([1, 2], False)


def write_lines(path, lines):
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


GOOD = {
    load_sft: '{"prompt": "p", "response": "r"}',
    load_rankings: '{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]}',
    load_prompts: '{"prompt": "p"}',
}
BAD = [  # (loader, second line, words the message must contain)
    (load_sft, '{"prompt": "p", "response": ', "invalid JSON"),
    (load_sft, '["p", "r"]', "expected a JSON object"),
    (load_sft, '{"prompt": "p"}', "missing field 'response'"),
    (load_sft, '{"prompt": "p", "response": 3}', "must be a string"),
    (load_sft, '{"prompt": "p", "response": "  "}', "'response' is empty"),
    (load_sft, '{"prompt": "", "response": "r"}', "'prompt' is empty"),
    (load_sft, '{"instruction": "i", "input": "x"}', "missing field 'output'"),
    (load_sft, b'{"prompt": "p", "response": "\xff"}', "not valid UTF-8"),
    (load_rankings, '{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}', "not a permutation"),
    (load_rankings, '{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 2]}', "not a permutation"),
    (load_rankings, '{"prompt": "p", "responses": ["a", "b"], "ranking": [true, false]}', "list of integers"),
    (load_rankings, '{"prompt": "p", "responses": ["a"], "ranking": [0]}', "at least 2"),
    (load_rankings, '{"prompt": "p", "responses": ["a", "a"], "ranking": [0, 1]}', "duplicate"),
    (load_rankings, '{"prompt": "p", "responses": ["a", ""], "ranking": [0, 1]}', "responses[1] is empty"),
    (load_rankings, '{"prompt": "p", "responses": "a", "ranking": [0]}', "must be a list"),
    (load_rankings, '{"prompt": "p", "responses": ["a", "b"]}', "missing field 'ranking'"),
    (load_rankings, '{"prompt": "p", "chosen": "a", "rejected": "a"}', "duplicate"),
    (load_rankings, '{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    (load_rankings, '{"text": "neither layout"}', "missing field 'responses'"),
    (load_rankings, json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: x",
                                "rejected": "\n\nHuman: b\n\nAssistant: y"}), "differ"),
    (load_rankings, json.dumps({"chosen": "no transcript", "rejected": "\n\nHuman: b\n\nAssistant: y"}),
     "does not start"),
    (load_rankings, json.dumps({"chosen": "\n\nHuman: a\n\nAssistant:",
                                "rejected": "\n\nHuman: a\n\nAssistant: y"}), "empty"),
    (load_prompts, '{"question": "p"}', "missing field 'prompt'"),
    (load_prompts, '{"prompt": ["p"]}', "must be a string"),
    (load_prompts, '"p"', "expected a JSON object"),
]


@pytest.mark.parametrize("loader,line,words", BAD, ids=[f"{l.__name__}-{w}" for l, _, w in BAD])
def test_bad_line_is_rejected_with_file_and_line(tmp_path, loader, line, words):
    path = write_lines(tmp_path / "data.jsonl", [GOOD[loader], "", line, GOOD[loader]])
    with pytest.raises(DataError) as e:
        loader(path)
    assert str(e.value).startswith(f"{path}:3: ") and words in str(e.value)
    assert "\n" not in str(e.value)  # one line for the user


@pytest.mark.parametrize("loader", [load_sft, load_rankings, load_prompts, load_text])
def test_empty_or_missing_file_is_an_error_at_line_0(tmp_path, loader):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"empty\.jsonl:0: .*no records"):
        loader(empty)
    with pytest.raises(DataError, match=r":0: no such file"):
        loader(tmp_path / "missing.jsonl")


def test_gzip_reads_the_same_and_extra_fields_are_ignored(tmp_path):
    records = [{"prompt": "p1", "responses": ["a", "b", "c"], "ranking": [1, 2, 0], "family": "x"},
               {"prompt": "p2", "chosen": "good", "rejected": "bad", "score": 3}]
    write_jsonl(tmp_path / "r.jsonl", records)
    write_jsonl(tmp_path / "r.jsonl.gz", records)
    with gzip.open(tmp_path / "r.jsonl.gz", "rt") as f:
        assert json.loads(f.readline())["prompt"] == "p1"
    expected = [{"prompt": "p1", "responses": ["a", "b", "c"], "ranking": [1, 2, 0]},
                {"prompt": "p2", "responses": ["good", "bad"], "ranking": [0, 1]}]
    assert load_rankings(tmp_path / "r.jsonl") == load_rankings(tmp_path / "r.jsonl.gz") == expected
    # Same records, same bytes: gzip headers carry no time stamp.
    first = (tmp_path / "r.jsonl.gz").read_bytes()
    write_jsonl(tmp_path / "r.jsonl.gz", records)
    assert (tmp_path / "r.jsonl.gz").read_bytes() == first


def test_hh_transcripts_become_a_k2_ranking(tmp_path):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: A lemon."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: No."
    write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    [r] = load_rankings(tmp_path / "hh.jsonl")
    assert r == {"prompt": "Hi\n\nAssistant: Hello.\n\nHuman: Name a fruit.", "responses": ["A lemon.", "No."],
                 "ranking": [0, 1]}
    assert format_query(r["prompt"]) + " " + r["responses"][0] == chosen


def test_alpaca_and_plain_demonstrations(tmp_path):
    write_jsonl(tmp_path / "sft.jsonl", [
        {"instruction": "Summarize.", "input": "Some text.", "output": "Short."},
        {"instruction": "Say hi.", "input": "", "output": "Hi."},
        {"prompt": "p", "response": "r", "id": 7},
    ])
    assert load_sft(tmp_path / "sft.jsonl") == [
        {"prompt": "Summarize.\n\nSome text.", "response": "Short."},
        {"prompt": "Say hi.", "response": "Hi."},
        {"prompt": "p", "response": "r"},
    ]


def test_json_array_loads_like_jsonl_with_located_errors(tmp_path):
    """Alpaca's alpaca_data.json is one indented JSON array: it loads as the same records as JSONL, and a bad
    record is reported at the line where it starts, with its index."""
    records = [{"instruction": f"Say {w}.", "input": "" if i % 2 else "Loudly.", "output": w.title()}
               for i, w in enumerate(["hi", "bye", "yes", "no"])]
    write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "alpaca_data.json").write_text(json.dumps(records, indent=4))
    write_text(tmp_path / "a.json.gz", json.dumps(records))
    expected = load_sft(tmp_path / "a.jsonl")
    assert load_sft(tmp_path / "alpaca_data.json") == expected == load_sft(tmp_path / "a.json.gz")

    records[2]["output"] = 7  # record 2 starts on line 12 of the indented file: 5 lines per record after "["
    (tmp_path / "bad.json").write_text(json.dumps(records, indent=4))
    with pytest.raises(DataError, match=r"bad.json:12: record 2: field 'output' must be a string, got int$"):
        load_sft(tmp_path / "bad.json")
    cases = {'[{"prompt": "a"},\n 3]': ":2: record 1: expected a JSON object, got int",
             '[{"prompt": "a"} {"prompt": "b"}]': ":1: record 0: expected ',' or ']' after it",
             '[{"prompt": "a"},\n{"prompt": ]': ":2: record 1: invalid JSON",
             '{"prompt": "a"}': ":1: expected a JSON array", "[ ]": ":0: the file has no records",
             '[{"prompt": "a"}]\n]': ":2: unexpected text after the JSON array"}
    for text, words in cases.items():
        (tmp_path / "p.json").write_text(text)
        with pytest.raises(DataError, match=re.escape(words)):
            load_prompts(tmp_path / "p.json")


def test_load_text_from_txt_and_jsonl(tmp_path):
    write_text(tmp_path / "a.txt", "line one\nline two\n")
    assert load_text(tmp_path / "a.txt") == "line one\nline two\n"
    write_jsonl(tmp_path / "a.jsonl", [{"text": "doc one"}, {"text": "doc two"}])
    assert load_text(tmp_path / "a.jsonl") == "doc one\n\ndoc two"
    write_text(tmp_path / "b.txt", "  \n")
    with pytest.raises(DataError, match="b.txt:0: the file is empty"):
        load_text(tmp_path / "b.txt")
    with pytest.raises(DataError, match="expected a .txt"):
        load_text(tmp_path / "a.csv")


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"prompt": "old"}])

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(formats.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        write_jsonl(path, [{"prompt": "new"}] * 1000)
    with pytest.raises(OSError):
        write_text(tmp_path / "new.txt", "text")
    monkeypatch.undo()
    assert load_prompts(path) == ["old"]  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]  # and no partial or temporary file is left


def test_split_of_is_a_fixed_hash_with_the_asked_fractions():
    prompts = [f"prompt {i}" for i in range(20000)]
    splits = [split_of(p) for p in prompts]
    assert splits == [split_of(p) for p in prompts]
    for name, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(splits.count(name) / len(prompts) - share) < 0.01
    assert abs(sum(split_of(p, 0.025, 0.025) == "test" for p in prompts) / len(prompts) - 0.025) < 0.005
