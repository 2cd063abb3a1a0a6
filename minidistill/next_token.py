"""The next token from the final hidden states: sampled (`sample_next`), or greedy, which on a
CPU with AMX comes exactly from a bf16 screen of the head (`GreedyScreen`).

The screen. A greedy step needs one thing from the (V, H) head: the index of each row's largest
logit. For an fp32 model on a CPU with AMX, `GreedyScreen` finds it from a bf16 product, which
reads half the bytes and runs several times faster, and recomputes the few tokens that could still
win in fp32. Measured on the 2-core container, one thread, SmolLM2-135M's head (49,152 x 576), 32
rows, weights read from memory: fp32 (MKL packed) 18.5 ms, bf16 (oneDNN packed) 6.0 ms, the
screen's own bookkeeping 1.3-2.2 ms; the benchmark's batch-32 generate call 9.9-10.2 -> 9.5 s.

Why it is exact. Let u = 2^-8 (bf16's unit roundoff) and K = H. The screen's logit z'_i = x . w_i
rounds x and w_i to bf16 (each product then within 2u + u^2 of the exact one), sums in fp32 (within
gamma_K = K 2^-24 / (1 - K 2^-24) of the rounded terms' absolute sum) and rounds the sum to bf16 (u).
So |z'_i - x . w_i| <= C sum_k |x_k w_ik| <= C |x| max_j |w_j| = E (Cauchy-Schwarz), with
C = 3u + 4u^2 + 3.1 gamma_K and a little slack (the fp32 arithmetic of the bound itself; its 2
gamma_K also covers fp32 products, which may pick another of two logits that close). If token t
has the largest logit, z'_t >= x . w_t - E >= x . w_i* - E >= z'_i* - 2E for the screen's best i*:
every token with z'_i >= max z' - 2E (a handful per row on the benchmark's model) is recomputed in
fp32 and the largest wins, the first of ties (as `argmax`). A row whose bound is not finite (an inf
or NaN in x, an overflow) makes the step take the fp32 head (`argmax` returns None).

The candidates are found in blocks of BLOCK tokens (the block maxima first, then the tokens of the
blocks that pass), so no full (B, V) mask or `nonzero` is built: on (32, 49,152) those cost more
than the screen saves.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from .prepacked import PACK_MIN_STEPS, Linear
from .quant import DECODE_BUDGET_MB

BLOCK = 64  # tokens per block of the candidate search
MIN_HEAD_MB = 8.0  # a smaller fp32 head stays in the CPU's caches: a screen gains nothing there
_U = 2.0 ** -8
log = logging.getLogger(__name__)


def sample_next(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0, u: Tensor | None = None) -> Tensor:
    """(B, V) logits -> (B,) token ids: greedy at temperature 0, else inverse-CDF sampling of the
    top_p nucleus with u (B,), one uniform in [0, 1) per row."""
    if temperature <= 0.0:  # max's indices: argmax's (the first of ties, NaN wins), 3-5x faster on the CPU
        return logits.max(-1).indices
    if u is None:
        raise ValueError(f"sampling at temperature {temperature} needs one uniform per row (u)")
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(-1)  # (B, V)
    # (1 - 1e-6): the point stays below the last edge when u * mass rounds up.
    x = (u.to(cdf) * cdf[:, -1] * (1 - 1e-6))[:, None]  # (B, 1)
    idx = torch.searchsorted(cdf, x, right=True)  # (B, 1): first token whose cdf passes x
    return idx.squeeze(1) if order is None else order.gather(-1, idx).squeeze(1)


def available() -> bool:
    """bf16 matmuls are fast here: a CPU with AMX and oneDNN in the torch build."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return torch.backends.mkldnn.is_available() and amx is not None and bool(amx())


def screen_constant(K: int) -> float:
    """C of the module docstring for dot products of length K, with slack for the bound's own fp32 rounding."""
    gamma = K * 2.0 ** -24 / (1 - K * 2.0 ** -24)
    return (3 * _U + 4 * _U ** 2 + 3.1 * gamma) * (1 + 2.0 ** -10)


class _Screen:
    """The bf16 screen of one fp32 head: built once, then `argmax(x)` per step."""

    def __init__(self, weight: Tensor, rows: int):
        w = weight.detach()
        self.weight, self.version = weight, weight._version
        self.norm_max = float(w.norm(dim=1).max())  # max_j |w_j|, read once
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), rows)  # oneDNN's layout for `rows`
        self.c = screen_constant(w.shape[1])
        self.slack = w.shape[1] * 2.0 ** -120  # bf16 subnormals flushed to zero: far below any real logit

    def argmax(self, x: Tensor) -> Tensor | None:
        """(B, H) fp32 final hidden states -> (B,) int64, argmax of x @ weight.T; None: take the fp32 head."""
        w = self.weight.detach()
        V, B = w.shape[0], x.shape[0]
        z = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), self.packed, None, "none", [], "")  # (B, V) bf16
        # Block maxima on the bits as int16, 5x faster than on bf16: for values >= +0 the order is the
        # same, every negative value's bits are below every positive one's, and among negatives the
        # least negative has the smallest bits. So a block's int16 max is its largest value if that is
        # >= +0, else its int16 min is (-0 included).
        keys = z.view(torch.int16)
        bk = _block_reduce(keys, "amax")  # (B, blocks)
        if bool((bk < 0).any()):  # blocks of negative logits only
            bk = torch.where(bk >= 0, bk, _block_reduce(keys, "amin"))
        bmax = bk.view(torch.bfloat16).float()  # (B, blocks): each block's largest screened logit
        thr = bmax.amax(-1) - 2 * (self.c * x.norm(dim=-1) * self.norm_max + self.slack)  # (B,)
        if not bool(torch.isfinite(thr).all()):
            return None  # an inf or NaN in x or among the logits, or a bound that overflows
        r, blk = (bmax >= thr[:, None]).nonzero(as_tuple=True)  # candidate blocks (row-major, ascending)
        cols = blk[:, None] * BLOCK + torch.arange(BLOCK)  # (n, BLOCK)
        inside = cols < V
        cols = cols.clamp_(max=V - 1)
        take = inside & (z[r[:, None], cols].float() >= thr[r][:, None])
        rows, cols = r[:, None].expand_as(cols)[take], cols[take]  # candidate tokens, row-major, ascending
        # Their fp32 logits, each row's sum in the same order whatever the batch (a GEMM's may not be)
        exact = (w.index_select(0, cols) * x.index_select(0, rows)).sum(-1)
        best = x.new_full((B,), float("-inf")).scatter_reduce_(0, rows, exact, "amax")
        win = exact == best[rows]
        return torch.full((B,), V, dtype=torch.long).scatter_reduce_(0, rows[win], cols[win], "amin")


def _block_reduce(keys: Tensor, op: str) -> Tensor:
    """(B, V) -> (B, ceil(V / BLOCK)): `op` ("amax" / "amin") over each block of BLOCK columns."""
    B, V = keys.shape
    nb = V // BLOCK
    out = getattr(keys[:, :nb * BLOCK].reshape(B, nb, BLOCK), op)(-1)
    return out if V % BLOCK == 0 else torch.cat([out, getattr(keys[:, nb * BLOCK:], op)(-1, keepdim=True)], dim=1)


class GreedyScreen:
    """The screen of one generate call (`for_model`): built once its batch may decode
    PACK_MIN_STEPS more steps (`prepare`: the packing rule's, prepacked.py; building it costs about
    seven batch-32 steps' gain: 70 ms), dropped when the head changes in place (an optimizer step
    between two yields), freed by `close()`. A head with an inf or NaN is never screened."""

    def __init__(self, weight: Tensor):
        self.weight = weight
        self.built: _Screen | None = None
        self.unusable_at: int | None = None  # the head's version when it was found not finite

    @classmethod
    def for_model(cls, model, temperature: float, budget_mb: float | None = None) -> "GreedyScreen | None":
        """None unless greedy, on a CPU with AMX, with a plain fp32 head (no bias, no added
        tokens) of MIN_HEAD_MB or more whose bf16 copy fits the budget (quant.DECODE_BUDGET_MB if None)."""
        head = model.lm_head
        w = getattr(head, "weight", None)
        budget = (DECODE_BUDGET_MB if budget_mb is None else budget_mb) * 2**20
        if (temperature > 0 or type(head) is not Linear or head.bias is not None or w is None
                or w.device.type != "cpu" or w.dtype != torch.float32 or not available()
                or w.numel() * 4 < MIN_HEAD_MB * 2**20 or w.numel() * 2 > budget):
            return None
        return cls(w)

    def prepare(self, rows: int, steps: int) -> None:
        if self.built is not None and self.built.version != self.weight._version:
            self.built = None
        if self.built is None and steps >= PACK_MIN_STEPS and self.unusable_at != self.weight._version:
            try:
                screen = _Screen(self.weight, rows)
            except RuntimeError as e:  # a oneDNN without this op or layout: the fp32 head, as before
                log.warning("greedy screen off (%s): the fp32 head picks the tokens", e)
                screen = None
            if screen is not None and math.isfinite(screen.norm_max):
                self.built = screen
            else:
                self.unusable_at = self.weight._version

    def argmax(self, x: Tensor) -> Tensor | None:
        """(B, H) -> (B,) greedy ids, or None: not built (or the head changed), or a bound not finite."""
        s = self.built
        return s.argmax(x) if s is not None and s.version == self.weight._version else None

    def close(self) -> None:
        self.built = None
