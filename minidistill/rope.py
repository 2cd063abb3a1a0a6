"""Rotary position embeddings: the cos/sin tables of every rope type minidistill reads, and their use.

Types (`ModelConfig.rope_type`), each computed as transformers computes it, so checkpoints behave as
they do there:
- default: inv_freq = theta^(-2i/d) over the rotary dims d;
- linear: positions divided by `factor` (the inverse frequencies divided, the same thing);
- dynamic (NTK-aware): the base grows with the current length L once it passes
  max_position_embeddings m: theta * (factor * L / m - (factor - 1))^(d / (d - 2));
- yarn: each frequency a blend of interpolated (/ factor) and original, by a ramp over the dims
  between beta_fast and beta_slow rotations in the original context; cos/sin times an attention factor;
- llama3: Llama 3.1's smoothed per-wavelength scaling;
- longrope: Phi-3's per-frequency factors, the short or the long set by the sequence's length.
HF rotate-half layout. `parse_rope_scaling` reads a `--rope-scaling KIND:F` value.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import ModelConfig

# What `--rope-scaling` may add to a model with plain rope.
SCALING_KINDS = ("linear", "dynamic", "yarn")


def parse_rope_scaling(spec: str) -> dict:
    """`linear:F`, `dynamic:F` or `yarn:F[:ORIGINAL]` -> the config.json `rope_scaling` dict.

    F > 1 is the context extension factor; yarn's ORIGINAL is the pre-extension context
    (default: the model's max_position_embeddings). Apply it with `load_model(..., rope_scaling=)`.
    """
    kind, _, rest = spec.strip().partition(":")
    parts = rest.split(":") if rest else []
    usage = "use linear:F, dynamic:F or yarn:F[:ORIGINAL_CONTEXT] with a factor F > 1, e.g. yarn:4"
    if kind not in SCALING_KINDS or not 1 <= len(parts) <= (2 if kind == "yarn" else 1):
        raise ValueError(f"--rope-scaling {spec!r} not understood; {usage}")
    try:
        factor = float(parts[0])
        original = int(parts[1]) if len(parts) == 2 else None
    except ValueError:
        raise ValueError(f"--rope-scaling {spec!r}: {parts} are not numbers; {usage}") from None
    if not factor > 1.0 or (original is not None and original < 1):
        raise ValueError(f"--rope-scaling {spec!r}: factor {factor} must be > 1 (and a context >= 1); {usage}")
    out = {"rope_type": kind, "factor": factor}
    if original is not None:
        out["original_max_position_embeddings"] = original
    return out


def _exponent(d: int) -> Tensor:
    return torch.arange(0, d, 2, dtype=torch.int64).float() / d  # (d/2,) the denominator is rotary_dim


def inv_freq(cfg: ModelConfig, long: bool = False) -> Tensor:
    """(rotary_dim/2,) inverse frequencies of the rope types that do not depend on the length
    (dynamic at or below max_position_embeddings, where it is default); long: LongRoPE's long set."""
    d, theta = cfg.rotary_dim, cfg.rope_theta
    if cfg.rope_type == "longrope":
        ext = torch.tensor(cfg.long_factor if long else cfg.short_factor, dtype=torch.float32)
        return 1.0 / (ext * theta ** _exponent(d))
    inv = 1.0 / (theta ** _exponent(d))
    if cfg.rope_type == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_type == "yarn":
        return _yarn(cfg)
    if cfg.rope_type == "llama3":
        old_len = cfg.original_max_position_embeddings
        low_wl, high_wl = old_len / cfg.low_freq_factor, old_len / cfg.high_freq_factor
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > low_wl, inv / cfg.rope_factor, inv)
        smooth = (old_len / wl - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wl >= high_wl) & (wl <= low_wl)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def _yarn(cfg: ModelConfig) -> Tensor:
    d, base, factor = cfg.rotary_dim, cfg.rope_theta, cfg.rope_factor
    orig = cfg.original_max_position_embeddings

    def dim_of(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in orig
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(cfg.beta_fast), dim_of(cfg.beta_slow)
    if cfg.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** _exponent(d)
    keep = 1 - ramp  # 1: high frequencies, kept as they are; 0: low ones, interpolated
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def dynamic_inv_freq(cfg: ModelConfig, seq_len: Tensor) -> Tensor:
    """Dynamic NTK inverse frequencies for sequences of length seq_len (any shape S): (*S, rotary_dim/2).
    At or below max_position_embeddings they are the default ones."""
    d, m, f = cfg.rotary_dim, cfg.max_position_embeddings, cfg.rope_factor
    length = torch.clamp(seq_len, min=m).float()[..., None]  # (*S, 1)
    base = cfg.rope_theta * (f * length / m - (f - 1)) ** (d / (d - 2))  # (*S, 1)
    return 1.0 / (base ** _exponent(d).to(seq_len.device))


class Rotary(nn.Module):
    """cos/sin tables from the config's rope type.

    The inverse frequencies are derived from the config on first use per device (they are
    never stored in checkpoints, and the model is built on the meta device).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self._inv_freq: dict[tuple[str, bool], Tensor] = {}

    def inv_freq(self, device: torch.device, long: bool) -> Tensor:
        key = (str(device), long)
        if key not in self._inv_freq:
            self._inv_freq[key] = inv_freq(self.cfg, long).to(device)
        return self._inv_freq[key]

    def forward(self, positions: Tensor, dtype: torch.dtype, seq_len: int | Tensor) -> tuple[Tensor, Tensor]:
        """positions (B, T) -> cos, sin (B, T, rotary_dim) in `dtype`.

        seq_len: the length of the sequence each token belongs to, an int for the whole batch or
        a tensor broadcastable to (B, T). LongRoPE takes the long factors, and dynamic NTK its
        grown base, from it. In packed rows that is each document's own length, what the document
        gets when run alone (at inference), per token and with no host sync; transformers instead
        decides once from the largest position in the batch, so a short document packed beside a
        long one gets the long document's frequencies there (tests/test_model.py shows the
        difference). transformers' dynamic rope also keeps the largest base it has seen until a
        sequence shorter than the original context comes; here each call starts from its own lengths.
        """
        cfg = self.cfg
        pos = positions.float()[..., None]  # (B, T, 1)
        if cfg.rope_type == "dynamic":
            lengths = torch.as_tensor(seq_len, device=positions.device)
            lengths = lengths.view(1, 1) if lengths.dim() == 0 else lengths  # (B or 1, T or 1)
            freqs = pos * dynamic_inv_freq(cfg, lengths)  # (B, T, rotary_dim/2)
        elif cfg.rope_type != "longrope":
            freqs = pos * self.inv_freq(positions.device, False)  # (B, T, rotary_dim/2)
        elif isinstance(seq_len, int):
            freqs = pos * self.inv_freq(positions.device, seq_len > cfg.original_max_position_embeddings)
        else:
            long = (seq_len > cfg.original_max_position_embeddings)[..., None]  # (B, T, 1) or (B, 1, 1)
            freqs = torch.where(long, pos * self.inv_freq(positions.device, True),
                                pos * self.inv_freq(positions.device, False))
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rotary_dim)
        return (emb.cos() * cfg.attention_factor).to(dtype), (emb.sin() * cfg.attention_factor).to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, T, nh, hd); cos/sin (B, T, rd). Rotates dims [0, rd), passes the rest through."""
    rd = cos.shape[-1]
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, rd)
    if rd == x.shape[-1]:
        return _rotated(x, cos, sin)
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((_rotated(x_rot, cos, sin), x_pass), dim=-1)


def _rotated(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin; without autograd the sum goes into a product, and on large
    inputs (a prefill's queries) each half is done alone, with no rotated copy: the same rounding
    (a - b is a + (-b)), 2.7x faster on (1952, 9, 64) fp32 (4.3 -> 1.6 ms); on a decode step's few
    rows its extra ops cost more than the copy."""
    if torch.is_grad_enabled():
        return x * cos + _rotate_half(x) * sin
    if x.numel() < 1 << 19:
        return (x * cos).add_(_rotate_half(x).mul_(sin))
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h].sub_(x[..., h:] * sin[..., :h])
    out[..., h:].add_(x[..., :h] * sin[..., h:])
    return out
