"""Trace files: schema, reasoning split, resume (with the seeds an uninterrupted run would use),
--verify rejection sampling, truncated replies counted, R1 templates that open the think block."""

import runpy
import json

import pytest
import torch

import minidistill as md
from minidistill import traces
from minidistill.answers import ThinkStats, read_prompts
from minidistill.demo import build_demo_model
from minidistill.replies import iter_replies
from minidistill.sampling import Completion
from minidistill.traces import write_traces


def cli_main(name: str):
    """The main() of `python -m minidistill.<name>`, loaded without binding the module as the package
    attribute (importing minidistill.generate would hide the function md.generate)."""
    return runpy.run_module(f"minidistill.{name}")["main"]



@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = build_demo_model(tmp_path_factory.mktemp("demo"))
    return md.load_model(folder, dtype=torch.float32).eval(), md.load_tokenizer(str(folder)), folder


def prompt_file(tmp_path):
    f = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": "q0"}], "reasoning": "r", "answer": "The answer is 3."},
            {"id": "b", "messages": [{"role": "user", "content": "q1"}], "reasoning": "r", "answer": "7"},
            {"messages": [{"role": "user", "content": "q2"}], "reasoning": "r", "answer": "The answer is 1,000."}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


def fake_generation(outputs):
    """Replace generation by a table from the prompt text to its K (reply, reason) pairs; the
    completions come back in reverse order, as a ragged batch may finish them."""
    calls = []

    def fake(model, tok, asked, **kw):
        calls.append(dict(kw, n=len(asked)))
        seen, out = {}, []
        for i, p in enumerate(asked):
            q = p.messages[-1]["content"]
            text, reason = outputs[q][seen.get(q, 0)]
            seen[q] = seen.get(q, 0) + 1
            out.append(Completion(i, [], reason, text))
        return iter(out[::-1])
    return fake, calls


OUTPUTS = {"q0": [("<think>\n1 + 2 = 3\n</think>\nThe answer is 3.", "stop"),
                  ("<think>oops</think> The answer is 4.", "stop")],
           "q1": [("no think block, 7", "stop"), ("<think>never closes", "length")],
           "q2": [("<think>a</think>1000", "stop"), ("<think>b</think>It is 1000.5", "stop")]}


def test_trace_records_split_and_resume(tmp_path, demo, monkeypatch):
    model, tok, _ = demo
    fake, calls = fake_generation(OUTPUTS)
    monkeypatch.setattr(traces, "iter_prompt_replies", fake)
    prompts, _ = read_prompts(prompt_file(tmp_path))
    out = tmp_path / "traces.jsonl"
    stats = write_traces(model, tok, prompts[:2], out, num_samples=2, batch_size=3, seed=10, progress=False)
    assert stats == {"prompts": 2, "skipped": 0, "generated": 4, "kept": 3, "unfinished": 1, "rejected": 0,
                     "truncated": 1}
    assert len(calls) == 1 and calls[0]["n"] == 4 and calls[0]["batch_size"] == 3  # one ragged stream
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    by = {(r["prompt_id"], r["sample"]): r for r in recs}
    assert set(by) == {(0, 0), (0, 1), ("b", 0)}
    assert by[0, 0] == {"messages": [{"role": "user", "content": "q0"},
                                     {"role": "assistant", "content": "The answer is 3."}],
                        "reasoning": "1 + 2 = 3", "answer": "The answer is 3.", "prompt_id": 0, "sample": 0}
    assert by["b", 0]["reasoning"] is None and by["b", 0]["answer"] == "no think block, 7"
    # The records train as dolphin-r1 rows: the reasoning goes back inside <think>.
    from minidistill.records import detect_schema, to_messages
    assert detect_schema(recs[0]) == "dolphin-r1"
    assert to_messages(by[0, 0], "dolphin-r1")[-1]["content"] == "<think>\n1 + 2 = 3\n</think>\nThe answer is 3."
    # Resume: the first two prompts are done; only q2 runs, with the seeds of its place in the file.
    stats = write_traces(model, tok, prompts, out, num_samples=2, batch_size=4, seed=10, progress=False)
    assert stats["skipped"] == 2 and stats["generated"] == 2 and calls[1]["n"] == 2
    assert calls[0]["seed"] == [10, 11, 12, 13] and calls[1]["seed"] == [14, 15]
    assert sorted(json.loads(line)["prompt_id"] for line in out.read_text().splitlines()[3:]) == [2, 2]


def test_verify_keeps_only_matching_answers_and_resumes(tmp_path, demo, monkeypatch, capsys):
    model, tok, folder = demo
    fake, calls = fake_generation(OUTPUTS)
    monkeypatch.setattr(traces, "iter_prompt_replies", fake)
    out = tmp_path / "verified.jsonl"
    argv = ["--model", str(folder), "--prompts", str(prompt_file(tmp_path)), "--output", str(out),
            "--num-samples", "2", "--temperature", "0.7", "--verify", "answer", "--device", "cpu", "--stop", "##"]
    cli_main("generate")(argv)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((str(r["prompt_id"]), r["sample"]) for r in recs) == [("0", 0), ("2", 0), ("b", 0)]
    assert [r["reference"] for r in recs if r["prompt_id"] == 2] == ["The answer is 1,000."]
    assert calls[0]["stop_strings"] == ["##"] and calls[0]["temperature"] == 0.7
    printed = capsys.readouterr().out
    assert "kept 3/6 verified samples (1 unfinished, 2 rejected; 1 reached --max-new-tokens)" in printed
    calls.clear()
    cli_main("generate")(argv)  # every prompt done (also those with no kept sample): nothing runs
    assert calls == []
    assert len(out.read_text().splitlines()) == 3


def test_r1_generation_starts_inside_think(demo, tmp_path, monkeypatch):
    model, tok, _ = demo
    monkeypatch.setattr(tok, "render_chat", lambda m, add_generation_prompt=False: "<｜Assistant｜><think>\n")
    monkeypatch.setattr(traces, "iter_prompt_replies",
                        lambda *a, **k: iter([Completion(0, [], "stop", "step one\n</think>\n\nThe answer is 3.")]))
    prompts, _ = read_prompts(prompt_file(tmp_path), limit=1)
    write_traces(model, tok, prompts, tmp_path / "r1.jsonl", progress=False)
    rec = json.loads((tmp_path / "r1.jsonl").read_text())
    assert (rec["reasoning"], rec["answer"]) == ("step one", "The answer is 3.")


def test_real_generation_writes_the_batched_replies(demo, tmp_path, monkeypatch):
    model, tok, _ = demo
    prompts, _ = read_prompts(prompt_file(tmp_path))
    want = list(iter_replies(model, tok, [p.messages for p in prompts], max_new_tokens=6, batch_size=2))
    # The random demo model never closes a think block: count every reply as a finished answer.
    monkeypatch.setattr(traces, "think_stats", lambda text, started_in_think=False: ThinkStats(None, text + "!", False))
    stats = write_traces(model, tok, prompts, tmp_path / "t.jsonl", max_new_tokens=6, batch_size=2, progress=False)
    recs = {r["prompt_id"]: r["answer"] for r in map(json.loads, (tmp_path / "t.jsonl").read_text().splitlines())}
    assert recs == {prompts[c.index].id: c.text + "!" for c in want}
    assert (stats["generated"], stats["truncated"]) == (3, sum(c.reason == "length" for c in want))


def test_generate_with_a_template_continues_the_prompt_part(tmp_path, monkeypatch, capsys):
    from minidistill import replies
    from minidistill.sampling import generate_ids
    from model_fixtures import write_family_model

    folder = write_family_model(tmp_path / "m", "phi4-mini", "phi-4-mini")
    prompt = "<|user|>\n{instruction}<|end|>\n<|assistant|>\n"  # the Phi-3 post's hand-written format
    (tmp_path / "t.txt").write_text(prompt + "---response---\n{response}<|end|>\n")
    rows = [{"instruction": "Add 2 and 3.", "response": "5"}, {"instruction": "Add 1 and 1.", "response": "2"},
            {"response": "no instruction"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fed = []
    real = replies.iter_generate
    monkeypatch.setattr(replies, "iter_generate", lambda model, ids, **kw: fed.extend(ids) or real(model, ids, **kw))
    out = tmp_path / "traces.jsonl"
    # The random model never closes a think block: count every reply as a finished answer.
    monkeypatch.setattr(traces, "think_stats", lambda text, started_in_think=False: ThinkStats(None, text + "!", False))
    cli_main("generate")(["--model", str(folder), "--prompts", str(tmp_path / "p.jsonl"), "--output", str(out),
                          "--template", str(tmp_path / "t.txt"), "--max-new-tokens", "4", "--device", "cpu"])
    tok, model = md.load_tokenizer(str(folder)), md.load_model(folder, dtype=torch.float32).eval()
    texts = [prompt.format(**r) for r in rows[:2]]
    assert not tok.prepends_bos and fed == [tok.encode(t) for t in texts]  # the rendered prompt part, nothing else
    recs = sorted(map(json.loads, out.read_text().splitlines()), key=lambda r: r["prompt_id"])  # in finish order
    assert [r["prompt_text"] for r in recs] == texts
    assert [r["answer"] for r in recs] == [tok.decode(generate_ids(model, tok.encode(t), max_new_tokens=4,
                                                                   stop_ids=tok.stop_ids)) + "!" for t in texts]
    assert recs[0]["messages"] == [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": recs[0]["answer"]}]
    err = capsys.readouterr().err
    assert "skipping p.jsonl:3: missing field 'instruction' (t.txt:2 uses it; keys: ['response'])" in err
    with pytest.raises(SystemExit):
        cli_main("generate")(["--model", str(folder), "--prompt", "hi", "--template", str(tmp_path / "t.txt")])
    assert "--template fills record fields: use it with --prompts FILE" in capsys.readouterr().err
