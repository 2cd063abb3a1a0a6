"""Samples -> batches for one epoch and one rank: packed rows with document masks, or padded.

Packing puts whole samples into rows (best fit), restarts positions per sample and gives each
sample its own document id, so attention never crosses samples (see model.Transformer).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .data import Sample, SFTData
from .loss import IGNORE_INDEX


@dataclass
class Batch:
    input_ids: Tensor  # (B, T) long
    labels: Tensor  # (B, T) long, aligned with positions, -100 = not trained
    weights: Tensor | None  # (B, T) float loss weights; None when all 1
    position_ids: Tensor  # (B, T) restarting at 0 for each packed sample
    document_ids: Tensor | None  # (B, T) sample index within the row when packed, else None
    num_tokens: int  # labelled positions
    num_input_tokens: int  # non-padding input tokens
    rows: list[list[int]]  # sample indices of each row, in order (to find per-sample data, e.g. a teacher cache)

    def model_inputs(self, device: torch.device | str) -> dict:
        """The keyword arguments of `Transformer.forward` for this batch, on `device`."""
        return dict(input_ids=self.input_ids.to(device), position_ids=self.position_ids.to(device),
                    document_ids=None if self.document_ids is None else self.document_ids.to(device))


class Batches(Sequence):
    """One rank's batches of one epoch, built on access: a whole epoch as tensors would not
    fit in memory for 300k samples. Indexable, sized and iterable like a list."""

    def __init__(self, samples: list[Sample], plan: list[list[list[int]]], seq_len: int | None, pad_id: int,
                 weighted: bool):
        self.samples, self.plan, self.seq_len, self.pad_id, self.weighted = samples, plan, seq_len, pad_id, weighted

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return _collate(self.samples, self.plan[i], self.seq_len, self.pad_id, self.weighted)


def make_batches(data: SFTData, batch_size: int, seq_len: int, *, packing: bool = True, shuffle: bool = True,
                 seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1, pad_id: int = 0) -> Batches:
    """Batches of one epoch for one rank, deterministic for (seed, epoch).

    packing: samples best-fit into rows of seq_len (each sample whole), with document_ids
    and positions restarting per sample. Otherwise: padded rows, length-grouped (sorted
    within buckets of 64 batches, then the batches shuffled). All ranks cut the same global
    order: rank r takes batches r, r+W, ...; the last round is filled with empty batches
    (no labelled token) so every rank gets the same number."""
    if batch_size < 1 or seq_len < 2:
        raise ValueError(f"batch_size must be >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    samples = data.samples
    lengths = np.fromiter((len(s.ids) for s in samples), dtype=np.int64, count=len(samples))
    if len(lengths) and lengths.max() > seq_len:
        raise ValueError(f"a sample has {int(lengths.max())} tokens > seq_len {seq_len}; use seq_len >= the "
                         "DataConfig.max_seq_len the data was prepared with")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(samples)) if shuffle else np.arange(len(samples))
    if packing:
        rows = _pack(order, lengths, seq_len)
        if shuffle:
            rows = [rows[i] for i in rng.permutation(len(rows))]
        plan = [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
    else:
        plan = []
        bucket = batch_size * 64
        for b in range(0, len(order), bucket):
            chunk = order[b: b + bucket]
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
            plan += [[[int(i)] for i in chunk[j: j + batch_size]] for j in range(0, len(chunk), batch_size)]
        if shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
    per_rank = -(-len(plan) // world_size)
    mine = [plan[k] if k < len(plan) else [] for k in range(rank, per_rank * world_size, world_size)]
    weighted = any(s.weights is not None for s in samples[:1])
    return Batches(samples, mine, seq_len if packing else None, pad_id, weighted)


def _pack(order: np.ndarray, lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Best-fit: each sample goes to the open row with the least room that still fits it.
    Rows are found through the sorted distinct free amounts (at most seq_len of them)."""
    rows: list[list[int]] = []
    free: dict[int, list[int]] = {}  # free room -> rows with exactly that room
    keys: list[int] = []  # sorted keys of `free`
    for i in order.tolist():
        n = int(lengths[i])
        j = bisect.bisect_left(keys, n)
        if j < len(keys):
            room = keys[j]
            r = free[room].pop()
            if not free[room]:
                del free[room]
                keys.pop(j)
        else:
            r, room = len(rows), seq_len
            rows.append([])
        rows[r].append(i)
        room -= n
        if room > 0:
            if room not in free:
                bisect.insort(keys, room)
                free[room] = []
            free[room].append(r)
    return rows


def _collate(samples: list[Sample], rows: list[list[int]], seq_len: int | None, pad_id: int,
             weighted: bool) -> Batch:
    packed = seq_len is not None
    sample_rows = [list(r) for r in rows]
    if not rows:  # an empty batch that keeps ranks in step: one padding row, nothing to learn
        rows = [[]]
    # Rows are as long as the longest one (packed rows are at most seq_len): no all-padding tail.
    T = max(1, max(sum(len(samples[i].ids) for i in row) for row in rows))
    B = len(rows)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    pos = np.tile(np.arange(T, dtype=np.int64), (B, 1))
    doc = np.zeros((B, T), dtype=np.int64)
    w = np.zeros((B, T), dtype=np.float32) if weighted else None
    n_in = 0
    for b, row in enumerate(rows):
        t = 0
        for d, i in enumerate(row):
            s = samples[i]
            n = len(s.ids)
            ids[b, t: t + n] = s.ids
            labels[b, t: t + n] = s.labels
            pos[b, t: t + n] = np.arange(n)
            doc[b, t: t + n] = d
            if w is not None:
                w[b, t: t + n] = s.weights
            t += n
        n_in += t
        # Padding is a document of its own, positions from 0: it attends only to itself.
        pos[b, t:] = np.arange(T - t)
        doc[b, t:] = len(row)
    lab = torch.from_numpy(labels)
    return Batch(torch.from_numpy(ids), lab, None if w is None else torch.from_numpy(w), torch.from_numpy(pos),
                 torch.from_numpy(doc) if packed else None, int((lab != IGNORE_INDEX).sum()), n_in, sample_rows)
