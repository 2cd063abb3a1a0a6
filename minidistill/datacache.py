"""The on-disk cache of tokenized training data: flat numpy arrays, keyed by everything that made them.

One folder per key under `$MINIDISTILL_CACHE/data` (default `~/.cache/minidistill/data`), holding
the samples' ids, labels and weights as flat int32/float32 arrays with offsets, their think-token
counts, the data summary and the demo prompts. The key hashes the cache format version, the data
files (path, size, mtime), the data options and the tokenizer's full state, so a change to any of
them misses. Writes go to a temporary folder that is then renamed, so a reader never sees half of
one; loads are memory-mapped, so 300k samples load in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

CACHE_VERSION = 1  # bump when the meaning of cached arrays changes


@dataclass
class CachedData:
    """What a cache folder holds; each sample's arrays are views into the memory-mapped files."""
    ids: list[np.ndarray]  # per sample (L,) int32
    labels: list[np.ndarray]  # per sample (L,) int32
    weights: list[np.ndarray] | None  # per sample (L,) float32; None when every weight is 1
    think_counts: np.ndarray  # (N,) int64 trained think tokens per sample
    summary: dict[str, Any]  # DataSummary fields
    prompts: list[tuple[int, str]]  # (sample index, prompt text)


def cache_key(fingerprint: list, options: dict[str, Any], tok_state: bytes) -> str:
    """Key of one prepared dataset: the data files' fingerprint (`records.data_fingerprint`), the
    options that shape samples (JSON-serialisable) and the tokenizer's state bytes."""
    text = json.dumps([CACHE_VERSION, fingerprint, options]).encode()
    return hashlib.sha256(text + hashlib.sha256(tok_state).digest()).hexdigest()[:24]


def cache_folder(key: str, cache_dir: str | None = None) -> Path:
    """`cache_dir/key`, or under `$MINIDISTILL_CACHE/data` (default `~/.cache/minidistill/data`)."""
    root = os.environ.get("MINIDISTILL_CACHE", Path.home() / ".cache" / "minidistill")
    return Path(cache_dir or Path(root) / "data") / key


def save_cache(folder: Path, ids: list, labels: list, weights: list | None, think_counts,
               summary: dict[str, Any], prompts: list[tuple[int, str]],
               log: Callable[..., None] = print) -> None:
    """Write one dataset (per-sample arrays) as flat arrays + offsets, atomically. A folder that
    cannot be written (read-only home) is reported through `log`, never raised: training goes on."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(x) for x in ids])
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "think_counts.npy", np.asarray(think_counts, dtype=np.int64))
        np.save(tmp / "ids.npy", _flat(ids, np.int32))
        np.save(tmp / "labels.npy", _flat(labels, np.int32))
        if weights is not None:
            np.save(tmp / "weights.npy", _flat(weights, np.float32))
        (tmp / "summary.json").write_text(json.dumps(summary))
        (tmp / "prompts.json").write_text(json.dumps(prompts))
        try:
            tmp.rename(folder)
        except OSError:  # another process (rank) wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        log(f"warning: could not write the data cache {folder} ({e}); set DataConfig.cache_dir")


def load_cache(folder: Path) -> CachedData | None:
    """The dataset stored in `folder`, or None when there is none (a miss)."""
    if not (folder / "summary.json").exists():
        return None
    offsets = np.load(folder / "offsets.npy").tolist()
    ids = np.load(folder / "ids.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy", mmap_mode="r")
    w = np.load(folder / "weights.npy", mmap_mode="r") if (folder / "weights.npy").exists() else None
    cuts = list(zip(offsets[:-1], offsets[1:]))
    return CachedData(ids=[ids[a:b] for a, b in cuts], labels=[labels[a:b] for a, b in cuts],
                      weights=None if w is None else [w[a:b] for a, b in cuts],
                      think_counts=np.load(folder / "think_counts.npy"),
                      summary=json.loads((folder / "summary.json").read_text()),
                      prompts=[tuple(p) for p in json.loads((folder / "prompts.json").read_text())])


def _flat(arrays: list, dtype) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]) if arrays else np.zeros(0, dtype)
