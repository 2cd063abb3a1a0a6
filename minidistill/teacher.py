"""The distillation term of the training loss: a teacher model run online on each batch, or
the teacher's top-k next-token distributions read from a cache (teacher_cache.py)."""

from __future__ import annotations

from typing import Callable

import torch

from .teacher_cache import TeacherCache
from .kd import chunked_kd_loss, kd_from_topk
from .loader import load_model
from .tokenizer import load_tokenizer


def make_kd(cfg, tok, data, device, dtype, log) -> Callable | None:
    """The distillation term `kd(hidden, head, labels, positions, batch, num_items) -> KDOutput` of a
    TrainConfig: online from a teacher model, or offline from a top-k cache; None without either."""
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
            ids, logprobs, tail = cache.gather([i for row in batch.rows for i in row])
            return kd_from_topk(hidden, head, labels, ids.to(device), logprobs.to(device), tail.to(device),
                                temperature=d.kd_temperature, num_items=num_items, positions=positions,
                                chunk_budget_mb=cfg.loss_chunk_mb)
        return from_cache
    if not d.teacher:
        return None
    # Teacher and student must tokenize alike: the KD targets are the teacher's next-token
    # distributions over the student's ids.
    t_tok = load_tokenizer(d.teacher)
    for s in data.samples[:3]:
        text = tok.decode(s.ids)
        if t_tok.encode(text) != tok.encode(text):
            raise ValueError(f"teacher {d.teacher} and student {cfg.model} tokenize differently; online KD "
                             "needs a shared tokenizer (use traces from the teacher instead: "
                             "python -m minidistill.generate --prompts ... --output traces.jsonl)")
    teacher = load_model(d.teacher, dtype=dtype, device=device, quantize=d.teacher_quantize).requires_grad_(False)
    log(f"teacher {d.teacher}: {teacher.num_parameters():,} parameters, frozen")

    def online(hidden, head, labels, positions, batch, num_items):
        with torch.no_grad():
            t_hidden = teacher(**batch.model_inputs(device), return_hidden=True)
        return chunked_kd_loss(hidden, head, t_hidden, teacher.head_weight, labels, kind=d.kd_loss,
                               temperature=d.kd_temperature, num_items=num_items, positions=positions,
                               chunk_budget_mb=cfg.loss_chunk_mb)
    return online
