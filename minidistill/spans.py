"""Where the trained turns and their `<think>` blocks sit in a token sequence.

A rendered conversation is text whose trainable parts are known as character spans (the chat
format's segments). Tokens are trained when their first character lies in such a span (the rule
of `Tokenizer.encode_chat`), and the think block of a trained turn is found by string matching
in the text, then mapped back to tokens through character offsets. String matching works alike
for atomic think tokens (R1 vocabularies) and for tags split over BPE pieces (Phi-4-mini).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .chat import Segment

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class TokenText:
    """Per-token text, decoded once per id: a char view of ids when no offsets are at hand.

    Decoding a lone piece of a multi-byte character gives U+FFFD, which is harmless: the
    think tags are ASCII, and positions are counted in this same per-token text."""

    def __init__(self, tok):
        self.tok, self.cache = tok, {}

    def __call__(self, ids) -> tuple[str, np.ndarray]:
        """(text, start char of each token)."""
        c, pieces = self.cache, []
        for i in ids:
            s = c.get(i)
            if s is None:
                s = c[i] = self.tok.decode([int(i)])
            pieces.append(s)
        starts = np.zeros(len(pieces), dtype=np.int64)
        if len(pieces) > 1:
            np.cumsum([len(p) for p in pieces[:-1]], out=starts[1:])
        return "".join(pieces), starts


@dataclass
class Turn:
    """One trained assistant turn in token indices: [start, end), its think block [think, think_end)."""
    start: int
    end: int
    think: int = -1  # -1: no think block
    think_end: int = -1
    closed: bool = False  # `</think>` is in the turn


class TokenLocator:
    """Char -> token lookups for one encoded text. With a `tokenizers.Encoding`, asks it
    (char_to_token) and materialises all token offsets only for a char no token covers."""

    def __init__(self, n_chars: int, n_tokens: int, starts: np.ndarray | None = None, enc=None):
        self.n_chars, self.n_tokens, self.starts, self.enc = n_chars, n_tokens, starts, enc

    def _starts(self) -> np.ndarray:
        if self.starts is None:
            self.starts = np.array(self.enc.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]  # (n_tokens,)
        return self.starts

    def first_at(self, pos: int) -> int:
        """Index of the first token that starts at or after char pos."""
        if pos >= self.n_chars:
            return self.n_tokens
        i = self.enc.char_to_token(pos) if self.enc is not None else None
        if i is not None:
            return i if self.enc.token_to_chars(i)[0] >= pos else i + 1
        return int(np.searchsorted(self._starts(), pos, "left"))

    def containing(self, pos: int) -> int:
        """Index of the token that holds char pos."""
        i = self.enc.char_to_token(pos) if self.enc is not None else None
        return i if i is not None else int(np.searchsorted(self._starts(), pos, "right")) - 1


def trained_turns(text: str, loc: TokenLocator, spans: list[tuple[int, int]]) -> list[Turn]:
    """Trained turns of one rendered text, from the char spans of its trained segments.

    A token that straddles a tag's edge counts as think. Only `</think>`: the block starts
    the turn; unclosed: it runs to the end of the turn."""
    out = []
    for a, b in spans:
        t = Turn(loc.first_at(a), loc.first_at(b))
        seg = text[a:b]
        o = seg.find(THINK_OPEN)
        c = seg.find(THINK_CLOSE, max(o, 0))
        if o >= 0 or c >= 0:
            ca = a + o if o >= 0 and (c < 0 or o < c) else a
            cb = a + c + len(THINK_CLOSE) if c >= 0 else b
            t.think = max(t.start, loc.containing(ca))
            t.think_end = loc.first_at(cb)
            t.closed = c >= 0
        if t.end > t.start:
            out.append(t)
    return out


def mask_char_spans(mask: np.ndarray, starts: np.ndarray, n_chars: int) -> list[tuple[int, int]]:
    """Char spans of the runs of True in a token mask, given each token's start char."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    ends = np.append(starts[1:], n_chars)
    return [(int(starts[s]), int(ends[e - 1])) for s, e in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1))]


def think_mask(ids, trained: np.ndarray, text: TokenText) -> np.ndarray:
    """(L,) bool: the tokens inside the think blocks of the trained runs of `ids`."""
    joined, starts = text(ids)
    think = np.zeros(len(ids), dtype=bool)
    for t in trained_turns(joined, TokenLocator(len(joined), len(ids), starts),
                           mask_char_spans(trained, starts, len(joined))):
        if t.think >= 0:
            think[t.think: t.think_end] = True
    return think


def encode_segments(tok, texts: list[list[Segment]]) -> list[tuple[list[int], list[Turn]]]:
    """Token ids and trained turns of many segment lists, with one `encode_batch` call (Rust
    threads) on minidistill's Tokenizer: each list joined, each token trained when its first
    character lies in a trainable segment."""
    joined, spans = [], []
    for segs in texts:
        bounds = np.cumsum([0] + [len(t) for t, _ in segs]).tolist()
        spans.append([(bounds[i], bounds[i + 1]) for i, (_, train) in enumerate(segs) if train])
        joined.append("".join(t for t, _ in segs))
    out = []
    for enc, sp, text in zip(tok.backend.encode_batch(joined, add_special_tokens=False), spans, joined):
        out.append((enc.ids, trained_turns(text, TokenLocator(len(text), len(enc.ids), enc=enc), sp)))
    return out


def encode_chats(tok, convs: list[list[dict]], text: TokenText) -> list[tuple[list[int], list[Turn]]]:
    """Token ids and trained turns of many conversations.

    With minidistill's Tokenizer: its chat segments through `encode_segments`. Any other
    tokenizer (anything with `encode_chat` and `decode`): one `encode_chat` per conversation,
    the text rebuilt from per-token decodes."""
    if getattr(tok, "backend", None) is None or getattr(tok, "chat_segments", None) is None:
        out = []
        for m in convs:
            ids, mask = tok.encode_chat(m)
            joined, starts = text(ids)
            spans = mask_char_spans(np.asarray(mask, bool), starts, len(joined))
            out.append((ids, trained_turns(joined, TokenLocator(len(joined), len(ids), starts), spans)))
        return out
    return encode_segments(tok, [tok.chat_segments(m, False) for m in convs])
