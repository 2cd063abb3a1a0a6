"""Batched generation equals one-by-one generation; trace files: schema, reasoning split,
resume, --verify rejection sampling."""

import json

import pytest
import torch

import minidistill as md
import importlib

gen = importlib.import_module("minidistill.generate")
from minidistill.demo import build_demo_model
from minidistill.eval import read_prompts
from minidistill.generate import generate, generate_batch, generate_ids, generate_ids_batch, write_traces
from model_fixtures import write_checkpoint


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = build_demo_model(tmp_path_factory.mktemp("demo"))
    return md.load_model(folder, dtype=torch.float32).eval(), md.load_tokenizer(str(folder)), folder


PROMPTS = ["Ana has 3 pens and gets 2 more. How many pens does Ana have now?",
           "Ben has 9 coins and gives away 4. How many coins are left?",
           "Ana has 3 pens and gets 4 more. How many pens does Ana have now?",  # same length as the first
           "Hi",
           "Chen has 12 shells and gives away 5. How many shells are left?"]


def test_batched_greedy_equals_unbatched(demo):
    model, tok, _ = demo
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    lengths = [len(tok.encode_chat(c, add_generation_prompt=True)[0]) for c in chats]
    assert len(set(lengths)) < len(lengths)  # some prompts really share a batch
    want = [generate(model, tok, c, max_new_tokens=12) for c in chats]
    for bs in (1, 2, 16):
        assert generate_batch(model, tok, chats, max_new_tokens=12, batch_size=bs) == want


def test_batched_ids_stop_early_rows_and_sampling_seed(tmp_path):
    write_checkpoint(tmp_path, "llama3")
    model = md.load_model(tmp_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (6,), generator=g).tolist() for _ in range(6)]
    greedy = [generate_ids(model, p, max_new_tokens=10) for p in prompts]
    stop = [greedy[0][2], greedy[3][5]]  # rows stop at different steps; the batch shrinks
    want = [generate_ids(model, p, max_new_tokens=10, stop_ids=stop) for p in prompts]
    assert generate_ids_batch(model, prompts, max_new_tokens=10, stop_ids=stop, batch_size=4) == want
    a = generate_ids_batch(model, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    b = generate_ids_batch(model, prompts, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b and all(len(x) == 8 for x in a)


def test_longrope_crossing_falls_back_to_unbatched(tmp_path, monkeypatch):
    write_checkpoint(tmp_path, "phi4-mini")  # original context 32
    model = md.load_model(tmp_path, dtype=torch.float32)
    prompts = [[5, 6, 7, 8] * 5, [9, 10, 11, 12] * 5]
    want = [generate_ids(model, p, max_new_tokens=20) for p in prompts]
    calls = []
    real = gen.generate_ids
    monkeypatch.setattr(gen, "generate_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert generate_ids_batch(model, prompts, max_new_tokens=20) == want
    assert len(calls) == 2  # 20 + 20 > 32: the cache must be rebuilt per sequence
    calls.clear()
    assert generate_ids_batch(model, prompts, max_new_tokens=5) == [w[:5] for w in want]
    assert not calls


def prompt_file(tmp_path):
    f = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "user", "content": "q0"}], "reasoning": "r", "answer": "The answer is 3."},
            {"id": "b", "messages": [{"role": "user", "content": "q1"}], "reasoning": "r", "answer": "7"},
            {"messages": [{"role": "user", "content": "q2"}], "reasoning": "r", "answer": "The answer is 1,000."}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


def fake_generation(outputs):
    """Replace generation by a table from the prompt text to its K replies, in order."""
    calls = []

    def fake(model, tok, chats, **kw):
        calls.append(len(chats))
        seen, out = {}, []
        for c in chats:
            q = c[-1]["content"]
            out.append(outputs[q][seen.get(q, 0)])
            seen[q] = seen.get(q, 0) + 1
        return out
    return fake, calls


OUTPUTS = {"q0": ["<think>\n1 + 2 = 3\n</think>\nThe answer is 3.", "<think>oops</think> The answer is 4."],
           "q1": ["no think block, 7", "<think>never closes"],
           "q2": ["<think>a</think>1000", "<think>b</think>It is 1000.5"]}


def test_trace_records_split_and_resume(tmp_path, demo, monkeypatch):
    model, tok, _ = demo
    fake, calls = fake_generation(OUTPUTS)
    monkeypatch.setattr(gen, "generate_batch", fake)
    prompts, _ = read_prompts(prompt_file(tmp_path))
    out = tmp_path / "traces.jsonl"
    stats = write_traces(model, tok, prompts[:2], out, num_samples=2, batch_size=2, progress=False)
    assert stats == {"prompts": 2, "skipped": 0, "generated": 4, "kept": 3, "unfinished": 1, "rejected": 0}
    assert calls == [2, 2]  # batch_size 2 / 2 samples = one prompt per call
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs[0] == {"messages": [{"role": "user", "content": "q0"},
                                    {"role": "assistant", "content": "The answer is 3."}],
                       "reasoning": "1 + 2 = 3", "answer": "The answer is 3.", "prompt_id": 0, "sample": 0}
    assert recs[2]["prompt_id"] == "b" and recs[2]["reasoning"] is None and recs[2]["answer"] == "no think block, 7"
    # The records train as dolphin-r1 rows: the reasoning goes back inside <think>.
    from minidistill.records import detect_format, to_messages
    assert detect_format(recs[0]) == "dolphin-r1"
    assert to_messages(recs[0], "dolphin-r1")[-1]["content"] == "<think>\n1 + 2 = 3\n</think>\nThe answer is 3."
    # Resume: the first two prompts are done; only q2 runs.
    calls.clear()
    stats = write_traces(model, tok, prompts, out, num_samples=2, batch_size=4, progress=False)
    assert stats["skipped"] == 2 and stats["generated"] == 2 and calls == [2]
    assert [json.loads(line)["prompt_id"] for line in out.read_text().splitlines()] == [0, 0, "b", 2, 2]


def test_verify_keeps_only_matching_answers_and_resumes(tmp_path, demo, monkeypatch, capsys):
    model, tok, folder = demo
    fake, calls = fake_generation(OUTPUTS)
    monkeypatch.setattr(gen, "generate_batch", fake)
    out = tmp_path / "verified.jsonl"
    argv = ["--model", str(folder), "--prompts", str(prompt_file(tmp_path)), "--output", str(out),
            "--num-samples", "2", "--temperature", "0.7", "--verify", "answer", "--device", "cpu"]
    gen.main(argv)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_id"], r["sample"]) for r in recs] == [(0, 0), ("b", 0), (2, 0)]
    assert recs[2]["reference"] == "The answer is 1,000."
    assert "kept 3/6 verified samples (1 unfinished, 2 rejected)" in capsys.readouterr().out
    calls.clear()
    gen.main(argv)  # every prompt done (also those with no kept sample): nothing runs
    assert calls == [] and len(out.read_text().splitlines()) == 3


def test_r1_generation_starts_inside_think(demo, tmp_path, monkeypatch):
    model, tok, _ = demo
    monkeypatch.setattr(tok, "render_chat", lambda m, add_generation_prompt=False: "<｜Assistant｜><think>\n")
    monkeypatch.setattr(gen, "generate_batch", lambda *a, **k: ["step one\n</think>\n\nThe answer is 3."])
    prompts, _ = read_prompts(prompt_file(tmp_path), limit=1)
    write_traces(model, tok, prompts, tmp_path / "r1.jsonl", progress=False)
    rec = json.loads((tmp_path / "r1.jsonl").read_text())
    assert (rec["reasoning"], rec["answer"]) == ("step one", "The answer is 3.")
