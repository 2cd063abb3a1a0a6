"""Cross-entropy on labelled positions only, through the LM head in chunks.

The model returns final hidden states; `chunked_cross_entropy` gathers the positions that
carry a label, and for each chunk of them computes logits, the loss, and at once the
gradients w.r.t. the hidden states and the head weight (softmax - onehot), keeping only
those gradients. No (positions x vocab) tensor is ever held beyond one chunk, in forward or
backward: Phi-4-mini's vocab is 200,064, so full fp32 logits for 8k tokens would be 6.4 GB.
The same idea as Liger-Kernel's fused linear cross-entropy, in plain torch.

Labels are aligned with the hidden states (label[t] is the target for hidden[t]); turn
next-token labels into that with `shift_labels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """loss: scalar to backward, sum of (weighted) per-token CE / num_items.
    num_tokens: labelled positions here. num_correct: labelled positions whose argmax is the
    label (0-dim LongTensor, not synced, so logging decides when to `.item()`).
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
    denom = _normaliser(num_items, num_tokens, loss_sum.device)
    return LossOutput(loss_sum / denom, num_tokens, num_correct, loss_sum.detach())


def chunked_cross_entropy(
    hidden: Tensor,
    head_weight: Tensor,
    labels: Tensor,
    *,
    weights: Tensor | None = None,
    num_items: int | float | Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> LossOutput:
    """Cross-entropy of `hidden @ head_weight.T` against `labels`, on labelled positions only.

    hidden (B, T, H) or (N, H); head_weight (V, H); labels with hidden's leading shape,
    already aligned (see `shift_labels`); weights: optional per-position loss weights, same
    shape as labels (e.g. think vs answer spans), treated as constants. `num_items` is the
    number of trained tokens across the whole accumulated batch (all micro-batches and
    ranks), so that every token weighs the same; default: the labelled positions here.
    The loss is reduced in fp32 whatever the input dtype; gradients come back in the input
    dtype. Peak memory is chunk_size x V (fp32) plus the N x H and V x H gradients.
    """
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (B, T, H) or (N, H), got shape {tuple(hidden.shape)}")
    H = hidden.shape[-1]
    if head_weight.dim() != 2 or head_weight.shape[1] != H:
        raise ValueError(
            f"head_weight must be (vocab, {H}) to match hidden's last dim, got {tuple(head_weight.shape)}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if weights is not None and weights.shape != labels.shape:
        raise ValueError(
            f"weights shape {tuple(weights.shape)} must equal labels shape {tuple(labels.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    flat_labels = labels.reshape(-1)  # (B*T,)
    pos = (flat_labels != ignore_index).nonzero().squeeze(1)  # (N,)
    h = hidden.reshape(-1, H)[pos]  # (N, H): autograd scatters the gradient back
    y = flat_labels[pos]  # (N,)
    w = None if weights is None else weights.reshape(-1)[pos].detach().float()  # (N,)

    grad_on = torch.is_grad_enabled()
    loss_sum, num_correct = _ChunkedCE.apply(
        h, head_weight, y, w, chunk_size, grad_on and h.requires_grad, grad_on and head_weight.requires_grad
    )
    num_tokens = pos.numel()
    denom = _normaliser(num_items, num_tokens, loss_sum.device)
    return LossOutput(loss_sum / denom, num_tokens, num_correct, loss_sum.detach())


def _normaliser(
    num_items: int | float | Tensor | None, num_tokens: int, device: torch.device
) -> Tensor | float:
    # An empty micro-batch has a zero loss sum; dividing by 1 keeps it 0 rather than NaN.
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


class _ChunkedCE(torch.autograd.Function):
    """(h (N, H), weight (V, H), y (N,), w (N,) | None) -> (sum of w * CE, num_correct).

    Forward computes the gradients of the sum too and saves only them (N x H, V x H);
    backward scales them by grad_output, in place, so it can run once (no retain_graph)."""

    @staticmethod
    def forward(ctx, h, weight, y, w, chunk_size, need_grad_h, need_grad_w):
        N = h.shape[0]
        # Matmuls run in the input dtype (fp32 accumulation inside them) and the logits are
        # upcast per chunk: an fp32 copy of a bf16 head would cost V x H x 4 bytes (2.4 GB
        # for Phi-4-mini). In fp32 this is exact; in bf16 it is what transformers computes.
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        num_correct = torch.zeros((), dtype=torch.long, device=h.device)
        grad_h = torch.empty_like(h) if need_grad_h else None  # (N, H), input dtype
        # Accumulate the head's gradient over chunks in fp32, cast once at the end.
        grad_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad_w else None

        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            x = h[s:e].to(weight.dtype)  # (c, H)
            yc = y[s:e]  # (c,)
            logits = (x @ weight.t()).float()  # (c, V) fp32
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            ce = lse - logits.gather(1, yc[:, None]).squeeze(1)  # (c,)
            num_correct += (logits.argmax(-1) == yc).sum()
            if w is not None:
                ce = ce * w[s:e]
            loss_sum += ce.sum()
            if not (need_grad_h or need_grad_w):
                continue
            # d(sum CE)/d logits = softmax - onehot, built in the logits buffer (no 2nd c x V).
            dlogits = logits.sub_(lse[:, None]).exp_()  # (c, V)
            dlogits[torch.arange(e - s, device=h.device), yc] -= 1.0
            if w is not None:
                dlogits.mul_(w[s:e, None])
            dl = dlogits.to(weight.dtype)  # no-op in fp32
            if need_grad_h:
                grad_h[s:e] = dl @ weight  # (c, H)
            if need_grad_w:
                grad_w32 += (dl.t() @ x).float()  # (V, c) @ (c, H)

        grad_w = None
        if need_grad_w:
            grad_w = grad_w32 if weight.dtype == torch.float32 else grad_w32.to(weight.dtype)
        # Saved through save_for_backward so saved-tensor hooks (offloading, tests) see them,
        # and autograd's version check rejects a second backward after the in-place scale.
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.save_for_backward(*[g for g in (grad_h, grad_w) if g is not None])
        ctx.mark_non_differentiable(num_correct)
        return loss_sum, num_correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0).mul_(grad_loss) if ctx.has[0] else None
        grad_w = saved.pop(0).mul_(grad_loss) if ctx.has[1] else None
        return grad_h, grad_w, None, None, None, None, None
