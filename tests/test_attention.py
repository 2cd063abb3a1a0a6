"""The attention entry point against the dense-mask reference (the pre-issue-12 path), in values and
gradients over odd shapes; the varlen call against a CPU stand-in with its signature; no T x T
tensor in a packed training step."""

import functools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import minidistill as md
from minidistill import attention as A
from minidistill import doc_attention as D
from minidistill.attention import dense_mask_attention, doc_layout
from minidistill.config import ModelConfig
from minidistill.loss import chunked_cross_entropy
from minidistill.model import Transformer

# Rows of document lengths and the row length T: documents of length 1, a document filling
# its row, many tiny documents, padding at the end of a row, a row of padding only.
LAYOUTS = {
    "len-1": ([[1, 5, 1], [3, 1]], 8),
    "fill": ([[24], [9, 15]], 24),
    "tiny": ([[2, 1, 3, 1, 1, 4, 2, 1, 1, 1, 2, 3], [1] * 7], 22),
    "pad": ([[10, 7], [5], []], 20),
}
HEADS = [(4, 4), (3, 1), (8, 2), (8, 1)]  # GQA ratios 1, 3, 4, 8
WINDOWS = [None, 3, 50]  # full causal, shorter than most documents, longer than every one


def document_ids(rows, T):
    """The old collator's ids: sample index within the row, padding a document of its own."""
    doc = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        t = 0
        for d, n in enumerate(r):
            doc[b, t: t + n] = d
            t += n
        doc[b, t:] = len(r)
    return doc


def real_mask(rows, T):
    return torch.arange(T)[None, :] < torch.tensor([sum(r) for r in rows])[:, None]  # (B, T)


def varlen_reference(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch.nn.attention.varlen.varlen_attn's documented semantics, per document on the CPU:
    query i of a document sees key j of it when i - left <= j <= i + right (-1: no bound)."""
    assert cu_seq_q.dtype == torch.int32 and cu_seq_q is cu_seq_k and isinstance(max_q, int) and max_q == max_k
    cu = cu_seq_q.tolist()
    assert max_q == max(b - a for a, b in zip(cu, cu[1:]))
    assert enable_gqa == (q.shape[1] != k.shape[1]), "GQA flag must be set exactly when heads differ"
    left, right = window_size
    out = []
    for s, e in zip(cu, cu[1:]):
        i, j = torch.arange(e - s)[:, None], torch.arange(e - s)[None, :]
        m = torch.ones(e - s, e - s, dtype=torch.bool)
        if left >= 0:
            m &= j >= i - left
        if right >= 0:
            m &= j <= i + right
        kk, vv = k[s:e], v[s:e]
        if enable_gqa:
            rep = q.shape[1] // k.shape[1]
            kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
        y = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), attn_mask=m, scale=scale)
        out.append(y.transpose(0, 1))
    return torch.cat(out)


def inputs(rows, T, nh, nkv, hd=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(rows)
    q, k, v = (torch.randn(B, T, h, hd, generator=g) for h in (nh, nkv, nkv))
    return q, k, v, torch.randn(B, T, nh, hd, generator=g)


def run(fn, q, k, v, w, real, dtype):
    """Output at real tokens and the q, k, v gradients of a weighted sum of those outputs."""
    q, k, v = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
    y = fn(q, k, v)
    (y.float() * w)[real].sum().backward()
    return [t.float() for t in (y.detach()[real], q.grad, k.grad, v.grad)]


def check_close(got, ref, ref_lowp=None):
    """fp32: tight. Low precision: error to the fp32 reference <= 2x the reference's own error."""
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        err = (a - b).abs().max().item()
        if ref_lowp is None:
            assert err <= 2e-5, f"{name}: max err {err:.2e}"
        else:
            ref_err = (ref_lowp[("out", "dq", "dk", "dv").index(name)] - b).abs().max().item()
            assert err <= 2 * ref_err + 2e-3, f"{name}: err {err:.2e} vs bf16 reference err {ref_err:.2e}"


KERNELS = {
    "per-document": D.per_document_attention,
    "per-document-tile4": functools.partial(D.per_document_attention, tile=4),  # long docs in blocks
    # the same segments through plain SDPA + autograd (what CUDA without Flex runs)
    "per-document-sdpa": lambda q, k, v, lay, w: D.per_document_sdpa(q, k, v, D._segments(lay.lengths, w, D.TILE,
                                                                                           q.device)),
    "per-document-sdpa-tile4": lambda q, k, v, lay, w: D.per_document_sdpa(q, k, v, D._segments(lay.lengths, w, 4,
                                                                                                 q.device)),
    "varlen-call": functools.partial(A.varlen_attention, kernel=varlen_reference),
    # what compiled blocks run on the CPU: the custom op (flash kernel + its own backward)
    "doc-attention-op": lambda q, k, v, lay, w: torch.ops.minidistill.doc_attention_fwd(
        q, k, v, lay.cu_seqlens, -1 if w is None else w, D.TILE)[0],
    "doc-attention-op-tile4": lambda q, k, v, lay, w: torch.ops.minidistill.doc_attention_fwd(
        q, k, v, lay.cu_seqlens, -1 if w is None else w, 4)[0],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w}")
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_packed_paths_equal_dense_reference(monkeypatch, kernel, layout, window, dtype):
    rows, T = LAYOUTS[layout]
    monkeypatch.setitem(A.KERNELS, "per-document", KERNELS[kernel])  # what the CPU dispatch runs
    lay, doc, real = doc_layout(rows, T), document_ids(rows, T), real_mask(rows, T)
    for nh, nkv in HEADS:
        q, k, v, w = inputs(rows, T, nh, nkv, seed=nh + nkv)
        ours = functools.partial(A.attend, window=window, layout=lay)
        dense = functools.partial(dense_mask_attention, document_ids=doc, window=window)
        ref = run(dense, q, k, v, w, real, torch.float32)
        if dtype == torch.float32:
            check_close(run(ours, q, k, v, w, real, dtype), ref)
        else:
            check_close(run(ours, q, k, v, w, real, dtype), ref, run(dense, q, k, v, w, real, dtype))


def test_cpu_plan_runs_documents_alone_and_groups_only_tiny_ones():
    # Documents above GROUP tokens run alone, causal with no mask (the kernel then skips the blocks
    # above the diagonal); only runs of documents within GROUP tokens share one masked call.
    assert D.GROUP == 32
    plan = D._segments([100, 10, 10, 20, 40, 600], None, 512, torch.device("cpu"))
    assert [(L, back, m is None) for L, back, m in plan] == [
        (100, 0, True), (20, 0, False), (20, 0, True), (40, 0, True), (600, 0, True)]
    want = torch.zeros(20, 20, dtype=torch.bool)
    want[:10, :10] = want[10:, 10:] = torch.ones(10, 10, dtype=torch.bool).tril()  # two documents, causal
    assert torch.equal(plan[1][2], want)
    # a window shorter than a lone document: its own (L, L) causal + window mask, no other document
    (L, back, m), = D._segments([40], 5, 512, torch.device("cpu"))
    idx = torch.arange(40)
    assert (L, back) == (40, 0) and torch.equal(m, (idx[None] <= idx[:, None]) & (idx[None] > idx[:, None] - 5))


def test_padding_takes_no_part():
    rows, T = [[3, 2], [4]], 8
    q, k, v, _ = inputs(rows, T, 4, 2)
    lay = doc_layout(rows, T)
    y = A.attend(q, k, v, window=None, layout=lay)
    real = real_mask(rows, T)
    assert (y[~real] == 0).all()
    k2, v2 = k.clone(), v.clone()
    k2[~real], v2[~real] = 1e4, -1e4  # padding keys and values, if seen, would swamp the result
    assert torch.equal(A.attend(q, k2, v2, window=None, layout=lay)[real], y[real])


def test_varlen_call_arguments_and_window_off_by_one():
    calls = []

    def kernel(*args, **kw):
        calls.append((args, kw))
        return varlen_reference(*args, **kw)

    lay = doc_layout([[10, 3], [6]], 13)
    q, k, v, _ = inputs([[10, 3], [6]], 13, 4, 2)
    flat = [t.reshape(26, t.shape[2], 8)[lay.token_index] for t in (q, k, v)]
    A.varlen_attention(*flat, lay, 4, kernel=kernel)
    A.varlen_attention(*flat, lay, None, kernel=kernel)
    (args, kw), (_, kw_full) = calls
    assert args[3].tolist() == [0, 10, 13, 19] and args[3].dtype == torch.int32 and args[5] == args[6] == 10
    assert kw == dict(window_size=(3, 0), enable_gqa=True) and kw_full["window_size"] == (-1, 0)
    # Window 4 in the config's sense (q - 4 < k <= q) = 4 keys: query 9 of the first document
    # sees keys 6..9, exactly what the dense reference says.
    out = A.varlen_attention(*flat, lay, 4, kernel=varlen_reference)
    want = dense_mask_attention(q, k, v, document_ids([[10, 3], [6]], 13), 4)
    assert torch.allclose(out[9], want[0, 9], atol=1e-6)
    only = torch.nn.functional.scaled_dot_product_attention(
        q[0, 9:10].transpose(0, 1), k[0, 6:10].repeat_interleave(2, 1).transpose(0, 1),
        v[0, 6:10].repeat_interleave(2, 1).transpose(0, 1)).transpose(0, 1)[0]
    assert torch.allclose(out[9], only, atol=1e-6)


@pytest.mark.parametrize("window", [None, 3])
def test_flex_forward_equals_dense_reference(window):
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention
    rows, T = LAYOUTS["pad"]
    lay, real = doc_layout(rows, T), real_mask(rows, T)
    q, k, v, _ = inputs(rows, T, 8, 2, hd=16)
    flat = [t.reshape(-1, t.shape[2], 16)[lay.token_index] for t in (q, k, v)]
    with torch.no_grad():  # FlexAttention has no backward on the CPU: the gpu test covers it
        got = A.flex_attention_packed(*flat, lay, window, flex=flex_attention, compile_mask=False)
        want = dense_mask_attention(q, k, v, document_ids(rows, T), window)[real]
    assert (got - want).abs().max() <= 1e-5


def test_unpacked_rows_and_windows_without_layout():
    # No layout: causal SDPA for whole rows; a window shorter than the row goes per document.
    q, k, v, _ = inputs([[12], [12]], 12, 4, 2)
    for window in (None, 5, 12):
        got = A.attend(q, k, v, window=window, layout=None)
        assert (got - dense_mask_attention(q, k, v, None, window)).abs().max() <= 1e-5


def test_kernel_choice_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(A, "_LOGGED", set())
    rows, T = LAYOUTS["len-1"]
    q, k, v, _ = inputs(rows, T, 4, 2)
    with caplog.at_level(logging.INFO, logger="minidistill.attention"):
        for _ in range(3):
            A.attend(q, k, v, window=None, layout=doc_layout(rows, T))
    msgs = [r.getMessage() for r in caplog.records if r.name == "minidistill.attention"]
    assert len(msgs) == 1 and "per-document" in msgs[0]


# ---------------------------------------------------------------------------- model level

def tiny_model(window=None, n_kv=2, seed=0, **kw) -> Transformer:
    cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv, head_dim=16, sliding_window=window, **kw)
    torch.manual_seed(seed)
    return Transformer(cfg)


def packed_batch(rows, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (len(rows), T), generator=g)
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        pos[b] = torch.cat([torch.arange(n) for n in r + [T - sum(r)]])
    labels = torch.where(real_mask(rows, T), ids.roll(-1, 1), -100)
    return ids, pos, labels


def dense_attend(doc):
    def attend(q, k, v, *, window, layout, cache=None, layer=0):
        return dense_mask_attention(q, k, v, doc, window)
    return attend


@pytest.mark.parametrize("window", [None, 5])
def test_lora_gradients_equal_dense_reference(monkeypatch, window):
    rows, T = [[9, 1, 6], [4, 11]], 17
    model = tiny_model(window)
    md.apply_lora(model, md.LoraConfig(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # B = 0 would leave A without a gradient
    ids, pos, labels = packed_batch(rows, T)

    def step():
        model.zero_grad()
        h = model(ids, position_ids=pos, layout=doc_layout(rows, T), return_hidden=True)
        out = chunked_cross_entropy(h, model.head_weight, labels)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = step()
    monkeypatch.setattr(A, "attend", dense_attend(document_ids(rows, T)))
    want_loss, want = step()
    assert len(grads) == 2 * 7 * 2 and abs(loss - want_loss) <= 1e-5
    for n, g in grads.items():
        assert (g - want[n]).abs().max() <= 1e-5 * max(1.0, want[n].abs().max().item()), n


class BigTensorSpy(TorchDispatchMode):
    """Records every tensor produced with two or more dimensions >= T."""

    def __init__(self, T):
        super().__init__()
        self.T, self.big = T, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and sum(d >= self.T for d in t.shape) >= 2:
                self.big.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("window", [None, 300])
def test_no_t_by_t_tensor_in_a_packed_training_step(monkeypatch, window):
    # T = 1024 rows against hidden 64, head_dim 16, vocab 96, tile 512: only a T x T-like tensor
    # can have two dimensions >= T. Documents of 700 (longer than a tile and the window), 1, 200, 100
    # and padding; gradient checkpointing on, so the recompute is inside the check too.
    rows, T = [[700, 1, 200, 100], [1000]], 1024
    model = tiny_model(window).train()
    model.gradient_checkpointing = True
    md.apply_lora(model, md.LoraConfig(r=4, alpha=8))
    ids, pos, labels = packed_batch(rows, T)

    def step():
        spy = BigTensorSpy(T)
        with spy:
            h = model(ids, position_ids=pos, layout=doc_layout(rows, T), return_hidden=True)
            chunked_cross_entropy(h, model.head_weight, labels).loss.backward()
        return spy.big

    assert step() == []
    if window is None:  # the check can fail: the old dense-mask path builds (B, 1, T, T) masks
        monkeypatch.setattr(A, "attend", dense_attend(document_ids(rows, T)))
        assert (2, 1, T, T) in {shape for _, shape in step()}


# ---------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kernel", ["varlen", "flex"])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w}")
def test_cuda_kernels_equal_dense_reference(monkeypatch, kernel, window):
    if kernel == "varlen" and A._varlen_fn() is None:
        pytest.skip("this torch has no varlen_attn")
    if kernel == "flex":  # force the fallback even where varlen exists
        monkeypatch.setattr(A, "_varlen_fn", lambda: None)
    rows, T = [[300, 1, 150, 57], [512], [40, 40]], 512
    lay = doc_layout(rows, T).to("cuda")
    doc, real = document_ids(rows, T).cuda(), real_mask(rows, T).cuda()
    for nh, nkv in HEADS:
        q, k, v, w = (t.cuda() for t in inputs(rows, T, nh * 2, nkv * 2, hd=64))
        assert A.choose_kernel(q.device, torch.bfloat16, q.shape[-1]) == kernel
        ours = functools.partial(A.attend, window=window, layout=lay)
        dense = functools.partial(dense_mask_attention, document_ids=doc, window=window)
        ref = run(dense, q, k, v, w, real, torch.float32)
        check_close(run(ours, q, k, v, w, real, torch.bfloat16), ref, run(dense, q, k, v, w, real, torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_decode_step_attention_equals_sdpa(heads, dtype):
    # The CPU decode path (one query per row, two matmuls) against SDPA: no mask, a per-row key mask
    # (ragged batches), and a (1, Tk) window mask; rows read in blocks from each block's earliest slot.
    nh, nkv = heads
    g = torch.Generator().manual_seed(nh)
    B, Tk, hd = 9, 11, 8
    q = torch.randn(B, nh, 1, hd, generator=g).to(dtype)
    k, v = (torch.randn(B, nkv, Tk, hd, generator=g).to(dtype) for _ in range(2))
    starts = [0, 1, 4, 4, 6, 7, 9, 10, 10]
    masks = [None, (torch.arange(Tk)[None] >= torch.tensor(starts)[:, None])[:, None, None, :],
             torch.arange(Tk)[None] > Tk - 4]
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for mask in masks:
        got = A._one_query(q, k, v, None if mask is None else ~mask)
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=nh != nkv)
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    blocks = A._row_blocks(starts, Tk)  # 4 blocks: rows 0:2 from slot 0, 2:4 from 4, 4:6 from 6, 6:9 from 9
    assert blocks == [(0, 2, 0), (2, 4, 4), (4, 6, 6), (6, 9, 9)]
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for a, b, lo in blocks:  # slots a block skips never reach its rows, NaN or not
        poisoned_k[a:b, :, :lo], poisoned_v[a:b, :, :lo] = float("nan"), float("nan")
    got = A._one_query(q, poisoned_k, poisoned_v, ~masks[1], blocks)
    torch.testing.assert_close(got.float(), A._one_query(q, k, v, ~masks[1]).float(), rtol=tol, atol=tol)
    assert A._row_blocks(starts[:7], Tk) is None  # fewer than 2 rows a block: one block
    assert A._row_blocks([0, 0, 0, 0, 0, 0, 0, 1], Tk) is None  # it would skip under a quarter of the reads
