"""The `python -m minidistill.eval` command (the library's `evaluate` is tested in test_evaluation.py)."""

import runpy
import json

import torch

import minidistill as md
from minidistill import sampling
from minidistill.answers import score_answer
from minidistill.demo import DEMO_DATA, build_demo_model


def cli_main(name: str):
    """The main() of `python -m minidistill.<name>`, loaded without binding the module as the package
    attribute (importing minidistill.generate would hide the function md.generate)."""
    return runpy.run_module(f"minidistill.{name}")["main"]



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
