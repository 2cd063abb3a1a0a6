"""Logit distillation losses on labelled positions only, through the LM heads in chunks.

Same machinery as `loss.py`: `chunked.chunked_head` runs the student head over the labelled
positions a chunk at a time; this module supplies only the per-chunk maths (the teacher's
logits or cached top-k for those rows, the divergence, and its gradient w.r.t. the student
logits). The teacher side never gets a gradient.

Divergences, with p the student and q the teacher distribution at temperature T
(p = softmax(z_s / T), q = softmax(z_t / T)), per labelled token:
  forward  KL(q || p) = sum_v q_v (log q_v - log p_v)     (mean-seeking; the classic KD)
  reverse  KL(p || q) = sum_v p_v (log p_v - log q_v)     (mode-seeking, as in MiniLLM)
  jsd      beta * KL(q || m) + (1 - beta) * KL(p || m),  m = beta * q + (1 - beta) * p
           (the generalised JSD of GKD / TRL; beta = 0.5 is the symmetric JSD)
Each is multiplied by T**2 (Hinton et al. 2015): the gradient w.r.t. the logits scales as
1/T, so T**2 keeps its magnitude independent of T and comparable with the CE loss.

The maths works in place on the chunk's logits; the chunk x V fp32 buffers alive at its peak
are counted in `_BUFFERS` (the chunk size is fitted to them; the previous version held ~9).

Vocabularies: checkpoints pad the vocab differently (Qwen2 151,936 vs 152,064 rows); both
distributions are taken over the shared range [0, min(Vs, Vt)), which must hold every label.

Offline KD (`kd_from_topk`) uses only the teacher's top-k log-probs plus the log of the
mass outside them (see `minidistill.teacher_cache` for the cache that stores them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .chunked import (DEFAULT_CHUNK_BUDGET_MB, chunked_head, compute_dtype, labelled_positions, loss_denominator,
                      resolve_chunk_size, rows_at)
from .loss import IGNORE_INDEX

KINDS = ("forward", "reverse", "jsd")

# chunk x V fp32 buffers alive at the peak of each loss's maths (see the comments in the maths):
# online: student and teacher log-probs, plus one (forward, reverse) or two (jsd) more;
# top-k: the student log-probs plus the log-sum-exp's transient.
_BUFFERS = {"forward": 3, "reverse": 3, "jsd": 4, "topk": 2}


@dataclass
class KDOutput:
    """loss: scalar to backward, sum of per-token divergence * T**2 / num_items.
    num_tokens: labelled positions here. loss_sum: the unnormalised sum, detached, fp32.
    coverage / num_covered: see below (the trainer logs the step's share as kd_coverage)."""

    loss: Tensor
    num_tokens: int
    loss_sum: Tensor
    # Share of the num_tokens positions that have a KD target, and how many: 1.0 / None with a
    # shared tokenizer (every position); below 1 across tokenizers (xkd.py), where unaligned
    # positions get CE only. Host numbers, known without a device sync.
    coverage: float = 1.0
    num_covered: int | None = None


# ---------------------------------------------------------------------------- per-chunk maths

def _log_softmax_(x: Tensor) -> Tensor:
    """log_softmax of fp32 x (c, V) along V, in x's buffer (the log-sum-exp takes one transient)."""
    return x.sub_(torch.logsumexp(x, dim=-1, keepdim=True))


def _divergence_(logp: Tensor, logq: Tensor, kind: str, beta: float, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Per-row divergence (c,) and its gradient w.r.t. the student logits / T (c, V), from fp32
    log-probs logp (student) and logq (teacher), both (c, V) and both consumed (overwritten);
    "reverse" leaves p = exp(logp) in logp's buffer (onpolicy.py's sampled estimator uses it)."""
    if kind == "forward":
        q = logq.exp()  # 3rd buffer
        div = logq.sub_(logp).mul_(q).sum(-1)  # q (log q - log p), in logq's buffer
        return div, (logp.exp_().sub_(q) if need_grad else None)  # p - q
    if kind == "reverse":
        g = torch.sub(logp, logq, out=logq)  # log p - log q; dKL(p||q)/dp_v = g_v + 1
        p = logp.exp_()
        div = (p * g).sum(-1)  # transient 3rd buffer
        # Through the softmax: dL/ds_v = p_v (g_v - sum_u p_u g_u); the +1 vanishes, the sum is div.
        return div, (g.sub_(div[:, None]).mul_(p) if need_grad else None)
    if kind != "jsd":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    a = 1.0 - beta
    # log m = log(beta q + a p) = log q + log beta + log(1 + (a / beta) p / q): no temporaries.
    logm = torch.sub(logp, logq).add_(math.log(a / beta))  # 3rd buffer
    torch.logaddexp(logm, logm.new_zeros(()), out=logm)
    logm.add_(logq).add_(math.log(beta))
    u = logq.sub_(logm)  # log q - log m
    q_term = torch.add(u, logm).exp_().mul_(u).sum(-1)  # sum q (log q - log m); transient 4th buffer
    p = torch.exp(logp, out=u)  # u's buffer is free again
    w = logp.sub_(logm)  # log p - log m
    del logm
    p_term = (p * w).sum(-1)  # sum p (log p - log m); transient 3rd buffer
    div = beta * q_term + a * p_term
    # dJSD/dp_v = a (log p_v - log m_v) (the terms through m cancel against the +a); through the
    # softmax: a p_v (w_v - sum_u p_u w_u), and that sum is p_term.
    return div, (w.sub_(p_term[:, None]).mul_(p).mul_(a) if need_grad else None)


# ---------------------------------------------------------------------------- shared checks

def _check_head(hidden: Tensor, head: Tensor, what: str) -> None:
    if head.dim() != 2 or head.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{what} head must be (vocab, {hidden.shape[-1]}) to match its hidden states, "
                         f"got {tuple(head.shape)}")


def _check_labels(y: Tensor, V: int, Vs: int, Vt: int | None) -> None:
    # Reads values from the device (a host sync): only when the caller passed no positions.
    if y.numel() and (int(y.max()) >= V or int(y.min()) < 0):
        bad = int(y.max()) if int(y.max()) >= V else int(y.min())
        raise ValueError(f"label {bad} lies outside the vocabulary range [0, {V}) shared by student ({Vs}) and "
                         f"teacher ({Vt}); the two models must share a tokenizer (vocab sizes may differ only "
                         "by padding rows)")


def _check_temperature(temperature: float) -> float:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


# ---------------------------------------------------------------------------- online KD

def chunked_kd_loss(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
                    labels: Tensor, *, kind: str = "forward", temperature: float = 1.0,
                    num_items: int | float | Tensor | None = None, positions: Tensor | None = None,
                    chunk_size: int | None = None, chunk_budget_mb: float = DEFAULT_CHUNK_BUDGET_MB,
                    jsd_beta: float = 0.5) -> KDOutput:
    """Divergence between teacher and student next-token distributions on labelled positions.

    student_hidden (B, T, Hs) or (N, Hs) and teacher_hidden with the same leading shape (its
    own width Ht); heads (Vs, Hs), (Vt, Ht); labels aligned with the hidden states (-100 =
    ignored; other values only select positions). kind: "forward", "reverse" or "jsd" (see the
    module docstring); the per-token loss is multiplied by temperature**2. num_items: labelled
    tokens across the whole accumulated batch (default: those here). positions: the flat
    indices of the labelled positions from the collator (no `nonzero`, no host sync; then the
    labels are not range-checked either, which would sync). chunk_size: None picks it from
    chunk_budget_mb (MiB of chunk x V fp32 transients). Gradients flow to student_hidden and,
    if it requires grad, student_head; never to the teacher.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    T = _check_temperature(temperature)
    if kind == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta} (0 or 1 makes the JSD identically 0)")
    pos = labelled_positions(student_hidden, labels, positions, IGNORE_INDEX, "student_hidden")
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} must equal "
                         f"student_hidden's {tuple(student_hidden.shape[:-1])}: both models read the same tokens")
    _check_head(student_hidden, student_head, "student")
    _check_head(teacher_hidden, teacher_head, "teacher")
    Vs, Vt = student_head.shape[0], teacher_head.shape[0]
    V = min(Vs, Vt)
    if positions is None:
        _check_labels(labels.reshape(-1)[pos], V, Vs, Vt)
    chunk = resolve_chunk_size(chunk_size, chunk_budget_mb, V, student_hidden.shape[-1], student_head.dtype,
                               _BUFFERS[kind])
    h = rows_at(student_hidden, pos)  # (N, Hs)
    th = rows_at(teacher_hidden.detach(), pos)  # (N, Ht)
    tw = teacher_head.detach()[:V]
    tw = tw.to(compute_dtype(th.device, tw))  # (V, Ht); a copy only when autocast lowers an fp32 head

    def kd_chunk(s: int, e: int, logits: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        t = (th[s:e].to(tw.dtype) @ tw.t()).float()  # (c, V), 2nd buffer
        if T != 1.0:
            logits.div_(T)
            t.div_(T)
        div, grad = _divergence_(_log_softmax_(logits), _log_softmax_(t), kind, jsd_beta, need_grad)
        # loss = T^2 * D(z_s / T): dloss/dz_s = T^2 * (1/T) * dD/ds = T * dD/ds.
        return div * (T * T), (None if grad is None else grad.mul_(T))

    loss_sum = chunked_head(h, student_head, kd_chunk, chunk_size=chunk, vocab=V)
    n = pos.numel()
    return KDOutput(loss_sum / loss_denominator(num_items, n, loss_sum.device), n, loss_sum.detach())


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
    return KDOutput(loss_sum / loss_denominator(num_items, n, loss_sum.device), n, loss_sum.detach())


# ---------------------------------------------------------------------------- offline KD (top-k)

def kd_from_topk(student_hidden: Tensor, student_head: Tensor, labels: Tensor, topk_ids: Tensor,
                 topk_logprobs: Tensor, tail_logprob: Tensor, *, temperature: float = 1.0,
                 num_items: int | float | Tensor | None = None, positions: Tensor | None = None,
                 chunk_size: int | None = None, chunk_budget_mb: float = DEFAULT_CHUNK_BUDGET_MB,
                 row_mask: Tensor | None = None) -> KDOutput:
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
    positions, chunk_size, chunk_budget_mb: as in `chunked_kd_loss` (with positions, the
    labels and top-k ids are not range-checked: that would sync). row_mask (N,) bool: rows
    that count (a cross-tokenizer cache marks positions without a teacher target False: they
    get no loss and no gradient, but still count in the default denominator).
    """
    T = _check_temperature(temperature)
    pos = labelled_positions(student_hidden, labels, positions, IGNORE_INDEX, "student_hidden")
    _check_head(student_hidden, student_head, "student")
    N = pos.numel()
    if topk_ids.dim() != 2 or topk_ids.shape[0] != N or topk_logprobs.shape != topk_ids.shape \
            or tail_logprob.shape != (N,):
        raise ValueError(f"for {N} labelled positions expected topk_ids and topk_logprobs (N, k) and tail_logprob "
                         f"(N,), got {tuple(topk_ids.shape)}, {tuple(topk_logprobs.shape)}, "
                         f"{tuple(tail_logprob.shape)}; gather the cache rows of exactly this batch's samples")
    V = student_head.shape[0]
    if positions is None:
        _check_labels(labels.reshape(-1)[pos], V, V, None)
        if topk_ids.numel() and (int(topk_ids.max()) >= V or int(topk_ids.min()) < 0):
            raise ValueError(f"teacher top-k id {int(topk_ids.max())} is outside the student's vocab [0, {V}); "
                             "the cache was made with a teacher whose tokenizer differs")
    chunk = resolve_chunk_size(chunk_size, chunk_budget_mb, V, student_hidden.shape[-1], student_head.dtype,
                               _BUFFERS["topk"])
    h = rows_at(student_hidden, pos)  # (N, H)
    ids = topk_ids.to(h.device, torch.long)
    lq_all = topk_logprobs.to(h.device, torch.float32)
    lt_all = tail_logprob.to(h.device, torch.float32)
    if row_mask is not None and row_mask.shape != (N,):
        raise ValueError(f"row_mask must be (N,) = ({N},) like tail_logprob, got {tuple(row_mask.shape)}")
    keep_all = None if row_mask is None else row_mask.to(h.device, torch.bool)

    def topk_chunk(s: int, e: int, logits: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        div, grad = _topk_chunk(s, e, logits, need_grad)
        if keep_all is None:
            return div, grad
        keep = keep_all[s:e]  # rows without a teacher target (cross-tokenizer caches): no loss, no gradient
        return torch.where(keep, div, torch.zeros_like(div)), (None if grad is None else grad.mul_(keep[:, None]))

    def _topk_chunk(s: int, e: int, logits: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None]:
        idx, lq, lt = ids[s:e], lq_all[s:e], lt_all[s:e]  # (c, k), (c, k), (c,)
        if T != 1.0:
            logits.div_(T)
        logp = _log_softmax_(logits)  # (c, V)
        lp_top = logp.gather(1, idx)  # (c, k)
        # log P_tail summed over the tail itself (no 1 - P_top cancellation); -inf if the tail is empty.
        lp_tail = torch.logsumexp(logp.scatter_(1, idx, float("-inf")), dim=-1)  # (c,)
        q_top, q_tail = lq.exp(), lt.exp()
        tail_term = torch.where(q_tail > 0, q_tail * (lt - lp_tail), torch.zeros_like(q_tail))
        div = (q_top * (lq - lp_top)).sum(-1) + tail_term
        if not need_grad:
            return div * (T * T), None
        # r: q_i on S, Q_tail p_v / P_tail off S (0 where the tail is empty or has no teacher
        # mass); so sum(r) = sum_S q + Q_tail, and dL/ds = p sum(r) - r.
        spread = (q_tail > 0) & (lp_tail > float("-inf"))
        scale = torch.where(spread, (lt - lp_tail).exp(), torch.zeros_like(q_tail))  # (c,) Q_tail / P_tail
        r_sum = q_top.sum(-1) + torch.where(spread, q_tail, torch.zeros_like(q_tail))  # (c,)
        grad = logp.exp_().mul_((r_sum - scale)[:, None])  # off S: p_v (sum(r) - Q_tail / P_tail); 0 on S
        grad.scatter_(1, idx, lp_top.exp() * r_sum[:, None] - q_top)  # on S: p_i sum(r) - q_i
        return div * (T * T), grad.mul_(T)

    loss_sum = chunked_head(h, student_head, topk_chunk, chunk_size=chunk)
    return KDOutput(loss_sum / loss_denominator(num_items, N, loss_sum.device), N, loss_sum.detach())


def topk_targets(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(c, V) teacher logits -> top-k ids (c, k) int32, their log-probs (c, k) fp32, and the tail
    log-mass (c,) fp32 = logsumexp of the log-probs outside the top-k (-inf when k == V)."""
    logq = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    lq, ids = logq.topk(k, dim=-1)
    tail = torch.logsumexp(logq.scatter_(1, ids, float("-inf")), dim=-1)
    return ids.to(torch.int32), lq, tail
