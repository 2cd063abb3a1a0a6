"""Data pipeline: readers, schemas, think-aware masks and weights, truncation, cache, batches."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from minidistill import data as D
from minidistill import samples as S
from minidistill import spans
from minidistill.batches import make_batches
from minidistill.samples import DataConfig, SFTData, Sample, prepare_data, split_eval
from minidistill.records import iter_records
from minidistill.tokenizer import Tokenizer
from tok_fixtures import write_tokenizer

IGN = -100
Q, R, A = "What is 2 + 2?", "Let me think step by step. 2 + 2 = 4.", "The answer is 4."
THINK = f"<think>\n{R}\n</think>\n{A}"
TERMINATOR = {"phi-4-mini": "<|end|>", "r1-distill-qwen": "<｜end▁of▁sentence｜>"}

RECORDS = {  # one record per schema, each meaning: user Q -> assistant THINK (alpaca: plain A)
    "messages": {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": THINK}]},
    "sharegpt": {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": THINK}]},
    "dolphin-r1": {"messages": [{"role": "user", "content": Q}], "reasoning": R, "answer": A, "model": "r1"},
    "medical-o1": {"Question": Q, "Complex_CoT": R, "Response": A},
    "magpie": {"instruction": Q, "response": THINK, "conversations": [], "difficulty": "easy"},
    "alpaca": {"instruction": Q, "input": "", "output": A},
}


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {f: Tokenizer.from_dir(write_tokenizer(f, root / f)) for f in ("phi-4-mini", "r1-distill-qwen")}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def prep(path, tok, tmp_path, **kw) -> SFTData:
    return prepare_data(str(path), tok, DataConfig(cache_dir=str(tmp_path / "cache"), **kw), log=lambda *a: None)


def trained_text(tok, s: Sample, weight: float | None = None) -> str:
    """Decode the targets: labels already hold the next token of every trained position."""
    lab = np.asarray(s.labels)
    keep = lab != IGN
    if weight is not None:
        keep &= np.isclose(np.asarray(s.weights), weight)
    return tok.decode(lab[keep].tolist())


# ---------------------------------------------------------------------------- schemas and masks

@pytest.mark.parametrize("fmt", list(RECORDS))
@pytest.mark.parametrize("forced", [False, True])
def test_schema_masks_match_assistant_text(fmt, forced, toks, tmp_path):
    tok = toks["phi-4-mini"]
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS[fmt]] * 2)
    data = prep(path, tok, tmp_path, format=fmt if forced else "auto")
    assert data.summary.detected_format == fmt and data.summary.kept == 2
    want = (A if fmt == "alpaca" else THINK) + "<|end|>"
    for s in data.samples:
        assert trained_text(tok, s) == want
        ids, lab = np.asarray(s.ids), np.asarray(s.labels)
        t = lab != IGN
        assert (lab[:-1][t[:-1]] == ids[1:][t[:-1]]).all() and lab[-1] == IGN  # aligned, shifted in-sample


def test_system_prompt_inserted_only_when_missing(toks, tmp_path):
    tok = toks["phi-4-mini"]
    with_sys = {"messages": [{"role": "system", "content": "Be kind."}] + RECORDS["messages"]["messages"]}
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS["messages"], with_sys])
    data = prep(path, tok, tmp_path, system_prompt="You are terse.")
    texts = [tok.decode(np.asarray(s.ids).tolist()) for s in data.samples]
    assert "<|system|>You are terse." in texts[0] and "You are terse." not in texts[1] and "Be kind." in texts[1]


def test_malformed_records_named_by_file_and_line(toks, tmp_path):
    tok = toks["phi-4-mini"]
    good = RECORDS["messages"]
    rows = [good, "{not json", {"messages": [{"role": "user", "content": Q}]},
            {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": A}]},
            {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": A}]},
            {"messages": [{"role": "wizard", "content": Q}, {"role": "assistant", "content": A}]},
            {"messages": "hello"}, good]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    logs = []
    data = prepare_data(str(path), tok, DataConfig(cache_dir=str(tmp_path / "c")), log=logs.append)
    assert data.summary.read == 8 and data.summary.kept == 2 and data.summary.dropped == {"bad_record": 6}
    text = "\n".join(logs)
    for line, what in [(2, "invalid JSON"), (3, "no assistant turn"), (4, "must be a string"),
                       (5, "empty content"), (6, "unknown role 'wizard'")]:
        assert re.search(rf"data\.jsonl:{line}: [^\n]*{re.escape(what)}", text), (line, what)
    with pytest.raises(ValueError, match=r"data\.jsonl:2: invalid JSON"):
        prep(path, tok, tmp_path, on_bad_record="error")
    with pytest.raises(ValueError, match=r"data\.jsonl:1: missing field 'answer'"):
        prep(path, tok, tmp_path, format="dolphin-r1", on_bad_record="error")


def test_all_dropped_raises_with_summary(toks, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"foo": 1}, {"bar": 2}])
    with pytest.raises(ValueError, match=r"no usable sample(.|\n)*bad_record 2"):
        prep(path, toks["phi-4-mini"], tmp_path)


# ---------------------------------------------------------------------------- think spans and weights

@pytest.mark.parametrize("family", ["r1-distill-qwen", "phi-4-mini"])
def test_think_and_answer_weights(family, toks, tmp_path):
    tok = toks[family]
    atomic = len(tok.encode("</think>")) == 1
    assert atomic == (family == "r1-distill-qwen")  # one tokenizer of each kind
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS["dolphin-r1"]])
    s = prep(path, tok, tmp_path, think_weight=0.25, answer_weight=2.0).samples[0]
    assert trained_text(tok, s, 0.25) == f"<think>\n{R}\n</think>"
    assert trained_text(tok, s, 2.0) == f"\n{A}{TERMINATOR[family]}"
    w, lab = np.asarray(s.weights), np.asarray(s.labels)
    assert (w[lab == IGN] == 0).all() and set(np.unique(w[lab != IGN])) == {0.25, 2.0}
    summ = prep(path, tok, tmp_path).summary
    assert summ.think_tokens + summ.answer_tokens == summ.trained_tokens
    assert summ.think_tokens == int((np.isclose(w, 0.25)).sum())


def test_history_reasoning_and_last_turn_only(toks, tmp_path):
    tok = toks["phi-4-mini"]
    conv = {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": "<think>\nfirst\n</think>\n4."},
                         {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": THINK}]}
    path = write_jsonl(tmp_path / "d.jsonl", [conv])
    full = trained_text(tok, prep(path, tok, tmp_path).samples[0])
    assert full == "<think>\nfirst\n</think>\n4.<|end|>" + THINK + "<|end|>"
    stripped = prep(path, tok, tmp_path, strip_history_reasoning=True).samples[0]
    assert trained_text(tok, stripped) == "4.<|end|>" + THINK + "<|end|>"
    assert "first" not in tok.decode(np.asarray(stripped.ids).tolist())
    last = trained_text(tok, prep(path, tok, tmp_path, last_turn_only=True).samples[0])
    assert last == THINK + "<|end|>"


def test_r1_format_keeps_final_reasoning_and_drops_history(toks, tmp_path):
    tok = toks["r1-distill-qwen"]
    conv = {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": "<think>\nfirst\n</think>\n4."},
                         {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": THINK}]}
    s = prep(write_jsonl(tmp_path / "d.jsonl", [conv]), tok, tmp_path).samples[0]
    assert trained_text(tok, s) == "\n4.<｜end▁of▁sentence｜>" + THINK + "<｜end▁of▁sentence｜>"


# ---------------------------------------------------------------------------- truncation

def _long_record(n_reason: int, n_prompt: int = 1) -> dict:
    return {"messages": [{"role": "user", "content": " ".join([Q] * n_prompt)}],
            "reasoning": " ".join([R] * n_reason), "answer": A}


def test_truncation_cases(toks, tmp_path):
    tok = toks["r1-distill-qwen"]
    path = write_jsonl(tmp_path / "d.jsonl", [_long_record(6)])
    full = prep(path, tok, tmp_path, max_seq_len=4096).samples[0]
    ids, lab = np.asarray(full.ids), np.asarray(full.labels)
    L, close = len(ids), int(np.flatnonzero(ids == tok.token_to_id("</think>"))[0])
    first = int(np.flatnonzero(lab != IGN)[0]) + 1  # first trained token

    def dropped(n: int) -> str:
        with pytest.raises(ValueError, match="no usable sample") as e:
            prep(path, tok, tmp_path, max_seq_len=n)
        return str(e.value)

    assert "truncated_think 1" in dropped(close)  # </think> itself is cut
    assert "truncated_answer 1" in dropped(close + 1)  # </think> fits, answer does not
    assert "truncated_answer 1" in dropped(L - 1)  # only the terminator is cut
    assert "too_long 1" in dropped(first)  # the prompt alone fills max_seq_len
    assert prep(path, tok, tmp_path, max_seq_len=L).summary.kept == 1  # exactly fits
    with pytest.raises(ValueError, match=r"d\.jsonl:1: truncated think"):
        prep(path, tok, tmp_path, max_seq_len=close, on_truncation="error")
    cut = close - 3
    t = prep(path, tok, tmp_path, max_seq_len=cut, on_truncation="truncate")
    s = t.samples[0]
    assert t.summary.truncated == 1 and len(s.ids) == cut
    assert (np.asarray(s.ids) == ids[:cut]).all()
    assert (np.asarray(s.labels)[:-1] == lab[: cut - 1]).all() and s.labels[-1] == IGN  # no target past the cut
    with pytest.raises(ValueError, match="too_long 1"):  # truncate cannot save a prompt that fills it
        prep(path, tok, tmp_path, max_seq_len=first, on_truncation="truncate")


# ---------------------------------------------------------------------------- readers, cache

def test_json_array_and_parquet_readers(toks, tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    tok = toks["phi-4-mini"]
    rows = [RECORDS["medical-o1"], {**RECORDS["medical-o1"], "Question": "What is 3 + 3?"}]
    ref = prep(write_jsonl(tmp_path / "a.jsonl", rows), tok, tmp_path)
    (tmp_path / "b.json").write_text(json.dumps(rows, indent=2))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet", row_group_size=1)
    for name in ("b.json", "c.parquet"):
        got = prep(tmp_path / name, tok, tmp_path)
        assert got.summary.detected_format == "medical-o1"
        assert [np.asarray(s.ids).tolist() for s in got.samples] == [np.asarray(s.ids).tolist() for s in ref.samples]
    (tmp_path / "bad.json").write_text('[\n  {"Question": "a", "Response": "b"},\n  {"Question": oops}\n]')
    assert [r.where for r in iter_records([tmp_path / "bad.json"])] == ["bad.json:element 1 (line 2)",
                                                                       "bad.json:element 2 (line 3)"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.json").write_text(json.dumps(rows))
    write_jsonl(folder / "y.jsonl", rows)
    assert prep(folder, tok, tmp_path).summary.kept == 4


def test_cache_hit_and_invalidation(toks, tmp_path):
    tok = toks["phi-4-mini"]
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS["dolphin-r1"], RECORDS["dolphin-r1"]])
    a = prep(path, tok, tmp_path, think_weight=0.5)
    b = prep(path, tok, tmp_path, think_weight=0.5)
    assert not a.summary.cached and b.summary.cached
    for x, y in zip(a.samples, b.samples):
        assert np.array_equal(x.ids, y.ids) and np.array_equal(x.labels, y.labels)
        assert np.array_equal(x.weights, y.weights)
    assert b.summary.think_tokens == a.summary.think_tokens
    assert not prep(path, tok, tmp_path, think_weight=0.75).summary.cached  # an option changed
    write_jsonl(path, [RECORDS["dolphin-r1"]] * 3)  # the data changed
    c = prep(path, tok, tmp_path, think_weight=0.5)
    assert not c.summary.cached and c.summary.kept == 3


def test_worker_processes_match_in_process(toks, tmp_path, monkeypatch):
    tok = toks["r1-distill-qwen"]
    rows = [_long_record(k % 3 + 1) for k in range(40)] + ["oops"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    one = prepare_data(str(path), tok, DataConfig(num_workers=1, cache_dir=str(tmp_path / "c1")), log=lambda *a: None)
    monkeypatch.setattr(S, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(S, "CHUNK", 7)
    many = prepare_data(str(path), tok, DataConfig(num_workers=2, cache_dir=str(tmp_path / "c2")), log=lambda *a: None)
    assert many.summary.to_dict() == one.summary.to_dict()
    assert all(np.array_equal(x.ids, y.ids) and np.array_equal(x.labels, y.labels)
               for x, y in zip(one.samples, many.samples))


@pytest.mark.parametrize("family", ["phi-4-mini", "phi-3", "llama-3.1", "r1-distill-llama", "smollm2"])
def test_batched_encode_equals_encode_chat(family, tmp_path):
    tok = Tokenizer.from_dir(write_tokenizer(family, tmp_path / family))
    convs = [[{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": Q},
              {"role": "assistant", "content": THINK}, {"role": "user", "content": "again?"},
              {"role": "assistant", "content": " yes \n"}], [{"role": "user", "content": Q},
                                                             {"role": "assistant", "content": A}]]
    text = spans.TokenText(tok)
    batched = spans.encode_chats(tok, convs, text)

    class Plain:  # the generic path: encode_chat + per-token text
        decode, encode_chat = tok.decode, tok.encode_chat

    for conv, (ids, turns), (ids2, turns2) in zip(convs, batched, spans.encode_chats(Plain(), convs, text)):
        want_ids, want_mask = tok.encode_chat(conv)
        mask = np.zeros(len(ids), dtype=bool)
        for t in turns:
            mask[t.start: t.end] = True
        assert list(ids) == want_ids and mask.tolist() == want_mask
        assert list(ids2) == want_ids and turns2 == turns


def test_inspect_cli(toks, tmp_path, capsys):
    folder = write_tokenizer("r1-distill-qwen", tmp_path / "tok")
    path = write_jsonl(tmp_path / "d.jsonl", [RECORDS["dolphin-r1"]] * 3)
    D.main(["--model", str(folder), "--data", str(path), "--show", "2", "--cache-dir", str(tmp_path / "c"),
            "--max-seq-len", "512"])
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2
    assert f"[[<think>\n{R}\n</think>]][[\n{A}<｜end▁of▁sentence｜>]]" in out
    assert "kept 3" in out and "format dolphin-r1" in out


def test_data_command_prints_what_train_prints(tmp_path, capsys, monkeypatch):
    """The same bad folder: `train` and `python -m minidistill.data` print the same reasons (file:line,
    file:element in a JSON array) and name the skipped files; the data command from the cache too."""
    from minidistill.demo import build_demo_model
    from minidistill.train import main as train_main

    model = build_demo_model(tmp_path / "model", hidden=32, layers=1)
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    good = {"messages": [{"role": "user", "content": "1 + 1?"}], "reasoning": "1 + 1 = 2", "answer": "2"}
    write_jsonl(folder / "a.jsonl", [good] * 4 + ["{oops", {"messages": [{"role": "user", "content": "hi"}]}])
    (folder / "sub" / "b.json").write_text(json.dumps([good, {"messages": 3}]))
    for name in ("notes.txt", "sub/extra.csv", "README.md", ".hidden"):
        (folder / name).write_text("not data")
    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path / "mdcache"))
    train_main(["--model", str(model), "--data", str(folder), "--output", str(tmp_path / "run"), "--max-steps", "1",
                "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "64", "--no-grad-checkpointing",
                "--sample-max-tokens", "1", "--device", "cpu", "--cache-dir", str(tmp_path / "c")])
    train_out = capsys.readouterr().out.splitlines()
    D.main(["--model", str(model), "--data", str(folder), "--show", "1", "--max-seq-len", "64",
            "--cache-dir", str(tmp_path / "c")])
    data_out = capsys.readouterr().out.splitlines()
    notes = [ln for ln in train_out if ln.startswith(("skipping", "skipped"))]
    assert notes == [
        "skipping a.jsonl:5: invalid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        "skipping a.jsonl:6: missing field 'answer' (keys: ['messages'])",
        "skipping b.json:element 2 (line 1): field 'messages' must be list, got int",
        f"skipped 2 files of {folder} that are not data (.jsonl, .jsonl.gz, .json, .parquet): notes.txt, sub/extra.csv"]
    assert [ln for ln in data_out if ln.startswith(("skipping", "skipped"))] == notes
    summary = [ln for ln in train_out if ln.startswith(("data ", "  kept", "  tokens", "  length"))]
    assert "kept 5, dropped 3 (bad_record 3)" in summary[1]
    assert data_out[:len(notes) + 4] == notes + [summary[0] + " (tokenized data from cache)"] + summary[1:]


def test_more_bad_records_than_shown_are_counted(toks, tmp_path):
    rows = [RECORDS["messages"]] + [{"x": i} for i in range(S.SHOWN_BAD + 3)]
    logs = []
    data = prepare_data(str(write_jsonl(tmp_path / "d.jsonl", rows)), toks["phi-4-mini"],
                        DataConfig(cache_dir=str(tmp_path / "c")), log=logs.append)
    assert len(data.summary.bad_records) == S.SHOWN_BAD and data.summary.dropped == {"bad_record": S.SHOWN_BAD + 3}
    assert logs[:S.SHOWN_BAD + 1] == data.summary.notes()
    assert logs[S.SHOWN_BAD] == f"skipping 3 more bad records (the first {S.SHOWN_BAD} are named)"
    assert logs[0] == "skipping d.jsonl:2: missing field 'messages' (keys: ['x'])"  # the schema of record 1


# ---------------------------------------------------------------------------- batches

def synthetic(n: int = 37, seed: int = 0, weighted: bool = False, vocab: int = 96) -> SFTData:
    """Random samples: a prompt of -100 labels then a trained reply, labels shifted in-sample."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        L, p = int(rng.integers(4, 30)), int(rng.integers(1, 3))
        ids = rng.integers(3, vocab, L).astype(np.int32)
        lab = np.full(L, IGN, np.int32)
        lab[p:-1] = ids[p + 1:]
        w = np.where(lab != IGN, rng.choice([0.5, 1.0], L), 0).astype(np.float32) if weighted else None
        samples.append(Sample(ids, lab, w))
    return SFTData(samples, S.DataSummary(kept=n))


def _seen(batches) -> list[tuple]:
    """Every sample in the batches, as the tuple of its ids (unique in `synthetic`, never pad id 0)."""
    out = []
    for b in batches:
        for r in range(b.input_ids.shape[0]):
            ids = b.input_ids[r]
            doc = b.document_ids[r] if b.document_ids is not None else torch.zeros_like(ids)
            for d in doc.unique().tolist():
                sample = ids[(doc == d) & (ids != 0)].tolist()
                if sample:  # else: the padding document
                    out.append(tuple(sample))
    return out


def test_packed_rows_keep_targets_within_samples():
    data = synthetic()
    for b in make_batches(data, 3, 64, seed=1):
        lab, ids, doc, pos = b.labels, b.input_ids, b.document_ids, b.position_ids
        t = lab[:, :-1] != IGN
        assert (lab[:, :-1][t] == ids[:, 1:][t]).all()
        assert (doc[:, :-1][t] == doc[:, 1:][t]).all()  # never the next sample's first token
        assert (lab[:, -1] == IGN).all()
        starts = torch.ones_like(doc, dtype=torch.bool)
        starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
        assert (pos[starts] == 0).all() and (pos[~starts] == pos.roll(1, 1)[~starts] + 1).all()
        assert b.num_tokens == int((lab != IGN).sum())
    total = sum(len(s.ids) for s in data.samples)
    assert sum(b.num_input_tokens for b in make_batches(data, 3, 64)) == total


@pytest.mark.parametrize("packing", [True, False])
def test_sharding_disjoint_covering_deterministic(packing):
    data = synthetic(41)
    every = sorted(tuple(np.asarray(s.ids).tolist()) for s in data.samples)
    for world in (1, 2, 3):
        per = [make_batches(data, 2, 64, packing=packing, seed=3, epoch=1, rank=r, world_size=world)
               for r in range(world)]
        assert len({len(p) for p in per}) == 1
        seen = [x for p in per for x in _seen(p)]
        assert sorted(seen) == every  # disjoint and covering
    a = make_batches(data, 2, 64, packing=packing, seed=3, epoch=1)
    b = make_batches(data, 2, 64, packing=packing, seed=3, epoch=1)
    c = make_batches(data, 2, 64, packing=packing, seed=3, epoch=2)
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert _seen(a) != _seen(c)
    if not packing:  # length-grouped: rows of a batch have similar lengths, little padding
        pad = sum(x.input_ids.numel() - x.num_input_tokens for x in a)
        assert pad < 0.25 * sum(x.num_input_tokens for x in a)


def test_packed_and_unpacked_loss_equal(tmp_path):
    pytest.importorskip("transformers")
    from minidistill import load_model
    from minidistill.loss import chunked_cross_entropy
    from model_fixtures import write_checkpoint

    write_checkpoint(tmp_path / "m", "qwen2")
    model = load_model(str(tmp_path / "m"), dtype=torch.float32)
    data = synthetic(12, weighted=True)

    def loss(batches) -> float:
        total = sum(b.num_tokens for b in batches)
        out = 0.0
        with torch.no_grad():
            for b in batches:
                h = model(b.input_ids, position_ids=b.position_ids, document_ids=b.document_ids, return_hidden=True)
                out += float(chunked_cross_entropy(h, model.head_weight, b.labels, weights=b.weights,
                                                   num_items=total).loss)
        return out

    packed = make_batches(data, 2, 64, packing=True)
    unpacked = make_batches(data, 3, 64, packing=False)
    assert sum(b.num_tokens for b in packed) == sum(b.num_tokens for b in unpacked)
    assert any(int(b.document_ids.max()) >= 2 for b in packed)  # rows really hold several samples
    assert abs(loss(packed) - loss(unpacked)) < 1e-5


def test_split_eval_and_config_validation(toks, tmp_path):
    data = synthetic(20)
    data.think_counts = np.arange(20)
    train, held = split_eval(data, 0.25, seed=1)
    assert len(train) == 15 and len(held) == 5 and held.summary.kept == 5
    assert sorted(map(id, train.samples + held.samples)) == sorted(map(id, data.samples))
    assert held.summary.think_tokens == int(sum(data.think_counts[i] for i, s in enumerate(data.samples)
                                                if any(s is h for h in held.samples)))
    with pytest.raises(ValueError, match="on_truncation='cut'"):
        DataConfig(on_truncation="cut")
    with pytest.raises(ValueError, match="seq_len"):
        make_batches(data, 2, 8)
