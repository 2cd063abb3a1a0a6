"""The vocabulary map of a teacher / student tokenizer pair: teacher id -> student id (or -1).

Cross-tokenizer KD (xkd.py) moves the teacher's next-token distribution onto the student's
vocabulary. Two tokens correspond when they stand for the same text, so every token is first
turned into the bytes it stands for (`token_bytes`), whatever the tokenizer's conventions:
- byte-level BPE (GPT-2 / Llama 3 / Qwen2 / Phi-4-mini / SmolLM2): each character of the token
  string is one byte through GPT-2's byte <-> printable-character table (`Ġ` is the space);
  tokens holding part of a UTF-8 character map to exactly those bytes;
- SentencePiece-style (Metaspace, Phi-3): `▁` is the space; byte-fallback tokens `<0xNN>` are
  the byte NN; `<unk>` stands for no text (unmapped);
- added tokens (`<|im_end|>`, `<think>`, ...) stand for their content, whatever the model.

Rules, for each teacher id t with bytes b:
1. a special teacher token (added, special=True) maps only to a student token with the same
   content; otherwise it is unmapped;
2. any other token maps to the student token with the same bytes (a normal one first, else a
   non-special added token: `<think>` as an added token on both sides);
3. otherwise to the longest student normal token that is a prefix of b: the first token the
   student would write for that text (a Llama-3 teacher's "123" -> a one-digit student's "1").
   At an aligned position the teacher's mass on "123" is then mass on the student starting
   with "1", which is what the student's next-token distribution can express;
4. nothing matches (a byte the student lacks, `<unk>`): -1, unmapped.
`PrefixMaps` gives the same map conditioned on text already written inside a teacher token
(rule 3 applied to the rest of its text after that prefix), for align.py's inner targets.
Callers can add pairs the strings cannot find (`extra`): the end-of-turn tokens of two chat
formats (`<|eot_id|>` -> `<|im_end|>`), which align.py discovers from the renderings.

`vocab_map` builds the map once per pair and caches it on disk as a .npy (no pickle), keyed by
both tokenizers' content hashes (their tokenizer.json text), under
`$MINIDISTILL_CACHE/vocab_map` (default ~/.cache/minidistill/vocab_map).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

MAP_VERSION = 1  # bump when the rules above change, so cached maps are rebuilt


def _byte_table() -> dict[str, int]:
    """GPT-2's printable character -> byte table of byte-level BPE: printable Latin-1 bytes stand
    for themselves, the other 68 bytes for the characters 256, 257, ... in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTES = _byte_table()


def _has_type(node, name: str) -> bool:
    """Whether a tokenizer.json component (possibly a Sequence) contains a step of type `name`."""
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


def tokenizer_hash(tok) -> str:
    """sha256 (hex, 16 chars) of the tokenizer's full tokenizer.json text."""
    return hashlib.sha256(tok.backend.to_str().encode()).hexdigest()[:16]


def token_bytes(tok) -> tuple[list[bytes | None], np.ndarray, np.ndarray]:
    """Per id of `tok` (a minidistill Tokenizer): the bytes the token stands for (None: no text),
    whether it is an added token, and whether it is special. Lists of length len(tok)."""
    backend = tok.backend
    spec = json.loads(backend.to_str())
    byte_level = _has_type(spec.get("decoder"), "ByteLevel") or _has_type(spec.get("pre_tokenizer"), "ByteLevel")
    fallback = bool(spec.get("model", {}).get("byte_fallback"))
    unk = spec.get("model", {}).get("unk_token")
    n = len(tok)
    added = np.zeros(n, dtype=bool)
    special = np.zeros(n, dtype=bool)
    out: list[bytes | None] = [None] * n
    decoder = backend.get_added_tokens_decoder()
    for tid in range(n):
        s = backend.id_to_token(tid)
        if tid in decoder:
            added[tid], special[tid] = True, decoder[tid].special
        if s is None or s == unk:
            continue
        if tid in decoder:
            out[tid] = decoder[tid].content.encode("utf-8")
        elif byte_level:
            if all(c in _BYTES for c in s):
                out[tid] = bytes(_BYTES[c] for c in s)
        elif fallback and len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            out[tid] = bytes([int(s[3:5], 16)])
        else:
            out[tid] = s.replace("▁", " ").encode("utf-8")
    return out, added, special


class _StudentLookup:
    """The student side of rules 2-3: the student id for a text (bytes), or -1."""

    def __init__(self, student_tok):
        s_bytes, s_added, s_special = token_bytes(student_tok)
        # Rule 2: a normal student token first, else a non-special added one; rule 1: specials by content.
        self.normal = {b: sid for sid, b in reversed(list(enumerate(s_bytes))) if b is not None and not s_added[sid]}
        self.exact = {b: sid for sid, b in enumerate(s_bytes) if b is not None and s_added[sid] and not s_special[sid]}
        self.exact.update(self.normal)
        self.specials = {b: sid for sid, b in enumerate(s_bytes) if b is not None and s_added[sid]}
        self.longest = max((len(b) for b in self.normal), default=0)

    def first_token(self, b: bytes) -> int:
        """The student token of the same text, else the longest student normal token it starts with."""
        sid = self.exact.get(b)
        if sid is not None:
            return sid
        for cut in range(min(len(b), self.longest), 0, -1):  # rule 3
            sid = self.normal.get(b[:cut])
            if sid is not None:
                return sid
        return -1


def build_vocab_map(teacher_tok, student_tok, extra: dict[int, int] | None = None) -> np.ndarray:
    """(len(teacher_tok),) int64: the student id of each teacher id under the module's rules, or -1."""
    t_bytes, _, t_special = token_bytes(teacher_tok)
    s = _StudentLookup(student_tok)
    out = np.full(len(t_bytes), -1, dtype=np.int64)
    for tid, b in enumerate(t_bytes):
        if b:
            out[tid] = s.specials.get(b, -1) if t_special[tid] else s.first_token(b)
    for tid, sid in (extra or {}).items():
        out[int(tid)] = int(sid)
    return out


class PrefixMaps:
    """Vocabulary maps conditioned on text the student has already written inside one teacher
    token (align.py's inner targets): for prefix P, each teacher token whose text starts with P
    and is longer maps to the student's first token of the rest of its text (rules 2-3); the
    others (and specials) are unmapped. A Llama-3 teacher's distribution before " 123" then
    says, after the student wrote " " and "1", which digit comes next ("123" -> "2", "145" -> "4").
    Built per prefix on first use and kept; `get(b"")` is not served here (the plain map is)."""

    def __init__(self, teacher_tok, student_tok):
        t_bytes, _, t_special = token_bytes(teacher_tok)
        pairs = sorted((b, tid) for tid, b in enumerate(t_bytes) if b and not t_special[tid])
        self._keys = [b for b, _ in pairs]
        self._ids = [tid for _, tid in pairs]
        self._student = _StudentLookup(student_tok)
        self._maps: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, prefix: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(teacher ids, student ids), two (m,) int64 arrays: the map conditioned on `prefix`."""
        if not prefix:
            raise ValueError("PrefixMaps serves non-empty prefixes; the plain map is vocab_map()")
        if prefix not in self._maps:
            src, dst = [], []
            i = bisect.bisect_left(self._keys, prefix)
            while i < len(self._keys) and self._keys[i].startswith(prefix):  # the tokens starting with it
                b = self._keys[i]
                sid = self._student.first_token(b[len(prefix):]) if len(b) > len(prefix) else -1
                if sid >= 0:
                    src.append(self._ids[i])
                    dst.append(sid)
                i += 1
            self._maps[prefix] = (np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64))
        return self._maps[prefix]


def _cache_path(teacher_tok, student_tok, cache_dir: str | Path | None) -> Path:
    root = os.environ.get("MINIDISTILL_CACHE", Path.home() / ".cache" / "minidistill")
    folder = Path(cache_dir) if cache_dir is not None else Path(root) / "vocab_map"
    return folder / f"v{MAP_VERSION}-{tokenizer_hash(teacher_tok)}-{tokenizer_hash(student_tok)}.npy"


def vocab_map(teacher_tok, student_tok, *, extra: dict[int, int] | None = None,
              cache_dir: str | Path | None = None, log=None) -> np.ndarray:
    """`build_vocab_map`, read from / written to the on-disk cache (see the module docstring);
    `extra` pairs are applied after the cache, so they are never stored. A folder that cannot
    be written is reported through `log` (when given), never raised."""
    path = _cache_path(teacher_tok, student_tok, cache_dir)
    m = None
    if path.is_file():
        m = np.load(path, allow_pickle=False)
        if m.shape != (len(teacher_tok),) or m.dtype != np.int64:
            m = None  # not what this version writes: rebuild
    if m is None:
        m = build_vocab_map(teacher_tok, student_tok)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy")
            with os.fdopen(fd, "wb") as f:
                np.save(f, m, allow_pickle=False)
            os.replace(tmp, path)
        except OSError as e:
            if log is not None:
                log(f"warning: could not write the vocabulary map cache {path} ({e})")
    m = m.copy()
    for tid, sid in (extra or {}).items():
        m[int(tid)] = int(sid)
    return m
