"""fp32 matmuls of generation on the CPU, with each weight packed once for MKL's sgemm.

A decode step multiplies every weight by a few rows (one per sequence in the batch). On the CPU
`F.linear` then repacks the whole weight into the GEMM's blocked layout on every call, and at
8-32 rows that packing costs about as much as the multiply. `PackedWeights`, active during the
steps of one generate call, packs each fp32 weight once (`torch.ops.mkl._mkl_reorder_linear_weight`,
the op that torch.compile's CPU freezing pass uses) and multiplies with `torch.ops.mkl._mkl_linear`.
A packing is for one row count (MKL packs for it; `_mkl_linear` itself falls back to the plain
product for any other count, so fewer rows are padded to it, below). Measured on the 2-core
container, one thread, SmolLM2-135M shapes, weights read from memory (not cache), per product:
(32, 576) @ (576, 1536) 0.88 -> 0.58 ms, at 8 rows 0.61 -> 0.37 ms; a batch-32 decode step
160-168 -> 134-143 ms, the same greedy tokens.

Packing is not free: the whole SmolLM2-135M takes 0.23-0.56 s, 10-20 steps' gain. So the decoder
says which row count to pack for (`rows`; 0: none), asking `worth` with the steps its batch may
still decode (sampling._Group.steps_left). A product of fewer rows, down to a quarter of `rows` and
at least PAD_MIN_ROWS, is padded with zero rows to `rows`, since unpacked F.linear is erratic at
those sizes. Measured, all SmolLM2-135M weights once, one thread, ms (F.linear at M rows; packed
for P rows):

    M or P:    4     8    12    16    24    32
    F.linear  69    93   119    94   105   114
    packed    47    58    62    67    77    90

`worth`: a first packing (or one for more rows) for a batch that may decode PACK_MIN_STEPS more
steps; then one packing serves the batch as its replies end, down to a quarter of its rows, and a
smaller one is made once the batch has halved, if the steps left repay it (packed, a row costs about
1.55 ms a step and a packing about 230 ms: from P rows to n pays after 150 / (P - n) steps). A
packing per row count would not pay where stop ids shrink the batch at every rebuild.

The rule, while active (`with packs:`, grad off, as quant.DecodedWeights):
- only fp32 Parameters on the CPU (a decoded NF4 buffer changes under us; bf16 takes oneDNN's
  own path), and only products of `rows` rows or of fewer, padded (`serves`);
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
PACK_MIN_STEPS = 32  # the decoder packs for a batch that may decode at least this many more steps
PAD_MIN_ROWS = 4  # fewer rows go to F.linear (near a matrix-vector product there, as fast as packed)
REPACK_ROW_STEPS = 150  # a packing costs about as much as this many row-steps of packed products


def available() -> bool:
    """MKL's packed sgemm is in this torch build."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class StepScoped:
    """A weight cache of one generate call, active from `with` to its end on this thread, entered
    under no_grad only (its products have no backward): PackedWeights, quant.DecodedWeights."""

    _local: threading.local  # where each subclass keeps its active ones
    _why = "its products have no backward"

    def __enter__(self):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{type(self).__name__} is for generation: enter it under torch.no_grad() ({self._why})")
        self._local.__dict__.setdefault("active", []).append(self)
        return self

    def __exit__(self, *exc) -> None:
        self._local.active.remove(self)


class PackedWeights(StepScoped):
    """fp32 weights packed for MKL's sgemm during one generate call (the rule: module docstring)."""

    _local = _state

    def __init__(self, budget_mb: float | None = None):
        from .quant import DECODE_BUDGET_MB

        if budget_mb is not None and not budget_mb >= 0:
            raise ValueError(f"budget_mb must be >= 0 (0: pack nothing), got {budget_mb}")
        self.budget = (DECODE_BUDGET_MB if budget_mb is None else budget_mb) * 2**20  # bytes
        self.kept: dict[int, tuple] = {}  # id(weight) -> (weight, version, rows, packed)
        self.rows = 0  # the row count to pack for (set by the decoder); 0: none
        self.kept_bytes, self.packs, self.padded = 0, 0, 0  # packings made, products padded (for tests)
        self.enabled = available()

    def serves(self, rows: int) -> bool:
        """A product of this many rows takes the packed weights (padded to `self.rows` if fewer)."""
        return self.rows >= PAD_MIN_ROWS and self.rows >= rows >= max(PAD_MIN_ROWS, self.rows / 4)

    def worth(self, rows: int, steps: int) -> bool:
        """Pack for `rows` rows, for a batch that may decode `steps` more steps? (the module docstring)"""
        if rows < PAD_MIN_ROWS or rows == self.rows:
            return False
        if not self.serves(rows):  # none yet, too few rows for it, or more than it was packed for
            return steps >= PACK_MIN_STEPS
        # Served (padded): repack for a batch that has halved, if the steps left repay it. (With stop
        # ids the batch may shrink again soon: a packing for each rebuild's row count would not pay.)
        return 2 * rows <= self.rows and (self.rows - rows) * steps >= REPACK_ROW_STEPS

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """x @ weight.T + bias with the packed weight, or None where the rule says `F.linear`."""
        rows = x.numel() // weight.shape[1] if weight.ndim == 2 else 0
        if not (self.enabled and self.serves(rows) and x.device.type == "cpu" and x.dtype == torch.float32
                and weight.dtype == torch.float32 and isinstance(weight, nn.Parameter)):
            return None
        P = self.rows
        entry = self.kept.get(id(weight))  # (weight, its version when packed, rows, packed)
        if entry is None or entry[1:3] != (weight._version, P):
            nbytes = weight.numel() * weight.element_size()
            if entry is None and self.kept_bytes + nbytes > self.budget:
                return None
            self.packs += 1
            self.kept_bytes += nbytes if entry is None else 0
            packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), P)
            entry = self.kept[id(weight)] = (weight, weight._version, P, packed)
        if rows == P:
            return torch.ops.mkl._mkl_linear(x, entry[3], weight, bias, P)
        self.padded += 1
        padded = x.new_zeros(P, x.shape[-1])
        padded[:rows] = x.reshape(rows, -1)
        return torch.ops.mkl._mkl_linear(padded, entry[3], weight, bias, P)[:rows].view(*x.shape[:-1], -1)

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
