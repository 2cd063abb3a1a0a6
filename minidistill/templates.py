"""Plain-text records: prompt templates and the `text` format, records turned into text without a chat format.

A prompt template file holds the prompt part, a line `---response---`, then the response part;
`{Field}` names a record key, `{{` and `}}` are literal braces. Training (`samples.prepare_data`)
renders both parts and trains the response part (plus EOS); generation and evaluation
(`answers.read_prompts`) render the prompt part only and continue it as plain text, with no
chat template around it. Every error names the template file and line (and the record's
file:line), so a typo in a field name is one line to fix.

The `text` format reads records with one `text` field, trained whole or only after a
response marker (`text_parts`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .records import BadRecord, _field

TEXT_FORMAT = "text"  # {"text": ...}: no chat format, trained whole or after a response marker
RESPONSE_LINE = "---response---"  # separates a prompt template's prompt part from its response part

_PLACE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
Parts = tuple[tuple[str, str | None, int], ...]  # (literal text, field or None, template line of the field)


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template file: the prompt part, a line `---response---`, the response part.
    `{Field}` names a record key, `{{` and `}}` are literal braces; the file's final newline
    is not part of the response."""
    name: str  # the file name, for messages
    prompt: Parts
    response: Parts

    @property
    def response_fields(self) -> list[str]:
        """The record fields the response part names, in order."""
        return [f for _, f, _ in self.response if f is not None]

    @property
    def answer_field(self) -> str | None:
        """The reference answer of a templated eval record: the last field the response part names
        (`{Response}` in `<think>{Complex_CoT}</think>{Response}`), None when it names none."""
        names = self.response_fields
        return names[-1] if names else None

    def check_fields(self, obj: dict, where: str, *, prompt_only: bool = False) -> None:
        """ValueError naming the first field the template uses that the first record lacks
        (only the prompt part's fields when `prompt_only`: generation renders nothing else)."""
        for _, f, line in self.prompt + (() if prompt_only else self.response):
            if f is not None and f not in obj:
                raise ValueError(f"{self.name}:{line}: unknown field {{{f}}}: the first record ({where}) "
                                 f"has keys {sorted(obj)}")

    def _fill(self, parts: Parts, obj: Any) -> str:
        if not isinstance(obj, dict):
            raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
        out = []
        for text, f, line in parts:
            v = "" if f is None else obj.get(f)
            if v is None:
                raise BadRecord(f"missing field {f!r} ({self.name}:{line} uses it; keys: {sorted(obj)})")
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise BadRecord(f"field {f!r} must be a string or a number, got {type(v).__name__}")
            out += [text, str(v)]
        return "".join(out)

    def render_prompt(self, obj: Any) -> str:
        """The prompt part filled from one record: what generation and evaluation continue."""
        return self._fill(self.prompt, obj)

    def render(self, obj: Any) -> tuple[str, str]:
        """(prompt, response) of one record; BadRecord when it lacks a field."""
        return self._fill(self.prompt, obj), self._fill(self.response, obj)


def load_template(path: str | Path) -> PromptTemplate:
    """Parse a prompt template file (see PromptTemplate); ValueError naming file:line on a bad one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt template {str(path)!r} not found; check the path")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    marks = [i for i, ln in enumerate(lines) if ln.rstrip("\r\n") == RESPONSE_LINE]
    if len(marks) != 1:
        raise ValueError(f"{path.name}: needs exactly one line {RESPONSE_LINE!r} between the prompt and the "
                         f"response part, found {len(marks)}" + (f" (lines {[i + 1 for i in marks]})" if marks else ""))
    m = marks[0]
    response = "".join(lines[m + 1:])
    response = response[:-1] if response.endswith("\n") else response
    if not response.strip():
        raise ValueError(f"{path.name}:{m + 2}: the response part after {RESPONSE_LINE!r} is empty: nothing to train on")
    return PromptTemplate(path.name, _parse("".join(lines[:m]), path.name, 1), _parse(response, path.name, m + 2))


def _parse(text: str, name: str, first_line: int) -> Parts:
    parts, lit, pos = [], "", 0
    for mt in _PLACE.finditer(text):
        tok, line = mt.group(), first_line + text.count("\n", 0, mt.start())
        lit, pos = lit + text[pos: mt.start()], mt.end()
        if tok in ("{{", "}}"):
            lit += tok[0]
        elif mt.group(1) is None or not mt.group(1).strip():
            what = f"lone {tok!r}" if len(tok) == 1 else "empty field {}"
            raise ValueError(f"{name}:{line}: {what}; write {{Field}} for a record key, {{{{ and }}}} for braces")
        else:
            parts.append((lit, mt.group(1), line))
            lit = ""
    return tuple(parts) + ((lit + text[pos:], None, 0),)


def text_parts(obj: Any, marker: str | None) -> tuple[str, str]:
    """(prompt, response) of a `text` record: all of it trained, or what follows the first `marker`."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    text = _field(obj, "text", str)
    i = -1 if marker is None else text.find(marker)
    if marker is not None and i < 0:
        raise BadRecord(f"response marker {marker!r} not found in field 'text'")
    return ("", text) if marker is None else (text[: i + len(marker)], text[i + len(marker):])
