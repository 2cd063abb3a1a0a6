"""fp32 matmuls of generation on the CPU, with each weight packed once for MKL's sgemm.

A decode step multiplies every weight by a few rows (one per sequence in the batch). On the CPU
`F.linear` then repacks the whole weight into the GEMM's blocked layout on every call, and at
8-32 rows that packing costs about as much as the multiply. `PackedWeights`, active during the
steps of one generate call, packs each fp32 weight once (`torch.ops.mkl._mkl_reorder_linear_weight`,
the op that torch.compile's CPU freezing pass uses) and multiplies with `torch.ops.mkl._mkl_linear`.
A packing serves one row count only (MKL packs for it; `_mkl_linear` itself falls back to the plain
product for any other). Measured on the 2-core container, one thread, SmolLM2-135M shapes, weights
read from memory (not cache), per product: (32, 576) @ (576, 1536) 0.88 -> 0.58 ms, at 8 rows
0.61 -> 0.37 ms; a batch-32 decode step 160-168 -> 134-143 ms, the same greedy tokens.

Packing is not free: the whole SmolLM2-135M took 0.56 s inside a generate call, about 20 steps'
gain. So the decoder says which row count to pack for (`rows`), and only for a batch that will keep
its row count for at least PACK_MIN_STEPS more steps (sampling._Group.steady); 0: none.

The rule, while active (`with packs:`, grad off, as quant.DecodedWeights):
- only fp32 Parameters on the CPU (a decoded NF4 buffer changes under us; bf16 takes oneDNN's
  own path), and only products of exactly `rows` rows (at least two);
- a weight is packed on its first such use, kept while the packed bytes stay within the budget
  (the same as `decode_budget_mb`: DECODE_BUDGET_MB when None); past it, `F.linear`;
- a weight changed in place since it was packed (its version counter moved: an optimizer step
  between two yields, a LoRA merge), or packed for another row count, is packed again;
- `close()` frees it all.
Nothing changes where MKL is not in the torch build (no `torch.ops.mkl._mkl_linear`): `F.linear`.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_state = threading.local()  # per thread: the active PackedWeights
PACK_MIN_STEPS = 32  # the decoder packs for a batch that keeps its row count at least this many steps


def available() -> bool:
    """MKL's packed sgemm is in this torch build."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedWeights:
    """fp32 weights packed for MKL's sgemm during one generate call (the rule: module docstring)."""

    def __init__(self, budget_mb: float | None = None):
        from .quant import DECODE_BUDGET_MB

        if budget_mb is not None and not budget_mb >= 0:
            raise ValueError(f"budget_mb must be >= 0 (0: pack nothing), got {budget_mb}")
        self.budget = (DECODE_BUDGET_MB if budget_mb is None else budget_mb) * 2**20  # bytes
        self.kept: dict[int, tuple] = {}  # id(weight) -> (weight, version, rows, packed)
        self.rows = 0  # the row count to pack for (set by the decoder); 0: none
        self.kept_bytes, self.packs = 0, 0  # packs: every packing (for tests)
        self.enabled = available()

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """x @ weight.T + bias with the packed weight, or None where the rule says `F.linear`."""
        rows = x.numel() // weight.shape[1] if weight.ndim == 2 else 0
        if not (self.enabled and rows == self.rows >= 2 and x.device.type == "cpu" and x.dtype == torch.float32
                and weight.dtype == torch.float32 and isinstance(weight, nn.Parameter)):
            return None
        entry = self.kept.get(id(weight))  # (weight, its version when packed, rows, packed)
        if entry is None or entry[1:3] != (weight._version, rows):
            nbytes = weight.numel() * weight.element_size()
            if entry is None and self.kept_bytes + nbytes > self.budget:
                return None
            self.packs += 1
            self.kept_bytes += nbytes if entry is None else 0
            packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
            entry = self.kept[id(weight)] = (weight, weight._version, rows, packed)
        return torch.ops.mkl._mkl_linear(x, entry[3], weight, bias, rows)

    def __enter__(self) -> PackedWeights:
        if torch.is_grad_enabled():
            raise RuntimeError("PackedWeights is for generation: enter it under torch.no_grad() "
                               "(its matmuls have no backward)")
        _state.__dict__.setdefault("active", []).append(self)
        return self

    def __exit__(self, *exc) -> None:
        _state.active.remove(self)

    def close(self) -> None:
        self.kept, self.kept_bytes = {}, 0


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, or inside an active PackedWeights the packed-weight product its rule allows."""
    if not torch.compiler.is_compiling():
        active = getattr(_state, "active", None)
        if active:
            y = active[-1].linear(x, weight, bias)
            if y is not None:
                return y
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (the same parameters and keys) whose product goes through `linear`: the model's
    projections and head, so that generation can use packed weights."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
