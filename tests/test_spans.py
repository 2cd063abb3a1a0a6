"""spans.py: char <-> token lookups, trained turns and their think blocks, on hand-made and real tokenizations."""

from __future__ import annotations

import numpy as np
import pytest

from minidistill.spans import (TokenLocator, TokenText, Turn, encode_chats, encode_segments, mask_char_spans,
                               think_mask, trained_turns)
from minidistill.tokenizer import Tokenizer
from tok_fixtures import write_tokenizer


class PieceTok:
    """A tokenizer whose ids are indices into a fixed list of text pieces."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids) -> str:
        return "".join(self.pieces[int(i)] for i in ids)


def turns_of(pieces: list[str], first_trained: int) -> list[Turn]:
    """Turns of pieces[0..], trained from token `first_trained` to the end."""
    tok = PieceTok(pieces)
    text, starts = TokenText(tok)(range(len(pieces)))
    mask = np.arange(len(pieces)) >= first_trained
    spans = mask_char_spans(mask, starts, len(text))
    return trained_turns(text, TokenLocator(len(text), len(pieces), starts), spans)


@pytest.mark.parametrize("pieces,first,want", [
    # atomic tags: the block is exactly <think> .. </think>
    (["<u>", "Q", "<a>", "<think>", "\nr\n", "</think>", "\nA", "<e>"], 3, Turn(3, 8, 3, 6, True)),
    # tags split over pieces; the piece holding the end of </think> and the answer's start counts as think
    (["<a>", "<th", "ink>r", "</thi", "nk>\nA", "<e>"], 1, Turn(1, 6, 1, 5, True)),
    # a piece straddling the start of <think> before the turn: the block starts at the turn
    (["<a>x<th", "ink>r", "</think>", "A"], 0, Turn(0, 4, 0, 3, True)),
    # only </think>: the block starts the turn
    (["<a>", "r", "</think>", "A", "<e>"], 1, Turn(1, 5, 1, 3, True)),
    # unclosed: the block runs to the end of the turn
    (["<a>", "<think>", "r", "<e>"], 1, Turn(1, 4, 1, 4, False)),
    # no block
    (["<a>", "A", "<e>"], 1, Turn(1, 3)),
    # one block per turn: the first one
    (["<a>", "<think>", "a", "</think>", "b", "<think>", "c", "</think>", "d"], 1, Turn(1, 9, 1, 4, True)),
])
def test_trained_turns_hand_made(pieces, first, want):
    assert turns_of(pieces, first) == [want]


def test_mask_char_spans_and_several_turns():
    mask, starts = np.array([False, True, True, False, True]), np.array([0, 2, 5, 6, 9])
    assert mask_char_spans(mask, starts, 12) == [(2, 6), (9, 12)]
    assert mask_char_spans(np.zeros(5, bool), starts, 12) == []
    assert mask_char_spans(np.ones(5, bool), starts, 12) == [(0, 12)]
    pieces = ["<u>", "Q", "<a>", "<think>", "r", "</think>", "A", "<e>", "<u>", "Q2", "<a>", "B", "<e>"]
    tok = PieceTok(pieces)
    text, starts = TokenText(tok)(range(len(pieces)))
    m = np.zeros(len(pieces), bool)
    m[3:8] = m[11:13] = True
    loc = TokenLocator(len(text), len(pieces), starts)
    spans = mask_char_spans(m, starts, len(text))
    assert trained_turns(text, loc, spans) == [Turn(3, 8, 3, 6, True), Turn(11, 13)]
    assert trained_turns(text, loc, [(4, 4)]) == []  # an empty span is no turn


def test_token_text_caches_each_id_once():
    calls = []

    class Counting(PieceTok):
        def decode(self, ids):
            calls.append(list(ids))
            return super().decode(ids)

    text = TokenText(Counting(["ab", "c", "def"]))
    joined, starts = text([0, 2, 0, 1, 2])
    assert joined == "abdefabcdef" and starts.tolist() == [0, 2, 5, 7, 8]
    assert sorted(map(tuple, calls)) == [(0,), (1,), (2,)]
    assert text([]) == ("", pytest.approx(np.zeros(0)))


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {f: Tokenizer.from_dir(write_tokenizer(f, root / f)) for f in ("phi-4-mini", "r1-distill-qwen")}


def test_locator_with_encoding_equals_brute_force(toks):
    tok = toks["phi-4-mini"]
    text = "Hello  there<|end|>\n\n<think>\nstep 1; 2 + 2 = 4\n</think>\nThe answer is 4.<|end|>"
    enc = tok.backend.encode(text, add_special_tokens=False)
    starts = np.array([a for a, _ in enc.offsets])
    fast, plain = TokenLocator(len(text), len(enc.ids), enc=enc), TokenLocator(len(text), len(enc.ids), starts)
    for pos in range(len(text) + 1):
        first = next((i for i, s in enumerate(starts) if s >= pos), len(starts)) if pos < len(text) else len(starts)
        assert fast.first_at(pos) == plain.first_at(pos) == first, pos
        if pos < len(text):
            holder = max(i for i, s in enumerate(starts) if s <= pos)
            assert fast.containing(pos) == plain.containing(pos) == holder, pos


@pytest.mark.parametrize("family", ["phi-4-mini", "r1-distill-qwen"])
def test_think_mask_of_real_tokens(family, toks):
    tok = toks[family]
    reasoning = "<think>\nLet me think step by step. 2 + 2 = 4.\n</think>"
    conv = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": reasoning + "\nThe answer is 4."}]
    ids, mask = tok.encode_chat(conv)
    think = think_mask(ids, np.asarray(mask), TokenText(tok))
    assert tok.decode(np.asarray(ids)[think].tolist()) == reasoning
    assert not (think & ~np.asarray(mask)).any()  # think tokens are trained tokens
    assert not think_mask(ids, np.zeros(len(ids), bool), TokenText(tok)).any()


def test_encode_segments_marks_trained_text(toks):
    tok = toks["r1-distill-qwen"]
    segs = [[("Question: 2 + 2?\nAnswer: ", False), ("<think>\nr\n</think>\n4" + tok.eos_token, True)],
            [("x", True)], [("prompt only", False)]]
    out = encode_segments(tok, segs)
    for (ids, turns), s in zip(out, segs):
        assert ids == tok.encode("".join(t for t, _ in s))
    (ids, (t,)), (ids1, (t1,)), (_, none) = out
    assert tok.decode(ids[t.start: t.end]) == segs[0][1][0] and t.closed
    assert tok.decode(ids[t.think: t.think_end]) == "<think>\nr\n</think>"
    assert (t1.start, t1.end, t1.think) == (0, len(ids1), -1) and none == []
    # a conversation gives the same through its chat segments
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nr\n</think>\n4"}]
    assert encode_chats(tok, [conv], TokenText(tok)) == encode_segments(tok, [tok.chat_segments(conv)])
