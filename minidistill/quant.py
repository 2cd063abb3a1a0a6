"""NF4 weights in the bitsandbytes layout, and the frozen QLoRA base linear.

`quantize_nf4` reproduces `bitsandbytes.functional.quantize_4bit(quant_type="nf4")` code for
code (as bnb computes it on CPU), `dequantize_nf4` decodes with the Triton kernel on CUDA and
a byte -> two-values lookup table elsewhere (`nf4_matmul_weight`: for one matmul, into a reused
buffer; `nf4_matmul`: the 4-bit matvec kernel for few rows on CUDA), `DecodedWeights` keeps
decoded layers for one generate call. `NF4Linear` is the frozen 4-bit base (QLoRA's LoRA layer
over it is lora.NF4LoRALinear). The keys of "-bnb-4bit" checkpoints, and what
`loader.load_model` quantizes, are in bnb_format.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .prepacked import Linear, StepScoped

# The 16 NF4 values (QLoRA appendix E), index = 4-bit code; identical to bnb's table.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_NESTED_BLOCKSIZE = 256  # bnb always double-quantizes the absmax in blocks of 256


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bnb's `create_dynamic_map(signed=True)`: 256 sorted fp32 values, rebuilt op for op."""
    data: list[float] = []
    for i in range(7):  # 7 exponent bits; the fraction shrinks as the exponent grows
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()  # fp32 product, as bnb computes it
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@dataclass
class NF4State:
    """Everything besides the packed bytes needed to decode an NF4 tensor (bnb's QuantState)."""

    absmax: torch.Tensor  # uint8 [n_blocks] codes into nested_code, or float32 [n_blocks]
    code: torch.Tensor  # float32 [16]: the NF4 table
    blocksize: int
    shape: tuple[int, ...]  # shape of the original weight
    dtype: torch.dtype  # dtype of the original weight
    nested_absmax: torch.Tensor | None = None  # float32 [ceil(n_blocks / 256)]: per-256 scale
    nested_code: torch.Tensor | None = None  # float32 [256]: bnb's signed dynamic map
    offset: torch.Tensor | None = None  # float32 scalar: mean(absmax), added back on decode
    nested_blocksize: int = _NESTED_BLOCKSIZE

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def to(self, device: torch.device | str) -> NF4State:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, absmax=move(self.absmax), code=move(self.code),
                       nested_absmax=move(self.nested_absmax),
                       nested_code=move(self.nested_code), offset=move(self.offset))


@functools.cache
def _dynamic_lut() -> torch.Tensor:
    """bnb's CPU 8-bit quantizer does not search the map: it rounds x/absmax onto a grid of
    65536 points over [-1, 1] and reads the code of each point from this table."""
    code = dynamic_map()
    mid = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(mid, grid)  # number of midpoints strictly below each point


def _quantize_blockwise_8bit(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's CPU `quantize_blockwise` with the dynamic map, op for op (fp32 throughout).

    Not the nearest code: the 65536-point grid moves the thresholds by up to ~1e-5 from the
    midpoints, and a nearest-code search disagrees with bnb on ~0.1% of the absmax values."""
    n = x.numel()
    n_blocks = -(-n // blocksize)
    xb = F.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = xb.abs().amax(dim=1)  # padding zeros never win: |x| >= 0
    inv = torch.where(absmax > 0, 1.0 / absmax, 0.0)  # 0/0 would index the table with NaN
    v = (xb * inv[:, None]).clamp(-1, 1)
    t = ((v + 1.0) * 0.5) * 65535.0 + 0.5  # separate roundings, truncated below, as bnb's C
    q = _dynamic_lut().to(x.device)[t.to(torch.int32)]
    q = torch.where(absmax[:, None] == 0, 0, q)  # bnb writes code 0 for an all-zero block
    return q.reshape(-1)[:n].to(torch.uint8), absmax


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = 64, compress_statistics: bool = True
) -> tuple[torch.Tensor, NF4State]:
    """Quantize to NF4 exactly like bnb's `quantize_4bit(quant_type="nf4")` on CPU.

    Returns the packed bytes, uint8 [(numel + 1) // 2, 1], and the NF4State.
    """
    if blocksize not in _BNB_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {_BNB_BLOCKSIZES}, got {blocksize}")
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"can quantize bf16/fp16/fp32 weights only, got {weight.dtype}")
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=weight.device)
    w = weight.detach().reshape(-1).float()
    n = w.numel()
    full = n - n % blocksize
    # bnb multiplies full blocks by the reciprocal but divides the ragged tail, and clamps the
    # tail's absmax (not the full blocks') to 1e-38; both quirks change codes, so keep them.
    absmax = w[:full].view(-1, blocksize).abs().amax(dim=1)
    scaled = (w[:full].view(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38))[:, None])
    scaled = scaled.clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = w[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (w[full:] / tail_max).clamp(-1, 1)])
    scaled = F.pad(scaled, (0, n % 2))
    # Midpoints in fp32; bucketize sends a value exactly on a midpoint to the lower code.
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)  # even flat index in the high nibble
    state = NF4State(absmax=absmax, code=code, blocksize=blocksize, shape=tuple(weight.shape),
                     dtype=weight.dtype)
    if compress_statistics:
        offset = absmax.mean()
        nested_code = dynamic_map().to(weight.device)
        qabs, absmax2 = _quantize_blockwise_8bit(absmax - offset, _NESTED_BLOCKSIZE)
        state = replace(state, absmax=qabs, nested_absmax=absmax2, nested_code=nested_code,
                        offset=offset)
    return packed, state


def dequantize_nf4(
    packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Decode to `dtype` (default: the original weight's), a new tensor: Triton on CUDA, the
    lookup-table torch path elsewhere (both bit-identical to the reference)."""
    from minidistill.kernels import nf4 as _nf4

    dtype = state.dtype if dtype is None else dtype
    if packed.is_cuda and _nf4.triton is not None:
        return _nf4.dequantize_nf4_triton(packed, state, dtype)
    return _nf4.dequantize_nf4_lut(packed, state, dtype)


_scratch = threading.local()  # per thread: {(device, dtype): flat buffer}; the active DecodedWeights


def nf4_matmul_weight(packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    """The decoded weight for ONE matmul, used at once, never kept (inside an active DecodedWeights:
    its weight). Off CUDA it lives in a per-thread buffer that the next decode overwrites: a fresh
    large tensor costs page faults on the CPU; CUDA's caching allocator makes a new one cheap."""
    from minidistill.kernels import nf4 as _nf4

    active = getattr(_scratch, "active", None)
    if active:
        return active[-1].weight(packed, state, dtype)
    if packed.is_cuda and _nf4.triton is not None:
        return _nf4.dequantize_nf4_triton(packed, state, dtype)
    return _nf4.dequantize_nf4_into(_scratch.__dict__.setdefault("bufs", {}), packed, state, dtype)


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, state: NF4State,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(W).T + b, no autograd (the forward of both NF4 layers): the 4-bit matrix-vector
    kernel on CUDA while x has at most kernels.nf4_matvec.MAX_ROWS rows (decode), else a matmul on
    the decoded weight (`nf4_matmul_weight`)."""
    from minidistill.kernels import nf4_matvec as _mv

    if _mv.use_matvec(x, packed):
        return _mv.nf4_matvec(x, packed, state, bias)
    return F.linear(x, nf4_matmul_weight(packed, state, x.dtype), bias)


# ---- generation: each NF4 layer decoded once per generate call -------------------------------
DECODE_BUDGET_MB = 2048.0  # the default: SmolLM2 / Qwen2-0.5B whole in fp32, ~1/4 of Phi-4-mini in bf16


class DecodedWeights(StepScoped):
    """Decoded NF4 weights kept for one generate call, so a 4-bit model does not decode every
    weight on every token. The rule, while active (`with cache:`), per (layer, dtype):
    - a layer is decoded on its first use in the call, as the forward reaches it (never the whole
      model at once), into a buffer of its own, kept while the kept bytes stay within `budget_mb`
      (None: DECODE_BUDGET_MB, on CUDA at most a quarter of the free memory: QLoRA's sample
      answers run beside training, and small batches there take the matvec kernel anyway);
    - a layer past the budget is decoded on every use into one reusable buffer per (device,
      dtype), sized to the largest such layer: no allocation per token;
    - `close()` frees it all (iter_generate closes it when the call ends or is abandoned).
    Entering needs grad off, and iter_generate leaves it before each yield: code run between two
    yields (a training step of on-policy distillation, its backward) decodes afresh."""

    _local = _scratch
    _why = "training decodes per matmul and keeps no 16-bit weights"

    def __init__(self, budget_mb: float | None = None):
        if budget_mb is not None and not budget_mb >= 0:
            raise ValueError(f"budget_mb must be >= 0 (0: decode every layer per step), got {budget_mb}")
        self.budget = None if budget_mb is None else budget_mb * 2**20  # bytes; math.inf keeps all
        self.kept: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (packed, decoded)
        self.kept_bytes, self.decodes = 0, 0  # decodes: every decode, kept or per step (for tests)
        self.step_bufs: dict = {}  # {(device, dtype): flat buffer} for the layers past the budget

    def weight(self, packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
        """The decoded weight (out, in) in `dtype`, by the rule of the class docstring."""
        from minidistill.kernels import nf4 as _nf4

        key = (packed.data_ptr(), packed.device, dtype)
        if key in self.kept:
            return self.kept[key][1]
        self.decodes += 1
        if self.budget is None:  # the default, on the device of the first layer decoded
            free = torch.cuda.mem_get_info(packed.device)[0] if packed.is_cuda else math.inf
            self.budget = min(DECODE_BUDGET_MB * 2**20, free / 4)
        nbytes = math.prod(state.shape) * dtype.itemsize
        if self.kept_bytes + nbytes > self.budget:
            return _nf4.dequantize_nf4_into(self.step_bufs, packed, state, dtype)
        self.kept[key] = (packed, dequantize_nf4(packed, state, dtype))  # packed kept: its data_ptr stays its own
        self.kept_bytes += nbytes
        return self.kept[key][1]

    def close(self) -> None:
        self.kept, self.step_bufs, self.kept_bytes = {}, {}, 0


@contextlib.contextmanager
def decoded_weights(budget_mb: float | None = None) -> Iterator[DecodedWeights]:
    """`with decoded_weights(budget_mb):` (under no_grad): NF4 layers decode once inside, freed at the end."""
    cache = DecodedWeights(budget_mb)
    try:
        with cache:
            yield cache
    finally:
        cache.close()


# ---- the QLoRA base linear -----------------------------------------------------------------
class _NF4Matmul(torch.autograd.Function):
    """y = x @ dequant(W).T + b. Backward dequantizes again rather than keeping the 16-bit copy
    (that copy is what 4-bit storage saves), and gives no weight gradient: W is frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state: NF4State,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(packed)
        ctx.state = state
        return nf4_matmul(x, packed, state, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (packed,) = ctx.saved_tensors
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ nf4_matmul_weight(packed, ctx.state, grad_out.dtype)  # (..., in)
        if ctx.needs_input_grad[3]:  # only if someone unfroze the bias
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_b


def register_nf4_weight(module: nn.Module, packed: torch.Tensor, state: NF4State) -> None:
    """Store an NF4 weight on `module` as buffers under NF4Linear's state-dict keys (`weight`,
    `absmax`, `code`, `nested_absmax`, `nested_code`, `offset`); shared by the QLoRA layer."""
    if len(state.shape) != 2:
        raise ValueError(f"an NF4 linear needs a 2-D weight shape, got {tuple(state.shape)}")
    module.out_features, module.in_features = state.shape
    module.register_buffer("weight", packed)  # key "weight" as nn.Linear: LoRA keys match
    module.register_buffer("absmax", state.absmax)
    module.register_buffer("code", state.code)
    module.register_buffer("nested_absmax", state.nested_absmax)
    module.register_buffer("nested_code", state.nested_code)
    module.register_buffer("offset", state.offset)
    module.blocksize, module.nested_blocksize, module.weight_dtype = (
        state.blocksize, state.nested_blocksize, state.dtype)


def nf4_state_of(module: nn.Module) -> NF4State:
    """The NF4State of a module set up by `register_nf4_weight`, read from its buffers on each
    call so that .to(device) on the module moves the state too."""
    return NF4State(absmax=module.absmax, code=module.code, blocksize=module.blocksize,
                    shape=(module.out_features, module.in_features), dtype=module.weight_dtype,
                    nested_absmax=module.nested_absmax, nested_code=module.nested_code,
                    offset=module.offset, nested_blocksize=module.nested_blocksize)


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, state: NF4State,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(W).T + b in x's dtype; backward keeps only the packed bytes (see _NF4Matmul)."""
    return _NF4Matmul.apply(x, packed, state, None if bias is None else bias.to(x.dtype))


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A frozen 16-bit (or fp32) nn.Linear holding `weight` / `bias` cast to `dtype`."""
    out_f, in_f = weight.shape
    lin = Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return lin


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 (bnb layout) and decoded per call."""

    def __init__(self, packed: torch.Tensor, state: NF4State, bias: torch.Tensor | None = None):
        super().__init__()
        register_nf4_weight(self, packed, state)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64,
                    compress_statistics: bool = True) -> NF4Linear:
        """Quantize a dense nn.Linear."""
        packed, state = quantize_nf4(linear.weight, blocksize, compress_statistics)
        return cls(packed, state, linear.bias)

    @property
    def state(self) -> NF4State:
        return nf4_state_of(self)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out, in] in `dtype` (default: the original weight's)."""
        return dequantize_nf4(self.weight, self.state, dtype)

    def to_linear(self, dtype: torch.dtype) -> nn.Linear:
        """A dense nn.Linear in `dtype` with the decoded weight (for a merged 16-bit export)."""
        return dense_linear(self.dequantize(dtype), self.bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.state, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={self.nested_absmax is not None}")
