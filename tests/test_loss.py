import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minidistill.loss import (
    IGNORE_INDEX,
    LossOutput,
    chunked_cross_entropy,
    cross_entropy_reference,
    shift_labels,
)

B, T, H, V = 3, 11, 16, 97


def _inputs(seed=0, B=B, T=T, H=H, V=V, frac_labelled=0.6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) > frac_labelled] = IGNORE_INDEX
    return hidden, weight, labels


def _leaves(*ts, requires_grad=(True, True)):
    return [t.clone().requires_grad_(r) for t, r in zip(ts, requires_grad)]


def _run_chunked(hidden, weight, labels, requires_grad=(True, True), **kw):
    h, w = _leaves(hidden, weight, requires_grad=requires_grad)
    out = chunked_cross_entropy(h, w, labels, **kw)
    out.loss.backward()
    return out, h.grad, w.grad


def _run_reference(hidden, weight, labels, requires_grad=(True, True), weights=None, num_items=None):
    h, w = _leaves(hidden.float(), weight.float(), requires_grad=requires_grad)
    out = cross_entropy_reference(h @ w.t(), labels, weights=weights, num_items=num_items)
    out.loss.backward()
    return out, h.grad, w.grad


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_reference_matches_f_cross_entropy_mean():
    hidden, weight, labels = _inputs()
    logits = hidden @ weight.t()
    out = cross_entropy_reference(logits, labels)
    _close(out.loss, F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1)))


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 10, 1024])  # divides N=20 or not; N < chunk
def test_value_and_grads_match_full_logits(chunk_size):
    hidden, weight, _ = _inputs()
    g = torch.Generator().manual_seed(1)
    labels = torch.full((B, T), IGNORE_INDEX)
    labels.view(-1)[torch.randperm(B * T, generator=g)[:20]] = torch.randint(0, V, (20,), generator=g)
    out, gh, gw = _run_chunked(hidden, weight, labels, chunk_size=chunk_size)
    ref, rgh, rgw = _run_reference(hidden, weight, labels)
    assert isinstance(out, LossOutput) and out.num_tokens == 20 == ref.num_tokens
    full = F.cross_entropy((hidden @ weight.t()).reshape(-1, V), labels.reshape(-1))
    _close(out.loss, full)
    _close(out.loss_sum, ref.loss_sum)
    _close(gh, rgh)
    _close(gw, rgw)
    assert not out.loss_sum.requires_grad
    # Unlabelled positions get exactly zero gradient.
    assert (gh[labels == IGNORE_INDEX] == 0).all()


def test_flat_hidden_and_frozen_head():
    hidden, weight, labels = _inputs()
    h2, l2 = hidden.reshape(-1, H), labels.reshape(-1)
    out, gh, gw = _run_chunked(h2, weight, l2, requires_grad=(True, False), chunk_size=8)
    ref, rgh, rgw = _run_reference(h2, weight, l2, requires_grad=(True, False))
    assert gw is None and rgw is None
    _close(out.loss, ref.loss)
    _close(gh, rgh)


def test_trainable_head_only():
    hidden, weight, labels = _inputs()
    out, gh, gw = _run_chunked(hidden, weight, labels, requires_grad=(False, True), chunk_size=5)
    ref, _, rgw = _run_reference(hidden, weight, labels, requires_grad=(False, True))
    assert gh is None
    _close(out.loss, ref.loss)
    _close(gw, rgw)


def test_per_position_weights():
    hidden, weight, labels = _inputs()
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) * 2
    out, gh, gw = _run_chunked(hidden, weight, labels, weights=weights, chunk_size=6)
    ref, rgh, rgw = _run_reference(hidden, weight, labels, weights=weights)
    _close(out.loss, ref.loss)
    _close(gh, rgh)
    _close(gw, rgw)
    # Explicit: sum_i w_i * ce_i / num_labelled.
    ce = F.cross_entropy((hidden @ weight.t()).reshape(-1, V), labels.reshape(-1), reduction="none")
    mask = labels.reshape(-1) != IGNORE_INDEX
    _close(out.loss, (ce * weights.reshape(-1))[mask].sum() / mask.sum())


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_two_micro_batches_equal_one_big_batch(as_tensor):
    hidden, weight, labels = _inputs(B=4, frac_labelled=0.5)
    labels[:2, : T - 3] = IGNORE_INDEX  # micro-batches with very different token counts
    total = int((labels != IGNORE_INDEX).sum())
    num_items = torch.tensor(total) if as_tensor else total

    h, w = _leaves(hidden, weight)
    outs = [
        chunked_cross_entropy(h[i : i + 2], w, labels[i : i + 2], num_items=num_items, chunk_size=4)
        for i in (0, 2)
    ]
    assert outs[0].num_tokens != outs[1].num_tokens
    for o in outs:
        o.loss.backward()
    big, bgh, bgw = _run_chunked(hidden, weight, labels, chunk_size=4)
    _close(outs[0].loss + outs[1].loss, big.loss)
    _close(h.grad, bgh)
    _close(w.grad, bgw)
    assert outs[0].num_tokens + outs[1].num_tokens == big.num_tokens == total


def test_no_labelled_tokens():
    hidden, weight, labels = _inputs()
    labels[:] = IGNORE_INDEX
    for num_items in (None, 0, torch.tensor(0), 7):
        out, gh, gw = _run_chunked(hidden, weight, labels, num_items=num_items)
        assert out.num_tokens == 0 and int(out.num_correct) == 0
        assert out.loss.item() == 0.0 and out.loss.requires_grad
        assert (gh == 0).all() and (gw == 0).all()


def test_num_items_zero_with_tokens_fails():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="num_items=0"):
        chunked_cross_entropy(hidden, weight, labels, num_items=0)


def test_accuracy_counts():
    hidden, weight, labels = _inputs(seed=4)
    logits = hidden @ weight.t()
    pred = logits.argmax(-1)
    mask = labels != IGNORE_INDEX
    hit = mask & (torch.rand(B, T, generator=torch.Generator().manual_seed(5)) < 0.5)
    labels[hit] = pred[hit]  # about half the labelled positions predicted right
    expected = int(((pred == labels) & mask).sum())
    assert expected > 0
    for cs in (3, 1024):
        out = chunked_cross_entropy(hidden, weight, labels, chunk_size=cs)
        assert int(out.num_correct) == expected == int(cross_entropy_reference(logits, labels).num_correct)


def test_bf16_close_to_fp32_reference():
    hidden, weight, labels = _inputs(seed=6, dtype=torch.bfloat16)
    out, gh, gw = _run_chunked(hidden, weight, labels, chunk_size=7)
    assert out.loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    # Reference in fp32 on the same (bf16-valued) inputs: only the gradient's final cast differs.
    ref, rgh, rgw = _run_reference(hidden, weight, labels)
    _close(out.loss, ref.loss)
    torch.testing.assert_close(gh.float(), rgh, atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(gw.float(), rgw, atol=1e-3, rtol=1e-2)


def test_no_grad_skips_gradients():
    hidden, weight, labels = _inputs()
    h, w = _leaves(hidden, weight)
    with torch.no_grad():
        out = chunked_cross_entropy(h, w, labels, chunk_size=4)
    assert not out.loss.requires_grad
    _close(out.loss, cross_entropy_reference(hidden @ weight.t(), labels).loss)


def test_second_backward_is_refused():
    hidden, weight, labels = _inputs()
    h, w = _leaves(hidden, weight)
    out = chunked_cross_entropy(h, w, labels)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        out.loss.backward()


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_memory_is_chunk_by_vocab_not_tokens_by_vocab():
    # N = 60 labelled positions, chunk 24 (> H, so chunk x V is the largest legitimate
    # tensor), V = 97: saved tensors must be the N x H and V x H gradients only, and no op in
    # forward or backward may produce anything as large as N x V.
    Bm, Tm, chunk = 4, 15, 24
    hidden, weight, labels = _inputs(B=Bm, T=Tm, frac_labelled=2.0)
    N = Bm * Tm
    h, w = _leaves(hidden, weight)

    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with _LargestAllocation() as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = chunked_cross_entropy(h, w, labels, chunk_size=chunk)
        out.loss.backward()
    assert out.num_tokens == N
    # The gather saves its (N,) index; the Function saves exactly the two gradients.
    assert sorted(s for s in saved if len(s) == 2) == sorted([(N, H), (V, H)])
    assert all(len(s) <= 2 and (len(s) < 2 or s in [(N, H), (V, H)]) for s in saved), saved
    numels = [torch.Size(s).numel() for s in mode.shapes]
    assert (N, V) not in mode.shapes and (V, N) not in mode.shapes
    # 60 rows in chunks of at most 24: three of 20 (even chunks, no short last one)
    assert max(numels) == 20 * V < chunk * V < N * V, (max(numels), mode.shapes)
    assert (20, V) in mode.shapes


def test_shift_labels():
    labels = torch.tensor([[1, 2, 3, -100], [-100, 5, 6, 7]])
    assert shift_labels(labels).tolist() == [[2, 3, -100, -100], [5, 6, 7, -100]]
    assert shift_labels(torch.tensor([4, 5]), ignore_index=-1).tolist() == [5, -1]


def test_shift_labels_matches_full_logits_next_token_loss():
    hidden, weight, labels = _inputs()
    logits = hidden @ weight.t()  # (B, T, V)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    _close(chunked_cross_entropy(hidden, weight, shift_labels(labels), chunk_size=5).loss, expected)


def test_bad_shapes_fail_with_values():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match=r"\(3, 10\)"):
        chunked_cross_entropy(hidden, weight, labels[:, :10])
    with pytest.raises(ValueError, match="head_weight"):
        chunked_cross_entropy(hidden, weight[:, :8], labels)


# ---------------------------------------------------------------------------- issue 13: chunk sizing, positions, fp16


@pytest.mark.parametrize("shape", [(1, 1, 3, 2), (2, 13, 5, 7), (3, 11, 16, 97)])  # (B, T, H, V)
@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_odd_shapes_match_full_logits(shape, chunk_size):
    Bs, Ts, Hs, Vs = shape
    hidden, weight, labels = _inputs(seed=7, B=Bs, T=Ts, H=Hs, V=Vs, frac_labelled=0.7)
    labels.view(-1)[0] = 1  # at least one labelled position
    weights = torch.rand(Bs, Ts, generator=torch.Generator().manual_seed(8)) + 0.5
    out, gh, gw = _run_chunked(hidden, weight, labels, weights=weights, chunk_size=chunk_size)
    ref, rgh, rgw = _run_reference(hidden, weight, labels, weights=weights)
    _close(out.loss, ref.loss)
    _close(gh, rgh)
    _close(gw, rgw)


def test_auto_chunk_keeps_transients_within_the_budget():
    Bm, Tm = 4, 15  # N = 60 labelled positions
    hidden, weight, labels = _inputs(B=Bm, T=Tm, frac_labelled=2.0)
    budget_rows = 24  # fp32 budget of 24 rows (below 32: not rounded): 97 * 4 + 16 * 12 bytes each
    budget_mb = budget_rows * (V * 4 + H * 12) / 2**20
    h, w = _leaves(hidden, weight)
    with _LargestAllocation() as mode:
        out = chunked_cross_entropy(h, w, labels, chunk_budget_mb=budget_mb)
        out.loss.backward()
    # chunks of at most 24 rows: 60 rows run as three of 20
    assert (20, V) in mode.shapes
    assert max(torch.Size(s).numel() for s in mode.shapes if V in s) == 20 * V <= budget_rows * V
    ref, rgh, _ = _run_reference(hidden, weight, labels)
    _close(out.loss, ref.loss)
    _close(h.grad, rgh)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_positions_from_the_collator_skip_nonzero_and_give_the_same_result():
    hidden, weight, labels = _inputs(seed=9)
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(10))
    positions = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)  # what the collator precomputes
    runs = {}
    for given in (False, True):
        h, w = _leaves(hidden, weight)
        with _OpCounter() as ops:
            out = chunked_cross_entropy(h, w, labels, weights=weights, chunk_size=4, num_items=torch.tensor(30),
                                        positions=positions if given else None)
            out.loss.backward()
        runs[given] = (out, h.grad, w.grad, ops.names)
    (a, ah, aw, a_ops), (b, bh, bw, b_ops) = runs[False], runs[True]
    assert "nonzero" in a_ops  # the counter sees the sync when positions are not given
    assert "nonzero" not in b_ops and "_local_scalar_dense" not in b_ops and "item" not in b_ops
    assert b.num_tokens == a.num_tokens == positions.numel()
    _close(b.loss, a.loss, tol=0)
    _close(bh, ah, tol=0)
    _close(bw, aw, tol=0)


def test_positions_must_be_integer_indices():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="1-D integer tensor"):
        chunked_cross_entropy(hidden, weight, labels, positions=labels != IGNORE_INDEX)


def _confident_fp16(seed=11, N=6, Hc=16, Vc=50, gap=25.0):
    """fp16 rows whose label logit beats every other by ~gap nats: softmax - onehot is ~1e-11 per
    entry, below fp16's smallest subnormal (6e-8), so a gradient cast to fp16 before the loss
    scale is applied is exactly zero."""
    g = torch.Generator().manual_seed(seed)
    h = torch.linalg.qr(torch.randn(Hc, Hc, generator=g))[0][:N] * 3  # orthogonal rows: one label each
    y = torch.randperm(Vc, generator=g)[:N]
    w = torch.randn(Vc, Hc, generator=g) * 0.05
    w[y] = h * (gap / h.pow(2).sum(-1, keepdim=True))
    return h.half(), w.half(), y


def test_fp16_tiny_gradient_survives_a_large_loss_scale():
    h16, w16, y = _confident_fp16()
    N = h16.shape[0]
    scale = 2.0**20  # a GradScaler scale after many steps without overflow
    # Reference in fp64 from the same fp16 logits the chunked loss computes.
    logits = (h16 @ w16.t()).double()
    dl = torch.softmax(logits, -1) - torch.nn.functional.one_hot(y, w16.shape[0]).double()  # (N, V)
    assert (dl.half() == 0).all()  # cast before scaling, every entry vanishes
    want_h = dl @ w16.double() * (scale / N)
    want_w = dl.t() @ h16.double() * (scale / N)
    for chunk in (4, None):
        h, w = h16.clone().requires_grad_(), w16.clone().requires_grad_()
        out = chunked_cross_entropy(h, w, y, chunk_size=chunk)
        (out.loss * scale).backward()
        assert h.grad.dtype == w.grad.dtype == torch.float16
        assert (h.grad != 0).all()
        torch.testing.assert_close(h.grad.double(), want_h, rtol=1e-2, atol=1e-3 * want_h.abs().max().item())
        big = want_w.abs() > 1e-2 * want_w.abs().max()  # the head rows that carry the gradient
        assert (w.grad[big] != 0).all()
        torch.testing.assert_close(w.grad.double(), want_w, rtol=2e-2, atol=2e-3 * want_w.abs().max().item())


def test_fp16_close_to_fp32_reference():
    hidden, weight, labels = _inputs(seed=12, dtype=torch.float16)
    out, gh, gw = _run_chunked(hidden, weight, labels, chunk_size=7)
    assert out.loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float16
    ref, rgh, rgw = _run_reference(hidden, weight, labels)
    torch.testing.assert_close(out.loss, ref.loss, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(gh.float(), rgh, atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(gw.float(), rgw, atol=1e-3, rtol=1e-2)


def test_ce_holds_one_chunk_buffer():
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(13)
    N, Hc, Vc, c = 128, 16, 2048, 32  # one (c, V) fp32 buffer = 256 KiB
    h = torch.randn(N, Hc, generator=g).requires_grad_()
    w = torch.randn(Vc, Hc, generator=g) / 4
    y = torch.randint(0, Vc, (N,), generator=g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        chunked_cross_entropy(h, w, y, chunk_size=c, positions=torch.arange(N)).loss.backward()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        pytest.skip("this torch's profiler exposes no memory events")
    cur = peak = 0
    for e in sorted((e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    assert 1 <= peak / (c * Vc * 4) < 1.25, peak / (c * Vc * 4)  # the logits, reused in place


def test_fp32_head_under_autocast_runs_in_the_autocast_dtype():
    hidden, weight, labels = _inputs(seed=14)
    h, w = _leaves(hidden, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16), _LargestAllocation() as mode:
        out = chunked_cross_entropy(h, w, labels, chunk_size=8)
    out.loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    ref, rgh, rgw = _run_reference(hidden, weight, labels)
    assert (V, H) in mode.shapes  # the head cast once to bf16 (as F.linear would), not per chunk
    assert not torch.allclose(out.loss, ref.loss, atol=1e-6, rtol=0)  # it did run in bf16
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(h.grad, rgh, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(w.grad, rgw, atol=2e-3, rtol=2e-2)
