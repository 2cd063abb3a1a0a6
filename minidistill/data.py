"""Training data: records -> verified (ids, labels, weights) samples -> packed or padded batches.

`prepare_data` reads a file, folder or hub dataset (records.py), renders each conversation
with the model's chat format (`tok.encode_chat`, which marks the assistant tokens), finds
the `<think>…</think>` span of each trained turn by matching strings over the tokens (an
atomic token in R1 tokenizers, plain BPE text in Phi-4-mini), checks that the reasoning and
answer survive `max_seq_len`, and caches the result on disk as flat numpy arrays.
`batches.make_batches` turns samples into batches for one epoch and one rank.

Labels are shifted per sample (label[t] = ids[t+1] when that token is trained, else -100),
so a packed row never asks one sample's last position to predict the next sample's first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .cli import add_config_flags, flag_field
from .records import FORMATS, BadRecord, data_fingerprint, detect_format, iter_records, resolve_files, to_messages

from .loss import IGNORE_INDEX
CACHE_VERSION = 1  # bump when the meaning of cached arrays changes
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_HISTORY_THINK = re.compile(r"<think>.*?</think>\s*", re.S)


@dataclass
class DataConfig:
    format: str = flag_field("auto", "data schema", choices=["auto", *FORMATS])
    max_seq_len: int = flag_field(2048, "longest sample in tokens")
    system_prompt: str | None = flag_field(None, "system prompt inserted when a record has none")
    think_weight: float = flag_field(1.0, "loss weight of tokens inside <think>…</think> (tags included)")
    answer_weight: float = flag_field(1.0, "loss weight of the answer tokens (after </think>, terminator included)")
    last_turn_only: bool = flag_field(False, "train only the last assistant turn")
    strip_history_reasoning: bool = flag_field(False, "drop <think>…</think> from earlier assistant turns")
    on_truncation: str = flag_field("drop", "sample whose answer or </think> would be cut by max_seq_len",
                            choices=["drop", "truncate", "error"])
    on_bad_record: str = flag_field("skip", "malformed record", choices=["skip", "error"])
    config: str | None = flag_field(None, "hub dataset config (org/name:config also works)")
    split: str = flag_field("train", "dataset split")
    limit: int | None = flag_field(None, "read at most this many records")
    num_workers: int = flag_field(0, "tokenizer processes for large inputs; 0 = auto (1 below 4 cpus, else cpus-1, at most 8)")
    cache_dir: str | None = flag_field(None, "tokenized-data cache (default $MINIDISTILL_CACHE/data or ~/.cache/minidistill/data)")

    def __post_init__(self):
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"DataConfig.{f.name}={getattr(self, f.name)!r}; valid: {choices}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.think_weight < 0 or self.answer_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got think {self.think_weight}, answer {self.answer_weight}")


@dataclass
class Sample:
    ids: list[int] | np.ndarray  # (L,) token ids
    labels: list[int] | np.ndarray  # (L,) aligned: labels[t] = ids[t+1] if trained else -100
    weights: list[float] | np.ndarray | None = None  # (L,) loss weight per position, None when all 1


@dataclass
class DataSummary:
    source: str = ""
    detected_format: str = ""  # the schema the records were read as
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # kept, but cut to max_seq_len (on_truncation="truncate")
    trained_tokens: int = 0
    think_tokens: int = 0
    answer_tokens: int = 0
    total_tokens: int = 0
    length_p50: int = 0
    length_p90: int = 0
    length_p99: int = 0
    length_max: int = 0
    max_seq_len: int = 0
    cached: bool = False

    def format(self) -> str:
        """Multi-line human-readable summary."""
        drops = ", ".join(f"{k} {v:,}" for k, v in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
        t = max(self.trained_tokens, 1)
        lines = [
            f"data {self.source}: format {self.detected_format}, {self.read:,} records read"
            + (" (tokenized data from cache)" if self.cached else ""),
            f"  kept {self.kept:,}, dropped {sum(self.dropped.values()):,}" + (f" ({drops})" if drops else "")
            + (f", truncated {self.truncated:,}" if self.truncated else ""),
            f"  tokens {self.total_tokens:,}; trained {self.trained_tokens:,} "
            f"(think {100 * self.think_tokens / t:.1f}%, answer {100 * self.answer_tokens / t:.1f}%)",
            f"  length p50 {self.length_p50:,}, p90 {self.length_p90:,}, p99 {self.length_p99:,}, "
            f"max {self.length_max:,} (max_seq_len {self.max_seq_len:,})",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SFTData:
    samples: list[Sample]
    summary: DataSummary
    think_counts: np.ndarray | None = None  # (N,) trained think tokens per sample, for subsets' summaries
    prompt_texts: list[tuple[int, str]] = field(default_factory=list)  # (sample index, last user message)

    def __len__(self) -> int:
        return len(self.samples)

    def prompts(self, n: int = 3) -> list[str]:
        """User prompts of the first few samples (for answers sampled before/after training)."""
        return [t for _, t in self.prompt_texts[:n]]


# ---------------------------------------------------------------------------- think spans

class _TokenText:
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
class _Turn:
    """One trained assistant turn in token indices: [start, end), its think block [think, think_end)."""
    start: int
    end: int
    think: int = -1  # -1: no think block
    think_end: int = -1
    closed: bool = False  # `</think>` is in the turn


class _Locate:
    """Char -> token lookups for one encoded text. With a `tokenizers.Encoding`, asks it
    (char_to_token) and materialises all token offsets only for a char no token covers."""

    def __init__(self, n_chars: int, n_tokens: int, starts: np.ndarray | None = None, enc=None):
        self.n_chars, self.n_tokens, self.starts, self.enc = n_chars, n_tokens, starts, enc

    def _starts(self) -> np.ndarray:
        if self.starts is None:
            self.starts = np.array(self.enc.offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
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


def _turns(text: str, loc: _Locate, spans: list[tuple[int, int]]) -> list[_Turn]:
    """Trained turns of one rendered conversation, from char spans of its trained segments
    (a token is trained when its first char lies in such a span: Tokenizer.encode_chat's rule).

    The think block is found by string matching in the text, so it works for atomic think
    tokens (R1) and tags split over BPE pieces (Phi-4-mini) alike; a token that straddles a
    tag's edge counts as think. Only `</think>`: the block starts the turn; unclosed: it
    runs to the end."""
    out = []
    for a, b in spans:
        t = _Turn(loc.first_at(a), loc.first_at(b))
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


def _char_spans(mask: np.ndarray, starts: np.ndarray, n_chars: int) -> list[tuple[int, int]]:
    """Char spans of the runs of True in a token mask."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    ends = np.append(starts[1:], n_chars)
    return [(int(starts[s]), int(ends[e - 1])) for s, e in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1))]


# ---------------------------------------------------------------------------- one sample

def _encode(messages: list[dict], ids, turns: list[_Turn], cfg: DataConfig):
    """Ids and trained turns of one conversation -> (Sample, n_think, n_answer, truncated) or a drop reason."""
    ids_a = np.asarray(ids, dtype=np.int32)
    if cfg.last_turn_only:
        turns = turns[-1:]
    # The chat format must keep the final turn's reasoning (R1's own template drops it).
    if THINK_CLOSE in messages[-1]["content"] and not (turns and turns[-1].closed):
        return "reasoning_lost"
    trained = np.zeros(len(ids_a), dtype=bool)
    think = np.zeros(len(ids_a), dtype=bool)
    for t in turns:
        trained[t.start: t.end] = True
        if t.think >= 0:
            think[t.think: t.think_end] = True
    trained[0] = False  # position 0 is never a target
    if not trained.any():
        return "no_trained_tokens"
    L, cut = len(ids_a), cfg.max_seq_len
    truncated = False
    if L > cut:
        if not trained[:cut].any():
            return "too_long"  # the prompt alone fills max_seq_len
        reason = "truncated_think" if any(t.think_end > cut for t in turns if t.think >= 0) else "truncated_answer"
        if cfg.on_truncation == "error":
            raise ValueError(f"{reason.replace('_', ' ')}: {L} tokens > max_seq_len {cut}; raise max_seq_len "
                             "or use on_truncation='drop' / 'truncate'")
        if cfg.on_truncation == "drop":
            return reason
        ids_a, trained, think, truncated = ids_a[:cut], trained[:cut], think[:cut], True
    labels = np.full(len(ids_a), IGNORE_INDEX, dtype=np.int32)
    labels[:-1] = np.where(trained[1:], ids_a[1:], IGNORE_INDEX)  # shifted within the sample
    n_think = int((trained & think).sum())
    n_answer = int(trained.sum()) - n_think
    weights = None
    if cfg.think_weight != 1.0 or cfg.answer_weight != 1.0:
        w = np.where(think, cfg.think_weight, cfg.answer_weight).astype(np.float32)
        weights = np.zeros(len(ids_a), dtype=np.float32)
        weights[:-1] = np.where(trained[1:], w[1:], 0.0)
    return Sample(ids_a, labels, weights), n_think, n_answer, truncated


def _prepare_messages(msgs: list[dict], cfg: DataConfig) -> list[dict]:
    if not cfg.strip_history_reasoning:
        return msgs
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    out = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and i != last and THINK_CLOSE in m["content"]:
            content = _HISTORY_THINK.sub("", m["content"]).strip()
            if not content:
                raise BadRecord(f"assistant turn {i} holds reasoning but no answer")
            m = {"role": "assistant", "content": content}
        out.append(m)
    return out


# ---------------------------------------------------------------------------- many samples

_WORKER: dict[str, Any] = {}


def _worker_init(tok_state: bytes, cfg: DataConfig) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: processes are the parallelism
    tok = _tok_from_state(tok_state)
    _WORKER.update(tok=tok, cfg=cfg, text=_TokenText(tok))


def _encode_chunk(chunk: list[tuple[str, list[dict]]], tok=None, cfg=None, text=None) -> list:
    """[(where, messages)] -> [(where, Sample | reason, n_think, n_answer, truncated)]."""
    tok = tok or _WORKER["tok"]
    cfg = cfg or _WORKER["cfg"]
    text = text or _WORKER["text"]
    out = []
    for (where, m), (ids, turns) in zip(chunk, _encode_chats(tok, [m for _, m in chunk], text)):
        try:
            r = _encode(m, ids, turns, cfg)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        out.append((where, r) if isinstance(r, str) else (where, *r))
    return out


def _encode_chats(tok, convs: list[list[dict]], text: _TokenText) -> list[tuple[list[int], list[_Turn]]]:
    """Token ids and trained turns of many conversations.

    With minidistill's Tokenizer: its chat segments, joined and encoded with one
    `encode_batch` call (Rust threads), each token trained when its first character lies in
    a trainable segment (the rule of Tokenizer.encode_chat). Any other tokenizer: one
    `encode_chat` per conversation, the text rebuilt from per-token decodes."""
    hf, segments = getattr(tok, "_tok", None), getattr(tok, "_segments", None)
    if hf is None or segments is None:
        out = []
        for m in convs:
            ids, mask = tok.encode_chat(m)
            joined, starts = text(ids)
            spans = _char_spans(np.asarray(mask, bool), starts, len(joined))
            out.append((ids, _turns(joined, _Locate(len(joined), len(ids), starts), spans)))
        return out
    texts, spans = [], []
    for m in convs:
        segs = segments(m, False)
        bounds = np.cumsum([0] + [len(t) for t, _ in segs]).tolist()
        spans.append([(bounds[i], bounds[i + 1]) for i, (_, train) in enumerate(segs) if train])
        texts.append("".join(t for t, _ in segs))
    out = []
    for enc, sp, joined in zip(hf.encode_batch(texts, add_special_tokens=False), spans, texts):
        ids = enc.ids
        out.append((ids, _turns(joined, _Locate(len(joined), len(ids), enc=enc), sp)))
    return out


def _tok_state(tok) -> bytes:
    """What a worker needs to rebuild the tokenizer (its JSON, configs, chat format name);
    also the tokenizer part of the cache key. Chat formats hold closures, so no plain pickle."""
    hf = getattr(tok, "_tok", None)
    if hf is None:
        return pickle.dumps(tok)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return pickle.dumps((type(tok), hf.to_str(), tok.config, tok.generation_config, ids,
                         tok.chat_template, tok.chat_format))


def _tok_from_state(state: bytes):
    obj = pickle.loads(state)
    if not isinstance(obj, tuple):
        return obj
    from tokenizers import Tokenizer as HF

    cls, js, config, gen, ids, template, fmt = obj
    return cls(HF.from_str(js), config, gen, ids, template, None if fmt == "none" else fmt)


# ---------------------------------------------------------------------------- prepare_data

N_PROMPTS = 8  # prompts kept for SFTData.prompts
CHUNK = 256  # conversations per encode_batch call / per task sent to a worker
POOL_MIN_BYTES = 32 << 20  # below this, starting processes costs more than it saves


def prepare_data(source: str, tok, cfg: DataConfig, *, log: Callable[..., None] = print) -> SFTData:
    """Read, convert, tokenize and verify a dataset (file, folder or hub `org/name[:config]`).

    Results are cached on disk, keyed by the data files (path, size, mtime), the tokenizer
    and every option, so a second run loads flat arrays instead of tokenizing. The summary
    is printed through `log`; if no sample survives, raises with the summary."""
    files = resolve_files(source, config=cfg.config, split=cfg.split)
    tok_state = _tok_state(tok)
    options = {k: v for k, v in asdict(cfg).items() if k not in ("num_workers", "cache_dir")}
    key = hashlib.sha256(json.dumps([CACHE_VERSION, data_fingerprint(files), options]).encode()
                         + hashlib.sha256(tok_state).digest()).hexdigest()[:24]
    root = os.environ.get("MINIDISTILL_CACHE", Path.home() / ".cache" / "minidistill")
    cache = Path(cfg.cache_dir or Path(root) / "data") / key
    data = _load_cache(cache)
    if data is None:
        data = _build(source, files, tok, tok_state, cfg, log)
        _save_cache(cache, data, log)
    data.summary.source = source
    log(data.summary.format())
    if not data.samples:
        raise ValueError(f"no usable sample in {source}; nothing to train on.\n{data.summary.format()}\n"
                         "Check --format, raise --max-seq-len, or use --on-truncation truncate")
    return data


def _build(source: str, files: list[Path], tok, tok_state: bytes, cfg: DataConfig, log) -> SFTData:
    summ = DataSummary(source=source, max_seq_len=cfg.max_seq_len)
    fmt = None if cfg.format == "auto" else cfg.format
    shown_bad = 0
    first_prompts: dict[str, str] = {}

    def bad(where: str, msg: str) -> None:
        nonlocal shown_bad
        if cfg.on_bad_record == "error":
            raise ValueError(f"{where}: {msg} (on_bad_record='skip' skips such records)")
        summ.dropped["bad_record"] = summ.dropped.get("bad_record", 0) + 1
        if shown_bad < 5:  # enough to see what is wrong, without flooding the log
            log(f"skipping {where}: {msg}")
        shown_bad += 1

    def chunks():
        nonlocal fmt
        chunk = []
        for rec in iter_records(files, cfg.limit):
            summ.read += 1
            if isinstance(rec.data, BadRecord):
                bad(rec.where, str(rec.data))
                continue
            if fmt is None:
                fmt = detect_format(rec.data)
                if fmt is None:
                    keys = sorted(rec.data) if isinstance(rec.data, dict) else type(rec.data).__name__
                    bad(rec.where, f"no known schema fits keys {keys}; formats: {', '.join(FORMATS)}")
                    continue
            try:
                msgs = _prepare_messages(to_messages(rec.data, fmt, cfg.system_prompt), cfg)
            except BadRecord as e:
                bad(rec.where, str(e))
                continue
            chunk.append((rec.where, msgs))
            if len(first_prompts) < 4 * N_PROMPTS:  # a few, for sample answers before/after training
                first_prompts[rec.where] = next(m["content"] for m in reversed(msgs) if m["role"] == "user")
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    cpus = os.cpu_count() or 1
    # encode_batch already spreads the Rust part over all cores; processes pay off only when
    # there are cores left for the Python part too (measured: 2 cores, 1 process is 1.8x faster).
    workers = cfg.num_workers or (min(cpus - 1, 8) if cpus >= 4 else 1)
    big = sum(os.path.getsize(f) for f in files) >= POOL_MIN_BYTES
    samples: list[Sample] = []
    thinks: list[int] = []
    prompts: list[tuple[int, str]] = []

    def collect(results) -> None:
        for chunk in results:
            for where, *r in chunk:
                if len(r) == 1:
                    summ.dropped[r[0]] = summ.dropped.get(r[0], 0) + 1
                    continue
                s, n_think, n_answer, truncated = r
                if where in first_prompts and len(prompts) < N_PROMPTS:
                    prompts.append((len(samples), first_prompts[where]))
                samples.append(s)
                thinks.append(n_think)
                summ.think_tokens += n_think
                summ.answer_tokens += n_answer
                summ.trained_tokens += n_think + n_answer
                summ.truncated += truncated

    if workers > 1 and big:
        # fork shares the loaded modules (no torch re-import); spawn where fork does not exist.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers, _worker_init, (tok_state, cfg)) as pool:
            collect(pool.imap(_encode_chunk, chunks(), chunksize=1))
    else:
        text = _TokenText(tok)
        collect(_encode_chunk(c, tok, cfg, text) for c in chunks())
    summ.detected_format = fmt or cfg.format
    summ.kept = len(samples)
    if samples:
        lengths = np.array([len(x.ids) for x in samples])
        summ.length_p50, summ.length_p90, summ.length_p99 = (int(round(x)) for x in np.percentile(lengths, [50, 90, 99]))
        summ.length_max, summ.total_tokens = int(lengths.max()), int(lengths.sum())
    return SFTData(samples, summ, np.asarray(thinks, dtype=np.int64), prompts)


# ---------------------------------------------------------------------------- cache

def _save_cache(folder: Path, data: SFTData, log) -> None:
    """Flat int32 arrays + offsets, written to a temporary folder then renamed (atomic)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
        s = data.samples
        offsets = np.zeros(len(s) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(x.ids) for x in s])
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "think_counts.npy", np.asarray(data.think_counts, dtype=np.int64))
        np.save(tmp / "ids.npy", _flat([x.ids for x in s], np.int32))
        np.save(tmp / "labels.npy", _flat([x.labels for x in s], np.int32))
        if s and s[0].weights is not None:
            np.save(tmp / "weights.npy", _flat([x.weights for x in s], np.float32))
        (tmp / "summary.json").write_text(json.dumps(data.summary.to_dict()))
        (tmp / "prompts.json").write_text(json.dumps(data.prompt_texts))
        try:
            tmp.rename(folder)
        except OSError:  # another process (rank) wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # a read-only home must not stop training
        log(f"warning: could not write the data cache {folder} ({e}); set DataConfig.cache_dir")


def _flat(arrays: list, dtype) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]) if arrays else np.zeros(0, dtype)


def _load_cache(folder: Path) -> SFTData | None:
    if not (folder / "summary.json").exists():
        return None
    # Memory-mapped: 300k samples load in seconds and pages are read as batches touch them.
    offsets = np.load(folder / "offsets.npy")
    ids = np.load(folder / "ids.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy", mmap_mode="r")
    w = np.load(folder / "weights.npy", mmap_mode="r") if (folder / "weights.npy").exists() else None
    o = offsets.tolist()
    samples = [Sample(ids[a:b], labels[a:b], None if w is None else w[a:b]) for a, b in zip(o[:-1], o[1:])]
    summ = DataSummary(**json.loads((folder / "summary.json").read_text()))
    summ.cached = True
    prompts = [tuple(p) for p in json.loads((folder / "prompts.json").read_text())]
    return SFTData(samples, summ, np.load(folder / "think_counts.npy"), prompts)


def split_eval(data: SFTData, fraction: float, seed: int = 0) -> tuple[SFTData, SFTData]:
    """(train, eval): a random `fraction` of the samples held out, at least one of each."""
    n = len(data.samples)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval fraction must be in (0, 1), got {fraction}")
    k = max(1, int(round(n * fraction)))
    if k >= n:
        raise ValueError(f"eval fraction {fraction} of {n} samples leaves nothing to train on")
    perm = np.random.default_rng(seed).permutation(n)
    held = np.sort(perm[:k])
    rest = np.sort(perm[k:])
    return _subset(data, rest), _subset(data, held)


def _subset(data: SFTData, idx: np.ndarray) -> SFTData:
    samples = [data.samples[i] for i in idx.tolist()]
    summ = DataSummary(**{**data.summary.to_dict(), "dropped": dict(data.summary.dropped)})
    summ.kept = len(samples)
    summ.total_tokens = int(sum(len(s.ids) for s in samples))
    summ.trained_tokens = int(sum(int((np.asarray(s.labels) != IGNORE_INDEX).sum()) for s in samples))
    think = None if data.think_counts is None else data.think_counts[idx]
    if think is not None:
        summ.think_tokens = int(think.sum())
        summ.answer_tokens = summ.trained_tokens - summ.think_tokens
    # Prompts of samples in the subset first, then the others: they only seed demo answers.
    where = {int(i): k for k, i in enumerate(idx.tolist())}
    prompts = [(where[i], t) for i, t in data.prompt_texts if i in where]
    prompts += [(-1, t) for i, t in data.prompt_texts if i not in where]
    return SFTData(samples, summ, think, prompts)


# ---------------------------------------------------------------------------- inspect CLI

_COLOURS = {"think": "\033[33m", "answer": "\033[32m"}  # yellow reasoning, green answer
_RESET = "\033[0m"


def render_sample(sample: Sample, tok, colour: bool = False) -> str:
    """The sample's text with trained spans marked: colours on a terminal, `[[…]]` otherwise."""
    ids = [int(i) for i in sample.ids]
    labels = np.asarray(sample.labels)
    trained = np.zeros(len(ids), dtype=bool)
    trained[1:] = labels[:-1] != IGNORE_INDEX  # token t is trained when position t-1 predicts it
    think = np.zeros(len(ids), dtype=bool)
    joined, starts = _TokenText(tok)(ids)
    for t in _turns(joined, _Locate(len(joined), len(ids), starts), _char_spans(trained, starts, len(joined))):
        if t.think >= 0:
            think[t.think: t.think_end] = True
    kind = np.where(~trained, 0, np.where(think, 1, 2))
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or kind[t] != kind[start]:
            piece = tok.decode(ids[start:t])
            k = ("prompt", "think", "answer")[kind[start]]
            if k == "prompt":
                out.append(piece)
            elif colour:
                out.append(_COLOURS[k] + piece + _RESET)
            else:
                out.append(f"[[{piece}]]")
            start = t
    return "".join(out)


def main(argv: list[str] | None = None) -> None:
    """`python -m minidistill.data`: tokenize a dataset with a model's tokenizer, show samples, summarise."""
    p = argparse.ArgumentParser(prog="python -m minidistill.data", description=main.__doc__)
    p.add_argument("--model", required=True, help="preset, hub repo id or folder (only the tokenizer is loaded)")
    p.add_argument("--data", required=True, help="JSONL/JSON/Parquet file, folder, or hub dataset org/name[:config]")
    p.add_argument("--show", type=int, default=3, help="samples to print with their trained tokens marked")
    p.add_argument("--seed", type=int, default=0, help="which samples --show picks (random, by this seed)")
    p.add_argument("--system", dest="system_prompt", default=None, help="system prompt for records without one")
    add_config_flags(p, DataConfig, skip=("system_prompt",), help_suffix=" (default: %(default)s)")
    args = p.parse_args(argv)
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    cfg = DataConfig(**{f.name: getattr(args, f.name) for f in fields(DataConfig)})
    data = prepare_data(args.data, tok, cfg, log=lambda *a: None)
    colour = sys.stdout.isatty()
    legend = (f"{_COLOURS['think']}reasoning{_RESET} / {_COLOURS['answer']}answer{_RESET}" if colour
              else "[[trained tokens]]")
    pick = np.random.default_rng(args.seed).permutation(len(data.samples))[: args.show]
    for n, i in enumerate(sorted(pick.tolist())):
        s = data.samples[i]
        trained = int((np.asarray(s.labels) != IGNORE_INDEX).sum())
        print(f"--- sample {i} ({len(s.ids)} tokens, {trained} trained; {legend}) ---")
        print(render_sample(s, tok, colour))
    print("---")
    print(data.summary.format())


if __name__ == "__main__":
    from .cli import run

    run(main)
