"""`evaluate` (scoring rows, truncation and skipped counts) and the `python -m minidistill.eval` command."""

import runpy
import json

import pytest
import torch

import minidistill as md
from minidistill import sampling
from minidistill import evaluation
from minidistill.answers import PromptRecord, score_answer
from minidistill.demo import DEMO_DATA, build_demo_model
from minidistill.sampling import Completion


def cli_main(name: str):
    """The main() of `python -m minidistill.<name>`, loaded without binding the module as the package
    attribute (importing minidistill.generate would hide the function md.generate)."""
    return runpy.run_module(f"minidistill.{name}")["main"]



@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = build_demo_model(tmp_path_factory.mktemp("demo"))
    return md.load_model(folder, dtype=torch.float32).eval(), md.load_tokenizer(str(folder)), folder


def test_evaluate_scores_counts_truncated_and_skips(demo, monkeypatch):
    model, tok, _ = demo
    prompts = [PromptRecord(0, [{"role": "user", "content": "2+3?"}], {"answer": "5"}, "dolphin-r1"),
               PromptRecord("b", [{"role": "user", "content": "9-4?"}], {"answer": "5"}, "dolphin-r1"),
               PromptRecord(2, [{"role": "user", "content": "no ref"}], {"x": 1}, "dolphin-r1"),
               PromptRecord(3, [{"role": "user", "content": "1+1?"}], {"answer": "2"}, "dolphin-r1")]
    replies = {"2+3?": ("<think>\n2 + 3 = 5\n</think>\nThe answer is 5.", "stop"),
               "9-4?": ("<think>9 - 4 is", "length"),  # cut by max_new_tokens
               "1+1?": ("The answer is 3.", "stop")}
    seen = {}

    def fake(model, tok, chats, **kw):
        seen.update(kw)
        for i in reversed(range(len(chats))):  # completions arrive in any order
            text, reason = replies[chats[i][-1]["content"]]
            yield Completion(i, tok.encode(text), reason, text)

    monkeypatch.setattr(evaluation, "iter_replies", fake)
    summary, rows = evaluation.evaluate(model, tok, prompts, max_new_tokens=7, batch_size=3, stop_strings=["##"])
    assert (seen["max_new_tokens"], seen["batch_size"], seen["stop_strings"]) == (7, 3, ["##"])
    assert [r["id"] for r in rows] == [0, "b", 3]
    assert [(r["correct"], r["well_formed"], r["truncated"]) for r in rows] == [
        (True, True, False), (False, False, True), (False, False, False)]
    assert rows[0]["think_tokens"] == len(tok.encode("2 + 3 = 5")) and rows[2]["think_tokens"] is None
    assert summary == {"n": 3, "accuracy": 1 / 3, "well_formed": 1 / 3, "mean_think_tokens":
                       (len(tok.encode("2 + 3 = 5")) + len(tok.encode("9 - 4 is"))) / 2, "truncated": 1, "skipped": 1}


def test_eval_cli_on_demo_data(tmp_path, capsys):
    folder = build_demo_model(tmp_path / "demo")
    out = tmp_path / "rows.jsonl"
    summary = cli_main("eval")(["--model", str(folder), "--data", str(DEMO_DATA), "--limit", "6", "--max-new-tokens",
                             "8", "--batch-size", "4", "--output", str(out), "--device", "cpu"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["n"] == len(rows) == 6 and summary["skipped"] == 0
    assert rows[0]["reference"] == "Gus has 1 card. The answer is 1."
    assert summary["accuracy"] == sum(r["correct"] for r in rows) / 6
    assert all(r["correct"] == score_answer(r["prediction"], r["reference"]) for r in rows)
    assert summary["truncated"] == sum(r["truncated"] for r in rows)
    # The replies are those of greedy generation prompt by prompt.
    model, tok = md.load_model(folder, dtype=torch.float32).eval(), md.load_tokenizer(str(folder))
    want = [sampling.generate(model, tok, [{"role": "user", "content": r["prompt"]}], max_new_tokens=8) for r in rows]
    assert [r["output"] for r in rows] == want
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == summary and "reached --max-new-tokens" in printed[-2]
