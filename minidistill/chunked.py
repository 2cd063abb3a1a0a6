"""The one chunked-head autograd function behind every loss (cross-entropy in loss.py, the KD
divergences in kd.py), in the manner of Liger-Kernel's fused-linear losses, in plain torch.

A loss over a vocabulary of V tokens needs, per labelled position, the logits `h @ W.T`; for
Phi-4-mini (V = 200,064) full fp32 logits of 8k positions would be 6.4 GB. `chunked_head`
runs the head over the positions a chunk of rows at a time and hands each chunk's fp32
logits to the loss's own maths (`chunk_fn`), which returns the per-row loss and, in the same
pass, d loss / d logits. The base turns that into the gradients w.r.t. the hidden states and
the head weight right away and keeps only those (N x H, V x H); backward just scales them by
the incoming gradient. No (positions x V) tensor exists beyond one chunk.

Chunk rows come from a memory budget (`chunk_budget_mb`): each loss says how many chunk x V
fp32 buffers its maths holds at its peak, and `chunk_rows` fits that into the budget.

fp16: its smallest subnormal is 6e-8, so the gradient of a confidently right token (every
entry of softmax - onehot below that) would vanish if cast to fp16 before the GradScaler's
scale reaches it in backward. So with fp16 the forward gradients stay in fp32, and d logits
is cast for the matmuls only after scaling each row (or the chunk) to max |.| = 1; the
scale is undone in fp32 after the matmul.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

DEFAULT_CHUNK_BUDGET_MB = 256.0

# chunk_fn(s, e, logits, need_grad) -> (loss (c,) fp32, d loss / d logits (c, V) fp32 or None).
# `logits` (c, V) fp32 are the rows s:e; chunk_fn owns them and may overwrite them in place
# (and return that buffer as the gradient); the gradient is not read after the next call.
ChunkFn = Callable[[int, int, Tensor, bool], "tuple[Tensor, Tensor | None]"]


def chunk_rows(vocab: int, hidden: int, dtype: torch.dtype, *, buffers: float,
               budget_mb: float = DEFAULT_CHUNK_BUDGET_MB) -> int:
    """Rows per chunk so that a loss holding `buffers` chunk x vocab fp32 tensors at its peak
    stays within `budget_mb` MiB of transients (plus the compute-dtype logits / gradient
    copies when the head is not fp32, and the chunk x hidden row copies), at least 16. Not rounded
    down to a tile multiple: `chunk_bounds` evens the chunks out anyway, and every row fewer per
    chunk costs matmul speed (the head's weight is streamed once per chunk)."""
    if budget_mb <= 0:
        raise ValueError(f"chunk_budget_mb must be > 0, got {budget_mb}")
    low = 0 if dtype == torch.float32 else torch.empty((), dtype=dtype).element_size()
    per_row = vocab * (4 * buffers + low) + hidden * 12  # bytes: (c, V) buffers; x, grad row, fp32 copy
    return max(16, int(budget_mb * 2**20 // per_row))


def resolve_chunk_size(chunk_size: int | None, budget_mb: float, vocab: int, hidden: int, dtype: torch.dtype,
                       buffers: float) -> int:
    """`chunk_size` as given (checked), or `chunk_rows` from the budget when it is None."""
    if chunk_size is None:
        return chunk_rows(vocab, hidden, dtype, buffers=buffers, budget_mb=budget_mb)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for a size from chunk_budget_mb), got {chunk_size}")
    return int(chunk_size)


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """(start, end) of ceil(n / chunk_size) chunks of rows 0:n, their sizes within one row of each
    other and none over chunk_size. Never a tiny last chunk: each chunk streams the whole head weight
    through its matmuls (Phi-4-mini: 1.2 GB in bf16), so 193 rows in chunks of 192 would pay for a
    second full pass on one row; as 96 + 97 they cost what 193 rows cost."""
    if n <= 0:
        return []
    k = -(-n // chunk_size)
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


def labelled_positions(hidden: Tensor, labels: Tensor, positions: Tensor | None, ignore_index: int,
                       what: str = "hidden") -> Tensor:
    """Flat indices (N,) int64 of the labelled positions of hidden (B, T, H) or (N, H).

    `positions` given (the collator's, e.g. Batch.label_index): used as they are, with no
    `nonzero` and so no host sync; they must be exactly the flat indices where
    labels != ignore_index, in row-major order (not checked: that would sync)."""
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{what} must be (B, T, H) or (N, H), got shape {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal {what}'s leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if positions is None:
        return (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)  # host sync
    if positions.dim() != 1 or positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"positions must be a 1-D integer tensor of flat indices into {what}'s leading dims, "
                         f"got {positions.dtype} of shape {tuple(positions.shape)}")
    return positions.to(device=hidden.device, dtype=torch.long)


def rows_at(hidden: Tensor, pos: Tensor) -> Tensor:
    """hidden (B, T, H) or (N', H) -> the rows at flat positions pos, (N, H); autograd scatters the
    gradient back (index_select: no host sync)."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, pos)


def loss_denominator(num_items: int | float | Tensor | None, num_tokens: int, device: torch.device) -> Tensor | float:
    """What a loss sum is divided by: num_items (the trained tokens of the whole accumulated
    batch), or the labelled positions here; an empty micro-batch divides by 1 (loss 0, not NaN)."""
    if num_items is None:
        return float(max(num_tokens, 1))
    if isinstance(num_items, Tensor):
        n = num_items.detach().to(device=device, dtype=torch.float32)
        return torch.where(n > 0, n, torch.ones_like(n))  # no host sync
    if num_items <= 0:
        if num_tokens > 0:
            raise ValueError(
                f"num_items={num_items} but this batch has {num_tokens} labelled tokens; pass the "
                "number of labelled tokens across the whole accumulated batch"
            )
        return 1.0
    return float(num_items)


def chunked_head(h: Tensor, weight: Tensor, chunk_fn: ChunkFn, *, chunk_size: int,
                 vocab: int | None = None) -> Tensor:
    """Sum over the rows of h (N, H) of chunk_fn's per-row loss on the logits h @ weight[:vocab].T,
    differentiable w.r.t. h and weight (rows past `vocab` get no logits and a zero gradient).
    Gradients are computed only where grad mode is on and the input requires grad."""
    if h.dim() != 2 or weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"chunked_head needs h (N, H) and weight (V, H), got {tuple(h.shape)} and "
                         f"{tuple(weight.shape)}")
    V = weight.shape[0] if vocab is None else vocab
    grad_on = torch.is_grad_enabled()
    return _ChunkedHead.apply(h, weight, chunk_fn, V, chunk_size, grad_on and h.requires_grad,
                              grad_on and weight.requires_grad)


def compute_dtype(device: torch.device, weight: Tensor) -> torch.dtype:
    """The dtype a head's matmul runs in: autocast's for an fp32 head under autocast (as F.linear
    would), otherwise the weight's own."""
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


def _store(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a @ b, without a temporary when the dtypes allow."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _backprop_chunk(dl: Tensor, x: Tensor, w: Tensor, gh: Tensor | None, gw: Tensor | None) -> None:
    """From d loss / d logits dl (c, V) fp32 (consumed) of rows x (c, H): gh (c, H) = dl @ w, and
    gw (V, H) fp32 += dl.T @ x, the matmuls in w's dtype."""
    if w.dtype == torch.float32:
        if gh is not None:
            _store(gh, dl, w)
        if gw is not None:
            gw.addmm_(dl.t(), x)  # (V, c) @ (c, H)
        return
    if w.dtype != torch.float16:  # bf16 has fp32's exponent range: a plain cast loses no small values
        d = dl.to(w.dtype)  # (c, V)
        if gh is not None:
            _store(gh, d, w)
        if gw is not None:
            gw.add_(d.t() @ x)  # (V, H) in the compute dtype, accumulated in fp32 (no fp32 copy)
        return
    # fp16: scale to max |.| = 1 before each cast and undo it in fp32 after (module docstring).
    row = torch.maximum(dl.amax(-1, keepdim=True), dl.amin(-1, keepdim=True).neg()).clamp_min_(1e-30)  # (c, 1)
    top = None
    if gw is not None:
        top = row.max()  # one scale for the chunk: the sum over its rows is taken in fp16
        gw.addcmul_(dl.div_(top).to(w.dtype).t() @ x, top)  # (V, H)
    if gh is not None:
        if top is None:
            dl.div_(row)  # rows at unit scale
        else:
            dl.mul_(top / row)
        torch.mul(dl.to(w.dtype) @ w, row, out=gh)  # (c, H), back to the true scale in fp32


class _ChunkedHead(torch.autograd.Function):
    """(h (N, H), weight (V', H), chunk_fn, V <= V', chunk_size, need_grad_h, need_grad_w) -> loss sum.

    Forward computes the gradients of the sum too and saves only them; backward scales them by
    grad_output in place, so it runs once (autograd's version check refuses a second)."""

    @staticmethod
    def forward(ctx, h, weight, chunk_fn, V, chunk_size, need_h, need_w):
        N = h.shape[0]
        dtype = compute_dtype(h.device, weight)
        # Matmuls run in the compute dtype (fp32 accumulation inside them) and the logits are
        # upcast per chunk: an fp32 copy of a bf16 head would cost V x H x 4 bytes (2.4 GB for
        # Phi-4-mini). In fp32 this is exact; in bf16 it is what transformers computes.
        w = weight[:V].to(dtype)  # (V, H); a copy only when autocast lowers an fp32 head
        fp16 = torch.float16 in (h.dtype, dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32 if fp16 else h.dtype, device=h.device) if need_h else None
        # The head's gradient accumulates over chunks in fp32.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        need = need_h or need_w
        with torch.autocast(h.device.type, enabled=False):  # dtypes are chosen above, explicitly
            for s, e in chunk_bounds(N, chunk_size):
                x = h[s:e].to(dtype)  # (c, H)
                # The compute-dtype logits die as soon as they are upcast: one fp32 (c, V) lives on.
                loss, dl = chunk_fn(s, e, (x @ w.t()).float(), need)  # (c,), (c, V)
                loss_sum += loss.sum()
                if need:
                    _backprop_chunk(dl, x, w, grad_h[s:e] if need_h else None, grad_w[:V] if need_w else None)
                del dl
        if grad_w is not None and weight.dtype == torch.bfloat16:
            grad_w = grad_w.to(weight.dtype)  # halves what is kept; bf16 keeps small values
        ctx.dtypes = (h.dtype, weight.dtype)
        ctx.has = (grad_h is not None, grad_w is not None)
        # Saved through save_for_backward so saved-tensor hooks (offloading, tests) see them,
        # and autograd's version check rejects a second backward after the in-place scale.
        ctx.save_for_backward(*[g for g in (grad_h, grad_w) if g is not None])
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)
        # Scaled before any cast to the input dtype: the GradScaler's scale is in grad_loss.
        grad_h = saved.pop(0).mul_(grad_loss).to(ctx.dtypes[0]) if ctx.has[0] else None
        grad_w = saved.pop(0).mul_(grad_loss).to(ctx.dtypes[1]) if ctx.has[1] else None
        return grad_h, grad_w, None, None, None, None, None
