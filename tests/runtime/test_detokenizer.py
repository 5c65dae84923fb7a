"""Incremental detokenizing and stop strings: a word-level tokenizer and SmolLM2's byte-level
BPE (stops across token boundaries, multi-byte characters, a stop at the very start)."""

from __future__ import annotations

import pytest

from llmc.runtime.detokenizer import IncrementalDetokenizer, StopChecker


@pytest.fixture(scope="module")
def words():
    """The tiny models' tokenizer: "w3 w17" <-> [3, 17], decoded with spaces between."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["</s>"])
    return tok


@pytest.fixture(scope="module")
def bpe(smollm2_path):
    from tokenizers import Tokenizer

    from llmc.model_zoo import load_model

    return Tokenizer.from_str(load_model(smollm2_path).tokenizer().json)


def stream(tok, ids, stop=()):
    detok = IncrementalDetokenizer(tok, stop)
    pieces = []
    for t in ids:
        pieces.append(detok.push(t))
        if detok.stopped is not None:
            break
    pieces.append(detok.flush())
    return pieces, detok


def test_stop_checker_holds_back_possible_starts():
    c = StopChecker(["abc", "xy"])
    assert [c.feed(p) for p in ["12a", "b", "Z", "x", "x", "y9"]] == \
        ["12", "", "abZ", "", "x", ""]
    assert c.stopped == "xy" and c.text == "12abZx" and c.feed("more") == ""
    c = StopChecker(["END"])
    assert c.feed("the EN") == "the " and c.flush() == "EN" and c.stopped is None
    c = StopChecker(["b", "abc"])   # the earliest match wins
    assert c.feed("xab") == "xa" and c.stopped == "b"


def test_words_stream_equals_whole_decode(words):
    ids = [5, 6, 7, 8, 9]
    pieces, detok = stream(words, ids)
    assert "".join(pieces) == words.decode(ids) == "w5 w6 w7 w8 w9"
    assert pieces[:3] == ["w5", " w6", " w7"]
    # a special token (EOS) adds no text
    assert "".join(stream(words, [5, 2])[0]) == "w5"


def test_words_stop_spanning_tokens(words):
    pieces, detok = stream(words, [5, 6, 7, 8, 9], stop=["6 w7 w"])
    assert detok.stopped == "6 w7 w" and "".join(pieces) == "w5 w" == detok.text
    # "6", then "6 w7", is held back as a possible start of the stop
    assert pieces == ["w5", " w", "", "", ""]
    pieces, detok = stream(words, [5, 6, 7], stop=["w5"])   # a stop at the very start
    assert pieces == ["", ""] and detok.stopped == "w5" and detok.text == ""
    pieces, detok = stream(words, [5, 6], stop=["w6 w9"])   # a start that never completes
    assert pieces == ["w5", " ", "w6"] and detok.stopped is None


def test_bpe_stream_equals_whole_decode(bpe):
    text = "Hello wörld 日本語 🙂 end\n\nnext"
    ids = bpe.encode(text).ids
    pieces, _ = stream(bpe, ids)
    assert "".join(pieces) == bpe.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces, "a partial character must be held back"


def test_bpe_stops(bpe):
    ids = bpe.encode("Hello wörld 日本語 🙂 end\n\nnext").ids
    # a stop spanning token boundaries, ending in a multi-byte character
    pieces, detok = stream(bpe, ids, stop=["ld 日本"])
    assert detok.stopped == "ld 日本" and "".join(pieces) == "Hello wör"
    # a stop that starts inside a token and a newline pair
    pieces, detok = stream(bpe, ids, stop=["d\n\n"])
    assert "".join(pieces) == "Hello wörld 日本語 🙂 en"
    # an emoji stop made of several byte tokens
    pieces, detok = stream(bpe, ids, stop=["🙂"])
    assert "".join(pieces) == "Hello wörld 日本語 "
    # a stop at the very start
    pieces, detok = stream(bpe, ids, stop=["Hel"])
    assert "".join(pieces) == "" and detok.stopped == "Hel"


def test_bpe_trailing_partial_character_is_flushed(bpe):
    ids = bpe.encode("x 日").ids
    pieces, _ = stream(bpe, ids[:-1])   # "日" is three byte tokens: cut inside it
    assert "".join(pieces) == bpe.decode(ids[:-1])
