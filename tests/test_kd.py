"""KD losses against full-logits references, their limits, vocab alignment, the offline
top-k cache round trip, and a short KD run that lowers the loss."""

import json

import numpy as np
import pytest
import torch

import minidistill as md
from minidistill.data import SFTData, DataSummary, Sample
from minidistill.distill import TeacherCache, cache_logits, samples_fingerprint
from minidistill.kd import chunked_kd_loss, kd_from_topk, kd_loss_reference, topk_targets
from model_fixtures import write_checkpoint

KINDS = ["forward", "reverse", "jsd"]


def make_inputs(seed=0, B=2, T=7, Hs=16, Ht=24, Vs=40, Vt=40, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, Hs, generator=g, dtype=torch.float64).float()
    ws = torch.randn(Vs, Hs, generator=g) * scale
    ht = torch.randn(B, T, Ht, generator=g)
    wt = torch.randn(Vt, Ht, generator=g) * scale
    labels = torch.randint(0, min(Vs, Vt), (B, T), generator=g)
    labels[0, :2] = -100
    labels[1, -1] = -100
    return hs, ws, ht, wt, labels


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_chunked_kd_matches_full_logits(kind, temperature, chunk):
    hs, ws, ht, wt, labels = make_inputs(Vs=40, Vt=44)  # teacher has 4 padding rows
    a, wa = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    got = chunked_kd_loss(a, wa, ht, wt, labels, kind=kind, temperature=temperature, chunk_size=chunk,
                          num_items=20)
    got.loss.backward()
    b, wb = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    want = kd_loss_reference(b @ wb.t(), ht @ wt.t(), labels, kind=kind, temperature=temperature, num_items=20)
    want.loss.backward()
    assert got.num_tokens == want.num_tokens == int((labels != -100).sum())
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-5, atol=1e-6)
    assert got.loss.item() > 0


def test_teacher_gets_no_gradient_and_head_grad_is_optional():
    hs, ws, ht, wt, labels = make_inputs()
    ht.requires_grad_()
    wt.requires_grad_()
    a = hs.clone().requires_grad_()
    out = chunked_kd_loss(a, ws, ht, wt, labels)
    out.loss.backward()
    assert a.grad is not None and ht.grad is None and wt.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_equal_to_student_gives_zero(kind):
    hs, ws, _, _, labels = make_inputs()
    a = hs.clone().requires_grad_()
    out = chunked_kd_loss(a, ws, hs, ws, labels, kind=kind, temperature=2.0)
    out.loss.backward()
    assert abs(out.loss.item()) < 1e-6
    assert a.grad.abs().max().item() < 1e-6


def test_jsd_symmetric_at_half_and_interpolates():
    hs, ws, ht, wt, labels = make_inputs(Hs=16, Ht=16)
    ab = chunked_kd_loss(hs, ws, ht, wt, labels, kind="jsd").loss
    ba = chunked_kd_loss(ht, wt, hs, ws, labels, kind="jsd").loss
    torch.testing.assert_close(ab, ba, rtol=1e-5, atol=1e-7)
    # JSD is bounded by log 2 per token; KL is not.
    assert 0 < ab.item() <= np.log(2) + 1e-6
    skew = chunked_kd_loss(hs, ws, ht, wt, labels, kind="jsd", jsd_beta=0.9).loss
    assert not torch.allclose(skew, ab)


def test_vocab_padding_alignment_and_out_of_range_label():
    hs, ws, ht, wt, labels = make_inputs(Vs=40, Vt=40)
    base = chunked_kd_loss(hs, ws, ht, wt, labels).loss
    # Extra padding rows on either side are ignored: the shared range is [0, 40).
    pad_t = torch.cat([wt, torch.randn(8, wt.shape[1]) * 5])
    pad_s = torch.cat([ws, torch.randn(3, ws.shape[1]) * 5]).requires_grad_()
    torch.testing.assert_close(chunked_kd_loss(hs, ws, ht, pad_t, labels).loss, base)
    out = chunked_kd_loss(hs, pad_s, ht, wt, labels)
    torch.testing.assert_close(out.loss, base)
    out.loss.backward()
    assert pad_s.grad[40:].abs().max() == 0
    bad = labels.clone()
    bad[1, 0] = 41
    with pytest.raises(ValueError, match=r"label 41 lies outside .*\[0, 40\)"):
        chunked_kd_loss(hs, pad_s, ht, wt, bad)


def test_errors_name_the_problem():
    hs, ws, ht, wt, labels = make_inputs()
    with pytest.raises(ValueError, match="kind must be one of"):
        chunked_kd_loss(hs, ws, ht, wt, labels, kind="kl")
    with pytest.raises(ValueError, match="teacher_hidden leading shape"):
        chunked_kd_loss(hs, ws, ht[:, :3], wt, labels)
    with pytest.raises(ValueError, match="jsd_beta"):
        chunked_kd_loss(hs, ws, ht, wt, labels, kind="jsd", jsd_beta=1.0)


def topk_reference(student_logits, teacher_logits, labels, k, T=1.0):
    """Bucketed forward KL (top-k ids + one tail bucket) from full logits, by autograd."""
    mask = labels.reshape(-1) != -100
    V = student_logits.shape[-1]
    logp = torch.log_softmax(student_logits.reshape(-1, V)[mask] / T, -1)
    logq = torch.log_softmax(teacher_logits.reshape(-1, V)[mask] / T, -1)
    idx = logq.topk(k, -1).indices
    inside = torch.zeros_like(logq, dtype=torch.bool).scatter_(1, idx, True)
    q_tail = torch.logsumexp(logq.masked_fill(inside, -float("inf")), -1)
    p_tail = torch.logsumexp(logp.masked_fill(inside, -float("inf")), -1)
    lq, lp = logq.gather(1, idx), logp.gather(1, idx)
    per = (lq.exp() * (lq - lp)).sum(-1)
    if k < V:  # an empty tail bucket adds nothing (0 log 0)
        per = per + q_tail.exp() * (q_tail - p_tail)
    return per.sum() * T * T / mask.sum()


@pytest.mark.parametrize("k", [1, 5, 40])
def test_kd_from_topk_matches_bucketed_reference(k):
    hs, ws, ht, wt, labels = make_inputs(Vs=40, Vt=40)
    mask = labels.reshape(-1) != -100
    t_logits = ht @ wt.t()
    ids, lq, tail = topk_targets(t_logits.reshape(-1, 40)[mask], k, temperature=1.5)
    a = hs.clone().requires_grad_()
    got = kd_from_topk(a, ws, labels, ids, lq, tail, temperature=1.5, chunk_size=4)
    got.loss.backward()
    b = hs.clone().requires_grad_()
    want = topk_reference(b @ ws.t(), t_logits, labels, k, T=1.5)
    want.backward()
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    if k == 40:  # the whole vocab: exactly forward KL
        full = chunked_kd_loss(hs, ws, ht, wt, labels, temperature=1.5).loss
        torch.testing.assert_close(got.loss, full, rtol=1e-5, atol=1e-6)


def test_kd_from_topk_shape_errors():
    hs, ws, ht, wt, labels = make_inputs()
    n = int((labels != -100).sum())
    ids = torch.zeros(n - 1, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=f"for {n} labelled positions"):
        kd_from_topk(hs, ws, labels, ids, ids.float(), torch.zeros(n - 1))
    ids = torch.full((n, 3), 99, dtype=torch.int32)
    with pytest.raises(ValueError, match="top-k id 99 is outside"):
        kd_from_topk(hs, ws, labels, ids, ids.float(), torch.zeros(n))


def tiny_data(n=5, seed=0, vocab=96):
    g = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        L = int(g.integers(6, 15))
        ids = g.integers(3, vocab, L)
        labels = np.full(L, -100)
        labels[L // 2: L - 1] = ids[L // 2 + 1:]
        samples.append(Sample(ids.tolist(), labels.tolist()))
    return SFTData(samples, DataSummary())


def test_cache_round_trip_equals_online_topk(tmp_path):
    write_checkpoint(tmp_path / "teacher", "qwen2", seed=1)
    write_checkpoint(tmp_path / "student", "llama3", seed=2)
    teacher = md.load_model(tmp_path / "teacher", dtype=torch.float32)
    student = md.load_model(tmp_path / "student", dtype=torch.float32)
    data = tiny_data()
    out = cache_logits(teacher, data, tmp_path / "cache", top_k=8, batch_size=2, dtype="fp32",
                       teacher_name="t", positions_per_shard=12)
    cache = TeacherCache(out)
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["shards"]) > 1 and meta["top_k"] == 8 and meta["vocab_size"] == 96
    assert cache.fingerprint == samples_fingerprint(data) and len(cache) == 5
    rows = [3, 0, 4]  # any batch order
    for i in rows:  # one sample at a time, then a packed row of three
        s = data.samples[i]
        x, y = torch.tensor([s.ids]), torch.tensor([s.labels])
        tid, tlp, tail = cache.lookup(i)
        assert tid.dtype == torch.int32 and tid.shape == (int((y != -100).sum()), 8)
        with torch.no_grad():
            t_logits = teacher(x)[0][y[0] != -100]
        want_ids, want_lp, want_tail = topk_targets(t_logits, 8)
        torch.testing.assert_close(tlp, want_lp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tail, want_tail, rtol=1e-5, atol=1e-5)
        assert torch.equal(tid, want_ids)
    ids = torch.tensor([sum((data.samples[i].ids for i in rows), [])])
    labels = torch.tensor([sum((data.samples[i].labels for i in rows), [])])
    doc = torch.tensor([sum(([d] * len(data.samples[i].ids) for d, i in enumerate(rows)), [])])
    pos = torch.tensor([sum((list(range(len(data.samples[i].ids))) for i in rows), [])])
    h = student(ids, position_ids=pos, document_ids=doc, return_hidden=True)
    got = kd_from_topk(h, student.head_weight, labels, *cache.gather(rows))
    with torch.no_grad():
        t_logits = teacher(ids, position_ids=pos, document_ids=doc)
    want = topk_reference(student(ids, position_ids=pos, document_ids=doc), t_logits, labels, 8)
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-5)


def test_cache_rejects_other_data(tmp_path):
    write_checkpoint(tmp_path / "teacher", "llama3", seed=1)
    teacher = md.load_model(tmp_path / "teacher", dtype=torch.float32)
    out = cache_logits(teacher, tiny_data(), tmp_path / "cache", top_k=4, dtype="fp16")
    cache = TeacherCache(out)
    assert cache.lookup(0)[1].dtype == torch.float32  # stored fp16, handed out fp32
    with pytest.raises(ValueError, match="fingerprint"):
        cache.check(tiny_data(seed=1))
    cache.check(tiny_data())


def test_short_kd_run_lowers_the_loss(tmp_path):
    write_checkpoint(tmp_path / "teacher", "qwen2", seed=1)
    write_checkpoint(tmp_path / "student", "llama3", seed=2)
    teacher = md.load_model(tmp_path / "teacher", dtype=torch.float32).eval()
    student = md.load_model(tmp_path / "student", dtype=torch.float32)
    md.apply_lora(student, md.LoraConfig(r=8, alpha=16, dropout=0.0))
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (4, 24), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, :8] = -100
    labels[:, -1] = -100
    with torch.no_grad():
        th = teacher(ids, return_hidden=True)
    losses = []
    for _ in range(15):
        h = student(ids, return_hidden=True)
        out = chunked_kd_loss(h, student.head_weight, th, teacher.head_weight, labels, kind="forward",
                              temperature=2.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
