"""templates.py: parsing, the fields a template names, and templated prompt files for generation and eval
(prompt part only, plain text, BOS as training adds it; one-line errors naming the field and file:line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minidistill.answers import (TEMPLATE_FORMAT, PromptRecord, prompt_ids, read_prompts, reference_answer,
                                 starts_in_think)
from minidistill.records import BadRecord
from minidistill.templates import load_template, text_parts
from minidistill.tokenizer import Tokenizer
from tok_fixtures import write_tokenizer

PROMPT = "Below is an instruction.\n\n### Question:\n{Question}\n\n### Response:\n"
RESPONSE = "<think>\n{Complex_CoT}\n</think>\n{Response}"
MEDICAL = PROMPT + "---response---\n" + RESPONSE + "\n"
REC = {"Question": "What is 2 + 2?", "Complex_CoT": "2 + 2 = 4.", "Response": "The answer is 4.", "id": "m1"}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_parts_fields_and_answer_field(tmp_path):
    t = load_template(write(tmp_path / "m.txt", MEDICAL))
    assert t.name == "m.txt" and t.response_fields == ["Complex_CoT", "Response"] and t.answer_field == "Response"
    assert t.render(REC) == (PROMPT.format(**REC), RESPONSE.format(**REC))  # str.format: an independent renderer
    assert t.render_prompt(REC) == PROMPT.format(**REC)
    assert [line for _, f, line in t.prompt if f] == [4]  # {Question} sits on line 4 of the file
    literal = load_template(write(tmp_path / "l.txt", "{Question}\n---response---\nconstant {{x}}\n"))
    assert literal.response_fields == [] and literal.answer_field is None and literal.render(REC)[1] == "constant {x}"
    with pytest.raises(BadRecord, match=r"missing field 'Question' \(m\.txt:4 uses it"):
        t.render_prompt({"Response": "r"})
    assert text_parts({"text": "Q: a A: b"}, "A:") == ("Q: a A:", " b")


def test_read_prompts_with_a_template(tmp_path):
    t = write(tmp_path / "m.txt", MEDICAL)
    rows = [REC, {"Question": "What is 3 + 3?", "Response": "6"}, {"Response": "no question"}, "{bad json", [1]]
    prompts, bad = read_prompts(write_jsonl(tmp_path / "p.jsonl", rows), template=t)
    # The prompt part only: no response field is needed, nothing of the response is rendered.
    assert [p.text for p in prompts] == [PROMPT.format(**REC), PROMPT.format(Question="What is 3 + 3?")]
    assert [(p.id, p.format, p.answer_field) for p in prompts] == [("m1", TEMPLATE_FORMAT, "Response"),
                                                                  (1, TEMPLATE_FORMAT, "Response")]
    assert prompts[0].messages == [{"role": "user", "content": PROMPT.format(**REC)}] and prompts[0].record == REC
    assert bad[0] == "p.jsonl:3: missing field 'Question' (m.txt:4 uses it; keys: ['Response'])"
    assert bad[1].startswith("p.jsonl:4: invalid JSON") and bad[2] == "p.jsonl:5: expected a JSON object, got list"
    # The reference answer: the template's last response field, or the one named.
    assert reference_answer(prompts[0].record, prompts[0].format, prompts[0].answer_field) == "The answer is 4."
    assert reference_answer(REC, TEMPLATE_FORMAT, "Complex_CoT") == "2 + 2 = 4."
    with pytest.raises(BadRecord, match="response part names no field .* --answer-field"):
        reference_answer(REC, TEMPLATE_FORMAT, None)


@pytest.mark.parametrize("kw, msg", [
    ({}, r"m\.txt:4: unknown field \{Question\}: the first record \(p\.jsonl:1\) has keys \['Q', 'Response'\]"),
    ({"fmt": "medical-o1"}, r"prompt template \(m\.txt\) and format 'medical-o1' both say"),
    ({"system": "be brief"}, r"system prompt applies to chat formats; the prompt template m\.txt writes"),
])
def test_template_prompt_errors(kw, msg, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"Q": "typo'd key", "Response": "r"}, REC])
    with pytest.raises(ValueError, match=msg):
        read_prompts(path, template=write(tmp_path / "m.txt", MEDICAL), **kw)


def test_template_needs_records_and_a_template_file(tmp_path):
    with pytest.raises(ValueError, match=r"p\.txt is not a data file"):
        read_prompts(write(tmp_path / "p.txt", "one prompt\n"), template=write(tmp_path / "m.txt", MEDICAL))
    with pytest.raises(FileNotFoundError, match="prompt template .*nope.txt' not found"):
        read_prompts(write_jsonl(tmp_path / "p.jsonl", [REC]), template=tmp_path / "nope.txt")


@pytest.mark.parametrize("family, bos_first", [("r1-distill-llama", True), ("phi-4-mini", False)])
def test_prompt_ids_plain_text_with_bos_as_training(family, bos_first, tmp_path):
    tok = Tokenizer.from_dir(write_tokenizer(family, tmp_path / "tok"))
    text = PROMPT.format(**REC)
    ids = prompt_ids(tok, PromptRecord(0, [{"role": "user", "content": text}], REC, TEMPLATE_FORMAT, text))
    assert tok.prepends_bos is bos_first
    assert ids == tok.encode(text, add_bos=bos_first) and (ids[0] == tok.bos_id) is bos_first
    assert tok.decode(ids[1:] if bos_first else ids) == text  # no chat template around it
    chat = PromptRecord(0, [{"role": "user", "content": "hi"}])
    assert prompt_ids(tok, chat) == tok.encode_chat(chat.messages, add_generation_prompt=True)[0]
    opens = PromptRecord(0, [], text="### Response:\n<think>\n")
    assert starts_in_think(tok, opens) and not starts_in_think(tok, PromptRecord(0, [], text=text))
