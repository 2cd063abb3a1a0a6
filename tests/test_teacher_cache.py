"""The offline-KD teacher cache: written then read back, shards, gather order, fingerprints."""

import json

import numpy as np
import pytest
import torch

import minidistill as md
from minidistill.kd import kd_from_topk, topk_targets
from minidistill.samples import DataSummary, Sample, SFTData
from minidistill.teacher_cache import TeacherCache, cache_logits, samples_fingerprint
from model_fixtures import write_checkpoint


def tiny_data(n=5, seed=0, vocab=96):
    g = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        L = int(g.integers(6, 15))
        ids = g.integers(3, vocab, L)
        labels = np.full(L, -100)
        labels[L // 2: L - 1] = ids[L // 2 + 1:]
        samples.append(Sample(ids.tolist(), labels.tolist()))
    return SFTData(samples, DataSummary())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tc")
    write_checkpoint(root / "teacher", "qwen2", seed=1)
    write_checkpoint(root / "student", "llama3", seed=2)
    return md.load_model(root / "teacher", dtype=torch.float32), md.load_model(root / "student", dtype=torch.float32)


def packed(data, rows):
    """The packed row of samples `rows`, as make_batches builds it: ids, labels, document ids, positions (1, L)."""
    s = [data.samples[i] for i in rows]
    cat = lambda xs: torch.tensor([sum(xs, [])])  # noqa: E731
    return (cat([x.ids for x in s]), cat([x.labels for x in s]), cat([[d] * len(x.ids) for d, x in enumerate(s)]),
            cat([list(range(len(x.ids))) for x in s]))


def test_written_then_read_back(models, tmp_path):
    teacher, _ = models
    data = tiny_data()
    out = cache_logits(teacher, data, tmp_path / "cache", top_k=8, batch_size=2, dtype="fp32",
                       teacher_name="t", positions_per_shard=12, chunk_size=3)
    meta = json.loads((out / "meta.json").read_text())
    n_labelled = [int((np.asarray(s.labels) != -100).sum()) for s in data.samples]
    assert len(meta["shards"]) > 1 and meta["top_k"] == 8 and meta["vocab_size"] == 96 and meta["teacher"] == "t"
    assert sum(s["num_positions"] for s in meta["shards"]) == sum(n_labelled)
    assert [s["first_sample"] for s in meta["shards"]] == sorted(s["first_sample"] for s in meta["shards"])
    cache = TeacherCache(out)
    assert cache.fingerprint == samples_fingerprint(data) and len(cache) == 5 and cache.top_k == 8
    for i, s in enumerate(data.samples):  # every sample, across shard boundaries
        x, y = torch.tensor([s.ids]), torch.tensor([s.labels])
        tid, tlp, tail = cache.lookup(i)
        assert tid.dtype == torch.int32 and tid.shape == (n_labelled[i], 8)
        with torch.no_grad():
            t_logits = teacher(x)[0][y[0] != -100]  # (n, V): the same positions, computed apart
        want_ids, want_lp, want_tail = topk_targets(t_logits, 8)
        assert torch.equal(tid, want_ids)
        torch.testing.assert_close(tlp, want_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tail, want_tail, rtol=1e-5, atol=1e-5)
        # log-probs of the top-k plus the tail mass account for the whole distribution
        torch.testing.assert_close(torch.logsumexp(torch.cat([tlp, tail[:, None]], 1), 1), torch.zeros(n_labelled[i]),
                                   atol=1e-5, rtol=0)


def test_gather_order_is_the_packed_rows_order(models, tmp_path):
    teacher, student = models
    data = tiny_data()
    cache = TeacherCache(cache_logits(teacher, data, tmp_path / "cache", top_k=8, dtype="fp32",
                                      positions_per_shard=12))
    rows = [3, 0, 4]  # any batch order
    ids, labels, doc, pos = packed(data, rows)
    g_ids, g_lp, g_tail = cache.gather(rows)
    with torch.no_grad():
        t_logits = teacher(ids, position_ids=pos, document_ids=doc)[0][labels[0] != -100]
    want_ids, want_lp, want_tail = topk_targets(t_logits, 8)
    assert torch.equal(g_ids, want_ids)
    torch.testing.assert_close(g_lp, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_tail, want_tail, rtol=1e-5, atol=1e-5)
    assert not torch.equal(cache.gather([0, 3, 4])[0], g_ids)  # the order matters
    # The loss from the cache equals the loss from the teacher's targets computed online.
    h = student(ids, position_ids=pos, document_ids=doc, return_hidden=True)
    got = kd_from_topk(h, student.head_weight, labels, g_ids, g_lp, g_tail)
    want = kd_from_topk(h, student.head_weight, labels, want_ids, want_lp, want_tail)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    e_ids, e_lp, e_tail = cache.gather([])
    assert e_ids.shape == (0, 8) and e_lp.shape == (0, 8) and e_tail.shape == (0,)


def test_other_data_is_refused(models, tmp_path):
    teacher, _ = models
    data = tiny_data()
    cache = TeacherCache(cache_logits(teacher, data, tmp_path / "cache", top_k=4, dtype="fp16"))
    lp = cache.lookup(0)[1]
    assert lp.dtype == torch.float32  # stored fp16, handed out fp32
    full = TeacherCache(cache_logits(teacher, data, tmp_path / "full", top_k=4, dtype="fp32")).lookup(0)[1]
    assert not torch.equal(lp, full)
    torch.testing.assert_close(lp, full, rtol=1e-3, atol=1e-3)
    cache.check(tiny_data())  # the same samples again: accepted
    with pytest.raises(ValueError, match="fingerprint"):
        cache.check(tiny_data(seed=1))
    relabelled = tiny_data()
    relabelled.samples[2].labels[-2] = -100  # one label fewer changes the fingerprint too
    assert samples_fingerprint(relabelled) != samples_fingerprint(data)
    with pytest.raises(ValueError, match="fingerprint"):
        cache.check(relabelled)


def test_bad_input_raises(models, tmp_path):
    teacher, _ = models
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TeacherCache(tmp_path)  # an unfinished cache: no meta.json
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 96\]"):
        cache_logits(teacher, tiny_data(), tmp_path / "c", top_k=97)
    with pytest.raises(ValueError, match="dtype must be one of"):
        cache_logits(teacher, tiny_data(), tmp_path / "c", dtype="bf16")
    cache = TeacherCache(cache_logits(teacher, tiny_data(n=2), tmp_path / "c", top_k=2))
    with pytest.raises(IndexError, match="not in this cache of 2 samples"):
        cache.lookup(2)


def test_mapped_cache_marks_positions_without_target(tmp_path):
    """A cross-tokenizer cache (plan given): the mapped top-k per student position, placeholders
    flagged by `covered`, meta "mapped"; checked against the plan and the teacher computed apart."""
    from minidistill.xkd import CrossPlan, map_index, mapped_distribution

    write_checkpoint(tmp_path / "t", "qwen2", seed=1)
    teacher = md.load_model(tmp_path / "t", dtype=torch.float32)
    data = tiny_data(n=3)
    g = np.random.default_rng(0)
    Vt = teacher.head_weight.shape[0]
    vm = g.integers(0, 50, Vt)
    vm[::7] = -1
    t_ids, strict = [], []
    for s in data.samples:
        n = int((np.asarray(s.labels) != -100).sum())
        t_ids.append(g.integers(3, 90, n + 4))
        st = np.arange(1, n + 1)
        st[::2] = -1  # every other student position without a teacher partner
        strict.append(st)
    plan = CrossPlan(t_ids, strict, [x.copy() for x in strict], vm, Vt)
    out = cache_logits(teacher, data, tmp_path / "cache", top_k=50, dtype="fp32", vocab_size=50, plan=plan,
                       positions_per_shard=4)
    cache = TeacherCache(out)
    assert cache.meta["vocab_size"] == 50 and cache.meta["mapped"]["coverage"] == pytest.approx(plan.coverage())
    index = map_index(vm, 50)
    for i in range(3):
        ids, lp, _ = cache.lookup(i)
        cov = cache.covered(i)
        assert cov.tolist() == (strict[i] >= 0).tolist()
        with torch.no_grad():
            h = teacher(torch.as_tensor(t_ids[i])[None], return_hidden=True)[0]
        qs, _ = mapped_distribution(h[torch.as_tensor(strict[i][strict[i] >= 0])] @ teacher.head_weight.t(), index)
        got = torch.full((int(cov.sum()), 50), 0.0).scatter_(1, ids[cov].long(), lp[cov].exp())
        torch.testing.assert_close(got, qs, rtol=1e-4, atol=1e-6)  # k = the student vocab: the whole mapped q_s
    assert torch.equal(cache.gather_covered([2, 0]), torch.cat([cache.covered(2), cache.covered(0)]))
    plain = TeacherCache(cache_logits(teacher, data, tmp_path / "plain", top_k=4))
    assert plain.covered(0) is None and plain.gather_covered([0, 1]) is None
