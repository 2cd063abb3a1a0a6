"""Samples -> batches for one epoch and one rank: packed rows of whole samples, or padded rows.

Packing puts whole samples into rows (best fit), restarts positions per sample and gives each
sample its own document id. Every batch carries its `DocLayout` (document lengths, cu_seqlens,
max length, non-padding token indices), built here in numpy on the host, so the model's
attention stays within a sample, skips padding, and never reads a length back from the device.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from .attention import DocLayout, doc_layout
from .loss import IGNORE_INDEX
from .samples import Sample, SFTData


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
    layout: DocLayout  # where the samples lie (packed or padded rows): the model's attention metadata
    label_index: Tensor  # (num_tokens,) int64 flat indices into B*T of the labelled positions

    def model_inputs(self, device: torch.device | str, host_ids: bool = False) -> dict:
        """The keyword arguments of `Transformer.forward` for this batch, on `device` (copies are
        non_blocking when the batch is pinned, see `pin`); host_ids: input_ids stay on the host
        (for a model whose embedding is there, `Transformer.embedding_on_host`)."""
        return dict(input_ids=self.input_ids if host_ids else _to(self.input_ids, device),
                    position_ids=_to(self.position_ids, device),
                    layout=self.layout.to(device, non_blocking=self.input_ids.is_pinned()))

    def pin(self) -> "Batch":
        """This batch in pinned host memory, so that `model_inputs` copies to the GPU overlap
        compute; unchanged where there is no CUDA."""
        if not torch.cuda.is_available():
            return self

        def pin(t):
            return None if t is None else t.pin_memory()
        return replace(self, input_ids=pin(self.input_ids), labels=pin(self.labels), weights=pin(self.weights),
                       position_ids=pin(self.position_ids), document_ids=pin(self.document_ids),
                       layout=self.layout.pin(), label_index=pin(self.label_index))


def _to(t: Tensor, device: torch.device | str) -> Tensor:
    return t.to(device, non_blocking=t.is_pinned())


class EpochBatches(Sequence):
    """One rank's batches of one epoch, built on access: a whole epoch as tensors would not
    fit in memory for 300k samples. Indexable, sized and iterable like a list."""

    def __init__(self, samples: list[Sample], plan: list[list[list[int]]], seq_len: int | None, pad_id: int,
                 weighted: bool, pad_to_multiple: int = 1):
        self.samples, self.plan, self.seq_len, self.pad_id, self.weighted = samples, plan, seq_len, pad_id, weighted
        self.multiple = pad_to_multiple

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return _collate(self.samples, self.plan[i], self.seq_len, self.pad_id, self.weighted, self.multiple)

    def fill(self) -> float:
        """The share of the epoch's row slots (B x T of each batch) that hold sample tokens; the rest
        is padding, which the matmuls run over all the same. From the plan, without collating."""
        tokens = slots = 0
        for rows in self.plan:
            used = [sum(len(self.samples[i].ids) for i in row) for row in rows]
            tokens += sum(used)
            slots += max(1, len(rows)) * _row_len(used, self.multiple)
        return tokens / slots if slots else 1.0


def make_batches(data: SFTData, batch_size: int, seq_len: int, *, packing: bool = True, shuffle: bool = True,
                 seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1, pad_id: int = 0,
                 pad_to_multiple: int = 1) -> EpochBatches:
    """Batches of one epoch for one rank, deterministic for (seed, epoch).

    packing: samples best-fit, longest first, into rows of seq_len (each sample whole; the rows
    then shuffled), with document_ids and positions restarting per sample. Otherwise: padded
    rows, length-grouped (sorted within buckets of 64 batches, then the batches shuffled). All
    ranks cut the same global order: rank r takes batches r, r+W, ...; the last round is filled
    with empty batches (no labelled token) so every rank gets the same number. pad_to_multiple:
    row length rounded up to a multiple of it (fewer distinct shapes: less allocator
    fragmentation, fewer recompiles); the padding takes part in no attention and no loss."""
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
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
    return EpochBatches(samples, mine, seq_len if packing else None, pad_id, weighted, pad_to_multiple)


def _pack(order: np.ndarray, lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: longest sample first (ties in `order`, the epoch's shuffle), each
    into the open row with the least room that still fits it. Taken in the shuffled order
    instead, each long sample that comes late opens a row of its own after the short ones have
    filled the others (bench_train.py's 64 train-command traces of 60-380 tokens in rows of 512:
    88-91% of the row tokens filled that way, 94-95% this way). Rows are found through the
    sorted distinct free amounts (at most seq_len of them)."""
    order = order[np.argsort(-lengths[order], kind="stable")]
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


def _row_len(used: list[int], multiple: int) -> int:
    """A batch's row length: its longest row (packed rows are at most seq_len) rounded up to the
    multiple, no all-padding tail beyond that; used: the tokens of each row."""
    return -(-max(1, max(used, default=0)) // multiple) * multiple


def _collate(samples: list[Sample], rows: list[list[int]], seq_len: int | None, pad_id: int,
             weighted: bool, multiple: int = 1) -> Batch:
    packed = seq_len is not None
    sample_rows = [list(r) for r in rows]
    if not rows:  # an empty batch that keeps ranks in step: one padding row, nothing to learn
        rows = [[]]
    lengths = [[len(samples[i].ids) for i in row] for row in rows]
    T = _row_len([sum(r) for r in lengths], multiple)
    B = len(rows)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    pos = np.tile(np.arange(T, dtype=np.int64), (B, 1))
    doc = np.zeros((B, T), dtype=np.int64)
    w = np.zeros((B, T), dtype=np.float32) if weighted else None
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
        # Padding: positions from 0 and a document id of its own (for callers that pass
        # document_ids); the layout leaves it out of attention altogether.
        pos[b, t:] = np.arange(T - t)
        doc[b, t:] = len(row)
    label_index = np.flatnonzero(labels.reshape(-1) != IGNORE_INDEX).astype(np.int64)  # (num_tokens,)
    return Batch(torch.from_numpy(ids), torch.from_numpy(labels), None if w is None else torch.from_numpy(w),
                 torch.from_numpy(pos), torch.from_numpy(doc) if packed else None, len(label_index),
                 sum(map(sum, lengths)), sample_rows, doc_layout(lengths, T), torch.from_numpy(label_index))


class BatchStream:
    """This rank's endless stream of micro-batches. The position lives in the LoopState (epoch,
    index), so a checkpoint that saves the state saves the position. With `ahead` (training on
    a GPU) a background thread collates the next step's micro-batches while a step trains,
    pinned for non-blocking copies; what it returns depends only on the position, so results
    are the same with or without it. `cfg` is the run's TrainConfig (batch size, packing, seed, ...);
    `state` in `take` its LoopState."""

    def __init__(self, data, cfg, rank: int, world: int, pad_id: int, *, ahead: bool = False):
        self.data, self.cfg, self.rank, self.world, self.pad_id = data, cfg, rank, world, pad_id
        self.pin = ahead and torch.cuda.is_available()
        self._epoch, self._batches = None, None
        # Only where compute is elsewhere (a GPU): on the CPU the thread would take cores from the step.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="collate") if ahead else None
        self._ahead: tuple[tuple[int, int, int], Future] | None = None
        self._lock = threading.Lock()  # epoch_batches is shared by the thread and the loop

    def epoch_batches(self, epoch: int):
        with self._lock:
            if epoch != self._epoch:
                c = self.cfg
                self._batches = make_batches(self.data, c.batch_size, c.data_config.max_seq_len, packing=c.packing,
                                             shuffle=True, seed=c.seed, epoch=epoch, rank=self.rank,
                                             world_size=self.world, pad_id=self.pad_id, pad_to_multiple=c.pad_to_multiple)
                self._epoch = epoch
            return self._batches

    def _collate(self, epoch: int, index: int, n: int) -> tuple[list, int, int]:
        out = []
        for _ in range(n):
            if index >= len(self.epoch_batches(epoch)):
                epoch, index = epoch + 1, 0
            b = self.epoch_batches(epoch)[index]
            out.append(b.pin() if self.pin else b)
            index += 1
        return out, epoch, index

    def take(self, state, n: int) -> list:
        """The next n micro-batches, advancing state.epoch / state.index."""
        key = (state.epoch, state.index, n)
        if self._ahead is not None and self._ahead[0] == key:
            batches, state.epoch, state.index = self._ahead[1].result()
        else:
            batches, state.epoch, state.index = self._collate(*key)
        if self._pool is not None:
            self._ahead = ((state.epoch, state.index, n), self._pool.submit(self._collate, state.epoch, state.index, n))
        return batches

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
