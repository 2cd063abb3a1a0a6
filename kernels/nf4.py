"""NF4 dequantization (bitsandbytes layout, double-quantized absmax decoded in the same pass).

`_dequant_nf4_kernel` is the Triton kernel, `dequantize_nf4_triton` its launcher,
`dequantize_nf4_reference` the plain-torch reference, and `dequantize_nf4_lut` the fast torch
path for devices without the kernel (the CPU): a byte -> two-values table, one gather per byte,
into a caller's buffer. All three give bit-identical results for the same output dtype (each
multiplies the fp32 code by the fp32 scale, then casts). The format is described in
minidistill/quant.py (bnb's layout, two codes per byte, high nibble first).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux x86_64 only; elsewhere only the reference runs
    triton = None

if TYPE_CHECKING:
    from minidistill.quant import NF4State

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BLOCK_BYTES = 1024  # packed bytes per program (2048 outputs); raised to blocksize // 2 if larger


if triton is not None:

    @triton.jit
    def _dequant_nf4_kernel(
        packed_ptr,  # uint8 [n_bytes], byte j holds element 2j (high nibble) and 2j+1 (low)
        absmax_ptr,  # uint8 [n_blocks] codes into nested_code (NESTED) or float32 [n_blocks]
        nested_absmax_ptr,  # float32 [ceil(n_blocks / NESTED_BLOCKSIZE)]
        nested_code_ptr,  # float32 [256], bnb's signed dynamic map
        offset_ptr,  # float32 [1], the mean bnb subtracted before the nested quantization
        code_ptr,  # float32 [16], the NF4 table
        out_ptr,
        n_bytes,
        n_out,
        n_blocks,
        BLOCKSIZE: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr,
        NESTED: tl.constexpr,
        BLOCK_BYTES: tl.constexpr,
    ):
        # One program covers ROWS whole quantization blocks, laid out as a (ROWS, HALF) tile of
        # bytes, so each block's scale is decoded once per row rather than once per byte.
        HALF: tl.constexpr = BLOCKSIZE // 2
        ROWS: tl.constexpr = BLOCK_BYTES // HALF
        pid = tl.program_id(0).to(tl.int64)  # 64-bit: phi-4's gate_up has 183M elements
        blk = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        blk_ok = blk < n_blocks
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=blk_ok, other=0).to(tl.int32)
            s2 = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=blk_ok, other=0.0)
            # Two roundings (mul, then add), as bnb and the reference do: the launcher turns
            # off FMA contraction so this stays bit-identical.
            scale = tl.load(nested_code_ptr + q) * s2 + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=blk_ok, other=0.0)
        j = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF) byte index
        byte = tl.load(packed_ptr + j, mask=j < n_bytes, other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4)) * scale[:, None]  # fp32 product, like bnb
        lo = tl.load(code_ptr + (byte & 0xF)) * scale[:, None]
        vals = tl.interleave(hi, lo)  # (ROWS, BLOCKSIZE): element 2j then 2j+1
        o = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        if out_ptr.dtype.element_ty == tl.bfloat16:
            # fp32 -> bf16 round-to-nearest-even by hand: the interpreter's cast truncates,
            # so only this gives the same bits on CPU tests as on the GPU (and as torch).
            bits = vals.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            res = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            res = vals.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + o, res, mask=o < n_out)


def _check(packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> tuple[int, int]:
    """Validate inputs shared by the kernel and the reference; returns (numel, n_blocks)."""
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"output dtype must be one of {_OUT_DTYPES}, got {dtype}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed NF4 weight must be uint8, got {packed.dtype}")
    bs = state.blocksize
    if bs < 32 or bs & (bs - 1):
        raise ValueError(f"blocksize must be a power of two >= 32, got {bs}")
    n = math.prod(state.shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed has {packed.numel()} bytes but shape {tuple(state.shape)} needs {(n + 1) // 2}"
        )
    n_blocks = -(-n // bs)
    if state.absmax.numel() != n_blocks:
        raise ValueError(f"absmax has {state.absmax.numel()} entries, expected {n_blocks} "
                         f"(numel {n} / blocksize {bs})")
    if state.code.numel() != 16 or state.code.dtype != torch.float32:
        raise ValueError(f"code table must be float32 [16], got {state.code.dtype} "
                         f"{tuple(state.code.shape)}")
    if state.nested:
        n2 = -(-n_blocks // state.nested_blocksize)
        if state.absmax.dtype != torch.uint8 or state.nested_absmax.numel() != n2:
            raise ValueError(
                f"double-quantized absmax must be uint8 [{n_blocks}] with {n2} nested scales, got "
                f"{state.absmax.dtype} and {state.nested_absmax.numel()} scales"
            )
    elif state.absmax.dtype != torch.float32:
        raise ValueError(f"absmax without double quant must be float32, got {state.absmax.dtype}")
    return n, n_blocks


def _check_launch(kernel, name: str, packed: torch.Tensor, state: NF4State, x: torch.Tensor | None = None) -> bool:
    """Before a launch: the NF4 tensors contiguous on packed's device, x (when given) on it too, and
    a device the kernel runs on (CUDA, or any under TRITON_INTERPRET=1). Returns whether the
    kernel is the interpreter's."""
    tensors = [packed, state.absmax, state.code]
    if state.nested:
        tensors += [state.nested_absmax, state.nested_code, state.offset]
    for t in tensors:
        if t.device != packed.device or not t.is_contiguous():
            raise ValueError(f"NF4 tensors must be contiguous and on {packed.device}; got one on "
                             f"{t.device} (contiguous={t.is_contiguous()})")
    if x is not None and x.device != packed.device:
        raise ValueError(f"x is on {x.device} but the NF4 tensors are on {packed.device}: move one of them")
    interpret = type(kernel).__name__ == "InterpretedFunction"
    if packed.device.type != "cuda" and not interpret:
        raise ValueError(f"the {name} kernel needs CUDA tensors (got {packed.device}) or "
                         "TRITON_INTERPRET=1 set before triton is imported")
    return interpret


def dequantize_nf4_triton(packed: torch.Tensor, state: NF4State, dtype: torch.dtype,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize with the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1), into `out` (a
    contiguous tensor of numel(shape) elements in `dtype`, reused by the caller) or a new tensor."""
    n, n_blocks = _check(packed, state, dtype)
    if triton is None:
        raise RuntimeError("triton is not installed; use dequantize_nf4_reference")
    _check_launch(_dequant_nf4_kernel, "NF4", packed, state)
    out = _out(out, state, dtype, n, packed.device)
    if n == 0:
        return out
    block_bytes = max(_BLOCK_BYTES, state.blocksize // 2)
    nested = state.nested
    grid = (triton.cdiv(n_blocks, block_bytes // (state.blocksize // 2)),)
    _dequant_nf4_kernel[grid](
        packed, state.absmax,
        state.nested_absmax if nested else state.absmax,  # unused when not NESTED
        state.nested_code if nested else state.code,
        state.offset if nested else state.code,
        state.code, out, packed.numel(), n, n_blocks,
        BLOCKSIZE=state.blocksize,
        NESTED_BLOCKSIZE=state.nested_blocksize if nested else 1,
        NESTED=nested, BLOCK_BYTES=block_bytes,
        num_warps=4,
        enable_fp_fusion=False,  # keep mul-then-add of the nested scale unfused (bit parity)
    )
    return out


def _out(out: torch.Tensor | None, state: NF4State, dtype: torch.dtype, n: int, device) -> torch.Tensor:
    """The caller's output buffer, checked and viewed as the weight's shape, or a new tensor."""
    if out is None:
        return torch.empty(state.shape, dtype=dtype, device=device)
    if out.dtype != dtype or out.numel() != n or not out.is_contiguous() or out.device != device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of {n} elements on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})")
    return out.view(state.shape)


def dequantize_nf4_reference(
    packed: torch.Tensor, state: NF4State, dtype: torch.dtype
) -> torch.Tensor:
    """Plain-torch dequantization, in bnb's order: fp32 scale, fp32 code * scale, then cast."""
    n, n_blocks = _check(packed, state, dtype)
    bs = state.blocksize
    if state.nested:
        nbs = state.nested_blocksize
        s2 = state.nested_absmax.repeat_interleave(nbs)[:n_blocks]  # (n_blocks,)
        absmax = state.nested_code[state.absmax.long()] * s2
        absmax = absmax + state.offset  # a separate rounding, as bnb's `absmax += offset`
    else:
        absmax = state.absmax
    b = packed.reshape(-1)
    codes = torch.stack((b >> 4, b & 0xF), dim=-1).reshape(-1)  # (2 * n_bytes,) in flat order
    codes = torch.nn.functional.pad(codes, (0, n_blocks * bs - codes.numel()))
    vals = state.code[codes.long()].view(n_blocks, bs) * absmax[:, None]  # (n_blocks, bs) fp32
    return vals.reshape(-1)[:n].to(dtype).view(state.shape)


# ---- the fast torch path (CPU) ------------------------------------------------------------------
_CHUNK = 1 << 16  # output elements per pass: the gather, the scale and the cast stay in cache
_PAIR_TABLES: dict[tuple, torch.Tensor] = {}


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64: byte b -> the fp32 pair (code[b >> 4], code[b & 15]) as one 8-byte word, so
    one gather per byte writes both elements in flat order (even element = high nibble first)."""
    key = (str(code.device), tuple(code.tolist()))
    if key not in _PAIR_TABLES:
        b = torch.arange(256, device=code.device)
        pairs = torch.stack((code[b >> 4], code[b & 15]), dim=1).contiguous()  # (256, 2) fp32
        _PAIR_TABLES[key] = pairs.view(torch.int64).view(256)
    return _PAIR_TABLES[key]


def _absmax_fp32(state: NF4State, n_blocks: int) -> torch.Tensor:
    """The per-block fp32 scales, (n_blocks,), decoded from the double quantization as bnb does."""
    if not state.nested:
        return state.absmax
    s2 = state.nested_absmax.repeat_interleave(state.nested_blocksize)[:n_blocks]  # (n_blocks,)
    return state.nested_code[state.absmax.int()] * s2 + state.offset  # two roundings, as bnb


def dequantize_nf4_lut(packed: torch.Tensor, state: NF4State, dtype: torch.dtype,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize with a 256-entry byte -> pair table, into `out` (a contiguous tensor of
    numel(shape) elements in `dtype`, reused by the caller) or a new tensor. Bit-identical to
    the reference; no int64 codes, and only chunk-sized temporaries."""
    n, n_blocks = _check(packed, state, dtype)
    out = _out(out, state, dtype, n, packed.device)
    if n == 0:
        return out.view(state.shape)
    bs = state.blocksize
    table, absmax = _pair_table(state.code), _absmax_fp32(state, n_blocks)
    src, dst = packed.reshape(-1), out.view(-1)
    step = max(1, _CHUNK // bs)  # whole blocks per pass
    idx = torch.empty(step * bs // 2, dtype=torch.int32, device=packed.device)
    direct = dtype == torch.float32
    work = None if direct and n % bs == 0 else torch.empty(step * bs, dtype=torch.float32, device=packed.device)
    for blk in range(0, n_blocks, step):
        nb = min(step, n_blocks - blk)
        e0, e1 = blk * bs, min((blk + nb) * bs, n)  # element range; e0 is even (bs is)
        n_bytes = (e1 - e0 + 1) // 2
        i = idx[:n_bytes]
        i.copy_(src[e0 // 2:e0 // 2 + n_bytes])  # uint8 -> int32 index
        w = dst[e0:e1] if work is None else work[:nb * bs]
        torch.index_select(table, 0, i, out=w[:2 * n_bytes].view(torch.int64))  # both nibbles at once
        w.view(nb, bs).mul_(absmax[blk:blk + nb, None])  # fp32 code * fp32 scale, as bnb
        if work is not None:
            dst[e0:e1].copy_(w[:e1 - e0])  # the cast (round to nearest even) to `dtype`
    return out.view(state.shape)


def dequantize_nf4_into(bufs: dict, packed: torch.Tensor, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
    """Decode into bufs[(device, dtype)], a flat buffer the caller keeps, grown to the largest
    weight seen (the kernel on CUDA, the table elsewhere); valid until the next decode into it."""
    n, key = math.prod(state.shape), (packed.device, dtype)
    if key not in bufs or bufs[key].numel() < n:
        bufs[key] = torch.empty(n, dtype=dtype, device=packed.device)
    if packed.is_cuda and triton is not None:
        return dequantize_nf4_triton(packed, state, dtype, out=bufs[key][:n])
    return dequantize_nf4_lut(packed, state, dtype, out=bufs[key][:n])
