"""KD losses against full-logits references, their limits, vocab alignment, the positions /
budget / in-place paths, and a short KD run that lowers the loss (the cache: test_teacher_cache.py)."""

import numpy as np
import pytest
import torch

import minidistill as md
from minidistill.kd import chunked_kd_loss, kd_from_topk, kd_loss_reference, topk_targets
from model_fixtures import write_checkpoint
from sync_count import CountSyncs

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
@pytest.mark.parametrize("chunk", [3, 1024, None])
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
@pytest.mark.parametrize("chunk", [4, None])
def test_kd_from_topk_matches_bucketed_reference(k, chunk):
    hs, ws, ht, wt, labels = make_inputs(Vs=40, Vt=40)
    mask = labels.reshape(-1) != -100
    t_logits = ht @ wt.t()
    ids, lq, tail = topk_targets(t_logits.reshape(-1, 40)[mask], k, temperature=1.5)
    a = hs.clone().requires_grad_()
    got = kd_from_topk(a, ws, labels, ids, lq, tail, temperature=1.5, chunk_size=chunk)
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


# ---------------------------------------------------------------------------- issue 13: positions, budget, in place

@pytest.mark.parametrize("kind", KINDS + ["topk"])
def test_positions_give_the_same_loss_without_host_syncs(kind):
    hs, ws, ht, wt, labels = make_inputs(seed=3, Vs=40, Vt=44)
    positions = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    n = positions.numel()
    if kind == "topk":
        ids, lq, tail = topk_targets((ht @ wt[:40].t()).reshape(-1, 40)[positions], 6, temperature=2.0)
        kw = dict(temperature=2.0, chunk_size=4, num_items=torch.tensor(n + 3))

        def loss(a, pos):
            return kd_from_topk(a, ws, labels, ids, lq, tail, positions=pos, **kw)
    else:
        def loss(a, pos):
            return chunked_kd_loss(a, ws, ht, wt, labels, kind=kind, temperature=2.0, chunk_size=4,
                                   num_items=torch.tensor(n + 3), positions=pos)
    results = {}
    for given in (False, True):
        a = hs.clone().requires_grad_()
        outs = []

        def step():
            outs.append(loss(a, positions if given else None))
            outs[0].loss.backward()

        with CountSyncs() as mode:
            step()
        results[given] = (outs[0], a.grad, mode.seen)
    (u, ug, usync), (g, gg, gsync) = results[False], results[True]
    assert any(s.startswith("aten.nonzero") for s in usync) and gsync == []
    assert g.num_tokens == u.num_tokens == n
    torch.testing.assert_close(g.loss, u.loss, rtol=0, atol=0)
    torch.testing.assert_close(gg, ug, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS + ["topk"])
def test_no_labelled_positions_give_zero(kind):
    hs, ws, ht, wt, labels = make_inputs()
    labels[:] = -100
    a, wa = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    if kind == "topk":
        empty = torch.zeros(0, 4, dtype=torch.int32)
        out = kd_from_topk(a, wa, labels, empty, empty.float(), torch.zeros(0), num_items=5)
    else:
        out = chunked_kd_loss(a, wa, ht, wt, labels, kind=kind, num_items=5)
    out.loss.backward()
    assert out.num_tokens == 0 and out.loss.item() == 0.0
    assert (a.grad == 0).all() and (wa.grad == 0).all()


def _peak_bytes(fn) -> int:
    """Peak CPU bytes allocated by torch while fn runs, above the start (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        pytest.skip("this torch's profiler exposes no memory events")
    events = sorted((e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("kind", KINDS + ["topk"])
def test_in_place_maths_holds_its_counted_buffers(kind):
    from minidistill.kd import _BUFFERS

    g = torch.Generator().manual_seed(0)
    N, H, V, c = 128, 16, 2048, 32  # one (c, V) fp32 buffer = 256 KiB
    ws, wt = torch.randn(V, H, generator=g) / 4, torch.randn(V, H, generator=g) / 4
    hs, ht = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    labels, pos = torch.randint(0, V, (N,), generator=g), torch.arange(N)
    a = hs.clone().requires_grad_()
    if kind == "topk":
        ids, lq, tail = topk_targets(ht @ wt.t(), 8)

        def step():
            kd_from_topk(a, ws, labels, ids, lq, tail, temperature=2.0, chunk_size=c, positions=pos).loss.backward()
    else:
        def step():
            chunked_kd_loss(a, ws, ht, wt, labels, kind=kind, temperature=2.0, chunk_size=c,
                            positions=pos).loss.backward()
    buffers = _peak_bytes(step) / (c * V * 4)
    assert _BUFFERS[kind] <= buffers < _BUFFERS[kind] + 0.25, buffers  # (the rest: N x H gradients, rows)


def test_bf16_kd_close_to_fp32_reference():
    hs, ws, ht, wt, labels = make_inputs(seed=5)
    hs, ws, ht, wt = (t.bfloat16() for t in (hs, ws, ht, wt))
    a = hs.clone().requires_grad_()
    got = chunked_kd_loss(a, ws, ht, wt, labels, kind="jsd", temperature=2.0, chunk_size=5)
    got.loss.backward()
    b = hs.float().requires_grad_()
    want = kd_loss_reference(b @ ws.float().t(), (ht @ wt.t()).float(), labels, kind="jsd", temperature=2.0)
    want.loss.backward()
    assert a.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got.loss, want.loss, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(a.grad.float(), b.grad, rtol=5e-2, atol=2e-3)


def test_kd_from_topk_row_mask_drops_rows_exactly():
    """row_mask (cross-tokenizer caches): masked rows add no loss and no gradient; the others give
    what they give alone, with the same denominator."""
    hs, ws, ht, wt, labels = make_inputs(Vs=40, Vt=40)
    mask = labels.reshape(-1) != -100
    n = int(mask.sum())
    ids, lq, tail = topk_targets((ht @ wt.t()).reshape(-1, 40)[mask], 6)
    keep = torch.arange(n) % 3 != 0
    a = hs.clone().requires_grad_()
    got = kd_from_topk(a, ws, labels, ids, lq, tail, num_items=n, chunk_size=4, row_mask=keep)
    got.loss.backward()
    pos = mask.nonzero().squeeze(1)
    sub = torch.full_like(labels.reshape(-1), -100)
    sub[pos[keep]] = 1  # only the kept positions labelled
    b = hs.clone().requires_grad_()
    want = kd_from_topk(b, ws, sub.reshape(labels.shape), ids[keep], lq[keep], tail[keep], num_items=n)
    want.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert got.num_tokens == n and a.grad.reshape(-1, a.shape[-1])[pos[~keep]].abs().max() == 0
    with pytest.raises(ValueError, match=rf"row_mask must be \(N,\) = \({n},\)"):
        kd_from_topk(hs, ws, labels, ids, lq, tail, row_mask=keep[1:])
