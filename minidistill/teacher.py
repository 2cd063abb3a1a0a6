"""The distillation term of the training loss: a teacher model run online on each batch, or
the teacher's top-k next-token distributions read from a cache (teacher_cache.py).

Same tokenizer (the fast path): the teacher reads the student's own batch and kd.py compares the
two distributions id for id. Different tokenizers (xkd.py): at setup each sample's conversation
is found again in the data files (`conversations_of`), rendered in the teacher's chat format and
tokens, aligned with the student's (align.py) and the vocabulary map is built (vocab_map.py);
per batch the teacher runs on its own token rows and KD applies at the aligned positions only.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch

from .kd import KDOutput, chunked_kd_loss, kd_from_topk
from .loader import load_model
from .teacher_cache import TeacherCache
from .tokenizer import load_tokenizer
from .xkd import XKINDS, CrossPlan, mapped_kd_loss, uld_loss


def same_tokenizer(student_tok, teacher_tok, id_seqs) -> bool:
    """Whether the two tokenizers have one vocabulary and tokenize the text of the first student
    id sequences (samples' or prompts' ids) alike."""
    if student_tok.backend.get_vocab(with_added_tokens=True) != teacher_tok.backend.get_vocab(with_added_tokens=True):
        return False
    for ids in id_seqs[:3]:
        text = student_tok.decode(ids)
        if teacher_tok.encode(text) != student_tok.encode(text):
            return False
    return True


def _key(ids) -> bytes:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).digest()


def conversations_of(source: str, data_cfg, tok, samples) -> list[list[dict] | None]:
    """The chat messages each prepared sample came from (None where none is found), read again
    from the data files as `samples.prepare_data` reads them and matched on the student's token
    ids (a truncated sample matches its record's first max_seq_len tokens)."""
    from .records import BadRecord, detect_schema, iter_records, resolve_files, to_messages
    from .samples import _prepare_messages

    if data_cfg.plain_text:
        raise ValueError("cross-tokenizer KD renders each conversation in the teacher's chat format; a prompt "
                         "template or --format text has no chat turns to align (use chat-format data)")
    want: dict[bytes, list[int]] = {}
    for i, s in enumerate(samples):
        want.setdefault(_key(s.ids), []).append(i)
    out: list[list[dict] | None] = [None] * len(samples)
    fmt = None if data_cfg.format == "auto" else data_cfg.format
    pending: list[list[dict]] = []

    def flush() -> None:
        texts = [tok.render_chat(m) for m in pending]
        for m, enc in zip(pending, tok.backend.encode_batch(texts, add_special_tokens=False)):
            for i in want.pop(_key(enc.ids[: data_cfg.max_seq_len]), []):
                out[i] = m
        pending.clear()

    for rec in iter_records(resolve_files(source, config=data_cfg.config, split=data_cfg.split), data_cfg.limit):
        if isinstance(rec.data, BadRecord):
            continue
        if fmt is None:
            fmt = detect_schema(rec.data)
            if fmt is None:
                continue
        try:
            pending.append(_prepare_messages(to_messages(rec.data, fmt, data_cfg.system_prompt), data_cfg))
        except (BadRecord, ValueError, KeyError, StopIteration):
            continue
        if len(pending) == 256:
            flush()
        if not want:
            break
    if pending:
        flush()
    return out


def cross_plan(source: str, data_cfg, student_tok, teacher_tok, data, log) -> CrossPlan:
    """The `CrossPlan` of a dataset (xkd.py) with a summary line through `log`."""
    from .xkd import build_plan

    if teacher_tok.format is None:
        raise ValueError("the teacher's tokenizer has no chat template; cross-tokenizer KD renders each "
                         "conversation in the teacher's own chat format")
    plan = build_plan(student_tok, teacher_tok, data.samples, conversations_of(source, data_cfg, student_tok,
                                                                               data.samples))
    st = plan.stats
    log(f"cross-tokenizer KD: {st['samples']:,} samples, {st['unmatched']:,} not found in the data files, "
        f"{st['turns_skipped']:,} assistant turns without shared text; KD targets on "
        f"{100 * plan.coverage():.1f}% of trained tokens ({100 * plan.coverage(uld=True):.1f}% with ULD; "
        f"{st['inner']:,} inside a teacher token, {st['prefixes']:,} prefix maps); "
        f"vocabulary map covers {100 * float((plan.vocab_map >= 0).mean()):.1f}% of the teacher's ids")
    return plan


def _batch_order(batch) -> list[int]:
    return [i for row in batch.rows for i in row]


def make_kd(cfg, tok, data, device, dtype, log) -> Callable | None:
    """The distillation term `kd(hidden, head, labels, positions, batch, num_items) -> KDOutput` of a
    TrainConfig: online from a teacher model, or offline from a top-k cache; None without either.
    A teacher whose tokenizer differs from the student's goes through cross-tokenizer KD; the
    returned KDOutput then carries `coverage` (share of this batch's trained tokens with a target)."""
    d = cfg.distill

    if d.teacher_cache:
        cache = TeacherCache(d.teacher_cache)
        cache.check(data)  # same samples, same order as the cache was made from
        if abs(cache.temperature - d.kd_temperature) > 1e-9:
            raise ValueError(f"--teacher-cache was made at temperature {cache.temperature}; pass "
                             f"--kd-temperature {cache.temperature} or re-run cache-logits")

        def from_cache(hidden, head, labels, positions, batch, num_items):
            if cache.meta["vocab_size"] > head.shape[0]:  # ids past the head: a device-side assert on CUDA
                raise ValueError(f"--teacher-cache {d.teacher_cache} holds ids of a {cache.meta['vocab_size']}-token "
                                 f"vocabulary; the student's head has {head.shape[0]} rows (another tokenizer?)")
            order = _batch_order(batch)
            ids, logprobs, tail = cache.gather(order)
            covered = cache.gather_covered(order)  # None: every position has a target (same tokenizer)
            out = kd_from_topk(hidden, head, labels, ids.to(device), logprobs.to(device), tail.to(device),
                               temperature=d.kd_temperature, num_items=num_items, positions=positions,
                               chunk_budget_mb=cfg.loss_chunk_mb,
                               row_mask=None if covered is None else covered.to(device))
            if covered is not None:
                out.num_covered = int(covered.sum())  # a host tensor: no device sync
                out.coverage = out.num_covered / max(len(covered), 1)
            return out
        return from_cache
    if not d.teacher:
        return None
    t_tok = load_tokenizer(d.teacher)
    if not same_tokenizer(tok, t_tok, [s.ids for s in data.samples[:3]]):
        return _cross_kd(cfg, tok, t_tok, data, device, dtype, log)
    teacher = load_model(d.teacher, dtype=dtype, device=device, quantize=d.teacher_quantize).requires_grad_(False)
    log(f"teacher {d.teacher}: {teacher.num_parameters():,} parameters, frozen")

    def online(hidden, head, labels, positions, batch, num_items):
        with torch.no_grad():
            t_hidden = teacher(**batch.model_inputs(device), return_hidden=True)
        return chunked_kd_loss(hidden, head, t_hidden, teacher.head_weight, labels, kind=d.kd_loss,
                               temperature=d.kd_temperature, num_items=num_items, positions=positions,
                               chunk_budget_mb=cfg.loss_chunk_mb)
    return online


def _cross_kd(cfg, tok, t_tok, data, device, dtype, log) -> Callable:
    """Online KD from a teacher with another tokenizer (module docstring; xkd.py)."""
    from .chunked import labelled_positions
    from .loss import IGNORE_INDEX

    d = cfg.distill
    if d.kd_loss not in XKINDS:
        raise ValueError(f"--kd-loss {d.kd_loss} needs a shared tokenizer; teacher {d.teacher} tokenizes differently "
                         f"from {cfg.model}, which supports --kd-loss {' or '.join(XKINDS)}")
    plan = cross_plan(cfg.data, cfg.data_config, tok, t_tok, data, log)
    teacher = load_model(d.teacher, dtype=dtype, device=device, quantize=d.teacher_quantize).requires_grad_(False)
    log(f"teacher {d.teacher}: {teacher.num_parameters():,} parameters, frozen, own tokenizer")
    index = {}  # the MapIndex, made on the first call (it needs the student head's rows)
    pad = t_tok.pad_id if t_tok.pad_id is not None else (t_tok.eos_id or 0)
    uld = d.kd_loss == "uld"

    def cross(hidden, head, labels, positions, batch, num_items):
        order = _batch_order(batch)
        n = plan.num_positions(order)
        if n != batch.num_tokens:
            raise ValueError(f"this batch has {batch.num_tokens} trained tokens but its samples {order[:8]}... "
                             f"had {n} when the cross-tokenizer plan was built: batch.rows must index `data`")
        pos = labelled_positions(hidden, labels, positions, IGNORE_INDEX)
        denom = n if num_items is None else num_items  # all trained tokens, covered or not (as kd_from_topk)
        t_ids, _ = plan.teacher_rows(order, pad)
        with torch.no_grad():
            t_hidden = teacher(t_ids.to(device), return_hidden=True)  # (B', T', Ht)
        sel, flat, map_ids = plan.pairs(order, t_ids.shape[1])
        if head.shape[0] not in index:
            index[head.shape[0]] = plan.maps(head.shape[0], device)
        out = mapped_kd_loss(hidden, head, t_hidden, teacher.head_weight, index[head.shape[0]], pos[sel.to(device)],
                             flat.to(device), temperature=d.kd_temperature, num_items=denom,
                             chunk_budget_mb=cfg.loss_chunk_mb, map_ids=map_ids)
        covered = len(sel)
        loss, loss_sum = out.loss, out.loss_sum
        if uld:
            sel2, flat2, _ = plan.pairs(order, t_ids.shape[1], loose=True)
            u = uld_loss(hidden, head, t_hidden, teacher.head_weight, pos[sel2.to(device)], flat2.to(device),
                         temperature=d.kd_temperature, num_items=denom, teacher_vocab=plan.teacher_vocab,
                         chunk_budget_mb=cfg.loss_chunk_mb)
            loss, loss_sum, covered = loss + u.loss, loss_sum + u.loss_sum, covered + len(sel2)
        return KDOutput(loss, n, loss_sum, coverage=covered / max(n, 1), num_covered=covered)
    return cross
