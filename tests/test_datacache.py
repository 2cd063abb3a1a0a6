"""datacache.py: arrays saved and loaded unchanged, keys that follow every input, atomic writes; prepare_data hits and misses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from minidistill import datacache
from minidistill.datacache import cache_folder, cache_key, load_cache, save_cache
from minidistill.samples import DataConfig, prepare_data
from minidistill.tokenizer import Tokenizer
from tok_fixtures import write_tokenizer


def arrays(n: int, weighted: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 20, n)
    ids = [rng.integers(0, 50_000, k).astype(np.int32) for k in lens]
    labels = [np.where(rng.random(k) < 0.5, -100, rng.integers(0, 50_000, k)).astype(np.int32) for k in lens]
    weights = [rng.random(k).astype(np.float32) for k in lens] if weighted else None
    return ids, labels, weights


@pytest.mark.parametrize("weighted", [False, True])
def test_save_load_round_trip(weighted, tmp_path):
    ids, labels, weights = arrays(9, weighted)
    summary = {"source": "x.jsonl", "kept": 9, "dropped": {"too_long": 2}}
    prompts = [(0, "What is 2 + 2?"), (-1, "ünïcode ✓")]
    folder = tmp_path / "k"
    save_cache(folder, ids, labels, weights, np.arange(9), summary, prompts, log=pytest.fail)
    got = load_cache(folder)
    assert len(got.ids) == 9 and got.summary == summary and got.prompts == prompts
    assert got.think_counts.tolist() == list(range(9)) and got.think_counts.dtype == np.int64
    for a, b in zip(ids + labels, got.ids + got.labels):
        assert b.dtype == np.int32 and np.array_equal(a, b)
    if weighted:
        assert all(b.dtype == np.float32 and np.array_equal(a, b) for a, b in zip(weights, got.weights))
    else:
        assert got.weights is None and not (folder / "weights.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no temporary folder left behind


def test_empty_and_missing(tmp_path):
    assert load_cache(tmp_path / "nothing") is None
    save_cache(tmp_path / "e", [], [], None, [], {"kept": 0}, [], log=pytest.fail)
    got = load_cache(tmp_path / "e")
    assert got.ids == [] and got.labels == [] and got.weights is None and got.summary == {"kept": 0}


def test_second_writer_and_unwritable_folder(tmp_path):
    ids, labels, _ = arrays(3, False)
    folder = tmp_path / "k"
    save_cache(folder, ids, labels, None, [0, 0, 0], {"kept": 3}, [], log=pytest.fail)
    other, _, _ = arrays(3, False, seed=1)
    save_cache(folder, other, labels, None, [0, 0, 0], {"kept": 3}, [], log=pytest.fail)  # another rank was first
    assert all(np.array_equal(a, b) for a, b in zip(ids, load_cache(folder).ids))  # the first one stays, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    logs = []
    save_cache(blocker / "k", ids, labels, None, [0, 0, 0], {}, [], log=logs.append)  # never raises
    assert len(logs) == 1 and "could not write the data cache" in logs[0] and "cache_dir" in logs[0]


def test_key_follows_every_input(monkeypatch):
    fp, opts, state = [("/d.jsonl", 10, 1)], {"max_seq_len": 512, "format": "auto"}, b"tok"
    k = cache_key(fp, opts, state)
    assert len(k) == 24 and k == cache_key([list(fp[0])], dict(opts), bytes(state))  # deterministic
    others = {cache_key([("/d.jsonl", 11, 1)], opts, state), cache_key([("/d.jsonl", 10, 2)], opts, state),
              cache_key(fp, {**opts, "max_seq_len": 1024}, state), cache_key(fp, opts, b"tok2")}
    monkeypatch.setattr(datacache, "CACHE_VERSION", datacache.CACHE_VERSION + 1)
    others.add(cache_key(fp, opts, state))
    assert len(others) == 5 and k not in others


def test_cache_folder_location(tmp_path, monkeypatch):
    assert cache_folder("abc", str(tmp_path / "mine")) == tmp_path / "mine" / "abc"
    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path / "env"))
    assert cache_folder("abc") == tmp_path / "env" / "data" / "abc"
    monkeypatch.delenv("MINIDISTILL_CACHE")
    assert cache_folder("abc") == Path.home() / ".cache" / "minidistill" / "data" / "abc"


# ---------------------------------------------------------------------------- through prepare_data

REC = {"messages": [{"role": "user", "content": "What is 2 + 2?"}],
       "reasoning": "Let me think step by step. 2 + 2 = 4.", "answer": "The answer is 4."}


def test_prepare_data_hit_is_identical_and_changes_miss(tmp_path):
    tok = Tokenizer.from_dir(write_tokenizer("r1-distill-qwen", tmp_path / "tok"))
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(REC) + "\n" for _ in range(3)))
    cache = str(tmp_path / "cache")

    def prep(t=tok, **kw):
        return prepare_data(str(path), t, DataConfig(cache_dir=cache, **kw), log=lambda *a: None)

    cold, warm = prep(answer_weight=2.0), prep(answer_weight=2.0)
    assert not cold.summary.cached and warm.summary.cached
    assert len(warm) == len(cold) == 3 and warm.prompt_texts == cold.prompt_texts
    assert np.array_equal(warm.think_counts, cold.think_counts)
    for a, b in zip(cold.samples, warm.samples):
        for x, y in ((a.ids, b.ids), (a.labels, b.labels), (a.weights, b.weights)):
            assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
    assert {**warm.summary.to_dict(), "cached": False} == cold.summary.to_dict()
    assert not prep(answer_weight=2.0, last_turn_only=True).summary.cached  # an option changed
    assert prep(answer_weight=2.0, num_workers=3).summary.cached  # how many workers is no option of the data
    tok.add_tokens(["<new>"])
    assert not prep(answer_weight=2.0).summary.cached  # the tokenizer changed
    assert len(list(Path(cache).iterdir())) == 3
