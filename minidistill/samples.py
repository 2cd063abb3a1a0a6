"""Training samples: records -> verified (ids, labels, weights) samples, with a summary of what was kept.

`prepare_data` reads a file, folder or hub dataset (records.py), renders each conversation
with the model's chat format (its segments mark the assistant text), or each record as plain
text with a prompt template or the `text` format (templates.py), tokenizes many at once,
finds the `<think>…</think>` span of each trained turn (spans.py), checks that the reasoning
and answer survive `max_seq_len`, and caches the result on disk (datacache.py).
`batches.make_batches` turns samples into batches for one epoch and one rank.

Labels are shifted per sample (label[t] = ids[t+1] when that token is trained, else -100),
so a packed row never asks one sample's last position to predict the next sample's first.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .cli import flag_field
from .datacache import cache_folder, cache_key, load_cache, save_cache
from .loss import IGNORE_INDEX
from .records import (BadRecord, DATA_SUFFIXES, FORMATS, data_fingerprint, detect_schema, iter_records, resolve_files,
                      skipped_files, to_messages)
from .templates import TEXT_FORMAT, PromptTemplate, load_template, text_parts
from .spans import THINK_CLOSE, Segment, TokenText, Turn, encode_chats, encode_segments
from .tokenizer import tokenizer_from_state, tokenizer_state

_HISTORY_THINK = re.compile(r"<think>.*?</think>\s*", re.S)


@dataclass
class DataConfig:
    format: str = flag_field("auto", "data schema (text: records with one `text` field, no chat format)",
                             choices=["auto", *FORMATS, TEXT_FORMAT])
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
    template: str | None = flag_field(None, "prompt template file instead of the chat format: prompt part, a line "
                                            "---response---, response part; {Field} is a record key, {{ a brace")
    response_marker: str | None = flag_field(None, "with --format text: train only what follows this string")

    def __post_init__(self):
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"DataConfig.{f.name}={getattr(self, f.name)!r}; valid: {choices}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.think_weight < 0 or self.answer_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got think {self.think_weight}, answer {self.answer_weight}")
        if self.template is not None and self.format != "auto":
            raise ValueError(f"template={self.template!r} and format={self.format!r} both say how a record becomes "
                             "text; keep one")
        if self.response_marker is not None and self.format != TEXT_FORMAT:
            raise ValueError(f"response_marker={self.response_marker!r} applies to format='text' only, "
                             f"not {self.format!r}")
        if self.system_prompt is not None and self.plain_text:
            raise ValueError("system_prompt applies to chat formats; a template or text record writes the whole prompt")

    @property
    def plain_text(self) -> bool:
        """Records become (prompt, response) text without the chat format (a template or format 'text')."""
        return self.template is not None or self.format == TEXT_FORMAT


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
    bad_records: list[str] = field(default_factory=list)  # "file:line: why" of the first few skipped records
    skipped_files: list[str] = field(default_factory=list)  # a folder's files that are not data (other extensions)

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

    def notes(self) -> list[str]:
        """What was left out, one line each: the bad records' reasons (file:line, or file:element
        in a JSON array) and a folder's skipped files. `train` and `python -m minidistill.data`
        both print these lines, before the summary."""
        lines = [f"skipping {b}" for b in self.bad_records]
        more = self.dropped.get("bad_record", 0) - len(self.bad_records)
        if more > 0:
            lines.append(f"skipping {more:,} more bad records (the first {len(self.bad_records)} are named)")
        if self.skipped_files:
            n = len(self.skipped_files)
            lines.append(f"skipped {n} file{'s' if n > 1 else ''} of {self.source} that are not data "
                         f"({', '.join(DATA_SUFFIXES)}): {', '.join(self.skipped_files)}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SFTData:
    samples: list[Sample]
    summary: DataSummary
    think_counts: np.ndarray | None = None  # (N,) trained think tokens per sample, for subsets' summaries
    prompt_texts: list[tuple[int, str]] = field(default_factory=list)  # (sample index, user message or prompt part)

    def __len__(self) -> int:
        return len(self.samples)

    def prompts(self, n: int = 3) -> list[str]:
        """User prompts of the first few samples (for answers sampled before/after training)."""
        return [t for _, t in self.prompt_texts[:n]]


# ---------------------------------------------------------------------------- one sample

def _encode(last_text: str, ids, turns: list[Turn], cfg: DataConfig):
    """Ids and trained turns of one conversation -> (Sample, n_think, n_answer, truncated) or a drop
    reason; `last_text` is the final turn's text (assistant content, or a plain-text response)."""
    ids_a = np.asarray(ids, dtype=np.int32)
    if cfg.last_turn_only:
        turns = turns[-1:]
    # The chat format must keep the final turn's reasoning (R1's own template drops it).
    if THINK_CLOSE in last_text and not (turns and turns[-1].closed):
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


def _plain_segments(prompt: str, response: str, bos: str, eos: str) -> list[Segment]:
    """A (prompt, response) pair as segments: BOS (unless written) and the prompt untrained, the
    response and an EOS (unless it ends with one) trained."""
    bos = "" if bos and (prompt or response).startswith(bos) else bos
    eos = "" if eos and response.endswith(eos) else eos
    return [(t, train) for t, train in ((bos + prompt, False), (response + eos, True)) if t]


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
    tok = tokenizer_from_state(tok_state)
    _WORKER.update(tok=tok, cfg=cfg, text=TokenText(tok))


def _encode_chunk(chunk: list[tuple[str, list]], tok=None, cfg=None, text=None) -> list:
    """[(where, messages or plain-text segments)] -> [(where, Sample | reason, n_think, n_answer, truncated)]."""
    tok = tok or _WORKER["tok"]
    cfg = cfg or _WORKER["cfg"]
    text = text or _WORKER["text"]
    items = [m for _, m in chunk]
    encoded = encode_segments(tok, items) if cfg.plain_text else encode_chats(tok, items, text)
    out = []
    for (where, m), (ids, turns) in zip(chunk, encoded):
        try:
            last = next((t for t, train in reversed(m) if train), "") if cfg.plain_text else m[-1]["content"]
            r = _encode(last, ids, turns, cfg)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        out.append((where, r) if isinstance(r, str) else (where, *r))
    return out


# ---------------------------------------------------------------------------- prepare_data

N_PROMPTS = 8  # prompts kept for SFTData.prompts
SHOWN_BAD = 5  # bad records named one by one: enough to see what is wrong, without flooding the log
CHUNK = 256  # conversations per encode_batch call / per task sent to a worker
POOL_MIN_BYTES = 32 << 20  # below this, starting processes costs more than it saves


def prepare_data(source: str, tok, cfg: DataConfig, *, log: Callable[..., None] = print) -> SFTData:
    """Read, convert, tokenize and verify a dataset (file, folder or hub `org/name[:config]`).

    Results are cached on disk, keyed by the data files (path, size, mtime), the tokenizer
    and every option, so a second run loads flat arrays instead of tokenizing. The summary
    is printed through `log`; if no sample survives, raises with the summary."""
    template = load_template(cfg.template) if cfg.template is not None else None
    if cfg.plain_text and getattr(tok, "backend", None) is None:
        raise ValueError(f"a prompt template or format 'text' needs minidistill's Tokenizer, got {type(tok).__name__}")
    files = resolve_files(source, config=cfg.config, split=cfg.split)
    tok_state = tokenizer_state(tok)
    # The template's text shapes the samples, not its path; plain-text options left unset stay out
    # of the key, so that caches written before these options existed still hit.
    options = {k: v for k, v in asdict(cfg).items()
               if k not in ("num_workers", "cache_dir") and not (k in ("template", "response_marker") and v is None)}
    if template is not None:
        options["template"] = [template.prompt, template.response]
    folder = cache_folder(cache_key(data_fingerprint(files), options, tok_state), cfg.cache_dir)
    data = _from_cache(folder)
    if data is None:
        data = _build(source, files, tok, tok_state, cfg, template)
        s = data.samples
        save_cache(folder, [x.ids for x in s], [x.labels for x in s],
                   [x.weights for x in s] if s and s[0].weights is not None else None,
                   data.think_counts, data.summary.to_dict(), data.prompt_texts, log)
    data.summary.source = source
    data.summary.skipped_files = skipped_files(source)  # not from the cache: the key knows only the data files
    for line in data.summary.notes():
        log(line)
    log(data.summary.format())
    if not data.samples:
        raise ValueError(f"no usable sample in {source}; nothing to train on.\n{data.summary.format()}\n"
                         "Check --format, raise --max-seq-len, or use --on-truncation truncate")
    return data


def _build(source: str, files: list[Path], tok, tok_state: bytes, cfg: DataConfig,
           template: PromptTemplate | None) -> SFTData:
    summ = DataSummary(source=source, max_seq_len=cfg.max_seq_len)
    fmt = "template" if template is not None else None if cfg.format == "auto" else cfg.format
    # Plain text is tokenized as transformers' tokenizer(text) would: BOS when the post-processor adds one.
    bos = tok.bos_token if cfg.plain_text and tok.prepends_bos and tok.bos_token else ""
    checked = template is None  # unknown template fields are named against the first record's keys
    first_prompts: dict[str, str] = {}

    def bad(where: str, msg: str) -> None:
        if cfg.on_bad_record == "error":
            raise ValueError(f"{where}: {msg} (on_bad_record='skip' skips such records)")
        summ.dropped["bad_record"] = summ.dropped.get("bad_record", 0) + 1
        if len(summ.bad_records) < SHOWN_BAD:  # kept in the summary (and its cache), printed by notes()
            summ.bad_records.append(f"{where}: {msg}")

    def chunks():
        nonlocal fmt, checked
        chunk = []
        for rec in iter_records(files, cfg.limit):
            summ.read += 1
            if isinstance(rec.data, BadRecord):
                bad(rec.where, str(rec.data))
                continue
            if not checked and isinstance(rec.data, dict):
                template.check_fields(rec.data, rec.where)
                checked = True
            if fmt is None:
                fmt = detect_schema(rec.data)
                if fmt is None:
                    keys = sorted(rec.data) if isinstance(rec.data, dict) else type(rec.data).__name__
                    bad(rec.where, f"no known schema fits keys {keys}; formats: {', '.join(FORMATS)}")
                    continue
            try:
                if cfg.plain_text:
                    prompt, response = (template.render(rec.data) if template is not None
                                        else text_parts(rec.data, cfg.response_marker))
                    item = _plain_segments(prompt, response, bos, tok.eos_token or "")
                else:
                    item = _prepare_messages(to_messages(rec.data, fmt, cfg.system_prompt), cfg)
                    prompt = next(m["content"] for m in reversed(item) if m["role"] == "user")
            except BadRecord as e:
                bad(rec.where, str(e))
                continue
            chunk.append((rec.where, item))
            if prompt and len(first_prompts) < 4 * N_PROMPTS:  # a few, for sample answers before/after training
                first_prompts[rec.where] = prompt
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
        text = TokenText(tok)
        collect(_encode_chunk(c, tok, cfg, text) for c in chunks())
    summ.detected_format = fmt or cfg.format
    summ.kept = len(samples)
    if samples:
        lengths = np.array([len(x.ids) for x in samples])
        summ.length_p50, summ.length_p90, summ.length_p99 = (int(round(x)) for x in np.percentile(lengths, [50, 90, 99]))
        summ.length_max, summ.total_tokens = int(lengths.max()), int(lengths.sum())
    return SFTData(samples, summ, np.asarray(thinks, dtype=np.int64), prompts)


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


def _from_cache(folder: Path) -> SFTData | None:
    c = load_cache(folder)
    if c is None:
        return None
    weights = c.weights if c.weights is not None else [None] * len(c.ids)
    samples = [Sample(i, lab, w) for i, lab, w in zip(c.ids, c.labels, weights)]
    summ = DataSummary(**c.summary)
    summ.cached = True
    return SFTData(samples, summ, c.think_counts, c.prompts)
