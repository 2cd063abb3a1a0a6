"""The `python -m minidistill.eval` command (the library's `evaluate` is tested in test_evaluation.py)."""

import runpy
import json

import pytest
import torch

import minidistill as md
from minidistill import evaluation, replies
from minidistill.answers import score_answer
from minidistill.demo import DEMO_DATA, build_demo_model
from minidistill.sampling import Completion


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
    want = [replies.generate(model, tok, [{"role": "user", "content": r["prompt"]}], max_new_tokens=8) for r in rows]
    assert [r["output"] for r in rows] == want
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == summary and "reached --max-new-tokens" in printed[-2]


# ---------------------------------------------------------------------------- prompt templates

TEMPLATE = "Below is an instruction.\n\n### Question:\n{Question}\n\n### Response:\n---response---\n" \
           "<think>\n{Complex_CoT}\n</think>\n{Response}\n"
PROMPT = "Below is an instruction.\n\n### Question:\n{Question}\n\n### Response:\n"


def test_eval_with_a_template_feeds_plain_text_and_scores(tmp_path, capsys, monkeypatch):
    from minidistill import replies as replies_mod
    from minidistill.sampling import generate_ids
    from model_fixtures import write_family_model

    folder = write_family_model(tmp_path / "m", "llama3", "r1-distill-llama")
    recs = [{"Question": f"What is {k} + {k}?", "Complex_CoT": "add", "Response": f"The answer is {2 * k}."}
            for k in range(3)] + [{"Response": "no question"}]
    data = tmp_path / "med.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "t.txt").write_text(TEMPLATE)
    fed = []
    real = replies_mod.iter_generate
    monkeypatch.setattr(replies_mod, "iter_generate", lambda model, ids, **kw: fed.extend(ids) or real(model, ids, **kw))
    summary = cli_main("eval")(["--model", str(folder), "--data", str(data), "--template", str(tmp_path / "t.txt"),
                                "--max-new-tokens", "5", "--batch-size", "2", "--output", str(tmp_path / "rows.jsonl"),
                                "--device", "cpu"])
    tok, model = md.load_tokenizer(str(folder)), md.load_model(folder, dtype=torch.float32).eval()
    texts = [PROMPT.format(**r) for r in recs[:3]]
    assert tok.prepends_bos and fed == [tok.encode(t, add_bos=True) for t in texts]  # no chat template, BOS first
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows] == [r["Response"] for r in recs[:3]]  # the last response field
    assert [r["prompt"] for r in rows] == texts
    assert [r["output"] for r in rows] == [tok.decode(generate_ids(model, tok.encode(t, add_bos=True), max_new_tokens=5,
                                                                   stop_ids=tok.stop_ids)) for t in texts]
    assert all(r["correct"] == score_answer(r["prediction"], r["reference"]) for r in rows)
    assert summary["n"] == 3 and summary["skipped"] == 1
    assert "skipping med.jsonl:4: missing field 'Question' (t.txt:4 uses it" in capsys.readouterr().err
    # A reply holding the reference scores: the answers of a model that knows them.
    monkeypatch.setattr(evaluation, "iter_prompt_replies", lambda model, tok, asked, **kw: iter(
        [Completion(i, [], "stop", f"<think>\nok\n</think>\n{p.record['Response']}") for i, p in enumerate(asked)]))
    summary = cli_main("eval")(["--model", str(folder), "--data", str(data), "--template", str(tmp_path / "t.txt"),
                                "--device", "cpu"])
    assert (summary["accuracy"], summary["well_formed"], summary["n"]) == (1.0, 1.0, 3)


def test_eval_template_errors_before_the_model_loads(tmp_path, capsys):
    import subprocess
    import sys

    (tmp_path / "t.txt").write_text(TEMPLATE)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "lower case", "Response": "1"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "minidistill.eval", "--model", str(tmp_path / "no-model"), "--data",
                        str(data), "--template", str(tmp_path / "t.txt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: t.txt:4: unknown field {Question}: the first record (d.jsonl:1) has keys ['Response', 'question']"]
    data.write_text(json.dumps({"Question": "q", "Answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"reference answer field 'Response' \(the last field of .*t\.txt's response "
                                         r"part\) is not in the first record \(id 0, keys \['Answer', 'Question'\]\)"):
        cli_main("eval")(["--model", str(tmp_path / "no-model"), "--data", str(data), "--template", str(tmp_path / "t.txt")])
