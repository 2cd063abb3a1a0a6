"""Logit distillation across tokenizers: the losses, and the per-sample plan that feeds them.

The teacher reads each conversation in its own chat format and tokens; align.py pairs student
positions with teacher positions whose next-token targets agree, vocab_map.py maps teacher ids
to student ids. Per training batch the teacher runs on its own token rows (`CrossPlan.teacher_rows`),
its hidden states are gathered at the aligned positions (strict and inner targets of align.py;
inner ones use the prefix-conditioned maps) and projected through its head, a chunk
at a time, inside the student's chunked head (chunked.chunked_head; per-chunk maths only, as in
kd.py). KD applies only where a position is aligned; CE applies everywhere (trainer).

Mapped forward KL (`mapped_kd_loss`), per aligned position, with q the teacher distribution at
temperature T over its real vocabulary (rows of the tokenizer; padding rows excluded) and M the
vocabulary map: the teacher mass is pushed onto student ids, q_s(v) = sum_{t: M(t) = v} q(t);
the mass on unmapped teacher ids (special tokens without a counterpart, bytes the student lacks)
is dropped and q_s renormalised over the mapped support, q_s /= sum(q_s) — the student is asked
to match the teacher's distribution *given* that the next text is something the student can
write. (A position whose mass is all unmapped gets no loss.) Then T^2 * KL(q_s || p) with p the
student's softmax at T over its whole head, and its gradient (p - q_s) * T w.r.t. the logits.

ULD term (`uld_loss`, Boizard et al. 2024, "Towards cross-tokenizer distillation"): the L1
distance between the two distributions' probabilities sorted in decreasing order (the shorter
vocabulary padded with zeros), which needs no correspondence between ids. It is used, with
`kind="uld"`, at positions whose next tokens start at the same character but do not line up
(align.py's loose partners), in addition to the mapped KL at aligned positions. Also x T^2.

Normalisation: both sums are divided by num_items, the trained tokens of the whole accumulated
batch (as every loss here), so positions without a target contribute zero: the KD term is the
average over trained tokens with uncovered ones at 0. `KDOutput.coverage` reports the share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .chunked import (DEFAULT_CHUNK_BUDGET_MB, chunked_head, compute_dtype, loss_denominator, resolve_chunk_size,
                      rows_at)
from .align import align_conversation, sample_targets
from .kd import KDOutput, _check_temperature, _log_softmax_
from .vocab_map import PrefixMaps
from .vocab_map import vocab_map as load_vocab_map

XKINDS = ("forward", "uld")
_BUFFERS = {"forward": 5, "uld": 6}  # chunk x max(Vs, Vt) fp32 buffers at the peak of each maths


def _prepare(student_hidden, student_head, teacher_hidden, teacher_head, student_pos, teacher_pos, temperature):
    T = _check_temperature(temperature)
    for name, h, w in (("student", student_hidden, student_head), ("teacher", teacher_hidden, teacher_head)):
        if w.dim() != 2 or w.shape[1] != h.shape[-1]:
            raise ValueError(f"{name} head must be (vocab, {h.shape[-1]}) to match its hidden states, "
                             f"got {tuple(w.shape)}")
    if student_pos.shape != teacher_pos.shape or student_pos.dim() != 1:
        raise ValueError(f"student_pos and teacher_pos must be 1-D of one length (aligned pairs), got "
                         f"{tuple(student_pos.shape)} and {tuple(teacher_pos.shape)}")
    h = rows_at(student_hidden, student_pos.to(student_hidden.device, torch.long))  # (N, Hs)
    th = rows_at(teacher_hidden.detach(), teacher_pos.to(teacher_hidden.device, torch.long))  # (N, Ht)
    return T, h, th


@dataclass
class MapIndex:
    """A vocabulary map as index pairs, on the device: teacher ids `src` (n,) with a student
    counterpart, their student ids `dst` (n,), the teacher's real vocabulary size and the
    student's. Built once (`map_index`) so a step does no host sync to read the map."""
    src: Tensor
    dst: Tensor
    teacher_vocab: int
    student_vocab: int


def map_index(vocab_map, student_vocab: int, device: torch.device | str = "cpu") -> MapIndex:
    """A (Vt,) vocabulary map (numpy or a CPU tensor; vocab_map.py) as a `MapIndex` on `device`;
    ValueError when it points past the student's vocabulary."""
    vm = np.asarray(vocab_map.cpu() if isinstance(vocab_map, Tensor) else vocab_map, dtype=np.int64)
    if vm.size and int(vm.max()) >= student_vocab:
        raise ValueError(f"the vocabulary map points at student id {int(vm.max())} but the student head has "
                         f"{student_vocab} rows: it was built for another student tokenizer")
    src = np.nonzero(vm >= 0)[0]
    return MapIndex(torch.as_tensor(src, device=device), torch.as_tensor(vm[src], device=device), len(vm),
                    student_vocab)


def pairs_index(src, dst, teacher_vocab: int, student_vocab: int, device: torch.device | str = "cpu") -> MapIndex:
    """A `MapIndex` from (teacher id, student id) pairs, e.g. a vocab_map.PrefixMaps map."""
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    if dst.size and int(dst.max()) >= student_vocab:
        raise ValueError(f"a map points at student id {int(dst.max())} but the student head has {student_vocab} rows")
    return MapIndex(torch.as_tensor(src, device=device), torch.as_tensor(dst, device=device), teacher_vocab,
                    student_vocab)


def mapped_distribution(teacher_logits: Tensor, index: MapIndex | list[MapIndex], temperature: float = 1.0,
                        map_ids: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
    """(c, Vt) teacher logits (consumed) -> the mapped, renormalised q_s (c, Vs) and the mapped
    mass (c,) before renormalisation (0: the row has no target). With a list of maps, row i uses
    map map_ids[i] (host ints: the plain map 0, or one conditioned on a prefix)."""
    maps = [index] if isinstance(index, MapIndex) else index
    t = teacher_logits[:, : maps[0].teacher_vocab].float()
    if temperature != 1.0:
        t = t.div_(temperature)
    q = _log_softmax_(t).exp_()  # (c, Vt)
    qs = q.new_zeros(q.shape[0], maps[0].student_vocab)
    groups = [0] if map_ids is None else np.unique(map_ids).tolist()
    for g in groups:
        m = maps[g]
        if len(groups) == 1:
            qs.index_add_(1, m.dst, q.index_select(1, m.src))
        else:  # the rows of this map only
            rows = torch.as_tensor(np.nonzero(map_ids == g)[0], device=q.device)
            part = q.new_zeros(len(rows), qs.shape[1]).index_add_(1, m.dst, q[rows].index_select(1, m.src))
            qs.index_copy_(0, rows, part)
    mass = qs.sum(-1)
    qs.div_(torch.where(mass > 0, mass, torch.ones_like(mass))[:, None])
    return qs, mass


def mapped_kd_loss(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
                   vocab_map, student_pos: Tensor, teacher_pos: Tensor, *, temperature: float = 1.0,
                   num_items: int | float | Tensor | None = None, chunk_size: int | None = None,
                   chunk_budget_mb: float = DEFAULT_CHUNK_BUDGET_MB, map_ids: np.ndarray | None = None
                   ) -> KDOutput:
    """Forward KL from the teacher's distribution mapped onto the student vocabulary (module docstring).

    student_hidden (B, T, Hs) or (N', Hs), teacher_hidden (B', T', Ht) or (N'', Ht): their own
    layouts; student_pos / teacher_pos (N,): flat indices of the aligned pairs into each.
    vocab_map: the (Vt,) student id of each teacher id (-1: unmapped; teacher head rows past it
    are padding and excluded), or its `MapIndex` (no host sync), or a list of MapIndex with
    map_ids (N,) host ints choosing one per pair (CrossPlan: prefix-conditioned maps for student
    positions inside a teacher token). num_items as in kd.py. Gradients reach the student only."""
    T, h, th = _prepare(student_hidden, student_head, teacher_hidden, teacher_head, student_pos, teacher_pos,
                        temperature)
    Vs = student_head.shape[0]
    maps = vocab_map if isinstance(vocab_map, list) else [vocab_map]
    maps = [m if isinstance(m, MapIndex) else map_index(m, Vs, h.device) for m in maps]
    index = maps[0]
    if map_ids is not None and len(map_ids) != h.shape[0]:
        raise ValueError(f"map_ids has {len(map_ids)} entries for {h.shape[0]} position pairs")
    if any(m.student_vocab != Vs for m in maps):
        raise ValueError(f"the MapIndex is for a {index.student_vocab}-row student head, this one has {Vs}")
    if teacher_head.shape[0] < index.teacher_vocab:
        raise ValueError(f"the teacher head has {teacher_head.shape[0]} rows, fewer than the {index.teacher_vocab} "
                         "ids of the vocabulary map (its tokenizer's size): a teacher checkpoint for this tokenizer?")
    Vt = index.teacher_vocab
    tw = teacher_head.detach()[:Vt]
    tw = tw.to(compute_dtype(th.device, tw))
    chunk = resolve_chunk_size(chunk_size, chunk_budget_mb, max(Vs, Vt), student_hidden.shape[-1],
                               student_head.dtype, _BUFFERS["forward"])

    def chunk_fn(s: int, e: int, logits: Tensor, need_grad: bool):
        qs, mass = mapped_distribution(th[s:e].to(tw.dtype) @ tw.t(), maps, T,
                                       None if map_ids is None else map_ids[s:e])  # (c, Vs), (c,)
        if T != 1.0:
            logits.div_(T)
        has = mass > 0
        logp = _log_softmax_(logits)
        div = torch.xlogy(qs, qs).sum(-1) - (qs * logp).sum(-1)  # sum q_s (log q_s - log p)
        div = torch.where(has, div, torch.zeros_like(div)) * (T * T)
        if not need_grad:
            return div, None
        return div, logp.exp_().sub_(qs).mul_((has.float() * T)[:, None])  # (p - q_s) T

    loss_sum = chunked_head(h, student_head, chunk_fn, chunk_size=chunk)
    n = h.shape[0]
    return KDOutput(loss_sum / loss_denominator(num_items, n, loss_sum.device), n, loss_sum.detach())


def uld_loss(student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
             student_pos: Tensor, teacher_pos: Tensor, *, temperature: float = 1.0,
             num_items: int | float | Tensor | None = None, teacher_vocab: int | None = None,
             chunk_size: int | None = None, chunk_budget_mb: float = DEFAULT_CHUNK_BUDGET_MB) -> KDOutput:
    """T^2 * sum_i |sort(p)_i - sort(q)_i| at the position pairs (module docstring); arguments as in
    `mapped_kd_loss`, teacher_vocab: the teacher's real rows (default: all its head rows)."""
    T, h, th = _prepare(student_hidden, student_head, teacher_hidden, teacher_head, student_pos, teacher_pos,
                        temperature)
    Vs = student_head.shape[0]
    Vt = min(teacher_head.shape[0], teacher_vocab or teacher_head.shape[0])
    n_common = min(Vs, Vt)
    tw = teacher_head.detach()[:Vt]
    tw = tw.to(compute_dtype(th.device, tw))
    chunk = resolve_chunk_size(chunk_size, chunk_budget_mb, max(Vs, Vt), student_hidden.shape[-1],
                               student_head.dtype, _BUFFERS["uld"])

    def chunk_fn(s: int, e: int, logits: Tensor, need_grad: bool):
        t = (th[s:e].to(tw.dtype) @ tw.t()).float()  # (c, Vt)
        if T != 1.0:
            logits.div_(T)
            t.div_(T)
        qsort = _log_softmax_(t).exp_().sort(dim=-1, descending=True).values  # (c, Vt)
        del t
        p = _log_softmax_(logits).exp_()  # (c, Vs)
        psort, perm = p.sort(dim=-1, descending=True)
        d = psort[:, :n_common] - qsort[:, :n_common]
        # The zero padding of the shorter side: |p_i - 0| or |0 - q_i| past the common length.
        div = d.abs().sum(-1) + psort[:, n_common:].sum(-1) + qsort[:, n_common:].sum(-1)
        if not need_grad:
            return div * (T * T), None
        g_sorted = torch.ones_like(psort)
        g_sorted[:, :n_common] = torch.sign(d)  # d|p_(i) - q_(i)| / dp_(i); +1 on the padded tail
        g = torch.empty_like(p).scatter_(1, perm, g_sorted)  # back to vocabulary order
        # Through the softmax: dL/ds_v = p_v (g_v - sum_u p_u g_u).
        grad = g.sub_((p * g).sum(-1, keepdim=True)).mul_(p)
        return div * (T * T), grad.mul_(T)

    loss_sum = chunked_head(h, student_head, chunk_fn, chunk_size=chunk)
    n = h.shape[0]
    return KDOutput(loss_sum / loss_denominator(num_items, n, loss_sum.device), n, loss_sum.detach())


def xkd_reference(student_logits: Tensor, teacher_logits: Tensor, vocab_map: Tensor | None, *, kind: str = "forward",
                  temperature: float = 1.0) -> Tensor:
    """Plain-torch per-row reference (tests): logits of the N aligned pairs (N, Vs), (N, Vt) ->
    the summed loss, differentiable through autograd (dense, unchunked)."""
    T = float(temperature)
    logp = torch.log_softmax(student_logits.float() / T, -1)
    q = torch.softmax(teacher_logits.float().detach() / T, -1)
    if kind == "forward":
        vm = vocab_map[: q.shape[1]].long()
        onehot = torch.zeros(q.shape[1], logp.shape[1])
        keep = vm >= 0
        onehot[keep.nonzero().squeeze(1), vm[keep]] = 1.0  # (Vt, Vs) the map as a matrix
        qs = q @ onehot
        mass = qs.sum(-1, keepdim=True)
        qs = torch.where(mass > 0, qs / mass.clamp_min(1e-30), qs)
        per = (torch.xlogy(qs, qs) - qs * logp).sum(-1)
    else:
        p = logp.exp()
        n = max(p.shape[1], q.shape[1])
        ps = torch.nn.functional.pad(p, (0, n - p.shape[1])).sort(-1, descending=True).values
        qs = torch.nn.functional.pad(q, (0, n - q.shape[1])).sort(-1, descending=True).values
        per = (ps - qs).abs().sum(-1)
    return per.sum() * T * T


# ---------------------------------------------------------------------------- the per-sample plan

@dataclass
class CrossPlan:
    """What cross-tokenizer KD needs per student sample, built once at setup: the teacher's ids
    of the conversation (its own rendering, cut after the last aligned position), and for each
    labelled position of the sample (in order) the aligned teacher position (strict: mapped KL;
    loose: ULD), -1 where none; plus the vocabulary map and counts for the log."""
    teacher_ids: list[np.ndarray]
    strict: list[np.ndarray]
    loose: list[np.ndarray]
    vocab_map: np.ndarray
    teacher_vocab: int
    stats: dict = field(default_factory=dict)
    # Per sample, per labelled position: which map its target uses (0: vocab_map; k > 0: the map
    # conditioned on prefix_maps[k - 1]'s prefix, for positions inside a teacher token).
    map_ids: list[np.ndarray] | None = None
    prefix_maps: list[tuple[bytes, np.ndarray, np.ndarray]] = field(default_factory=list)

    def maps(self, student_vocab: int, device: torch.device | str = "cpu") -> list[MapIndex]:
        """The plan's maps as MapIndex on `device`, indexed by map id."""
        return [map_index(self.vocab_map, student_vocab, device)] + [
            pairs_index(src, dst, len(self.vocab_map), student_vocab, device) for _, src, dst in self.prefix_maps]

    def coverage(self, uld: bool = False) -> float:
        """Share of all labelled positions with a KD target (mapped KL, or mapped KL or ULD)."""
        n = sum(len(s) for s in self.strict)
        hit = sum(int(((s >= 0) | ((lo >= 0) if uld else False)).sum()) for s, lo in zip(self.strict, self.loose))
        return hit / max(n, 1)

    def teacher_rows(self, sample_indices: list[int], pad_id: int = 0) -> tuple[Tensor, list[int]]:
        """(B, T') right-padded teacher ids of these samples (causal attention: the padding after a
        sample cannot change its positions), and each row's length."""
        rows = [self.teacher_ids[i] for i in sample_indices]
        width = max([len(r) for r in rows] + [1])
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for r, x in enumerate(rows):
            ids[r, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        return ids, [len(r) for r in rows]

    def pairs(self, sample_indices: list[int], width: int, loose: bool = False) -> tuple[Tensor, Tensor, np.ndarray]:
        """For a batch whose labelled positions are these samples' in order: (indices into the
        batch's labelled positions, flat indices into the (B, width) teacher rows, map ids) of the
        strict pairs, or with loose=True of the loose-only ones (loose partner, no strict target)."""
        sel, flat, ids, base = [], [], [], 0
        for r, i in enumerate(sample_indices):
            s = self.strict[i]
            t = np.where(s < 0, self.loose[i], -1) if loose else s
            k = np.nonzero(t >= 0)[0]
            sel.append(k + base)
            flat.append(t[k] + r * width)
            ids.append(np.zeros(len(k), np.int64) if loose or self.map_ids is None else self.map_ids[i][k])
            base += len(s)
        if not sel:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), np.zeros(0, np.int64)
        cat = lambda xs: torch.from_numpy(np.concatenate(xs).astype(np.int64))  # noqa: E731
        return cat(sel), cat(flat), np.concatenate(ids)

    def num_positions(self, sample_indices: list[int]) -> int:
        return sum(len(self.strict[i]) for i in sample_indices)


def build_plan(student_tok, teacher_tok, samples, conversations: list[list[dict] | None], *,
               cache_dir=None, log=None) -> CrossPlan:
    """Align every sample with its conversation rendered by the teacher (align.py) and build the
    vocabulary map (vocab_map.py, cached on disk; the aligned end-of-turn tokens added to it).
    A sample without a conversation, or whose ids are not the student rendering's, gets no target."""
    from .align import byte_lengths

    sb, tb = byte_lengths(student_tok), byte_lengths(teacher_tok)
    t_ids, strict, loose, map_ids = [], [], [], []
    prefixes: dict[bytes, int] = {}
    ends: dict[int, int] = {}
    stats = {"samples": len(samples), "unmatched": 0, "turns_skipped": 0}
    for s, conv in zip(samples, conversations):
        labels = np.asarray(s.labels)
        n = int((labels != -100).sum())
        al = None if conv is None else align_conversation(student_tok, teacher_tok, conv, sb, tb)
        if al is None or [int(i) for i in s.ids] != al.student_ids[: len(s.ids)]:
            stats["unmatched"] += 1
            t_ids.append(np.zeros(1, dtype=np.int64))
            strict.append(np.full(n, -1, dtype=np.int64))
            loose.append(np.full(n, -1, dtype=np.int64))
            map_ids.append(np.zeros(n, dtype=np.int64))
            continue
        st, lo, pre = sample_targets(al, labels)
        map_ids.append(np.array([prefixes.setdefault(p, len(prefixes) + 1) if p else 0 for p in pre], dtype=np.int64))
        stats["turns_skipped"] += al.turns_skipped
        last = max(int(lo.max()), int(st.max())) if lo.size else -1
        t_ids.append(np.asarray(al.teacher_ids[: max(last + 1, 1)], dtype=np.int64))  # nothing after the last target
        strict.append(st)
        loose.append(lo)
        for t, v in al.turn_ends:
            ends.setdefault(int(t), int(v))
    vm = load_vocab_map(teacher_tok, student_tok, extra=ends, cache_dir=cache_dir, log=log)
    pm = PrefixMaps(teacher_tok, student_tok)
    prefix_maps = [(p, *pm.get(p)) for p, _ in sorted(prefixes.items(), key=lambda kv: kv[1])]
    stats["prefixes"] = len(prefix_maps)
    stats["inner"] = int(sum(int((m > 0).sum()) for m in map_ids))
    return CrossPlan(t_ids, strict, loose, vm, len(teacher_tok), stats, map_ids, prefix_maps)
