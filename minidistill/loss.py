"""Cross-entropy on labelled positions only, through the LM head in chunks.

The model returns final hidden states; `chunked_cross_entropy` gathers the positions that
carry a label and runs them through `chunked.chunked_head`, which never holds more than one
chunk of logits; this module supplies only the per-chunk maths: the loss and, in the same
pass, softmax - onehot, its gradient w.r.t. the logits. The same idea as Liger-Kernel's fused
linear cross-entropy, in plain torch.

Labels are aligned with the hidden states (label[t] is the target for hidden[t]); turn
next-token labels into that with `shift_labels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .chunked import (DEFAULT_CHUNK_BUDGET_MB, chunked_head, labelled_positions, loss_denominator,
                      resolve_chunk_size, rows_at)

IGNORE_INDEX = -100

# chunk x V fp32 buffers the CE maths holds: one, the logits, turned in place into exp(z - max),
# then into d loss / d logits.
_CE_BUFFERS = 1


@dataclass
class LossOutput:
    """loss: scalar to backward, sum of (weighted) per-token CE / num_items.
    num_tokens: labelled positions here. num_correct: labelled positions whose label has the
    row's largest logit (ties count as right; 0-dim LongTensor, not synced, so logging decides
    when to `.item()`; it costs no pass of its own: the row max is the log-sum-exp's shift).
    loss_sum: the unnormalised (weighted) sum, detached, fp32."""

    loss: Tensor
    num_tokens: int
    num_correct: Tensor
    loss_sum: Tensor


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Next-token labels aligned with the hidden states: out[..., t] = labels[..., t+1], the
    last position gets `ignore_index`. Works on (B, T) or (T,)."""
    out = torch.full_like(labels, ignore_index)
    out[..., :-1] = labels[..., 1:]
    return out


def cross_entropy_reference(
    logits: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    num_items: int | float | Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> LossOutput:
    """Full-logits reference for `chunked_cross_entropy` (tests): logits (..., V), labels (...)."""
    V = logits.shape[-1]
    logits = logits.reshape(-1, V).float()  # (N, V)
    labels = labels.reshape(-1)  # (N,)
    mask = labels != ignore_index
    per_tok = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")  # (N,)
    if weights is not None:
        per_tok = per_tok * weights.reshape(-1).float()
    loss_sum = per_tok.sum()
    num_tokens = int(mask.sum())
    num_correct = ((logits.argmax(-1) == labels) & mask).sum()
    denom = loss_denominator(num_items, num_tokens, loss_sum.device)
    return LossOutput(loss_sum / denom, num_tokens, num_correct, loss_sum.detach())


def chunked_cross_entropy(
    hidden: Tensor,
    head_weight: Tensor,
    labels: Tensor,
    *,
    weights: Tensor | None = None,
    num_items: int | float | Tensor | None = None,
    positions: Tensor | None = None,
    chunk_size: int | None = None,
    chunk_budget_mb: float = DEFAULT_CHUNK_BUDGET_MB,
    ignore_index: int = IGNORE_INDEX,
) -> LossOutput:
    """Cross-entropy of `hidden @ head_weight.T` against `labels`, on labelled positions only.

    hidden (B, T, H) or (N, H); head_weight (V, H); labels with hidden's leading shape,
    already aligned (see `shift_labels`); weights: optional per-position loss weights, same
    shape as labels (e.g. think vs answer spans), treated as constants. `num_items` is the
    number of trained tokens across the whole accumulated batch (all micro-batches and
    ranks), so that every token weighs the same; default: the labelled positions here.
    positions: the flat indices (int64) of the labelled positions, from the collator, so no
    `nonzero` (a host sync) runs here; they must match labels (not checked).
    chunk_size: rows per chunk; None picks it from `chunk_budget_mb` (MiB of chunk x V
    transients) and the vocabulary. The loss is reduced in fp32 whatever the input dtype;
    gradients come back in the input dtype. Beyond the budget it keeps the N x H (and, with a
    trainable head, V x H) gradients from forward to backward.
    """
    H = hidden.shape[-1]
    pos = labelled_positions(hidden, labels, positions, ignore_index)
    if head_weight.dim() != 2 or head_weight.shape[1] != H:
        raise ValueError(
            f"head_weight must be (vocab, {H}) to match hidden's last dim, got {tuple(head_weight.shape)}"
        )
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(
            f"weights shape {tuple(weights.shape)} must equal labels shape {tuple(labels.shape)}"
        )
    V = head_weight.shape[0]
    chunk = resolve_chunk_size(chunk_size, chunk_budget_mb, V, H, head_weight.dtype, _CE_BUFFERS)
    h = rows_at(hidden, pos)  # (N, H)
    y = labels.reshape(-1).index_select(0, pos)  # (N,)
    w = None if weights is None else weights.reshape(-1).index_select(0, pos).detach().float()  # (N,)
    num_correct = torch.zeros((), dtype=torch.long, device=hidden.device)

    def ce_chunk(s: int, e: int, logits: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        yc = y[s:e, None]  # (c, 1)
        top = logits.amax(-1, keepdim=True)  # (c, 1)
        z_y = logits.gather(1, yc)  # (c, 1)
        num_correct.add_((z_y >= top).sum())
        ez = logits.sub_(top).exp_()  # (c, V) in place: exp(z - max)
        e_y = ez.gather(1, yc)  # (c, 1)
        # The mass off the label, summed apart: 1 - p_y from 1 - (a value within 1e-7 of 1) would
        # lose every confident token's gradient to fp32 rounding.
        off = ez.scatter_(1, yc, 0.0).sum(-1, keepdim=True)  # (c, 1)
        total = e_y + off
        # CE = log(total / e_y); log1p keeps a confident token's small loss exact, the plain form
        # covers a label whose exp(z - max) underflows.
        ce = torch.where(e_y > 1e-30, torch.log1p(off / e_y), top - z_y + total.log()).squeeze(1)  # (c,)
        wc = None if w is None else w[s:e, None]  # (c, 1)
        if wc is not None:
            ce = ce * wc.squeeze(1)
        if not need_grad:
            return ce, None
        # d CE / d logits = softmax - onehot, in the same buffer: p_v off the label, -off / total on it.
        dl = ez.div_(total).scatter_(1, yc, -off / total)
        return ce, (dl if wc is None else dl.mul_(wc))

    loss_sum = chunked_head(h, head_weight, ce_chunk, chunk_size=chunk)
    num_tokens = pos.numel()
    denom = loss_denominator(num_items, num_tokens, loss_sum.device)
    return LossOutput(loss_sum / denom, num_tokens, num_correct, loss_sum.detach())
