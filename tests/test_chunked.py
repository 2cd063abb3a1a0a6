"""The chunked-head autograd function every loss uses, with a loss of its own (squared error on
the logits) against full-logits autograd; chunk rows from a memory budget; the position,
denominator and dtype helpers."""

import pytest
import torch

from minidistill.chunked import (
    chunk_bounds,
    chunk_rows,
    chunked_head,
    compute_dtype,
    labelled_positions,
    loss_denominator,
    resolve_chunk_size,
    rows_at,
)

N, H, V = 10, 8, 13


def _inputs(seed=0, dtype=torch.float32, extra_rows=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V + extra_rows, H, generator=g) / H**0.5
    target = torch.randn(N, V, generator=g)
    return h.to(dtype), w.to(dtype), target


def squared_error(target, calls=None):
    """A chunk_fn: per row 0.5 * ||logits - target||^2, gradient logits - target (in place)."""
    def fn(s, e, logits, need_grad):
        if calls is not None:
            calls.append((s, e, need_grad))
        d = logits.sub_(target[s:e])  # (c, V), the buffer the base handed over
        loss = 0.5 * d.pow(2).sum(-1)  # (c,)
        return loss, (d if need_grad else None)
    return fn


def _reference(h, w, target, vocab=None):
    h, w = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    vocab = w.shape[0] if vocab is None else vocab
    loss = 0.5 * (h @ w[:vocab].t() - target).pow(2).sum()
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 3, N, N + 5])  # divides N or not; one chunk; chunk > N
def test_any_chunk_fn_gets_exact_value_and_gradients(chunk):
    h, w, target = _inputs()
    calls = []
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = chunked_head(hh, ww, squared_error(target, calls), chunk_size=chunk)
    (2.5 * loss).backward()  # backward scales the saved gradients by the incoming one
    want, gh, gw = _reference(h, w, target)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hh.grad, 2.5 * gh, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ww.grad, 2.5 * gw, rtol=1e-6, atol=1e-5)
    assert [(s, e) for s, e, _ in calls] == chunk_bounds(N, chunk)  # every row once, in order
    assert all(need for _, _, need in calls)
    assert len(calls) == -(-N // chunk) and max(e - s for s, e, _ in calls) <= chunk


def test_chunk_bounds_are_even_and_cover_every_row_once():
    # 193 labelled rows in chunks of at most 192 (Phi-4-mini, bf16): two of 96/97, not 192 + 1
    assert chunk_bounds(193, 192) == [(0, 96), (96, 193)]
    assert chunk_bounds(10, 3) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert chunk_bounds(10, 10) == chunk_bounds(10, 15) == [(0, 10)]
    assert chunk_bounds(0, 4) == []
    for n in range(1, 60):
        for c in range(1, 20):
            b = chunk_bounds(n, c)
            sizes = [e - s for s, e in b]
            assert b[0][0] == 0 and b[-1][1] == n and all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
            assert len(b) == -(-n // c) and max(sizes) <= c and max(sizes) - min(sizes) <= 1


def test_rows_past_vocab_get_no_logits_and_zero_gradient():
    h, w, target = _inputs(extra_rows=3)  # a head padded to 16 rows, 13 real tokens
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = chunked_head(hh, ww, squared_error(target), chunk_size=4, vocab=V)
    loss.backward()
    want, gh, gw = _reference(h, w, target, vocab=V)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ww.grad, gw, rtol=1e-6, atol=1e-5)
    assert ww.grad.shape == (V + 3, H) and (ww.grad[V:] == 0).all()


def test_gradients_only_where_asked_and_one_backward():
    h, w, target = _inputs()
    calls = []
    with torch.no_grad():
        loss = chunked_head(h.clone().requires_grad_(), w, squared_error(target, calls), chunk_size=4)
    assert not loss.requires_grad and {c[2] for c in calls} == {False}  # no gradient computed at all
    torch.testing.assert_close(loss, _reference(h, w, target)[0], rtol=1e-6, atol=1e-5)
    hh = h.clone().requires_grad_()  # a frozen head: no head gradient is accumulated
    loss = chunked_head(hh, w, squared_error(target), chunk_size=4)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(hh.grad, _reference(h, w, target)[1], rtol=1e-6, atol=1e-5)
    assert w.grad is None
    with pytest.raises(RuntimeError, match="inplace"):  # the saved gradients were scaled in place
        loss.backward()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_low_precision_heads_keep_their_dtype_and_stay_close(dtype, tol):
    h, w, target = _inputs(dtype=dtype)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = chunked_head(hh, ww, squared_error(target), chunk_size=3)
    loss.backward()
    want, gh, gw = _reference(h, w, target)  # fp32 maths from the same rounded inputs
    assert loss.dtype == torch.float32 and hh.grad.dtype == ww.grad.dtype == dtype
    torch.testing.assert_close(loss, want, rtol=tol, atol=tol)
    torch.testing.assert_close(hh.grad.float(), gh, rtol=tol, atol=tol * gh.abs().max().item())
    torch.testing.assert_close(ww.grad.float(), gw, rtol=tol, atol=tol * gw.abs().max().item())


def test_bad_shapes_are_named():
    h, w, target = _inputs()
    with pytest.raises(ValueError, match=r"h \(N, H\) and weight \(V, H\), got \(10, 8\) and \(13, 4\)"):
        chunked_head(h, w[:, :4], squared_error(target), chunk_size=4)


def test_chunk_rows_from_budget():
    # Phi-4-mini: one fp32 (c, V) buffer, 200,064 * 4 + 3072 * 12 bytes a row -> 320 rows in 256 MiB;
    # bf16 adds the compute-dtype logits (2 bytes) -> 216 rows.
    assert chunk_rows(200064, 3072, torch.float32, buffers=1) == 320
    assert chunk_rows(200064, 3072, torch.bfloat16, buffers=1) == 216
    assert chunk_rows(200064, 3072, torch.float32, buffers=3) == 110  # KD keeps three
    assert chunk_rows(200064, 3072, torch.float32, buffers=1, budget_mb=1024) == 1282
    assert chunk_rows(200064, 3072, torch.float32, buffers=4, budget_mb=1) == 16  # floor
    with pytest.raises(ValueError, match="chunk_budget_mb"):
        chunk_rows(100, 8, torch.float32, buffers=1, budget_mb=0)


def test_resolve_chunk_size():
    assert resolve_chunk_size(None, 256.0, 200064, 3072, torch.float32, 1) == chunk_rows(
        200064, 3072, torch.float32, buffers=1) == 320
    # The budget's count as it is (no rounding to a tile multiple).
    assert chunk_rows(1000, 8, torch.float32, buffers=1, budget_mb=20 * (4000 + 96) / 2**20) == 20
    assert resolve_chunk_size(7, 256.0, 100, 8, torch.float32, 1) == 7  # given: used as is
    with pytest.raises(ValueError, match="chunk_size must be >= 1 .* got 0"):
        resolve_chunk_size(0, 256.0, 100, 8, torch.float32, 1)


def test_labelled_positions_and_rows_at():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.tensor([[-100, 5, 6], [7, -100, -100]])
    pos = labelled_positions(hidden, labels, None, -100)
    assert pos.tolist() == [1, 2, 3] and pos.dtype == torch.long
    given = labelled_positions(hidden, labels, torch.tensor([1, 2, 3], dtype=torch.int32), -100)
    assert given.dtype == torch.long and given.tolist() == [1, 2, 3]
    rows = rows_at(hidden, pos)  # (3, 4)
    assert torch.equal(rows, torch.stack([hidden[0, 1], hidden[0, 2], hidden[1, 0]]))
    rows.sum().backward()  # the gradient lands on the picked rows only
    assert hidden.grad.sum(-1).tolist() == [[0.0, 4.0, 4.0], [4.0, 0.0, 0.0]]
    flat = labelled_positions(torch.zeros(6, 4), labels.reshape(-1), None, -100)
    assert flat.tolist() == [1, 2, 3]


def test_labelled_positions_errors_name_the_shapes():
    hidden, labels = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"student must be \(B, T, H\) or \(N, H\), got shape \(2, 3, 4, 1\)"):
        labelled_positions(hidden[..., None], labels, None, -100, "student")
    with pytest.raises(ValueError, match=r"labels shape \(2, 2\) must equal hidden's leading shape \(2, 3\)"):
        labelled_positions(hidden, labels[:, :2], None, -100)
    with pytest.raises(ValueError, match="1-D integer tensor .* got torch.bool of shape \\(2, 3\\)"):
        labelled_positions(hidden, labels, labels == 0, -100)
    with pytest.raises(ValueError, match="got torch.float32"):
        labelled_positions(hidden, labels, torch.tensor([0.0]), -100)


def test_loss_denominator():
    cpu = torch.device("cpu")
    assert loss_denominator(None, 7, cpu) == 7.0 and loss_denominator(None, 0, cpu) == 1.0
    assert loss_denominator(12, 7, cpu) == 12.0  # the whole accumulated batch's count wins
    assert loss_denominator(0, 0, cpu) == 1.0  # an empty batch: loss 0, not NaN
    n = loss_denominator(torch.tensor(9), 3, cpu)
    assert n.dtype == torch.float32 and n.item() == 9.0
    assert loss_denominator(torch.tensor(0), 0, cpu).item() == 1.0
    with pytest.raises(ValueError, match="num_items=0 but this batch has 3 labelled tokens"):
        loss_denominator(0, 3, cpu)


def test_compute_dtype_follows_autocast_for_fp32_heads_only():
    cpu = torch.device("cpu")
    w32, w16 = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bfloat16)
    assert compute_dtype(cpu, w32) == torch.float32 and compute_dtype(cpu, w16) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(cpu, w32) == torch.bfloat16
        assert compute_dtype(cpu, w16.half()) == torch.float16  # a 16-bit head keeps its own dtype
