"""fp32 matmuls of generation on the CPU, with each weight packed once for MKL's sgemm.

A decode step multiplies every weight by a few rows (one per sequence in the batch). On the CPU
`F.linear` then repacks the whole weight into the GEMM's blocked layout on every call, and at
8-32 rows that packing costs about as much as the multiply. `PackedWeights`, active during the
steps of one generate call, packs each fp32 weight once (`torch.ops.mkl._mkl_reorder_linear_weight`,
the op that torch.compile's CPU freezing pass uses) and multiplies with `torch.ops.mkl._mkl_linear`.
Measured on the 2-core container, one thread, SmolLM2-135M shapes at 32 rows: (32, 576) @ (576, 1536)
0.45 -> 0.33 ms, the (576, 49,152) head 25.6 -> 17.4 ms; at 8 rows 0.36 -> 0.14 ms; a whole batch-32
decode step 163 -> 134-140 ms, the same greedy tokens.

The rule, while active (`with packs:`, grad off, as quant.DecodedWeights):
- only fp32 Parameters on the CPU (a decoded NF4 buffer changes under us; bf16 takes oneDNN's
  own path), and only for inputs of at least two rows (one row is a matrix-vector product, which
  needs no packing and runs as fast without);
- each weight is packed on its first use in the call, kept while the packed bytes stay within
  the budget (the same as `decode_budget_mb`: DECODE_BUDGET_MB when None); past it, `F.linear`;
- a weight changed in place since it was packed (its version counter moved: an optimizer step
  between two yields, a LoRA merge) is packed again;
- `close()` frees it all.
Packing costs about four 32-row products of the weight (1.5 ms for (1536, 576), 51 ms for the head),
so generate calls of fewer than PACK_MIN_NEW_TOKENS new tokens pack nothing.
Nothing changes where MKL is not in the torch build (no `torch.ops.mkl._mkl_linear`): `F.linear`.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_state = threading.local()  # per thread: the active PackedWeights
PACK_MIN_NEW_TOKENS = 16  # sampling.iter_generate packs for calls of at least this many new tokens


def available() -> bool:
    """MKL's packed sgemm is in this torch build."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedWeights:
    """fp32 weights packed for MKL's sgemm during one generate call (the rule: module docstring)."""

    ROWS_HINT = 32  # the row count the packing is tuned for (any count gives the same products)

    def __init__(self, budget_mb: float | None = None):
        from .quant import DECODE_BUDGET_MB

        if budget_mb is not None and not budget_mb >= 0:
            raise ValueError(f"budget_mb must be >= 0 (0: pack nothing), got {budget_mb}")
        self.budget = (DECODE_BUDGET_MB if budget_mb is None else budget_mb) * 2**20  # bytes
        self.kept: dict[int, tuple[Tensor, int, Tensor]] = {}  # id(weight) -> (weight, its version, packed)
        self.kept_bytes, self.packs = 0, 0  # packs: every packing (for tests)
        self.enabled = available()

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """x @ weight.T + bias with the packed weight, or None where the rule says `F.linear`."""
        if not (self.enabled and x.device.type == "cpu" and x.dtype == torch.float32
                and weight.dtype == torch.float32 and isinstance(weight, nn.Parameter)
                and 2 * weight.shape[1] <= x.numel() <= 256 * weight.shape[1]):
            return None
        entry = self.kept.get(id(weight))
        if entry is None or entry[1] != weight._version:
            nbytes = weight.numel() * weight.element_size()
            if entry is None and self.kept_bytes + nbytes > self.budget:
                return None
            self.packs += 1
            packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), self.ROWS_HINT)
            self.kept_bytes += 0 if entry is not None else nbytes
            entry = self.kept[id(weight)] = (weight, weight._version, packed)
        return torch.ops.mkl._mkl_linear(x, entry[2], weight, bias, self.ROWS_HINT)

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
