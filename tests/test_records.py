"""records.py: file readers (JSONL, JSON array, gzip, folders), schemas -> messages, file:line errors, file choice."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from minidistill.records import (BadRecord, choose_files, data_fingerprint, detect_schema, iter_records,
                                 resolve_files, think_content, to_messages)

Q, R, A = "What is 2 + 2?", "2 + 2 = 4.", "The answer is 4."
THINK = f"<think>\n{R}\n</think>\n{A}"
USER = {"role": "user", "content": Q}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- schemas

SCHEMAS = [  # (record, detected schema, messages it becomes)
    ({"messages": [USER, {"role": "assistant", "content": A}]}, "messages",
     [USER, {"role": "assistant", "content": A}]),
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": Q}, {"from": "gpt", "value": A}]},
     "sharegpt", [{"role": "system", "content": "S"}, USER, {"role": "assistant", "content": A}]),
    # dolphin-r1: the prompt side of `messages` only (a trailing assistant turn is replaced), reasoning wrapped
    ({"messages": [USER, {"role": "assistant", "content": "old"}], "reasoning": f"  {R} ", "answer": f" {A}\n"},
     "dolphin-r1", [USER, {"role": "assistant", "content": THINK}]),
    ({"Question": Q, "Complex_CoT": R, "Response": A}, "medical-o1", [USER, {"role": "assistant", "content": THINK}]),
    ({"instruction": Q, "response": f"\n{THINK}  ", "conversations": []}, "magpie",
     [USER, {"role": "assistant", "content": THINK}]),
    ({"instruction": Q, "input": " 2 and 2 ", "output": A}, "alpaca",
     [{"role": "user", "content": f"{Q}\n\n2 and 2"}, {"role": "assistant", "content": A}]),
]


@pytest.mark.parametrize("rec,schema,want", SCHEMAS, ids=[s for _, s, _ in SCHEMAS])
def test_each_schema_detected_and_converted(rec, schema, want):
    assert detect_schema(rec) == schema
    assert to_messages(rec, schema) == want
    sys_msgs = to_messages(rec, schema, system_prompt="Be brief.")
    if want[0]["role"] == "system":  # a record's own system message wins
        assert sys_msgs == want
    else:
        assert sys_msgs == [{"role": "system", "content": "Be brief."}] + want


def test_detect_schema_unknown_and_order():
    assert detect_schema({"foo": 1}) is None and detect_schema([1, 2]) is None and detect_schema("x") is None
    # Magpie rows also carry `conversations`; alpaca has no `response`
    assert detect_schema({"instruction": "a", "response": "b", "conversations": []}) == "magpie"
    assert detect_schema({"instruction": "a", "output": "b", "messages": []}) == "alpaca"


def test_think_content_keeps_existing_blocks():
    assert think_content(None, f" {A} ") == A
    assert think_content("  ", A) == A
    assert think_content(R, A) == THINK
    assert think_content(f"<think>\n{R}\n</think>", A) == THINK  # already wrapped
    assert think_content(f"{R}\n</think>", A) == THINK  # trace that starts inside the block


@pytest.mark.parametrize("rec,fmt,msg", [
    ({"messages": [USER]}, "messages", "no assistant turn"),
    ({"messages": []}, "messages", "field 'messages' is an empty list"),
    ({"messages": [USER, {"role": "wizard", "content": A}]}, "messages", "messages[1] has unknown role 'wizard'"),
    ({"messages": [USER, {"role": "assistant", "content": 3}]}, "messages", "messages[1].content must be a string"),
    ({"messages": [USER, {"role": "system", "content": "s"}, {"role": "assistant", "content": A}]}, "messages",
     "messages[1]: a system message is only allowed first"),
    ({"messages": [USER, {"role": "assistant", "content": " \n"}]}, "messages", "messages[1] (assistant) has empty"),
    ({"conversations": [{"from": "bot", "value": A}]}, "sharegpt", "conversations[0] has unknown from 'bot'"),
    ({"messages": [USER], "reasoning": R}, "dolphin-r1", "missing field 'answer'"),
    ({"messages": [USER], "reasoning": 5, "answer": A}, "dolphin-r1", "field 'reasoning' must be a string"),
    ({"Question": Q, "Response": "  "}, "medical-o1", "field 'Response' is empty"),
    ({"instruction": Q, "input": [1], "output": A}, "alpaca", "field 'input' must be a string"),
    ([1, 2], "messages", "expected a JSON object, got list"),
])
def test_bad_records_say_why(rec, fmt, msg):
    with pytest.raises(BadRecord) as e:
        to_messages(rec, fmt)
    assert msg in str(e.value)
    with pytest.raises(ValueError, match="unknown format 'chatty'"):
        to_messages({"messages": []}, "chatty")


# ---------------------------------------------------------------------------- readers

def test_jsonl_lines_counted_with_blanks_and_bad_json(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n   \n{oops\n{"a": 2}\n', encoding="utf-8")
    recs = list(iter_records([path]))
    assert [r.where for r in recs] == ["d.jsonl:1", "d.jsonl:4", "d.jsonl:5"]
    assert recs[0].data == {"a": 1} and recs[2].data == {"a": 2}
    assert isinstance(recs[1].data, BadRecord) and "invalid JSON" in str(recs[1].data)


def test_gzip_and_limit_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"i": 0}, {"i": 1}])
    b = tmp_path / "b.jsonl.gz"
    with gzip.open(b, "wt", encoding="utf-8") as f:
        f.write('{"i": 2}\n{"i": 3}\n')
    assert [r.data["i"] for r in iter_records([a, b])] == [0, 1, 2, 3]
    assert [r.where for r in iter_records([a, b], limit=3)] == ["a.jsonl:1", "a.jsonl:2", "b.jsonl.gz:1"]


def test_json_array_elements_know_their_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('\n[\n  {"i": 0},\n\n  {"i": 1,\n   "j": [1,\n 2]},  {"i": 2}\n]\n', encoding="utf-8")
    recs = list(iter_records([path]))
    assert [(r.where, r.data["i"]) for r in recs] == [("d.json:element 1 (line 3)", 0), ("d.json:element 2 (line 5)", 1),
                                                      ("d.json:element 3 (line 7)", 2)]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"i": 0},\n {"i": oops},\n {"i": 2}]', encoding="utf-8")
    recs = list(iter_records([bad]))
    assert [r.where for r in recs] == ["bad.json:element 1 (line 1)", "bad.json:element 2 (line 2)"]
    assert recs[0].data == {"i": 0}
    minified = tmp_path / "min.json"  # all on one line: the element number still tells records apart
    minified.write_text(json.dumps([{"i": 0}, {"i": 1}]), encoding="utf-8")
    assert [r.where for r in iter_records([minified])] == ["min.json:element 1 (line 1)", "min.json:element 2 (line 1)"]
    assert isinstance(recs[1].data, BadRecord) and "the rest of the file is skipped" in str(recs[1].data)
    lines = tmp_path / "lines.json"  # a .json file holding JSON lines is read as JSONL
    write_jsonl(lines, [{"i": 5}, {"i": 6}])
    assert [r.data["i"] for r in iter_records([lines])] == [5, 6]


def test_folder_reading(tmp_path):
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "train-1.jsonl", [{"i": 0}])
    write_jsonl(folder / "data" / "test.jsonl", [{"i": 1}])
    write_jsonl(folder / "data" / "train-0.jsonl", [{"i": 2}])
    (folder / "notes.txt").write_text("not data")
    assert resolve_files(str(folder)) == [folder / "data" / "train-0.jsonl", folder / "data" / "train-1.jsonl"]
    assert resolve_files(str(folder), split="test") == [folder / "data" / "test.jsonl"]
    assert [r.data["i"] for r in iter_records(resolve_files(str(folder)))] == [2, 0]
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: small\n  data_files: data/test.jsonl\n---\n")
    assert resolve_files(str(folder)) == [folder / "data" / "test.jsonl"]  # the card decides
    single = write_jsonl(tmp_path / "one.jsonl", [{"i": 0}])
    assert resolve_files(str(single)) == [single]


def test_resolve_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file or folder nor a hub dataset id"):
        resolve_files(str(tmp_path / "missing" / "x.jsonl"))
    with pytest.raises(ValueError, match="dataset config given twice"):
        resolve_files("org/name:a", config="b")  # refused before any network access
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no data files"):
        resolve_files(str(empty))


def test_fingerprint_follows_content(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"i": 0}])
    (name, size, _), = data_fingerprint([path])
    assert name == str(path.resolve()) and size == path.stat().st_size
    write_jsonl(path, [{"i": 0}, {"i": 1}])
    assert data_fingerprint([path])[0][1] == path.stat().st_size != size


# ---------------------------------------------------------------------------- hub file choice

DOLPHIN_README = """---
license: apache-2.0
configs:
- config_name: nonreasoning
  data_files:
  - split: train
    path: dolphin-r1-nonreasoning.jsonl
- config_name: reasoning-deepseek
  data_files:
  - split: train
    path: dolphin-r1-reasoning-deepseek.jsonl
- config_name: reasoning-flash
  data_files:
  - split: train
    path: dolphin-r1-reasoning-flash.jsonl
---
# Dolphin R1
"""
MEDICAL_README = """---
configs:
- config_name: en
  data_files: medical_o1_sft.json
- config_name: zh
  data_files: medical_o1_sft_Chinese.json
---
"""


def test_hub_file_choice():
    dolphin = [".gitattributes", "README.md", "dolphin-r1-nonreasoning.jsonl", "dolphin-r1-reasoning-deepseek.jsonl",
               "dolphin-r1-reasoning-flash.jsonl"]
    assert choose_files(dolphin, DOLPHIN_README, "reasoning-deepseek", "train") == ["dolphin-r1-reasoning-deepseek.jsonl"]
    with pytest.raises(ValueError, match="nonreasoning"):  # no default: the configs are listed
        choose_files(dolphin, DOLPHIN_README, None, "train")
    with pytest.raises(ValueError, match="no config 'reasoning'"):
        choose_files(dolphin, DOLPHIN_README, "reasoning", "train")
    # Without the README, the config name found in the file name decides.
    assert choose_files(dolphin, None, "reasoning-flash", "train") == ["dolphin-r1-reasoning-flash.jsonl"]
    medical = ["README.md", "medical_o1_sft.json", "medical_o1_sft_Chinese.json", "medical_o1_sft_mix.json"]
    assert choose_files(medical, MEDICAL_README, "en", "train") == ["medical_o1_sft.json"]
    magpie = ["README.md", ".gitattributes"] + [f"data/train-0000{i}-of-00009.parquet" for i in range(9)]
    assert choose_files(magpie, "# Magpie\nno yaml", None, "train") == magpie[2:]
    split = ["data/train.jsonl", "data/test.jsonl", "data/validation.jsonl"]
    assert choose_files(split, None, None, "test") == ["data/test.jsonl"]
    assert choose_files(split, None, None, "validation") == ["data/validation.jsonl"]
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        choose_files(["all.jsonl"], None, None, "test")


def test_choose_files_more_rules():
    # split aliases: "valid"/"dev" files are the validation split
    assert choose_files(["train.jsonl", "dev.jsonl"], None, None, "validation") == ["dev.jsonl"]
    # a card with one config is its default; a card split that does not exist is named
    card = "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: t.jsonl\n---\n"
    assert choose_files(["t.jsonl", "u.jsonl"], card, None, "train") == ["t.jsonl"]
    with pytest.raises(FileNotFoundError, match=r"split 'test' not found; splits: \['train'\]"):
        choose_files(["t.jsonl"], card, None, "test")
    with pytest.raises(FileNotFoundError, match="holds no data files"):
        choose_files(["README.md", "model.bin"], None, None, "train")
    with pytest.raises(FileNotFoundError, match="no data file names config 'fr'"):
        choose_files(["data_en.jsonl"], None, "fr", "train")
