"""Token alignment of one conversation rendered by two tokenizers (teacher and student), for
cross-tokenizer KD.

Each model sees the conversation in its own chat format, so the two token sequences share
only the assistant turns' content (the chat formats put different headers, terminators, system
prompts around it; Llama 3 strips the content, R1 drops earlier turns' reasoning). Alignment
therefore runs over the characters of each assistant turn's content, the same string on both
sides (`shared_content`), with each token's character offsets from the `tokenizers` encoding of
its own full rendering, moved to content coordinates: UTF-8 byte offsets into the content (0 =
its first byte; byte-level tokens that split one character get their own bytes), and the
end-of-turn token that follows the content is put at [len, END) on both sides, so the two
terminators line up with each other.

Boundaries. A token starts *cleanly* at byte x when the token before it ends exactly at x
(tokens straddling the content's first character do not start cleanly). A *common boundary*
is a place where both sides have a token starting cleanly: the two tokenizations break there,
and the spans between consecutive common boundaries are aligned one-to-one (one token each)
or many-to-many.

Targets. Student position p predicts its token p+1 starting at x. Call a teacher token *whole*
when it starts and ends cleanly and ends at a student boundary: its text is then a whole number
of student tokens. Student position p gets
- a *strict* target, teacher position q, when the teacher token q+1 starts at x and is whole:
  the teacher's distribution at q, mapped to the student vocabulary by vocab_map (equal bytes,
  else the student's first token of that text), says which student token comes next. A Llama-3
  teacher writing "123" where a one-digit student writes "1", "2", "3": before "1", the mass on
  "123" is mass on "1";
- an *inner* target (q, P) when x lies inside a whole teacher token q+1 that started earlier,
  P being the bytes of it the student has already written: the same teacher distribution at q,
  restricted to teacher tokens whose text starts with P and mapped to the student token that
  follows P (vocab_map.PrefixMaps). Before "2" (P = "1"): "123" -> "2", "145" -> "4". The
  teacher's context plus P is exactly the student's context, so the digit information of a
  multi-digit teacher token reaches every digit of the student (where GOLD-style first-token
  mapping loses it);
- neither where the teacher's token at x ends inside a student token (a one-digit teacher
  before a student's "12", `<think>` as characters on the teacher and one added token on the
  student): the teacher's next-token distribution says nothing certain about the student's
  next token, so CE only; such positions still have a *loose* partner q (same start), which the
  identity-free sorted-probability (ULD) term can use (xkd.py). Student positions outside the
  assistant content (headers) get nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .loss import IGNORE_INDEX


@dataclass
class Rendering:
    """One side: the chat rendering's token ids and character offsets, and per assistant turn
    the trained segment's (start, end) in the text."""
    text: str
    ids: list[int]
    starts: np.ndarray  # (L,) int64 character offsets of each token in text
    ends: np.ndarray  # (L,)
    turns: list[tuple[int, int]]  # trained segments (start, end) in text, in order


def render(tok, messages: list[dict]) -> Rendering:
    """The conversation in `tok`'s chat format, encoded with offsets (no specials added)."""
    segments = tok.chat_segments(messages)
    turns, pos = [], 0
    for text, train in segments:
        if train:
            turns.append((pos, pos + len(text)))
        pos += len(text)
    text = "".join(t for t, _ in segments)
    enc = tok.backend.encode(text, add_special_tokens=False)
    off = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    return Rendering(text, list(enc.ids), off[:, 0].copy(), off[:, 1].copy(), turns)


def shared_content(a: str, b: str, content: str) -> str | None:
    """The text of an assistant message that both trained segments a and b hold: the content
    stripped (Llama 3 strips it), else its part after `</think>` (R1 drops earlier reasoning)."""
    for cand in (content.strip(), content.split("</think>")[-1].strip()):
        if cand and cand in a and cand in b:
            return cand
    return None


def _byte_offsets(text: str) -> np.ndarray:
    """(len(text) + 2,) UTF-8 byte offset of each character position of text, and END past it."""
    b = np.zeros(len(text) + 2, dtype=np.int64)
    b[1: len(text) + 1] = np.cumsum([len(c.encode("utf-8")) for c in text])
    b[-1] = b[-2] + 1
    return b


def content_tokens(r: Rendering, turn: int, shared: str, byte_len: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tokens of trained segment `turn` of r from its content on: (token indices, start, end in
    content byte coordinates, clean start). The end-of-turn token is [n, n + 1) with n the
    content's UTF-8 length. byte_len (vocab,): bytes each id stands for (vocab_map.token_bytes);
    with it, byte-level tokens that split one character (same character offsets) get their own
    byte spans, so a character split alike on both sides aligns byte by byte."""
    s0, s1 = r.turns[turn]
    cs = s0 + r.text[s0:s1].find(shared)
    ce = cs + len(shared)
    n = len(shared)
    # Content tokens, then the end-of-turn token only when it is what closes the segment (not text the
    # other side stripped, such as trailing spaces Llama 3 drops).
    idx = np.nonzero((r.starts >= cs) & ((r.starts < ce) | ((r.starts == ce) & (r.ends >= s1) & (ce < s1))))[0]
    starts = r.starts[idx] - cs
    ends = np.where(r.ends[idx] > ce, n + 1, r.ends[idx] - cs)
    ends = np.where(starts == n, n + 1, ends)
    B = _byte_offsets(shared)
    bs, be = B[starts], B[ends]
    if byte_len is not None:
        k = 0
        while k < len(idx):  # runs of tokens with one character's offsets: bytes of one character
            e = k
            while e + 1 < len(idx) and starts[e + 1] == starts[k] and ends[e + 1] == ends[k]:
                e += 1
            lens = byte_len[np.asarray(r.ids)[idx[k: e + 1]]]
            if e > k and ends[k] <= n and lens.sum() == be[k] - bs[k] and (lens > 0).all():
                bs[k: e + 1] = bs[k] + np.concatenate([[0], np.cumsum(lens)[:-1]])
                be[k: e + 1] = bs[k: e + 1] + lens
            k = e + 1
    clean = np.ones(len(idx), dtype=bool)
    if len(idx):
        j0 = idx[0]
        clean[0] = j0 == 0 or r.ends[j0 - 1] == r.starts[j0]  # the token before the content ends where it starts
        clean[1:] = be[:-1] == bs[1:]
    return idx, bs, be, clean


def match_tokens(s_start: np.ndarray, s_end: np.ndarray, s_clean: np.ndarray, t_start: np.ndarray,
                 t_end: np.ndarray, t_clean: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each student token k (content coordinates, see `content_tokens`): the teacher token j
    that starts cleanly where k does and ends at a student boundary (strict); the teacher token
    starting cleanly where k does (loose); the teacher token j that starts before k, cleanly, and
    ends cleanly at a student boundary after k's start (inner: k lies inside j's text, which is
    a whole number of student tokens); -1 where there is none. Three (K,) int64 arrays."""
    t_at = {int(x): j for j, x in enumerate(t_start) if t_clean[j]}
    # A teacher token ends cleanly when the next one starts cleanly: a byte-level token holding the
    # first byte of a character has the whole character's offsets, but is only a prefix of it.
    t_end_clean = np.append(t_clean[1:], True)
    s_bounds = {int(x) for k, x in enumerate(s_start) if s_clean[k]}
    if len(s_end):
        s_bounds.add(int(s_end.max()))  # the end of the last student token closes a span too
    strict = np.full(len(s_start), -1, dtype=np.int64)
    loose = np.full(len(s_start), -1, dtype=np.int64)
    inner = np.full(len(s_start), -1, dtype=np.int64)
    whole = np.array([bool(t_clean[j] and t_end_clean[j] and int(t_end[j]) in s_bounds) for j in range(len(t_start))],
                     dtype=bool)  # teacher tokens whose text is a whole number of student tokens
    for k, x in enumerate(s_start):
        if not s_clean[k]:
            continue
        j = t_at.get(int(x))
        if j is not None:
            loose[k] = j
            if whole[j]:
                strict[k] = j
            continue
        j = int(np.searchsorted(t_start, x, side="right")) - 1  # the teacher token that k's start lies in
        if j >= 0 and whole[j] and t_start[j] < x < t_end[j]:
            inner[k] = j
    return strict, loose, inner


@dataclass
class Alignment:
    """A conversation aligned across tokenizers: the teacher's token ids and, keyed by student
    position (the position that predicts the token after it), the teacher position with the
    same next-token target (strict) or the same start (loose, ULD); the end-of-turn id pairs
    (teacher id, student id) met at aligned terminators."""
    teacher_ids: list[int]
    student_ids: list[int]
    strict: dict[int, int] = field(default_factory=dict)
    loose: dict[int, int] = field(default_factory=dict)
    # Student positions inside one teacher token's text: (teacher position at that token's start,
    # the bytes of the token's text the student has already written).
    inner: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    turn_ends: set[tuple[int, int]] = field(default_factory=set)
    turns_skipped: int = 0  # assistant turns with no shared content found


def byte_lengths(tok) -> np.ndarray:
    """(len(tok),) int64: how many bytes each id stands for (0: none), for `align_conversation`."""
    from .vocab_map import token_bytes

    return np.asarray([0 if b is None else len(b) for b in token_bytes(tok)[0]], dtype=np.int64)


def align_conversation(student_tok, teacher_tok, messages: list[dict], student_bytes: np.ndarray | None = None,
                       teacher_bytes: np.ndarray | None = None) -> Alignment:
    """Render `messages` with both tokenizers' chat formats and align them (module docstring).
    student_bytes / teacher_bytes: `byte_lengths` of each tokenizer (computed when not given;
    pass them when aligning many conversations)."""
    sb = byte_lengths(student_tok) if student_bytes is None else student_bytes
    tb = byte_lengths(teacher_tok) if teacher_bytes is None else teacher_bytes
    s, t = render(student_tok, messages), render(teacher_tok, messages)
    out = Alignment(t.ids, s.ids)
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    if not (len(s.turns) == len(t.turns) == len(contents)):
        out.turns_skipped = len(contents)
        return out
    for i, content in enumerate(contents):
        shared = shared_content(s.text[slice(*s.turns[i])], t.text[slice(*t.turns[i])], content)
        if shared is None:
            out.turns_skipped += 1
            continue
        si, ss, se, sc = content_tokens(s, i, shared, sb)
        ti, ts, te, tc = content_tokens(t, i, shared, tb)
        text = shared.encode("utf-8")
        n = len(text)
        strict, loose, inner = match_tokens(ss, se, sc, ts, te, tc)
        for k in range(len(si)):
            if si[k] > 0 and inner[k] >= 0 and ti[inner[k]] > 0:
                j = inner[k]
                out.inner[int(si[k]) - 1] = (int(ti[j]) - 1, text[ts[j]: ss[k]])
            if si[k] == 0 or loose[k] < 0 or ti[loose[k]] == 0:
                continue  # position 0 predicts nothing
            p, q = int(si[k]) - 1, int(ti[loose[k]]) - 1
            out.loose[p] = q
            if strict[k] >= 0:
                out.strict[p] = q
            if ss[k] == n and ts[loose[k]] == n:
                out.turn_ends.add((t.ids[q + 1], s.ids[p + 1]))
    return out


def sample_targets(alignment: Alignment, labels) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """For the labelled positions of a student sample (labels != -100, in order): the aligned
    teacher positions, strict or inner (-1: none) and loose (-1: none), two (n,) int64 arrays,
    and the prefix each target is conditioned on (b"" for strict ones)."""
    pos = np.nonzero(np.asarray(labels) != IGNORE_INDEX)[0]
    strict = np.full(len(pos), -1, dtype=np.int64)
    prefix = [b""] * len(pos)
    for i, p in enumerate(pos.tolist()):
        if p in alignment.strict:
            strict[i] = alignment.strict[p]
        elif p in alignment.inner:
            strict[i], prefix[i] = alignment.inner[p]
    loose = np.array([alignment.loose.get(int(p), -1) for p in pos], dtype=np.int64)
    return strict, loose, prefix
