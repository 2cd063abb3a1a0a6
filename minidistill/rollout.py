"""Rollouts for on-policy distillation: the student samples completions of prompts with the
ragged batched sampler (sampling.py), and the completions become a training `Batch` whose
labels are the student's own tokens.

A rollout's training sample is prompt + completion, packed into rows like SFT samples, with
next-token labels on the completion only: the prompt carries no loss, a completion that
ended on a stop id has that stop token labelled like any other token (a student that never
learns to stop is the classic failure), and a completion cut at `max_new_tokens` is labelled
up to the cut, with nothing after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .batches import Batch, make_batches
from .loss import IGNORE_INDEX
from .samples import DataSummary, Sample, SFTData
from .replies import encode_prompt
from .sampling import iter_generate


@dataclass
class Rollouts:
    """Completions sampled by `rollout`, one entry per rollout (prompt i's samples are
    consecutive). completion_ids holds the sampled tokens, the stop token included when the
    rollout finished; finished is False for a rollout cut at max_new_tokens; prompt_index names
    the prompt of the call that each rollout answers."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    finished: list[bool]
    prompt_index: list[int]

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def lengths(self) -> list[int]:
        """Sampled tokens of each rollout (the stop token counts)."""
        return [len(c) for c in self.completion_ids]

    def __getitem__(self, s: slice) -> "Rollouts":
        return Rollouts(self.prompt_ids[s], self.completion_ids[s], self.finished[s], self.prompt_index[s])


@dataclass
class RolloutBatch(Batch):
    """A `Batch` of rollouts (labels = the sampled tokens), with the rollouts it was built from;
    the trainer gives it the on-policy loss instead of cross-entropy."""

    rollouts: Rollouts | None = None


@torch.no_grad()
def rollout(model, tok, prompts: Sequence, *, max_new_tokens: int = 256, temperature: float = 1.0,
            top_p: float = 1.0, samples_per_prompt: int = 1, seed: int | Sequence[int] = 0,
            stop_ids: Sequence[int] | None = None, batch_size: int | None = None) -> Rollouts:
    """Sample `samples_per_prompt` completions of each prompt (ids, a chat, or a user message; see
    `encode_prompt`) from `model` as it is now (LoRA included), all decoding together.

    Rollout j (prompt j // samples_per_prompt) draws its uniforms from seed + j, or from seed[j]
    for a list of one seed per rollout: its tokens depend on nothing else. stop_ids: what ends
    a rollout (default: the tokenizer's stop ids). batch_size: sequences decoded together
    (default: all). The model samples in eval mode (no dropout) and gets its mode back after."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if not prompts:
        raise ValueError("rollout needs at least one prompt")
    stops = list(tok.stop_ids if stop_ids is None else stop_ids)
    if not stops:
        raise ValueError("no stop id: a rollout could never finish; pass stop_ids (e.g. [tok.eos_id])")
    ids = [encode_prompt(tok, p) for p in prompts]
    rows = [ids[i] for i in range(len(ids)) for _ in range(samples_per_prompt)]
    n = len(rows)
    if not isinstance(seed, int) and len(seed) != n:
        raise ValueError(f"{len(seed)} seeds for {n} rollouts ({len(ids)} prompts x {samples_per_prompt}); "
                         "give one per rollout, or one int")
    was_training = model.training
    model.eval()
    try:
        done = iter_generate(model, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             stop_ids=stops, seed=seed, batch_size=batch_size or n)
        done = sorted(done, key=lambda c: c.index)
    finally:
        model.train(was_training)
    # No stop strings here: a rollout finished exactly when a stop id ended it, and that id is trained on.
    completions = [list(c.ids) + ([c.stop_id] if c.stop_id is not None else []) for c in done]
    finished = [c.stop_id is not None for c in done]
    return Rollouts(rows, completions, finished, [j // samples_per_prompt for j in range(n)])


def rollout_samples(r: Rollouts) -> list[Sample]:
    """One training sample per rollout: ids prompt + completion, labels[t] = ids[t + 1] on the
    completion tokens (the prompt and anything after the last token carry IGNORE_INDEX)."""
    out = []
    for p, c in zip(r.prompt_ids, r.completion_ids):
        ids = np.asarray(list(p) + list(c), dtype=np.int64)
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        labels[len(p) - 1: len(ids) - 1] = c  # position t predicts token t + 1
        out.append(Sample(ids, labels))
    return out


def rollout_batch(r: Rollouts, *, seq_len: int | None = None, pad_id: int = 0,
                  pad_to_multiple: int = 1) -> RolloutBatch:
    """The rollouts as one training batch: packed rows of at most seq_len tokens (default and
    at least: the longest rollout), attention within each rollout, labels = the sampled tokens."""
    if not len(r):
        raise ValueError("rollout_batch needs at least one rollout")
    samples = rollout_samples(r)
    longest = max(len(s.ids) for s in samples)
    data = SFTData(samples, DataSummary())
    b = make_batches(data, len(samples), max(seq_len or 0, longest, 2), packing=True, shuffle=False, pad_id=pad_id,
                     pad_to_multiple=pad_to_multiple)[0]
    return RolloutBatch(**vars(b), rollouts=r)
