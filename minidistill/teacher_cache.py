"""The offline-KD teacher cache: a teacher's top-k log-probs on the prepared training data,
written once (`cache_logits`) and read back per sample (`TeacherCache`).

`cache_logits` takes the data exactly as training prepares it (`prepare_data` with the same
DataConfig; the `python -m minidistill.distill cache-logits` command does that), runs the
teacher once, and stores for every labelled position of every sample, in order: the top-k
ids (int32), their log-probs (fp16 or fp32) and the log of the mass outside them (fp32). A
large teacher then costs one pass instead of one per epoch, and need not fit beside the
student. `kd_from_topk` (minidistill.kd) is the loss that uses these.

Layout of the folder: `meta.json` and shards `shard-00000.safetensors`, ... Each shard holds
whole samples as flat arrays over their positions — `ids` (P, k), `logprobs` (P, k), `tail`
(P,) — and `offsets` (n + 1,) int64, the start of each sample's rows, so a sample is one
slice. Shards close after ~100k positions (top-32 fp16 ~ 20 MB). meta.json records the
teacher, k, temperature, vocab size and a fingerprint of the prepared samples (their ids and
labels), so a cache made for other data, another tokenizer or other DataConfig options is
refused.

Across tokenizers (`plan`, an xkd.CrossPlan): the teacher reads each sample in its own chat
format and tokens; at each student labelled position with an aligned teacher position, the
teacher's distribution is mapped onto the student vocabulary (xkd.mapped_distribution) and its
top-k is stored in *student* ids, so training reads it like any cache. Positions without a
target hold a placeholder row and `covered` (P,) uint8 = 0 in the shard; meta.json gets
"mapped": {...} (teacher vocabulary, coverage). `vocab_size` is then the student's.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .chunked import chunk_bounds, chunk_rows
from .kd import topk_targets
from .loss import IGNORE_INDEX

STORE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}  # --store-dtype choices


def samples_fingerprint(data) -> str:
    """sha256 (hex, 24 chars) of the prepared samples' token ids and labels, in order."""
    h = hashlib.sha256(str(len(data.samples)).encode())
    for s in data.samples:
        ids, labels = np.asarray(s.ids, dtype=np.int64), np.asarray(s.labels, dtype=np.int64)
        h.update(len(ids).to_bytes(8, "little"))
        h.update(ids.tobytes())
        h.update(labels.tobytes())
    return h.hexdigest()[:24]


@torch.no_grad()
def cache_logits(teacher, data, output: str | Path, *, top_k: int = 32, batch_size: int = 8,
                 dtype: str = "fp16", temperature: float = 1.0, teacher_name: str = "",
                 vocab_size: int | None = None, positions_per_shard: int = 100_000, chunk_size: int | None = None,
                 progress: bool = False, plan=None, pad_id: int = 0) -> Path:
    """Run `teacher` over the samples of `data` (an SFTData) and write the top-k cache to `output`.

    Samples go through in order, `batch_size` at a time, right-padded (causal attention: the
    padding after a sample cannot change its positions). vocab_size: softmax over the first
    vocab_size rows of the teacher's head only (the tokenizer's real tokens, so no padding row
    of the teacher can enter the top-k; the CLI passes len(tokenizer)). chunk_size: positions
    per head matmul (default: ~256 MiB of logits and log-probs). plan: an xkd.CrossPlan when the
    teacher's tokenizer differs from the one `data` was prepared with (module docstring); then
    vocab_size is the student's vocabulary and pad_id pads the teacher's rows. Returns the folder."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORE_DTYPES)}, got {dtype!r}")
    if plan is not None:
        return _cache_mapped(teacher, data, Path(output), plan, top_k=top_k, batch_size=batch_size, dtype=dtype,
                             temperature=temperature, teacher_name=teacher_name, vocab_size=vocab_size,
                             positions_per_shard=positions_per_shard, progress=progress, pad_id=pad_id)
    V = min(teacher.head_weight.shape[0], vocab_size or teacher.head_weight.shape[0])
    if not 1 <= top_k <= V:
        raise ValueError(f"top_k must be in [1, {V}] (the teacher's vocab), got {top_k}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    device = teacher.head_weight.device
    head = teacher.head_weight[:V]
    if chunk_size is None:  # the logits, their log-softmax and its masked copy: 3 chunk x V fp32 buffers
        chunk_size = chunk_rows(V, head.shape[1], head.dtype, buffers=3)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    shards: list[dict] = []
    buf: dict[str, list] = {"ids": [], "logprobs": [], "tail": [], "counts": []}
    first = 0  # sample index of the open shard's first sample

    def flush() -> None:
        nonlocal first
        if not buf["counts"]:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        counts = np.asarray(buf["counts"], dtype=np.int64)
        k_empty = (0, top_k)
        tensors = {
            "ids": torch.cat(buf["ids"]) if buf["ids"] else torch.zeros(k_empty, dtype=torch.int32),
            "logprobs": torch.cat(buf["logprobs"]) if buf["logprobs"] else torch.zeros(k_empty, dtype=STORE_DTYPES[dtype]),
            "tail": torch.cat(buf["tail"]) if buf["tail"] else torch.zeros(0),
            "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(counts)])),
        }
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / name))
        shards.append({"file": name, "first_sample": first, "num_samples": len(counts),
                       "num_positions": int(counts.sum())})
        first += len(counts)
        for v in buf.values():
            v.clear()

    samples = data.samples
    pending = 0
    steps = range(0, len(samples), batch_size)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="teacher", unit="batch")
    for b in steps:
        batch = samples[b: b + batch_size]
        T = max(len(s.ids) for s in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
        for r, s in enumerate(batch):
            ids[r, : len(s.ids)] = torch.as_tensor(np.asarray(s.ids, dtype=np.int64))
            labels[r, : len(s.ids)] = torch.as_tensor(np.asarray(s.labels, dtype=np.int64))
        hidden = teacher(ids.to(device), return_hidden=True)  # (B, T, H)
        for r, s in enumerate(batch):
            h = hidden[r][labels[r].to(device) != IGNORE_INDEX]  # (n, H), this sample's labelled positions
            for c, e in chunk_bounds(h.shape[0], chunk_size):
                logits = h[c:e].to(head.dtype) @ head.t()  # (c, V)
                tid, lq, tail = topk_targets(logits, top_k, temperature)
                buf["ids"].append(tid.cpu())
                buf["logprobs"].append(lq.to(STORE_DTYPES[dtype]).cpu())
                buf["tail"].append(tail.cpu())
            buf["counts"].append(h.shape[0])
            pending += h.shape[0]
            if pending >= positions_per_shard:
                flush()
                pending = 0
    flush()
    meta = {"teacher": teacher_name, "top_k": top_k, "temperature": temperature, "dtype": dtype,
            "vocab_size": V, "num_samples": len(samples), "fingerprint": samples_fingerprint(data),
            "shards": shards}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "meta.json")  # meta last: a folder without it is an unfinished cache
    return out


class TeacherCache:
    """Read side of `cache_logits`: `lookup(i)` -> the teacher targets of sample i.

    Shards open lazily (memory-mapped by safetensors); each lookup reads one slice."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder} has no meta.json: not a finished teacher cache; (re)run "
                                    "python -m minidistill.distill cache-logits")
        self.meta = json.loads(meta_path.read_text())
        self.fingerprint: str = self.meta["fingerprint"]
        self.top_k: int = self.meta["top_k"]
        self.temperature: float = self.meta.get("temperature", 1.0)
        self.vocab_size: int = self.meta["vocab_size"]
        self._firsts = [s["first_sample"] for s in self.meta["shards"]]
        self._open: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.meta["num_samples"]

    def check(self, data) -> None:
        """Raise unless `data` (SFTData) is the prepared data this cache was made from."""
        fp = samples_fingerprint(data)
        if fp != self.fingerprint:
            raise ValueError(f"teacher cache {self.folder} has data fingerprint {self.fingerprint}, but these "
                             f"{len(data.samples)} samples give {fp}: data, tokenizer or DataConfig options "
                             "differ from when it was made; re-run cache-logits with the training options")

    def _shard(self, j: int):
        if j not in self._open:
            f = safe_open(str(self.folder / self.meta["shards"][j]["file"]), framework="pt")
            self._open[j] = (f, f.get_tensor("offsets").tolist())
        return self._open[j]

    def lookup(self, sample_index: int) -> tuple[Tensor, Tensor, Tensor]:
        """(ids (n, k) int32, logprobs (n, k) fp32, tail (n,) fp32) for the n labelled positions of
        the sample, in position order."""
        if not 0 <= sample_index < len(self):
            raise IndexError(f"sample {sample_index} not in this cache of {len(self)} samples")
        j = bisect.bisect_right(self._firsts, sample_index) - 1
        f, offsets = self._shard(j)
        i = sample_index - self._firsts[j]
        a, b = offsets[i], offsets[i + 1]
        return (f.get_slice("ids")[a:b], f.get_slice("logprobs")[a:b].float(), f.get_slice("tail")[a:b].float())

    def covered(self, sample_index: int) -> Tensor | None:
        """(n,) bool: which labelled positions of the sample have a teacher target; None for a
        cache made with the student's own tokenizer (every position has one)."""
        if "mapped" not in self.meta:
            return None
        j = bisect.bisect_right(self._firsts, sample_index) - 1
        f, offsets = self._shard(j)
        i = sample_index - self._firsts[j]
        return f.get_slice("covered")[offsets[i]: offsets[i + 1]].bool()

    def gather_covered(self, sample_indices: list[int]) -> Tensor | None:
        """`covered` of a batch's samples concatenated like `gather`; None for an unmapped cache."""
        if "mapped" not in self.meta:
            return None
        parts = [self.covered(i) for i in sample_indices]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)

    def gather(self, sample_indices: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Targets of a batch: the lookups concatenated in the given order. For a batch built by
        `make_batches`, pass the sample indices row by row, and within a packed row in packing
        order; that is the row-major order of its labelled positions, which `kd_from_topk` expects."""
        parts = [self.lookup(i) for i in sample_indices]
        if not parts:
            k = self.top_k
            return torch.zeros(0, k, dtype=torch.int32), torch.zeros(0, k), torch.zeros(0)
        return tuple(torch.cat(x) for x in zip(*parts))


def _write_shard(out: Path, index: int, parts: dict[str, list], counts: list[int], top_k: int, store) -> dict:
    name = f"shard-{index:05d}.safetensors"
    tensors = {"ids": torch.cat(parts["ids"]) if parts["ids"] else torch.zeros(0, top_k, dtype=torch.int32),
               "logprobs": torch.cat(parts["logprobs"]) if parts["logprobs"] else torch.zeros(0, top_k, dtype=store),
               "tail": torch.cat(parts["tail"]) if parts["tail"] else torch.zeros(0),
               "covered": torch.cat(parts["covered"]) if parts["covered"] else torch.zeros(0, dtype=torch.uint8),
               "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]))}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / name))
    return {"file": name, "num_samples": len(counts), "num_positions": int(sum(counts))}


@torch.no_grad()
def _cache_mapped(teacher, data, out: Path, plan, *, top_k, batch_size, dtype, temperature, teacher_name,
                  vocab_size, positions_per_shard, progress, pad_id) -> Path:
    """`cache_logits` across tokenizers: the mapped top-k on student positions (module docstring)."""
    from .xkd import mapped_distribution

    Vs = vocab_size or int(plan.vocab_map.max()) + 1
    if not 1 <= top_k <= Vs:
        raise ValueError(f"top_k must be in [1, {Vs}] (the student's vocab), got {top_k}")
    if teacher.head_weight.shape[0] < plan.teacher_vocab:
        raise ValueError(f"teacher head has {teacher.head_weight.shape[0]} rows < its tokenizer's "
                         f"{plan.teacher_vocab} ids: is this the checkpoint of that tokenizer?")
    out.mkdir(parents=True, exist_ok=True)
    device = teacher.head_weight.device
    head = teacher.head_weight[: plan.teacher_vocab]
    maps = plan.maps(Vs, device)
    store = STORE_DTYPES[dtype]
    # A placeholder for positions without a target: finite, ignored through `covered`.
    filler = (torch.arange(top_k, dtype=torch.int32), torch.full((top_k,), -math.log(top_k)), float("-inf"))
    shards: list[dict] = []
    parts: dict[str, list] = {"ids": [], "logprobs": [], "tail": [], "covered": []}
    counts: list[int] = []
    first, pending, hit, total = 0, 0, 0, 0
    steps = range(0, len(data.samples), batch_size)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="teacher", unit="batch")
    for b in steps:
        order = list(range(b, min(b + batch_size, len(data.samples))))
        t_ids, _ = plan.teacher_rows(order, pad_id)
        hidden = teacher(t_ids.to(device), return_hidden=True)  # (B, T', H)
        for r, i in enumerate(order):
            tgt = torch.as_tensor(plan.strict[i])  # (n,) teacher position per student labelled position
            n = len(tgt)
            ids = filler[0].repeat(n, 1)
            lq = filler[1].repeat(n, 1)
            tail = torch.full((n,), filler[2])
            covered = torch.zeros(n, dtype=torch.uint8)
            k = (tgt >= 0).nonzero().squeeze(1)
            if len(k):
                logits = hidden[r, tgt[k].to(device)].to(head.dtype) @ head.t()  # (m, Vt)
                ids_of = None if plan.map_ids is None else plan.map_ids[i][k.numpy()]
                qs, mass = mapped_distribution(logits, maps, temperature, ids_of)  # (m, Vs)
                lqs = qs.log_()
                top, tid = lqs.topk(top_k, dim=-1)
                top = top.clamp_min(-1e4)  # ids without mapped mass: log 0 -> finite, so 0 * (log q - log p) = 0
                rest = torch.logsumexp(lqs.scatter_(1, tid, float("-inf")), dim=-1)
                ok = (mass > 0).cpu()
                ids[k[ok]] = tid.to(torch.int32).cpu()[ok]
                lq[k[ok]] = top.float().cpu()[ok]
                tail[k[ok]] = rest.float().cpu()[ok]
                covered[k[ok]] = 1
            parts["ids"].append(ids)
            parts["logprobs"].append(lq.to(store))
            parts["tail"].append(tail)
            parts["covered"].append(covered)
            counts.append(n)
            hit, total, pending = hit + int(covered.sum()), total + n, pending + n
            if pending >= positions_per_shard:
                shards.append(dict(_write_shard(out, len(shards), parts, counts, top_k, store), first_sample=first))
                first += len(counts)
                counts, pending = [], 0
                for v in parts.values():
                    v.clear()
    if counts or not shards:
        shards.append(dict(_write_shard(out, len(shards), parts, counts, top_k, store), first_sample=first))
    meta = {"teacher": teacher_name, "top_k": top_k, "temperature": temperature, "dtype": dtype, "vocab_size": Vs,
            "num_samples": len(data.samples), "fingerprint": samples_fingerprint(data), "shards": shards,
            "mapped": {"teacher_vocab": plan.teacher_vocab, "coverage": hit / max(total, 1),
                       "mapped_teacher_ids": int((plan.vocab_map >= 0).sum())}}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "meta.json")
    return out
