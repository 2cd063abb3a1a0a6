"""What a run keeps besides checkpoints: metrics.jsonl (cut back on resume), the sinks that need a
package, the sample prompts and answers before / after training, and the closing summary."""

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

import minidistill as md
from minidistill import replies, sampling
from minidistill.demo import build_demo_model
from minidistill.errors import MinidistillError
from minidistill.metrics import (
    MetricsLog,
    answer_prompts,
    print_summary,
    progress,
    sample_prompts,
    shown,
    write_samples,
)
from minidistill.train_config import TrainConfig


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_rows_are_json_lines_and_a_disabled_log_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path, "jsonl", TrainConfig(), enabled=True)
    rows = [{"step": 1, "loss": 2.5, "lr": 1e-4}, {"step": 2, "loss": 2.25, "lr": 2e-4, "eval_loss": None}]
    for r in rows:
        log.write(r)
    assert rows_of(tmp_path / "metrics.jsonl") == rows  # flushed per row: readable while the run goes on
    log.close()
    assert log.note is None
    other = tmp_path / "rank1"
    other.mkdir()
    quiet = MetricsLog(other, "jsonl", TrainConfig(), enabled=False)  # a rank other than 0
    quiet.write({"step": 1, "loss": 1.0})
    quiet.close()
    assert list(other.iterdir()) == []


def test_resume_cuts_back_rows_after_the_checkpoint_and_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 3.0 - s / 10}) for s in (1, 2, 3, 4)] + ['{"step": 5, "lo']
    path.write_text("\n".join(lines), encoding="utf-8")  # killed mid-write: no newline at the end
    log = MetricsLog(tmp_path, "jsonl", TrainConfig(), enabled=True, resume_step=2)
    assert log.note == "metrics.jsonl: 3 row(s) logged after step 2 (or cut short) dropped"
    log.write({"step": 3, "loss": 0.5})
    log.close()
    assert [(r["step"], r["loss"]) for r in rows_of(path)] == [(1, 2.9), (2, 2.8), (3, 0.5)]
    again = MetricsLog(tmp_path, "jsonl", TrainConfig(), enabled=True, resume_step=3)  # nothing to drop
    again.close()
    assert again.note is None and len(rows_of(path)) == 3


@pytest.mark.parametrize("sink,module,package", [("tensorboard", "torch.utils.tensorboard", "tensorboard"),
                                                 ("wandb", "wandb", "wandb")])
def test_a_sink_without_its_package_says_what_to_install(tmp_path, monkeypatch, sink, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # the import fails whether or not it is installed
    with pytest.raises(MinidistillError, match=f"--log {sink} needs the {package} package: pip install {package}"):
        MetricsLog(tmp_path, sink, TrainConfig(), enabled=True)


def test_sample_prompts_from_a_file_or_the_data(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("  What is 2 + 3?  \n\n\nName a prime.\n   \n", encoding="utf-8")
    assert sample_prompts(str(f), data=None) == ["What is 2 + 3?", "Name a prime."]  # stripped, blanks dropped
    asked = []

    class Data:
        def prompts(self, n):
            asked.append(n)
            return ["first", "second"][:n]

    assert sample_prompts(None, Data(), n=2) == ["first", "second"] and asked == [2]
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"--sample-prompts {empty} holds no prompt"):
        sample_prompts(str(empty), Data())


def test_shown_marks_whitespace_only_answers():
    assert shown("The answer is 5.") == "The answer is 5."
    assert shown(" \n\n") == "(whitespace only: ' \\n\\n')"
    assert shown("") == "(whitespace only: '')"
    assert shown("\n" * 25) == "(whitespace only: " + repr("\n" * 20) + "…)"  # cut at 20 characters


def test_write_samples(tmp_path):
    path = tmp_path / "samples.md"
    write_samples(path, ["2+3?", "9-4?"], ["\n\n", "4"], ["5", "The answer is 5."])
    assert path.read_text(encoding="utf-8") == (
        "# Sample answers, before and after training\n\n"
        "## 1. 2+3?\n\n**Before**\n\n```\n(whitespace only: '\\n\\n')\n```\n\n**After**\n\n```\n5\n```\n\n"
        "## 2. 9-4?\n\n**Before**\n\n```\n4\n```\n\n**After**\n\n```\nThe answer is 5.\n```\n")


def test_print_summary(capsys, tmp_path):
    summary = {"steps": 8, "time_s": 3.2, "skipped_steps": 1, "final_loss": 1.234567, "final_eval_loss": None,
               "best_eval_loss": 0.5}
    print_summary(summary, tmp_path, merged=True)
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "done: 8 steps in 3.2 s (1 skipped), final loss 1.2346, eval loss final - / best 0.5000"
    assert out[2:] == [f"  adapter      {tmp_path / 'adapter'}", f"  metrics      {tmp_path / 'metrics.jsonl'}",
                       f"  samples      {tmp_path / 'samples.md'}", f"  checkpoints  {tmp_path / 'checkpoints'}",
                       f"  merged model {tmp_path / 'merged'}"]
    print_summary(summary, tmp_path, merged=False)
    assert "merged model" not in capsys.readouterr().out


def test_step_bar_starts_at_the_resumed_step(capsys):
    bar = progress(10, 4, enabled=True)
    assert (bar.total, bar.n, bar.disable) == (10, 4, False)
    bar.close()
    assert progress(10, 0, enabled=False).disable  # ranks other than 0 show none
    capsys.readouterr()


def test_answer_prompts_are_greedy_replies_and_keep_the_training_mode(tmp_path):
    folder = build_demo_model(tmp_path / "demo", hidden=64, layers=1)
    model, tok = md.load_model(folder, dtype=torch.float32).train(), md.load_tokenizer(str(folder))
    prompts = ["Ana has 3 pens and gets 2 more. How many pens does Ana have now?", "Name a number."]
    got = answer_prompts(model, tok, prompts, max_new_tokens=5, amp=nullcontext())
    assert model.training  # put back as it was
    model.eval()
    assert got == [replies.generate(model, tok, [{"role": "user", "content": p}], max_new_tokens=5) for p in prompts]
    plain = answer_prompts(model, tok, prompts, max_new_tokens=5, amp=nullcontext(), plain_text=True)
    assert not model.training
    want = [tok.decode(sampling.generate_ids_batch(model, [tok.encode(p)], max_new_tokens=5, stop_ids=tok.stop_ids)[0])
            for p in prompts]  # the raw text continued, no chat format
    assert plain == want and plain != got
