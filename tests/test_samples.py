"""samples.py with plain text: prompt templates and `--format text` (masks, EOS/BOS, think rules, errors, cache)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from minidistill import data as D
from minidistill import samples as S
from minidistill.samples import DataConfig, prepare_data
from minidistill.tokenizer import Tokenizer
from tok_fixtures import write_tokenizer

IGN = -100
PROMPT = """Below is an instruction that describes a task.
Before answering, think carefully about the question.

### Question:
{Question}

### Response:
"""
RESPONSE = "<think>\n{Complex_CoT}\n</think>\n{Response}"
MEDICAL = PROMPT + "---response---\n" + RESPONSE + "\n"  # the file's final newline is not part of the response
REC = {"Question": "What is 2 + 2?", "Complex_CoT": "Let me think step by step. 2 + 2 = 4.",
       "Response": "The answer is 4.", "id": 7}


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {f: Tokenizer.from_dir(write_tokenizer(f, root / f)) for f in ("r1-distill-llama", "phi-4-mini")}


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, rows: list) -> str:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def prep(path, tok, tmp_path, log=lambda *a: None, **kw):
    return prepare_data(str(path), tok, DataConfig(cache_dir=str(tmp_path / "cache"), **kw), log=log)


def trained_text(tok, s, weight: float | None = None) -> str:
    lab = np.asarray(s.labels)
    keep = lab != IGN
    if weight is not None:
        keep &= np.isclose(np.asarray(s.weights), weight)
    return tok.decode(lab[keep].tolist())


@pytest.mark.parametrize("family", ["r1-distill-llama", "phi-4-mini"])
def test_template_trains_response_and_eos_only(family, toks, tmp_path):
    tok = toks[family]
    template = write(tmp_path / "medical.txt", MEDICAL)
    data = prep(write_jsonl(tmp_path / "d.jsonl", [REC, {**REC, "Question": "What is 3 + 3?"}]), tok, tmp_path,
                template=template, think_weight=0.5)
    assert data.summary.detected_format == "template" and data.summary.kept == 2
    # Independent rendering: Python's own str.format of the two parts.
    prompt, response = PROMPT.format(**REC), RESPONSE.format(**REC)
    bos = tok.bos_token if family == "r1-distill-llama" else ""  # its post-processor prepends BOS
    s = data.samples[0]
    assert np.asarray(s.ids).tolist() == tok.encode(bos + prompt + response + tok.eos_token)
    assert (np.asarray(s.ids)[:2] == tok.bos_id).sum() == (1 if bos else 0)
    assert trained_text(tok, s) == response + tok.eos_token  # nothing of the prompt
    assert trained_text(tok, s, 0.5) == f"<think>\n{REC['Complex_CoT']}\n</think>"  # think rules in the response
    assert trained_text(tok, s, 1.0) == f"\n{REC['Response']}{tok.eos_token}"
    assert data.prompts(2) == [prompt, PROMPT.format(**{**REC, "Question": "What is 3 + 3?"})]


def test_braces_numbers_and_eos_written_by_the_template(toks, tmp_path):
    tok = toks["phi-4-mini"]
    template = write(tmp_path / "t.txt", "id {id}: {{literal}} {Question}\n---response---\n{Response}"
                     + tok.eos_token + "\n")
    s = prep(write_jsonl(tmp_path / "d.jsonl", [REC]), tok, tmp_path, template=template).samples[0]
    assert tok.decode(np.asarray(s.ids).tolist()) == f"id 7: {{literal}} {REC['Question']}\n{REC['Response']}<|endoftext|>"
    assert trained_text(tok, s) == REC["Response"] + tok.eos_token  # one EOS: the template wrote it


@pytest.mark.parametrize("text,msg", [
    (PROMPT + RESPONSE, r"t\.txt: needs exactly one line '---response---' .* found 0"),
    (PROMPT + "---response---\nA\n---response---\nB", r"found 2 \(lines \[8, 10\]\)"),
    ("Q: {Question}\n---response---\n  \n", r"t\.txt:3: the response part after '---response---' is empty"),
    ("Q: {Question}\nsee {this\n---response---\n{Response}", r"t\.txt:2: lone '\{'; write \{Field\}"),
    ("Q: {Question}\n---response---\n{Response} }", r"t\.txt:3: lone '\}'"),
    ("Q: {}\n---response---\n{Response}", r"t\.txt:1: empty field \{\}"),
    ("Q: {Question}\n\n---response---\n<think>{Complex_CoT}</think>\n{Answer}",
     r"t\.txt:5: unknown field \{Answer\}: the first record \(d\.jsonl:1\) has keys \['Complex_CoT', 'Question'"),
])
def test_template_errors_name_file_and_line(text, msg, toks, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [REC])
    with pytest.raises(ValueError, match=msg):
        prep(path, toks["phi-4-mini"], tmp_path, template=write(tmp_path / "t.txt", text))


def test_record_lacking_a_field(toks, tmp_path):
    tok, template = toks["phi-4-mini"], write(tmp_path / "t.txt", MEDICAL)
    rows = [REC, {k: v for k, v in REC.items() if k != "Complex_CoT"}, {**REC, "Response": ["a"]}, REC]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    logs = []
    data = prep(path, tok, tmp_path, log=logs.append, template=template)
    assert data.summary.kept == 2 and data.summary.dropped == {"bad_record": 2}
    text = "\n".join(logs)
    assert re.search(r"data\.jsonl:2: missing field 'Complex_CoT' \(t\.txt:10 uses it", text), text
    assert "data.jsonl:3: field 'Response' must be a string or a number, got list" in text
    with pytest.raises(ValueError, match=r"data\.jsonl:2: missing field 'Complex_CoT' \(t\.txt:10 uses it"):
        prep(path, tok, tmp_path, template=template, on_bad_record="error")
    with pytest.raises(FileNotFoundError, match="prompt template .*nope.txt' not found"):
        prep(path, tok, tmp_path, template=str(tmp_path / "nope.txt"))


def test_format_text_whole_and_after_marker(toks, tmp_path):
    tok = toks["r1-distill-llama"]
    eos, bos = tok.eos_token, tok.bos_token
    texts = [f"### Question: {REC['Question']}\n### Response: <think>\nr\n</think>\n4",
             f"### Question: hi\n### Response: hello{eos}"]  # EOS already written: not doubled
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts] + [{"text": "no marker here"}])
    whole = prep(path, tok, tmp_path, format="text")
    assert whole.summary.detected_format == "text" and whole.summary.kept == 3
    first = whole.samples[0]
    assert np.asarray(first.ids).tolist() == tok.encode(bos + texts[0] + eos)
    assert trained_text(tok, first) == texts[0] + eos  # all of it but the BOS at position 0
    assert (np.asarray(first.labels)[:-1] != IGN).all() and whole.prompts() == []
    assert trained_text(tok, whole.samples[1]).endswith("hello" + eos) and trained_text(tok, whole.samples[1]).count(eos) == 1
    logs = []
    after = prep(path, tok, tmp_path, log=logs.append, format="text", response_marker="### Response:")
    assert after.summary.kept == 2 and after.summary.dropped == {"bad_record": 1}
    assert trained_text(tok, after.samples[0]) == " <think>\nr\n</think>\n4" + eos
    assert trained_text(tok, after.samples[1]) == " hello" + eos
    assert after.prompts(1) == [f"### Question: {REC['Question']}\n### Response:"]
    assert any("d.jsonl:3: response marker '### Response:' not found in field 'text'" in m for m in logs)
    w = prep(path, tok, tmp_path, format="text", response_marker="### Response:", think_weight=0.0).samples[0]
    assert trained_text(tok, w, 0.0) == "<think>\nr\n</think>"  # think rules apply after the marker


def test_truncation_inside_the_response(toks, tmp_path):
    tok = toks["r1-distill-llama"]
    template = write(tmp_path / "t.txt", MEDICAL)
    path = write_jsonl(tmp_path / "d.jsonl", [{**REC, "Complex_CoT": " ".join([REC["Complex_CoT"]] * 5)}])
    full = prep(path, tok, tmp_path, template=template).samples[0]
    close = int(np.flatnonzero(np.asarray(full.ids) == tok.token_to_id("</think>"))[0])
    with pytest.raises(ValueError, match="truncated_think 1"):
        prep(path, tok, tmp_path, template=template, max_seq_len=close)
    with pytest.raises(ValueError, match="truncated_answer 1"):
        prep(path, tok, tmp_path, template=template, max_seq_len=close + 1)
    assert prep(path, tok, tmp_path, template=template, max_seq_len=len(full.ids)).summary.kept == 1


def test_config_rules():
    with pytest.raises(ValueError, match="template='t.txt' and format='medical-o1' both say"):
        DataConfig(template="t.txt", format="medical-o1")
    with pytest.raises(ValueError, match="response_marker='###' applies to format='text' only, not 'auto'"):
        DataConfig(response_marker="###")
    with pytest.raises(ValueError, match="system_prompt applies to chat formats"):
        DataConfig(format="text", system_prompt="Be kind.")
    assert DataConfig(format="text").plain_text and DataConfig(template="t").plain_text
    assert not DataConfig().plain_text


def test_cache_follows_template_text_not_path(toks, tmp_path):
    tok = toks["phi-4-mini"]
    path = write_jsonl(tmp_path / "d.jsonl", [REC])
    a = write(tmp_path / "a.txt", MEDICAL)
    assert not prep(path, tok, tmp_path, template=a).summary.cached
    assert prep(path, tok, tmp_path, template=write(tmp_path / "b.txt", MEDICAL)).summary.cached  # same text
    write(tmp_path / "a.txt", MEDICAL.replace("### Question:", "### Q:"))
    changed = prep(path, tok, tmp_path, template=a)
    assert not changed.summary.cached and "### Q:" in tok.decode(np.asarray(changed.samples[0].ids).tolist())


def test_workers_match_in_process(toks, tmp_path, monkeypatch):
    tok = toks["r1-distill-llama"]
    template = write(tmp_path / "t.txt", MEDICAL)
    path = write_jsonl(tmp_path / "d.jsonl", [{**REC, "Question": f"What is {k} + {k}?"} for k in range(12)] + ["oops"])
    one = prepare_data(path, tok, DataConfig(template=template, num_workers=1, cache_dir=str(tmp_path / "c1")),
                       log=lambda *a: None)
    monkeypatch.setattr(S, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(S, "CHUNK", 5)
    many = prepare_data(path, tok, DataConfig(template=template, num_workers=2, cache_dir=str(tmp_path / "c2")),
                        log=lambda *a: None)
    assert many.summary.to_dict() == one.summary.to_dict() and one.summary.kept == 12
    assert all(np.array_equal(x.ids, y.ids) and np.array_equal(x.labels, y.labels)
               for x, y in zip(one.samples, many.samples))


def test_inspector_shows_template_spans(tmp_path, capsys):
    folder = write_tokenizer("r1-distill-llama", tmp_path / "tok")
    path = write_jsonl(tmp_path / "d.jsonl", [REC] * 2)
    D.main(["--model", str(folder), "--data", path, "--show", "1", "--cache-dir", str(tmp_path / "c"),
            "--template", write(tmp_path / "t.txt", MEDICAL), "--think-weight", "0.5"])
    out = capsys.readouterr().out
    prompt = PROMPT.format(**REC)
    assert f"{prompt}[[<think>\n{REC['Complex_CoT']}\n</think>]][[\n{REC['Response']}<｜end▁of▁sentence｜>]]" in out
    assert "format template" in out and "kept 2" in out
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "Q: hi\nA: <think>\nr\n</think>\nhello"}])
    D.main(["--model", str(folder), "--data", text, "--show", "1", "--cache-dir", str(tmp_path / "c"),
            "--format", "text", "--response-marker", "A:"])
    out = capsys.readouterr().out
    assert "<｜begin▁of▁sentence｜>Q: hi\nA:[[ ]][[<think>\nr\n</think>]][[\nhello<｜end▁of▁sentence｜>]]" in out
    assert "format text" in out
