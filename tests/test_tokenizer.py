"""Both encodings round-trip text, and special tokens are ids, never parsed out of user text."""
import pytest

from data.tokenizer import get_tokenizer

TEXTS = ["Hello world", "", "  leading spaces and\ttabs\n\nnew lines", "ünïcödé ✓ 漢字 🙂",
         "\n\nHuman: reverse stone\n\nAssistant: enots."]


def test_byte_encoding_round_trip_and_special_tokens():
    tok = get_tokenizer("byte")
    assert tok.n_vocab == 258 and tok.eot_token == 256 and tok.pad_token == 257
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))  # one token per UTF-8 byte
        assert tok.decode(ids) == text
    ids = tok.encode("a<|endoftext|>b")  # special-token text in data stays ordinary bytes
    assert tok.eot_token not in ids and tok.decode(ids) == "a<|endoftext|>b"
    assert tok.decode(tok.encode("hi") + [tok.eot_token, tok.pad_token]) == "hi"


def gpt2_or_fail():
    """The GPT-2 encoding must be available wherever the tests run (CI fetches its ranks from PyPI):
    a missing file is a failure, not a skip."""
    try:
        return get_tokenizer("gpt2")
    except RuntimeError as e:
        pytest.fail(str(e))


def test_gpt2_encoding_known_ids_and_round_trip():
    tok = gpt2_or_fail()
    assert tok.n_vocab == 50257 and tok.eot_token == 50256
    assert tok.encode("Hello world") == [15496, 995]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("x<|endoftext|>")
    assert 50256 not in ids
    assert tok.decode(tok.encode("ok") + [tok.eot_token]) == "ok"


def test_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("bpe-9000")
