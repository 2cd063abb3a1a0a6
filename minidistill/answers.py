"""What a reply and a prompt file hold, shared by generation, trace writing and evaluation.

Think blocks (`think_stats`: reasoning, answer, well-formedness), answer scoring
(`score_answer`) and reference answers (`reference_answer`), prompt reading (`read_prompts`
-> `PromptRecord`s) for `python -m minidistill.generate --prompts` and `python -m
minidistill.eval`, and how a prompt is fed to the model (`prompt_ids`, `iter_prompt_replies`).

A prompt is a chat (its messages, rendered with the model's chat template plus the
generation prompt), or, with a prompt template (`--template`), plain text: the template's
prompt part filled from the record, tokenized as training tokenizes it (BOS first when the
tokenizer's post-processor adds one), no chat template around it. The reference answer of a
templated record is `--answer-field` when given, else the last field the template's
response part names (`{Response}` in `<think>{Complex_CoT}</think>{Response}`).

Scoring rule (`score_answer`): when the reference holds a number, the last number of the
prediction must equal the reference's last number (numeric compare, thousands commas
stripped, `\\boxed{...}` preferred when present); otherwise the normalised reference must be
contained in the normalised prediction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .records import (BadRecord, DATA_SUFFIXES, FORMATS, ROLES, SHAREGPT_ROLES, _chat, detect_schema,
                      iter_records, to_messages)
from .replies import iter_replies
from .sampling import Completion
from .templates import PromptTemplate, load_template

TEMPLATE_FORMAT = "template"  # PromptRecord.format of a record read through a prompt template

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


# ---------------------------------------------------------------------------- scoring

def _numbers(text: str) -> list[float]:
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text)]


def _normalise(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(text.split())


def score_answer(prediction: str, reference: str) -> bool:
    """True when `prediction` (the answer text, after any think block) matches `reference`.

    Reference with a number: the prediction's last number (inside its last \\boxed{} if any)
    equals the reference's last number, within 1e-9 relative. Otherwise: the normalised
    reference (lower case, punctuation as spaces, single spaces) occurs in the normalised
    prediction. An empty reference matches nothing."""
    ref_nums = _numbers(reference)
    if ref_nums:
        boxed = _BOXED.findall(prediction)
        pred_nums = _numbers(boxed[-1]) if boxed and _numbers(boxed[-1]) else _numbers(prediction)
        if not pred_nums:
            return False
        a, b = pred_nums[-1], ref_nums[-1]
        return abs(a - b) <= 1e-9 * max(1.0, abs(b))
    ref = _normalise(reference)
    return bool(ref) and f" {ref} " in f" {_normalise(prediction)} "


@dataclass
class ThinkStats:
    """What a reply holds: reasoning (None without a think block), answer (after `</think>`; ""
    when the reasoning never closed), and whether the think block is well formed."""

    reasoning: str | None
    answer: str
    well_formed: bool


def think_stats(text: str, started_in_think: bool = False) -> ThinkStats:
    """Split a reply into reasoning and answer and check its think block.

    Well formed: exactly one `<think>` at the start and one `</think>`, with non-empty
    reasoning and a non-empty answer after it. started_in_think: the prompt already ended
    with `<think>` (DeepSeek-R1 templates), so a lone `</think>` is the expected shape."""
    opens, closes = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    if closes:
        before, _, after = text.rpartition(THINK_CLOSE)
        head = before.lstrip()
        reasoning = (head[len(THINK_OPEN):] if head.startswith(THINK_OPEN) else head).strip()
        answer = after.strip()
    elif opens or started_in_think:  # reasoning never closed: cut off, no answer yet
        reasoning, answer = text.split(THINK_OPEN, 1)[-1].strip(), ""
    else:
        return ThinkStats(None, text.strip(), False)
    if started_in_think:
        shape = closes == 1 and (opens == 0 or (opens == 1 and text.lstrip().startswith(THINK_OPEN)))
    else:
        shape = opens == 1 and closes == 1 and text.lstrip().startswith(THINK_OPEN)
    return ThinkStats(reasoning, answer, shape and bool(reasoning) and bool(answer))


def prompt_starts_in_think(tok, messages: list[dict]) -> bool:
    """Whether the chat template opens the think block itself (R1: `<｜Assistant｜><think>\\n`)."""
    return tok.render_chat(messages, add_generation_prompt=True).rstrip().endswith(THINK_OPEN)


# ---------------------------------------------------------------------------- prompt files

@dataclass
class PromptRecord:
    """One prompt: its id (the record's `id` field, else its index in the file), the messages to
    answer, and the record it came from (None for plain-text prompt files) with its schema.

    text: the rendered prompt part of a prompt template, fed as plain text (`messages` then holds
    it as one user turn, for the eval rows and the trace records); answer_field: the record field
    holding its reference answer when none is named (the template's last response field)."""

    id: Any
    messages: list[dict]
    record: Any = None
    format: str | None = None
    text: str | None = None
    answer_field: str | None = None


def prompt_ids(tok, p: PromptRecord) -> list[int]:
    """The token ids fed to the model for one prompt: the chat with the generation prompt, or a
    template's plain text with BOS when the tokenizer prepends one (as training tokenizes it)."""
    if p.text is not None:
        return tok.encode(p.text, add_bos=tok.prepends_bos)
    return tok.encode_chat(p.messages, add_generation_prompt=True)[0]


def starts_in_think(tok, p: PromptRecord) -> bool:
    """Whether the prompt itself opens the think block (an R1 chat template, or a template
    whose prompt part ends with `<think>`)."""
    if p.text is not None:
        return p.text.rstrip().endswith(THINK_OPEN)
    return prompt_starts_in_think(tok, p.messages)


def iter_prompt_replies(model, tok, prompts: Sequence[PromptRecord], **kw) -> Iterator[Completion]:
    """`sampling.iter_replies` over `prompt_ids` of each prompt (chats and template text alike);
    keywords as its."""
    return iter_replies(model, tok, [prompt_ids(tok, p) for p in prompts], **kw)


def prompt_messages(obj: Any, fmt: str) -> list[dict]:
    """The prompt side of a record: its messages up to (without) the final assistant turn."""
    if isinstance(obj, dict) and fmt in ("messages", "sharegpt"):
        key, role, text, roles = (("messages", "role", "content", {r: r for r in ROLES}) if fmt == "messages"
                                  else ("conversations", "from", "value", SHAREGPT_ROLES))
        turns = obj.get(key)
        if not isinstance(turns, list) or not turns:
            raise BadRecord(f"missing or empty {key!r} (keys: {sorted(obj)})")
        msgs = _chat(turns, role, text, roles, key)
    else:
        msgs = to_messages(obj, fmt)
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs or msgs[-1]["role"] != "user":
        raise BadRecord("no user turn to answer")
    return msgs


def read_prompts(path: str | Path, fmt: str = "auto", system: str | None = None, limit: int | None = None,
                 template: str | Path | PromptTemplate | None = None) -> tuple[list[PromptRecord], list[str]]:
    """Prompts of a data file (JSONL/JSON/Parquet, any schema the data readers know, or records
    with a `prompt` string) or of a text file (one prompt per non-empty line); with `template`
    (a prompt template file), each record's rendered prompt part, as plain text.

    Returns the prompts and the problems of the records that were skipped ("file:line: why").
    A template field the first record lacks is a ValueError naming template file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if template is not None:
        return _templated_prompts(path, fmt, system, limit, template)
    out: list[PromptRecord] = []
    bad: list[str] = []
    if not path.name.endswith(DATA_SUFFIXES):
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for i, line in enumerate(lines[:limit] if limit else lines):
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": line}]
            out.append(PromptRecord(i, msgs))
        return out, bad
    chosen = None if fmt == "auto" else fmt
    for i, rec in enumerate(iter_records([path], limit)):
        obj = rec.data
        try:
            if isinstance(obj, BadRecord):
                raise obj
            if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and detect_schema(obj) is None:
                msgs, f = [{"role": "user", "content": obj["prompt"]}], None
            else:
                f = chosen or detect_schema(obj)
                if f is None:
                    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise BadRecord(f"no known schema fits keys {keys}; formats: {', '.join(FORMATS)}, or `prompt`")
                msgs = prompt_messages(obj, f)
        except BadRecord as e:
            bad.append(f"{rec.where}: {e}")
            continue
        if system and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
        pid = obj.get("id", i) if isinstance(obj, dict) else i
        out.append(PromptRecord(pid, msgs, obj, f))
    return out, bad


def _templated_prompts(path: Path, fmt: str, system: str | None, limit: int | None,
                       template: str | Path | PromptTemplate) -> tuple[list[PromptRecord], list[str]]:
    t = template if isinstance(template, PromptTemplate) else load_template(template)
    if fmt != "auto":
        raise ValueError(f"a prompt template ({t.name}) and format {fmt!r} both say how a record becomes text; keep one")
    if system is not None:
        raise ValueError(f"a system prompt applies to chat formats; the prompt template {t.name} writes the whole "
                         "prompt (put the text into the template)")
    if not path.name.endswith(DATA_SUFFIXES):
        raise ValueError(f"a prompt template fills record fields: {path.name} is not a data file "
                         f"({', '.join(DATA_SUFFIXES)})")
    out: list[PromptRecord] = []
    bad: list[str] = []
    checked = False
    for i, rec in enumerate(iter_records([path], limit)):
        obj = rec.data
        try:
            if isinstance(obj, BadRecord):
                raise obj
            if not checked and isinstance(obj, dict):  # a typo in a field name stops at once
                t.check_fields(obj, rec.where, prompt_only=True)
                checked = True
            text = t.render_prompt(obj)
        except BadRecord as e:
            bad.append(f"{rec.where}: {e}")
            continue
        pid = obj.get("id", i)
        out.append(PromptRecord(pid, [{"role": "user", "content": text}], obj, TEMPLATE_FORMAT, text,
                                t.answer_field))
    return out, bad


def reference_answer(obj: Any, fmt: str | None, field: str | None = None) -> str:
    """The reference answer of a record: `field` when given; else by schema — dolphin-r1 `answer`,
    medical-o1 `Response`, alpaca `output`, magpie `response`, messages / sharegpt the last
    assistant turn — with any think block removed."""
    if not isinstance(obj, dict):
        raise BadRecord(f"a reference answer needs a JSON record, got {type(obj).__name__}")
    key = field or {"dolphin-r1": "answer", "medical-o1": "Response", "alpaca": "output",
                    "magpie": "response"}.get(fmt or "")
    if key is not None:
        if obj.get(key) is None:
            raise BadRecord(f"no reference answer field {key!r} (keys: {sorted(obj)}); choose one with --answer-field")
        value = obj[key]
        if not isinstance(value, (str, int, float)):
            raise BadRecord(f"reference field {key!r} must be a string or number, got {type(value).__name__}")
        text = str(value)
    elif fmt in ("messages", "sharegpt"):
        text = to_messages(obj, fmt)[-1]["content"]  # ends with the last assistant turn
    elif fmt == TEMPLATE_FORMAT:
        raise BadRecord("the prompt template's response part names no field to take the reference answer from; "
                        "name it with --answer-field")
    else:
        raise BadRecord(f"no reference answer for format {fmt!r}; name the field with --answer-field")
    return think_stats(text).answer if THINK_CLOSE in text else text.strip()
