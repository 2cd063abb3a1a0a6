"""Logit distillation losses on labelled positions only, through the LM heads in chunks.

Same design as `loss.py`: gather the positions that carry a label, and per chunk of them
compute the student logits (and the teacher's), the loss, and at once the gradient w.r.t.
the student logits, which is turned into the gradients of the student hidden states and
head and kept; no (positions x vocab) tensor outlives one chunk. The teacher side never
gets a gradient.

Divergences, with p the student and q the teacher distribution at temperature T
(p = softmax(z_s / T), q = softmax(z_t / T)), per labelled token:
  forward  KL(q || p) = sum_v q_v (log q_v - log p_v)     (mean-seeking; the classic KD)
  reverse  KL(p || q) = sum_v p_v (log p_v - log q_v)     (mode-seeking, as in MiniLLM)
  jsd      beta * KL(q || m) + (1 - beta) * KL(p || m),  m = beta * q + (1 - beta) * p
           (the generalised JSD of GKD / TRL; beta = 0.5 is the symmetric JSD)
Each is multiplied by T**2 (Hinton et al. 2015): the gradient w.r.t. the logits scales as
1/T, so T**2 keeps its magnitude independent of T and comparable with the CE loss.

Vocabularies: checkpoints pad the vocab differently (Qwen2 151,936 vs 152,064 rows); both
distributions are taken over the shared range [0, min(Vs, Vt)), which must hold every label.

Offline KD (`kd_from_topk`) uses only the teacher's top-k log-probs plus the log of the
mass outside them (see `minidistill.distill` for the cache that stores them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .loss import IGNORE_INDEX, _normaliser

KINDS = ("forward", "reverse", "jsd")


@dataclass
class KDOutput:
    """loss: scalar to backward, sum of per-token divergence * T**2 / num_items.
    num_tokens: labelled positions here. loss_sum: the unnormalised sum, detached, fp32."""

    loss: Tensor
    num_tokens: int
    loss_sum: Tensor


# ---------------------------------------------------------------------------- per-chunk math

def _divergence(s: Tensor, t: Tensor, kind: str, beta: float) -> tuple[Tensor, Tensor]:
    """Per-row divergence and its gradient w.r.t. s, for fp32 logits s (student), t (teacher)
    already divided by T. Returns (div (c,), dloss/ds (c, V)). Overwrites nothing it is given."""
    logp = torch.log_softmax(s, dim=-1)  # (c, V)
    logq = torch.log_softmax(t, dim=-1)  # (c, V)
    p = logp.exp()
    if kind == "forward":
        q = logq.exp()
        div = (q * (logq - logp)).sum(-1)
        return div, p - q
    if kind == "reverse":
        g = logp - logq  # dKL(p||q)/dp_v = g_v + 1; the +1 vanishes through the softmax
        div = (p * g).sum(-1)
    elif kind == "jsd":
        a = 1.0 - beta
        logm = torch.logaddexp(logp + math.log(a), logq + math.log(beta))  # log m, no c x V temporaries of p, q
        div = beta * (logq.exp() * (logq - logm)).sum(-1) + a * (p * (logp - logm)).sum(-1)
        # dJSD/dp_v = a * (log p_v - log m_v) (the terms through m cancel against the +a).
        g = a * (logp - logm)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    # Through the softmax: dL/ds_v = p_v * (g_v - sum_u p_u g_u).
    grad = p * (g - (p * g).sum(-1, keepdim=True))
    return div, grad


class _ChunkedKD(torch.autograd.Function):
    """(h (N, H), weight (V, H)) and a per-chunk target -> sum of per-token losses.

    `chunk_loss(s, e, logits)` gets the student's fp32 logits (c, V) of rows s:e over the
    shared vocab range V <= weight rows and returns (loss (c,), dloss/dlogits (c, V)).
    Like loss.py, forward computes the gradients and saves only them (N x H, V x H)."""

    @staticmethod
    def forward(ctx, h, weight, chunk_loss, V, chunk_size, need_grad_h, need_grad_w):
        N = h.shape[0]
        w = weight[:V]  # (V, H): rows past the shared range get no logits and no gradient
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad_h else None
        grad_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad_w else None
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            x = h[s:e].to(weight.dtype)  # (c, H)
            logits = (x @ w.t()).float()  # (c, V) fp32
            loss, dlogits = chunk_loss(s, e, logits)
            loss_sum += loss.sum()
            if not (need_grad_h or need_grad_w):
                continue
            dl = dlogits.to(weight.dtype)
            if need_grad_h:
                grad_h[s:e] = dl @ w  # (c, H)
            if need_grad_w:
                grad_w32[:V] += (dl.t() @ x).float()  # (V, c) @ (c, H)
        grad_w = None
        if need_grad_w:
            grad_w = grad_w32 if weight.dtype == torch.float32 else grad_w32.to(weight.dtype)
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.save_for_backward(*[g for g in (grad_h, grad_w) if g is not None])
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0).mul_(grad_loss) if ctx.has[0] else None
        grad_w = saved.pop(0).mul_(grad_loss) if ctx.has[1] else None
        return grad_h, grad_w, None, None, None, None, None


# ---------------------------------------------------------------------------- shared checks

def _labelled(hidden: Tensor, labels: Tensor, what: str) -> Tensor:
    """Indices (N,) of the labelled positions of hidden (B, T, H) or (N, H)."""
    if hidden.dim() not in (2, 3):
        raise ValueError(f"{what} must be (B, T, H) or (N, H), got shape {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal {what}'s leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def _check_head(hidden: Tensor, head: Tensor, what: str) -> None:
    if head.dim() != 2 or head.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{what} head must be (vocab, {hidden.shape[-1]}) to match its hidden states, "
                         f"got {tuple(head.shape)}")


def _check_labels(y: Tensor, V: int, Vs: int, Vt: int | None) -> None:
    if y.numel() and (int(y.max()) >= V or int(y.min()) < 0):
        bad = int(y.max()) if int(y.max()) >= V else int(y.min())
        raise ValueError(f"label {bad} lies outside the vocabulary range [0, {V}) shared by student ({Vs}) and "
                         f"teacher ({Vt}); the two models must share a tokenizer (vocab sizes may differ only "
                         "by padding rows)")


def _run(h: Tensor, head: Tensor, chunk_loss: Callable, V: int, chunk_size: int,
         num_items, n: int) -> KDOutput:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    grad_on = torch.is_grad_enabled()
    loss_sum = _ChunkedKD.apply(h, head, chunk_loss, V, chunk_size, grad_on and h.requires_grad,
                                grad_on and head.requires_grad)
    return KDOutput(loss_sum / _normaliser(num_items, n, loss_sum.device), n, loss_sum.detach())


# ---------------------------------------------------------------------------- online KD

def chunked_kd_loss(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
                    labels: Tensor, *, kind: str = "forward", temperature: float = 1.0,
                    num_items: int | float | Tensor | None = None, chunk_size: int = 1024,
                    jsd_beta: float = 0.5) -> KDOutput:
    """Divergence between teacher and student next-token distributions on labelled positions.

    student_hidden (B, T, Hs) or (N, Hs) and teacher_hidden with the same leading shape (its
    own width Ht); heads (Vs, Hs), (Vt, Ht); labels aligned with the hidden states (-100 =
    ignored; other values only select positions and are range-checked). kind: "forward",
    "reverse" or "jsd" (see the module docstring); the per-token loss is multiplied by
    temperature**2. num_items: labelled tokens across the whole accumulated batch (default:
    those here). Gradients flow to student_hidden and, if it requires grad, student_head;
    never to the teacher. Peak memory: a few chunk_size x V fp32 buffers.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kind == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta} (0 or 1 makes the JSD identically 0)")
    pos = _labelled(student_hidden, labels, "student_hidden")
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} must equal "
                         f"student_hidden's {tuple(student_hidden.shape[:-1])}: both models read the same tokens")
    _check_head(student_hidden, student_head, "student")
    _check_head(teacher_hidden, teacher_head, "teacher")
    Vs, Vt = student_head.shape[0], teacher_head.shape[0]
    V = min(Vs, Vt)
    _check_labels(labels.reshape(-1)[pos], V, Vs, Vt)
    h = student_hidden.reshape(-1, student_hidden.shape[-1])[pos]  # (N, Hs): autograd scatters back
    th = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[pos]  # (N, Ht)
    tw = teacher_head.detach()[:V]
    T = float(temperature)

    def chunk_loss(s: int, e: int, logits: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            t = (th[s:e].to(tw.dtype) @ tw.t()).float()  # (c, V)
        div, grad = _divergence(logits / T, t / T, kind, jsd_beta)
        # loss = T^2 * D(z_s / T): dloss/dz_s = T^2 * (1/T) * dD/ds = T * dD/ds.
        return div * (T * T), grad * T

    return _run(h, student_head, chunk_loss, V, chunk_size, num_items, pos.numel())


def kd_loss_reference(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, kind: str = "forward",
                      temperature: float = 1.0, num_items: int | float | None = None,
                      jsd_beta: float = 0.5) -> KDOutput:
    """Full-logits reference for `chunked_kd_loss` (tests), written with torch ops and autograd:
    logits (..., Vs) and (..., Vt), labels (...)."""
    V = min(student_logits.shape[-1], teacher_logits.shape[-1])
    mask = labels.reshape(-1) != IGNORE_INDEX
    T = float(temperature)
    logp = torch.log_softmax(student_logits[..., :V].reshape(-1, V)[mask].float() / T, -1)
    logq = torch.log_softmax(teacher_logits[..., :V].reshape(-1, V)[mask].float().detach() / T, -1)
    kl = torch.nn.functional.kl_div  # kl_div(input=log r, target=log s, log_target) = sum s (log s - log r)
    if kind == "forward":
        per = kl(logp, logq, log_target=True, reduction="none").sum(-1)
    elif kind == "reverse":
        per = kl(logq, logp, log_target=True, reduction="none").sum(-1)
    else:
        logm = torch.log(jsd_beta * logq.exp() + (1 - jsd_beta) * logp.exp())
        per = (jsd_beta * kl(logm, logq, log_target=True, reduction="none").sum(-1)
               + (1 - jsd_beta) * kl(logm, logp, log_target=True, reduction="none").sum(-1))
    loss_sum = per.sum() * T * T
    n = int(mask.sum())
    return KDOutput(loss_sum / _normaliser(num_items, n, loss_sum.device), n, loss_sum.detach())


# ---------------------------------------------------------------------------- offline KD (top-k)

def kd_from_topk(student_hidden: Tensor, student_head: Tensor, labels: Tensor, topk_ids: Tensor,
                 topk_logprobs: Tensor, tail_logprob: Tensor, *, temperature: float = 1.0,
                 num_items: int | float | Tensor | None = None, chunk_size: int = 1024) -> KDOutput:
    """Forward KL from a teacher known only by its top-k, on labelled positions.

    topk_ids (N, k), topk_logprobs (N, k) and tail_logprob (N,) hold, for the N labelled
    positions of `labels` in row-major order, the teacher's k most likely ids, their
    log-probs, and log Q_tail = logsumexp of the teacher log-probs outside the top-k (as
    `TeacherCache` stores them, at the temperature the cache was made with — pass the same
    `temperature`). With S the top-k set, p the student distribution at temperature T and
    P_tail = sum_{v not in S} p_v, the loss per token is the exact KL between the two
    distributions coarsened to k + 1 buckets (each top-k id, then "everything else"):

        T^2 * [ sum_{i in S} q_i (log q_i - log p_i) + Q_tail (log Q_tail - log P_tail) ]

    (0 * log 0 = 0 when the tail is empty). It equals forward KL when k covers the vocab.
    Its gradient w.r.t. z_s / T is p * sum(r) - r with the target r_i = q_i on S and
    r_v = Q_tail * p_v / P_tail off S: the tail mass is spread as the student spreads it.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    pos = _labelled(student_hidden, labels, "student_hidden")
    _check_head(student_hidden, student_head, "student")
    N = pos.numel()
    if topk_ids.dim() != 2 or topk_ids.shape[0] != N or topk_logprobs.shape != topk_ids.shape \
            or tail_logprob.shape != (N,):
        raise ValueError(f"for {N} labelled positions expected topk_ids and topk_logprobs (N, k) and tail_logprob "
                         f"(N,), got {tuple(topk_ids.shape)}, {tuple(topk_logprobs.shape)}, "
                         f"{tuple(tail_logprob.shape)}; gather the cache rows of exactly this batch's samples")
    V = student_head.shape[0]
    _check_labels(labels.reshape(-1)[pos], V, V, None)
    if topk_ids.numel() and (int(topk_ids.max()) >= V or int(topk_ids.min()) < 0):
        raise ValueError(f"teacher top-k id {int(topk_ids.max())} is outside the student's vocab [0, {V}); "
                         "the cache was made with a teacher whose tokenizer differs")
    h = student_hidden.reshape(-1, student_hidden.shape[-1])[pos]
    ids = topk_ids.to(h.device, torch.long)
    lq = topk_logprobs.to(h.device, torch.float32)
    ltail = tail_logprob.to(h.device, torch.float32)
    T = float(temperature)

    def chunk_loss(s: int, e: int, logits: Tensor) -> tuple[Tensor, Tensor]:
        logp = torch.log_softmax(logits / T, dim=-1)  # (c, V)
        idx, lqc, ltc = ids[s:e], lq[s:e], ltail[s:e]
        in_top = torch.zeros_like(logp, dtype=torch.bool).scatter_(1, idx, True)
        lp_top = logp.gather(1, idx)  # (c, k)
        lp_tail = torch.logsumexp(logp.masked_fill(in_top, float("-inf")), dim=-1)  # (c,), -inf if empty
        q_tail = ltc.exp()
        tail_term = torch.where(q_tail > 0, q_tail * (ltc - lp_tail), torch.zeros_like(q_tail))
        div = (lqc.exp() * (lqc - lp_top)).sum(-1) + tail_term
        p = logp.exp()
        # r: Q_tail * p_v / P_tail off S (0 where the tail is empty or has no teacher mass), q_i on S.
        scale = torch.where(q_tail > 0, (ltc - lp_tail).exp(), torch.zeros_like(q_tail))  # (c,)
        r = (p * scale[:, None]).masked_fill_(in_top, 0.0).scatter_(1, idx, lqc.exp())
        grad = p * r.sum(-1, keepdim=True) - r
        return div * (T * T), grad * T

    return _run(h, student_head, chunk_loss, V, chunk_size, num_items, N)


def topk_targets(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(c, V) teacher logits -> top-k ids (c, k) int32, their log-probs (c, k) fp32, and the tail
    log-mass (c,) fp32 = logsumexp of the log-probs outside the top-k (-inf when k == V)."""
    logq = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    lq, ids = logq.topk(k, dim=-1)
    tail = torch.logsumexp(logq.scatter(1, ids, float("-inf")), dim=-1)
    return ids.to(torch.int32), lq, tail
