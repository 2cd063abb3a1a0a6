"""`evaluate`: scoring rows, truncation and skipped counts, the summary's shares, the progress
display. The `python -m minidistill.eval` command is tested in test_eval.py."""

import pytest
import torch

import minidistill as md
from minidistill import evaluation
from minidistill.answers import PromptRecord
from minidistill.demo import build_demo_model
from minidistill.sampling import Completion


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

    def fake(model, tok, asked, **kw):
        seen.update(kw)
        for i in reversed(range(len(asked))):  # completions arrive in any order
            text, reason = replies[asked[i].messages[-1]["content"]]
            yield Completion(i, tok.encode(text), reason, text)

    monkeypatch.setattr(evaluation, "iter_prompt_replies", fake)
    summary, rows = evaluation.evaluate(model, tok, prompts, max_new_tokens=7, batch_size=3, stop_strings=["##"])
    assert (seen["max_new_tokens"], seen["batch_size"], seen["stop_strings"]) == (7, 3, ["##"])
    assert [r["id"] for r in rows] == [0, "b", 3]
    assert [(r["correct"], r["well_formed"], r["truncated"]) for r in rows] == [
        (True, True, False), (False, False, True), (False, False, False)]
    assert rows[0]["think_tokens"] == len(tok.encode("2 + 3 = 5")) and rows[2]["think_tokens"] is None
    assert summary == {"n": 3, "accuracy": 1 / 3, "well_formed": 1 / 3, "mean_think_tokens":
                       (len(tok.encode("2 + 3 = 5")) + len(tok.encode("9 - 4 is"))) / 2, "truncated": 1, "skipped": 1}


# ---------------------------------------------------------------------------- beyond the moved test

def test_no_usable_prompt_gives_zero_shares_not_nan(demo, monkeypatch):
    model, tok, _ = demo
    asked = []

    def fake(model, tok, prompts, **kw):
        asked.append(prompts)
        return iter(())

    monkeypatch.setattr(evaluation, "iter_prompt_replies", fake)
    prompts = [PromptRecord(i, [{"role": "user", "content": "q"}], {"x": 1}, "dolphin-r1") for i in range(2)]
    summary, rows = evaluation.evaluate(model, tok, prompts)
    assert rows == [] and asked == [[]]  # nothing is generated for prompts without a reference
    assert summary == {"n": 0, "accuracy": 0.0, "well_formed": 0.0, "mean_think_tokens": 0.0, "truncated": 0,
                       "skipped": 2}


def test_answer_field_picks_the_reference(demo, monkeypatch):
    model, tok, _ = demo
    monkeypatch.setattr(evaluation, "iter_prompt_replies",
                        lambda model, tok, asked, **kw: iter([Completion(0, [], "stop", "The answer is 12.")]))
    p = PromptRecord(7, [{"role": "user", "content": "4*3?"}], {"answer": "7", "solution": "12"}, "dolphin-r1")
    _, rows = evaluation.evaluate(model, tok, [p], answer_field="solution")
    assert (rows[0]["reference"], rows[0]["prediction"], rows[0]["correct"]) == ("12", "The answer is 12.", True)
    assert rows[0]["prompt"] == "4*3?" and rows[0]["output"] == "The answer is 12."


def test_progress_bar_counts_replies_and_closes_on_error(demo, monkeypatch):
    model, tok, _ = demo
    bars = []

    class Bar:
        def __init__(self, total, desc):
            self.total, self.desc, self.closed = total, desc, False
            bars.append(self)

        def close(self):
            self.closed = True

    def failing(model, tok, asked, progress=None, **kw):
        assert progress is bars[-1]  # the bar goes to the generator, which updates it
        yield Completion(0, [], "stop", "The answer is 5.")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(evaluation, "Progress", Bar)
    monkeypatch.setattr(evaluation, "iter_prompt_replies", failing)
    prompts = [PromptRecord(i, [{"role": "user", "content": "q"}], {"answer": "5"}, "dolphin-r1") for i in range(3)]
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluation.evaluate(model, tok, prompts, progress=True)
    assert [(b.total, b.desc, b.closed) for b in bars] == [(3, "eval", True)]
    monkeypatch.setattr(evaluation, "iter_prompt_replies", lambda model, tok, asked, **kw: iter(()))
    evaluation.evaluate(model, tok, prompts, progress=False)
    assert len(bars) == 1  # no display unless asked
