"""Packed-row attention on the CPU: the flash kernel per document, or per tile of small documents.

`attention.attend` flattens the non-padding tokens of packed rows and hands them here with the
layout's document lengths (known on the host). Each document runs alone (causal, no mask; longer
than TILE with a window, in blocks of TILE queries over the keys of its window); documents within
GROUP tokens share one tile with a document + causal mask. Nothing grows with the square of the row.
Backward runs the flash kernel's own backward from its saved logsumexp (no recompute).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .attention import DocLayout

TILE = 512  # CPU path: a longer document with a shorter window runs in blocks of TILE queries
# CPU path: only documents within GROUP tokens share one masked SDPA call. Alone, a document is causal
# with no mask, half the work (2 x 127 tokens, fwd + bwd, 1 thread: 3.1 ms alone, 4.6 ms in one tile).
GROUP = 32


def per_document_attention(q: Tensor, k: Tensor, v: Tensor, layout: DocLayout, window: int | None, *,
                           tile: int = TILE) -> Tensor:
    """SDPA over segments of the flattened tokens: each document alone (causal, or with its window's
    mask; longer than `tile`, in blocks of `tile` queries over the keys of its window), but runs of
    documents within min(tile, GROUP) tokens share a tile with a document + causal mask. The largest
    tensor besides q, k, v is tile x (tile + window): nothing grows with the square of the row.

    On the CPU each segment runs the flash kernel and its own backward (`_doc_forward`), which keeps
    one contiguous output (o_proj's input is a view of it), not one per segment plus the assembled
    copy; in a compiled block the same maths is one op (`minidistill::doc_attention_fwd`), so that
    the block neither unrolls the plan nor recompiles when the documents change. Elsewhere (CUDA
    without Flex) the segments go through F.scaled_dot_product_attention (`per_document_sdpa`)."""
    if q.device.type == "cpu" and torch.compiler.is_compiling():
        return torch.ops.minidistill.doc_attention_fwd(q, k, v, layout.cu_seqlens, -1 if window is None else window,
                                                      tile)[0]
    if q.device.type == "cpu":
        return _DocAttention.apply(q, k, v, _plan(layout.lengths, window, tile, q.dtype))
    key = ("segments", window, tile)
    if key not in layout.plans:
        layout.plans[key] = _segments(layout.lengths, window, tile, q.device)
    return per_document_sdpa(q, k, v, layout.plans[key])


def per_document_sdpa(q: Tensor, k: Tensor, v: Tensor, plan) -> Tensor:
    """per_document_attention's segments (a `_segments` plan), each through plain SDPA and autograd."""
    # split (one backward cat) rather than slices (one full-size zero gradient per slice)
    qs, ks, vs = (_pieces(t, plan) for t in (q, k, v))  # pieces (h, L, hd)
    gqa = q.shape[1] != k.shape[1]
    out = []
    for i, (_, back, mask) in enumerate(plan):
        y = F.scaled_dot_product_attention(qs[i][None], _keys(ks, i, back)[None], _keys(vs, i, back)[None],
                                           attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)  # (1, nh, L, hd)
        out.append(y[0])
    return torch.cat(out, dim=1).transpose(0, 1)  # (n, nh, hd)


def _segments(lengths: Sequence[int], window: int | None, tile: int,
              device: torch.device) -> list[tuple[int, int, Tensor | None]]:
    """The CPU plan: (queries, earlier pieces holding keys, mask or None for plain causal) per
    segment, in token order. Host arithmetic on the layout's lengths only."""
    segs: list[tuple[int, int, Tensor | None]] = []
    group: list[int] = []  # small documents waiting for their tile
    block_masks: dict[tuple[int, int], Tensor] = {}

    def flush():
        if len(group) == 1 and (window is None or window >= group[0]):
            segs.append((group[0], 0, None))
        elif group:
            doc = torch.repeat_interleave(torch.arange(len(group)), torch.tensor(group), output_size=sum(group))  # (L,)
            idx = torch.arange(len(doc))
            m = (doc[:, None] == doc[None, :]) & (idx[None, :] <= idx[:, None])  # (L, L)
            if window is not None:
                m &= idx[None, :] > idx[:, None] - window
            segs.append((len(doc), 0, m.to(device)))
        group.clear()

    for n in lengths:
        if n > tile:
            flush()
            if window is None or window >= n:
                segs.append((n, 0, None))
                continue
            reach = -(-(window - 1) // tile)  # earlier blocks of this document within the window
            for s in range(0, n, tile):
                L, back = min(tile, n - s), min(reach, s // tile)
                if (L, back) not in block_masks:
                    qi = torch.arange(back * tile, back * tile + L)[:, None]  # positions within the keys
                    ki = torch.arange(back * tile + L)[None, :]
                    block_masks[L, back] = ((ki <= qi) & (ki > qi - window)).to(device)  # (L, back*tile + L)
                segs.append((L, back, block_masks[L, back]))
        else:
            if sum(group) + n > min(tile, GROUP):
                flush()
            group.append(n)
    flush()
    return segs


# The CPU per-document kernel: each segment runs the CPU flash kernel, which returns its logsumexp, so
# backward runs that kernel's backward (no recompute) and keeps one contiguous output. Eager, the
# plan comes from the layout's host lengths (`_DocAttention`); in a compiled block the same maths is
# one custom op (a graph holds one call, whatever the documents), the plan made inside from cu_seqlens
# (a host read of a CPU tensor).

@lru_cache(maxsize=64)
def _plan(lengths: tuple[int, ...], window: int | None, tile: int, dtype: torch.dtype) -> list:
    """The segments of these documents, masks made additive in `dtype` (what the flash kernel takes)."""
    neg = torch.finfo(dtype).min
    return [(L, back, None if m is None else torch.zeros(m.shape, dtype=dtype).masked_fill_(~m, neg)[None, None])
            for L, back, m in _segments(lengths, window, tile, torch.device("cpu"))]


def _op_plan(q: Tensor, cu_seqlens: Tensor, window: int, tile: int):
    lengths = tuple(int(n) for n in cu_seqlens.diff().tolist())  # a CPU tensor: no device sync
    return _plan(lengths, None if window < 0 else window, tile, q.dtype)


def _pieces(t: Tensor, plan) -> tuple[Tensor, ...]:
    return t.transpose(0, 1).split([L for L, _, _ in plan], dim=1)  # pieces (h, L, hd)


def _keys(pieces: tuple[Tensor, ...], i: int, back: int) -> Tensor:
    """The keys (or values) segment i attends: its own piece and `back` earlier ones."""
    return pieces[i] if back == 0 else torch.cat(pieces[i - back: i + 1], dim=1)  # (n_kv, keys, hd)


def _doc_forward(q: Tensor, k: Tensor, v: Tensor, plan) -> tuple[Tensor, Tensor]:
    """out (n, nh, hd), contiguous, and the softmax logsumexp (nh, n) of the segments of `plan`."""
    qs, ks, vs = (_pieces(t, plan) for t in (q, k, v))
    out, lse = [], []
    for i, (_, back, mask) in enumerate(plan):
        o, m = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qs[i][None], _keys(ks, i, back)[None], _keys(vs, i, back)[None], 0.0, mask is None,
            attn_mask=mask)  # (1, nh, L, hd), (1, nh, L)
        out.append(o[0])
        lse.append(m[0])
    return torch.cat(out, dim=1).transpose(0, 1).contiguous(), torch.cat(lse, dim=1)


def _doc_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  plan) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v of `_doc_forward` for `grad` of its output."""
    qs, ks, vs, gs, os_ = (_pieces(t, plan) for t in (q, k, v, grad, out))
    ls = lse.split([L for L, _, _ in plan], dim=1)
    gq, gk, gv = [], [torch.zeros_like(t) for t in ks], [torch.zeros_like(t) for t in vs]
    for i, (_, back, mask) in enumerate(plan):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            gs[i][None].contiguous(), qs[i][None], _keys(ks, i, back)[None], _keys(vs, i, back)[None], os_[i][None],
            ls[i][None], 0.0, mask is None, attn_mask=mask)
        gq.append(dq[0])
        sizes = [t.shape[1] for t in ks[i - back: i + 1]]
        for j, (a, b) in enumerate(zip(dk[0].split(sizes, dim=1), dv[0].split(sizes, dim=1))):  # keys of earlier pieces
            gk[i - back + j] += a
            gv[i - back + j] += b
    return tuple(torch.cat(g, dim=1).transpose(0, 1).contiguous() for g in (gq, gk, gv))


class _DocAttention(torch.autograd.Function):
    """Eager CPU per-document attention over a host plan: saves q, k, v, the output and logsumexp."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan) -> Tensor:
        out, lse = _doc_forward(q, k, v, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return *_doc_backward(grad, *ctx.saved_tensors, ctx.plan), None


@torch.library.custom_op("minidistill::doc_attention_fwd", mutates_args=())
def _doc_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window: int,
                       tile: int) -> tuple[Tensor, Tensor]:
    """per_document_attention over documents cu_seqlens (window -1: none) -> out (n, nh, hd)
    and the softmax logsumexp (nh, n)."""
    return _doc_forward(q, k, v, _op_plan(q, cu_seqlens, window, tile))


@_doc_attention_fwd.register_fake
def _(q, k, v, cu_seqlens, window, tile):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("minidistill::doc_attention_bwd", mutates_args=())
def _doc_attention_bwd(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
                       window: int, tile: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of q, k, v of doc_attention_fwd for `grad` of its output."""
    return _doc_backward(grad, q, k, v, out, lse, _op_plan(q, cu_seqlens, window, tile))


@_doc_attention_bwd.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, window, tile):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _doc_attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, window, tile = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.window, ctx.tile = window, tile


def _doc_attention_grad(ctx, grad, grad_lse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    gq, gk, gv = torch.ops.minidistill.doc_attention_bwd(grad, q, k, v, out, lse, cu, ctx.window, ctx.tile)
    return gq, gk, gv, None, None, None


_doc_attention_fwd.register_autograd(_doc_attention_grad, setup_context=_doc_attention_setup)
