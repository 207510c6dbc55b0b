"""Prompt parsing and chunking: each of A1111's tokenize_line rules, named, on the real CLIP tokenizer."""

from __future__ import annotations

import pytest

from lib_ti.text.encoders import open_clip_tokenizer_info
from lib_ti.text.prompt import CHUNK_LENGTH, EmbeddingIndex, chunk_prompt, parse_attention, target_token_count

from . import models


@pytest.fixture(scope="module")
def tok():
    return open_clip_tokenizer_info(models.open_clip_tokenizer())


def words(n: int) -> str:
    return " ".join(["cat"] * n)  # "cat" is one token


# --- rule: emphasis (the host's documented examples)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.1 * 1.1 * 1.3),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.1**4),
                (".", 1.1),
            ],
        ),
        ("", [("", 1.0)]),
        ("a:b", [("a:b", 1.0)]),
        ("[faded]", [("faded", 1 / 1.1)]),
    ],
)
def test_rule_emphasis(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_rule_break_splits_runs():
    assert parse_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_attention("aBREAKb") == [("aBREAKb", 1.0)]  # only the word on its own


def test_rule_break_starts_new_chunk(tok):
    chunks, count = chunk_prompt("red cat BREAK blue dog", tok)
    assert len(chunks) == 2
    assert count == CHUNK_LENGTH + 2


# --- rule: chunks of 75 tokens, start + 75 + end
@pytest.mark.parametrize(("n", "n_chunks"), [(74, 1), (75, 1), (76, 2), (200, 3)])
def test_rule_chunks_of_75(tok, n, n_chunks):
    chunks, count = chunk_prompt(words(n), tok)
    assert len(chunks) == n_chunks
    assert count == n
    cat = tok.tokenize(["cat"])[0][0]
    for c in chunks:
        assert len(c.tokens) == 77
        assert c.tokens[0] == tok.id_start
        assert c.tokens[-1] == tok.id_end
        assert len(c.weights) == 77
    assert sum(t == cat for c in chunks for t in c.tokens) == n
    assert target_token_count(count) == 75 * n_chunks


# --- rule: comma backtrack
def test_rule_comma_backtrack_moves_tail(tok):
    prompt = words(70) + ", " + words(10)  # comma is token 71; the chunk fills at 75
    chunks, _ = chunk_prompt(prompt, tok)
    comma = tok.comma
    first = chunks[0].tokens[1:-1]
    assert first.index(comma) == 70
    assert first[71:] == [tok.id_end] * 4  # the 4 words after the comma moved to chunk 2
    assert chunks[1].tokens[1:11] == tok.tokenize(["cat"])[0] * 10


def test_rule_comma_backtrack_off_when_zero(tok):
    chunks, _ = chunk_prompt(words(70) + ", " + words(10), tok, comma_padding_backtrack=0)
    assert chunks[0].tokens[1:-1][71:] == tok.tokenize(["cat"])[0] * 4


def test_rule_comma_backtrack_only_within_limit(tok):
    chunks, _ = chunk_prompt(words(50) + ", " + words(40), tok)  # comma 24 tokens back: too far
    assert tok.id_end not in chunks[0].tokens[1:-1]


# --- rule: embedding never split across chunks
def test_rule_embedding_never_split(tok):
    index = EmbeddingIndex({"myemb": 4}, tok.tokenize)
    chunks, count = chunk_prompt(words(73) + " myemb cat", tok, index)
    assert len(chunks) == 2
    assert chunks[0].fixes == []
    assert chunks[0].tokens[1:-1][73:] == [tok.id_end, tok.id_end]
    assert chunks[1].fixes == [(0, "myemb")]
    assert chunks[1].tokens[1:5] == [0, 0, 0, 0]
    assert count == 75 + 5


def test_rule_embedding_fits_exactly(tok):
    index = EmbeddingIndex({"myemb": 2}, tok.tokenize)
    chunks, _ = chunk_prompt(words(73) + " myemb", tok, index)
    assert len(chunks) == 1
    assert chunks[0].fixes == [(73, "myemb")]


def test_rule_embedding_takes_emphasis_weight(tok):
    index = EmbeddingIndex({"myemb": 3}, tok.tokenize)
    [chunk], _ = chunk_prompt("a (myemb:1.4) b", tok, index)
    offset = chunk.fixes[0][0]
    assert chunk.weights[1 + offset : 1 + offset + 3] == [1.4] * 3


def test_rule_longest_name_wins(tok):
    index = EmbeddingIndex({"cat": 1, "cat-girl": 2}, tok.tokenize)
    [chunk], _ = chunk_prompt("a cat-girl and a cat", tok, index)
    assert [name for _, name in chunk.fixes] == ["cat-girl", "cat"]
