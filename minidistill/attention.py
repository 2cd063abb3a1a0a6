"""The one attention entry point (`attend`): it picks the kernel from what the batch is.

- KV cache (generation): SDPA over the cached keys as before, plus `KVCache.key_mask` (B, slots)
  when set, which keeps each row of a ragged batch to its own slots. A packed prefill (a layout and
  an empty cache) stores each token's keys at its column and attends as packed rows do (below).
- Rows that each hold one document from column 0 (unpacked rows, padding at the end), no window
  shorter than the row: SDPA `is_causal=True` (flash / memory-efficient kernels, no mask).
- Packed rows, or a window shorter than the row: the non-padding tokens are flattened (padding
  takes part in nothing) and the documents come from `DocLayout.cu_seqlens`, built on the CPU:
  * CUDA in fp16/bf16: torch's `varlen_attn` (FlashAttention-2 varlen), GQA without repeating K/V;
  * other CUDA cases (fp32, or a torch without varlen): FlexAttention with a document + causal +
    window `BlockMask`, compiled;
  * otherwise (the CPU): SDPA per document (causal, no mask), or per tile of very small
    documents, so that no tensor grows with the square of the row (doc_attention.py).
The choice is logged once per kind. Nothing of size T x T is built on any training path;
`dense_mask_attention` (the old (B, 1, T, T) mask) is kept only as the reference for tests and
the benchmark.

Window convention (ModelConfig.sliding_window): query q sees keys k with q - window < k <= q,
i.e. `window` keys counting itself. FlashAttention's window_size=(left, 0) allows q - left <= k,
so the varlen call passes left = window - 1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .doc_attention import per_document_attention

if TYPE_CHECKING:
    from .model import KVCache

log = logging.getLogger(__name__)


@dataclass(eq=False)
class DocLayout:
    """Where the documents of a (B, T) batch lie, known on the host so that the forward never
    reads a device tensor to learn a length (no host sync). Built by the collator (`doc_layout`).

    Documents are contiguous runs of a row, numbered row-major; what a row holds after its
    documents is padding, which takes part in no attention (its attention output is 0).
    """

    shape: tuple[int, int]  # (B, T)
    lengths: tuple[int, ...]  # document lengths, row-major (the CPU path plans from these)
    cu_seqlens: Tensor  # (N+1,) int32: document starts in the flattened non-padding tokens
    max_seqlen: int  # the longest document
    num_tokens: int  # non-padding tokens, n
    token_index: Tensor | None  # (n,) int64 flat indices into B*T of non-padding tokens; None: no padding
    doc_index: Tensor  # (n,) int32 document of each non-padding token
    doc_len: Tensor  # (B, T) int64 length of each token's document (padding: 0), for LongRoPE
    one_per_row: bool  # every row holds at most one document, starting at column 0
    plans: dict = field(default_factory=dict, repr=False, compare=False)  # kernel state per window, filled on use

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "DocLayout":
        """The same layout with its tensors on `device` (fresh, empty plans)."""
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)
        return replace(self, cu_seqlens=move(self.cu_seqlens), token_index=move(self.token_index),
                       doc_index=move(self.doc_index), doc_len=move(self.doc_len), plans={})

    def pin(self) -> "DocLayout":
        """The same layout in pinned host memory, for non_blocking copies."""
        def pin(t):
            return None if t is None else t.pin_memory()
        return replace(self, cu_seqlens=pin(self.cu_seqlens), token_index=pin(self.token_index),
                       doc_index=pin(self.doc_index), doc_len=pin(self.doc_len), plans={})


def doc_layout(row_lengths: Sequence[Sequence[int]], T: int) -> DocLayout:
    """The layout of B rows of T columns, row b holding documents of `row_lengths[b]` tokens from
    column 0 on, then padding. Plain numpy on the host (the collator calls it)."""
    B = len(row_lengths)
    rows = [[int(n) for n in r if int(n) > 0] for r in row_lengths]
    used = np.array([sum(r) for r in rows], dtype=np.int64)
    if B == 0 or T < 1 or (used > T).any():
        raise ValueError(f"rows of {used.tolist()} tokens do not fit a ({B}, {T}) batch")
    lengths = np.array([n for r in rows for n in r], dtype=np.int64)
    real = np.arange(T)[None, :] < used[:, None]  # (B, T)
    token_index = np.flatnonzero(real)  # (n,) row-major, so documents come out in order
    doc_len = np.zeros(B * T, dtype=np.int64)
    doc_len[token_index] = np.repeat(lengths, lengths)
    return _layout((B, T), lengths, None if real.all() else token_index, doc_len, all(len(r) <= 1 for r in rows))


def _layout(shape: tuple[int, int], lengths: np.ndarray, token_index: np.ndarray | None, doc_len: np.ndarray,
            one_per_row: bool) -> DocLayout:
    """A DocLayout on the host from the documents' lengths (int64, row-major) and the arrays built for them."""
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    return DocLayout(
        shape=shape, lengths=tuple(lengths.tolist()), cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(lengths.max(initial=0)), num_tokens=int(lengths.sum()),
        token_index=None if token_index is None else torch.from_numpy(token_index),
        doc_index=torch.from_numpy(np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)),
        doc_len=torch.from_numpy(doc_len.reshape(shape)), one_per_row=one_per_row)


def layout_from_document_ids(document_ids: Tensor) -> DocLayout:
    """The layout of (B, T) `document_ids` (runs of equal ids are documents; every token is in
    one, so there is no padding). Read on the host: for a CUDA tensor this is a host sync, which
    passing the collator's `Batch.layout` avoids."""
    d = document_ids.detach().cpu().numpy()
    B, T = d.shape
    start = np.ones((B, T), dtype=bool)
    start[:, 1:] = d[:, 1:] != d[:, :-1]
    flat_starts = np.flatnonzero(start)  # each row starts a document: none crosses rows
    lengths = np.diff(np.append(flat_starts, B * T)).astype(np.int64)
    lay = _layout((B, T), lengths, None, np.repeat(lengths, lengths), bool((start.sum(1) <= 1).all()))
    return lay.to(document_ids.device)


def rows_layout(B: int, T: int, device: torch.device | str) -> DocLayout:
    """Each row one document of T tokens, built on `device` without reading anything back."""
    return DocLayout(
        shape=(B, T), lengths=(T,) * B, cu_seqlens=torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device),
        max_seqlen=T, num_tokens=B * T, token_index=None,
        doc_index=torch.arange(B, dtype=torch.int32, device=device).repeat_interleave(T, output_size=B * T),
        doc_len=torch.full((B, T), T, dtype=torch.int64, device=device), one_per_row=True)


def attend(q: Tensor, k: Tensor, v: Tensor, *, window: int | None, layout: DocLayout | None,
           cache: "KVCache | None" = None, layer: int = 0) -> Tensor:
    """Causal attention. q (B, T, nh, hd), k / v (B, T, n_kv, hd), rotated -> (B, T, nh, hd).

    window: the layer's sliding window (see the module docstring), None for full causal.
    layout: the documents of packed rows (None: each row is one sequence). cache: generation.
    """
    if cache is not None and layout is None:
        return _cached(q, k, v, cache, layer, window)
    if cache is not None:  # a packed prefill: keys at their columns, attention within each document
        cache.update(layer, k.transpose(1, 2), v.transpose(1, 2))
    B, T = q.shape[:2]
    if window is not None and window >= T:
        window = None  # a window as long as the row masks nothing
    if window is None and (layout is None or layout.one_per_row):
        return _causal(q, k, v)
    if layout is None:
        layout = rows_layout(B, T, q.device)
    # An empty batch: nothing real to attend, keep every input in the graph. (Read from a tensor's
    # size, not num_tokens: a compiled block would specialise on that int and recompile per batch.)
    if layout.cu_seqlens.shape[0] == 1:
        return _causal(q, k, v)
    if q.is_cuda and q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))  # what SDPA does under autocast
    nh, hd = q.shape[2], q.shape[3]
    flat = [t.reshape(B * T, t.shape[2], hd) for t in (q, k, v)]  # (B*T, h, hd)
    if layout.token_index is not None:
        flat = [t.index_select(0, layout.token_index) for t in flat]  # (n, h, hd): padding dropped
    y = KERNELS[choose_kernel(q.device, q.dtype, hd)](*flat, layout, window)  # (n, nh, hd)
    if layout.token_index is not None:
        y = y.new_zeros(B * T, nh, hd).index_copy(0, layout.token_index, y)  # (B*T, nh, hd), padding 0
    return y.view(B, T, nh, hd)


def _causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=q.shape[2] != k.shape[2])  # (B, nh, T, hd)
    return y.transpose(1, 2)


def _cached(q: Tensor, k: Tensor, v: Tensor, cache: "KVCache", layer: int, window: int | None) -> Tensor:
    """Generation: append k / v to the cache, attend to everything cached (behaviour unchanged)."""
    T = q.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T, hd)
    past = cache.pos
    k, v = cache.update(layer, k, v)  # (B, n_kv, past + T, hd)
    Tk = k.shape[2]
    window = window if window is not None and window < Tk else None
    key_mask = cache.key_mask
    one_query = T == 1 and q.device.type == "cpu" and q.dtype == torch.float32
    if one_query and window is None:  # one new token sees every slot its row may attend
        if key_mask is None:
            return _one_query(q, k, v, None).transpose(1, 2)
        blocks = _row_blocks(cache.row_starts, Tk)
        return _one_query(q, k, v, cache.key_drop[:, None, None, :Tk], blocks).transpose(1, 2)
    mask, causal = None, False
    if window is None and past == 0 and key_mask is None:
        causal = True
    elif not (window is None and T == 1 and key_mask is None):  # one new token sees the whole cache
        q_idx, k_idx = torch.arange(past, past + T, device=q.device), torch.arange(Tk, device=q.device)
        mask = k_idx[None, :] <= q_idx[:, None]  # (T, Tk): prompt chunks only, never a training row
        if window is not None:
            mask = mask & (k_idx[None, :] > q_idx[:, None] - window)
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :Tk]  # (B, 1, T, Tk): each row to its own slots
    if one_query:
        return _one_query(q, k, v, None if mask is None else ~mask).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                       enable_gqa=q.shape[1] != k.shape[1])  # (B, nh, T, hd)
    return y.transpose(1, 2)


ROW_BLOCKS = 4  # a ragged decode step reads the cache in this many blocks of rows (`_row_blocks`)


def _row_blocks(starts: list[int] | None, Tk: int) -> list[tuple[int, int, int]] | None:
    """Contiguous blocks of rows (first, end, earliest slot any of them attends), for a decode step
    to skip the left padding before each block's earliest slot; None (one block) unless that skips
    a quarter of the reads: each block's own ops cost about 0.7 ms a step on SmolLM2-135M, and
    skipping a fifth of the reads gained nothing (batch 32 of the benchmark's prompts, one thread:
    a step 128.6-131.2 ms in one block, 131.1-133.2 ms in four), while 16 prompts of 4 tokens beside
    16 of 300 went 175.7-185.1 -> 157.1-158.5 ms a step. The decoder keeps rows sorted by their first
    slot, so blocks are tight."""
    if starts is None or len(starts) < 2 * ROW_BLOCKS:
        return None
    B = len(starts)
    bounds = [B * i // ROW_BLOCKS for i in range(ROW_BLOCKS + 1)]
    blocks = [(a, b, min(starts[a:b])) for a, b in zip(bounds, bounds[1:])]
    return blocks if 4 * sum((b - a) * lo for a, b, lo in blocks) >= B * Tk else None


def _one_query(q: Tensor, k: Tensor, v: Tensor, drop: Tensor | None,
               blocks: list[tuple[int, int, int]] | None = None) -> Tensor:
    """An fp32 decode step on the CPU: each row's one query against its cached keys as two batched
    matmuls, up to 1.3x faster than SDPA's kernel at these sizes (the step reads the cache once
    either way). Not in bf16, where the batched matmuls copy the keys and SDPA is 2.7x faster.
    q (B, nh, 1, hd), k / v (B, n_kv, Tk, hd), drop (bool, True = a slot not to attend)
    broadcastable to (B, 1, 1, Tk) or None -> (B, nh, 1, hd). Query head h reads KV head
    h // (nh / n_kv), as SDPA's GQA. blocks (`_row_blocks`): rows a:b read slots lo: only (the
    slots before are dropped for all of them)."""
    if blocks is not None:
        return torch.cat([_one_query(q[a:b], k[a:b, :, lo:], v[a:b, :, lo:], drop[a:b, ..., lo:])
                          for a, b, lo in blocks])
    B, nh, _, hd = q.shape
    nkv, Tk = k.shape[1], k.shape[2]
    scores = torch.matmul(q.reshape(B, nkv, nh // nkv, hd), k.transpose(-1, -2)).mul_(hd ** -0.5)  # (B, n_kv, g, Tk)
    if drop is not None:
        scores.masked_fill_(drop.reshape(-1, 1, 1, Tk), float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(p, v).reshape(B, nh, 1, hd)


# ------------------------------------------------------------------ kernels over flattened tokens
# Each takes q (n, nh, hd), k / v (n, n_kv, hd), the layout and the window; returns (n, nh, hd).

@lru_cache(maxsize=None)
def _varlen_fn() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@lru_cache(maxsize=None)
def _flex_fns() -> tuple[Callable, Callable] | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return flex_attention, create_block_mask


@lru_cache(maxsize=None)
def _compiled_flex() -> Callable:
    return torch.compile(_flex_fns()[0])  # eager FlexAttention builds the full score matrix


_LOGGED: set[str] = set()


def choose_kernel(device: torch.device, dtype: torch.dtype, hd: int, log_choice: bool = True) -> str:
    """The packed-rows kernel for queries on `device` in `dtype` with head size `hd`: "varlen",
    "flex" or "per-document"."""
    cuda = torch.device(device).type == "cuda"
    if cuda and _varlen_fn() is not None and dtype in (torch.float16, torch.bfloat16) and hd % 8 == 0 and hd <= 256:
        name = "varlen"
    elif cuda and _flex_fns() is not None:
        name = "flex"
    else:
        name = "per-document"
    if log_choice and name not in _LOGGED and not torch.compiler.is_compiling():  # logging would break a graph
        _LOGGED.add(name)
        log.info("packed attention: %s kernel (%s, %s, head_dim %d)", name, torch.device(device).type, dtype, hd)
    return name


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, layout: DocLayout, window: int | None, *,
                     kernel: Callable | None = None) -> Tensor:
    """FlashAttention-2 varlen over the documents (`kernel`: torch's `varlen_attn`, or a stand-in
    with its signature in tests)."""
    kernel = kernel or _varlen_fn()
    cu, m = layout.cu_seqlens, layout.max_seqlen
    # (-1, 0) is causal; (left, 0) keeps q - left <= k <= q: `window` keys is left = window - 1.
    ws = (-1, 0) if window is None else (window - 1, 0)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # v of a fused qkv is a strided view
    return kernel(q, k, v, cu, cu, m, m, window_size=ws, enable_gqa=q.shape[1] != k.shape[1])


def flex_attention_packed(q: Tensor, k: Tensor, v: Tensor, layout: DocLayout, window: int | None, *,
                          flex: Callable | None = None, compile_mask: bool = True) -> Tensor:
    """FlexAttention with a document + causal + window BlockMask (fully masked blocks are skipped).
    The block mask is built once per batch and window (`layout.plans`), shared by the layers."""
    flex = flex or _compiled_flex()
    key = ("flex", window)
    if key not in layout.plans:
        doc = layout.doc_index

        def mask_mod(b, h, qi, ki):
            m = (doc[qi] == doc[ki]) & (ki <= qi)
            return m & (qi - ki < window) if window is not None else m

        n = q.shape[0]
        layout.plans[key] = _flex_fns()[1](mask_mod, None, None, n, n, device=q.device, _compile=compile_mask)
    y = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=layout.plans[key],
             enable_gqa=q.shape[1] != k.shape[1])  # (1, nh, n, hd)
    return y[0].transpose(0, 1)


KERNELS: dict[str, Callable] = {"varlen": varlen_attention, "flex": flex_attention_packed,
                                "per-document": per_document_attention}


def dense_mask_attention(q: Tensor, k: Tensor, v: Tensor, document_ids: Tensor | None, window: int | None) -> Tensor:
    """The pre-issue-12 path, kept only as the reference of tests and benchmarks (never used by the
    model): a (B, 1, T, T) causal + window + same-document boolean mask into SDPA.
    q (B, T, nh, hd), k / v (B, T, n_kv, hd), document_ids (B, T) -> (B, T, nh, hd)."""
    T = q.shape[1]
    idx = torch.arange(T, device=q.device)
    m = idx[None, :] <= idx[:, None]  # (T, T)
    if window is not None:
        m = m & (idx[None, :] > idx[:, None] - window)
    m = m[None, None]  # (1, 1, T, T)
    if document_ids is not None:
        m = m & (document_ids[:, None, :, None] == document_ids[:, None, None, :])  # (B, 1, T, T)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=m,
                                       enable_gqa=q.shape[2] != k.shape[2])  # (B, nh, T, hd)
    return y.transpose(1, 2)
