"""Small-batch NF4 matrix-vector product: y = x @ dequant(W).T + b, W never written out in 16 bits.

At decode time a 4-bit model multiplies a few rows by every weight. Dequantize-then-matmul
moves 0.5 (packed) + 2 (write) + 2 (read) bytes per bf16 weight; `_nf4_matvec_kernel` reads the
0.5 packed bytes (and the scales) and decodes in registers. With more rows the weight is reused
across them and a matmul on the decoded weight wins, hence `MAX_ROWS`.

`nf4_matvec` launches the kernel (CUDA, or CPU under TRITON_INTERPRET=1), `nf4_matvec_reference`
is the plain-torch reference (fp32 decode, fp32 matmul), `use_matvec` the dispatch rule. The
format (bnb's layout, flat row-major, two codes per byte, high nibble first) is described in
minidistill/quant.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from minidistill.kernels.nf4 import _check, _check_launch, dequantize_nf4_reference, triton

if triton is not None:
    import triton.language as tl

if TYPE_CHECKING:
    from minidistill.quant import NF4State

MAX_ROWS = 16  # rows of x (batch x new tokens) up to which the kernel beats decode + matmul
_X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


if triton is not None:

    @triton.jit
    def _scales(blk, ok, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
        """fp32 scale of each quantization block index in `blk` (any shape)."""
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
            s2 = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=ok, other=0.0)
            s = tl.load(nested_code_ptr + q) * s2 + tl.load(offset_ptr)  # two roundings, as bnb
        else:
            s = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
        return s

    @triton.jit
    def _nf4_matvec_kernel(
        x_ptr,  # [M, K] rows of the input, row stride stride_xm
        packed_ptr,  # uint8 [(N * K + 1) // 2]: W [N, K] flat, element 2j in byte j's high nibble
        absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,  # as in nf4.py
        out_ptr,  # float32 [SPLIT, M, N]: one partial sum per slice of K
        M, N, K, stride_xm, k_per_split,
        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
        ALIGNED: tl.constexpr,  # K % BLOCKSIZE == 0: a row holds whole blocks, K is even
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT16: tl.constexpr,  # tensor-core 16-bit dot (False under the interpreter, whose bf16 dot is wrong)
    ):
        # Program (pid_n, pid_k): output columns [pid_n * BLOCK_N, +BLOCK_N) over K slice pid_k.
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,); int64: 8B-model sizes
        n_ok = n < N
        m = tl.arange(0, BLOCK_M)
        m_ok = m < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * k_per_split  # k_per_split is a multiple of BLOCK_K
        k_hi = tl.minimum(k_lo + k_per_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_hi
            if ALIGNED:
                # Whole bytes, and one scale per G elements of a row: decoded once, not per element.
                G: tl.constexpr = BLOCKSIZE if BLOCKSIZE < BLOCK_K else BLOCK_K
                HALF: tl.constexpr = BLOCK_K // 2
                jb = tl.arange(0, HALF)
                b_ok = n_ok[:, None] & ((k0 + 2 * jb) < k_hi)[None, :]
                byte = tl.load(packed_ptr + (n[:, None] * K + k0) // 2 + jb[None, :], mask=b_ok,
                               other=0).to(tl.int32)  # (BLOCK_N, HALF)
                vals = tl.interleave(tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 0xF)))
                g = tl.arange(0, BLOCK_K // G)
                blk = (n[:, None] * K + k0 + g[None, :] * G) // BLOCKSIZE  # (BLOCK_N, BLOCK_K // G)
                s_ok = n_ok[:, None] & ((k0 + g * G) < k_hi)[None, :]
                s = _scales(blk, s_ok, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                            NESTED_BLOCKSIZE, NESTED)
                w = tl.reshape(tl.reshape(vals, (BLOCK_N, BLOCK_K // G, G)) * s[:, :, None],
                               (BLOCK_N, BLOCK_K))
            else:
                # Blocks straddle rows (or K is odd): each element finds its byte, nibble and scale.
                f = n[:, None] * K + k[None, :]  # (BLOCK_N, BLOCK_K) flat index into W
                ok = n_ok[:, None] & k_ok[None, :]
                byte = tl.load(packed_ptr + f // 2, mask=ok, other=0).to(tl.int32)
                nib = tl.where(f % 2 == 0, byte >> 4, byte & 0xF)
                s = _scales(f // BLOCKSIZE, ok, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                            offset_ptr, NESTED_BLOCKSIZE, NESTED)
                w = tl.load(code_ptr + nib) * s
            w = tl.where(n_ok[:, None] & k_ok[None, :], w, 0.0)  # (BLOCK_N, BLOCK_K) fp32
            xt = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0)  # (BLOCK_M, BLOCK_K)
            if BLOCK_M == 1:  # one row: a reduction, in fp32
                acc += tl.sum(w * xt.to(tl.float32), axis=1)[None, :]
            elif x_ptr.dtype.element_ty == tl.float32:
                acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
            elif DOT16:  # 16-bit x: the decoded weight rounded to x's dtype, as decode + matmul does
                acc += tl.dot(xt, tl.trans(w.to(x_ptr.dtype.element_ty)))
            else:  # the same products (16-bit x 16-bit is exact in fp32), summed in fp32
                w16 = w.to(x_ptr.dtype.element_ty).to(tl.float32)
                acc += tl.dot(xt.to(tl.float32), tl.trans(w16), input_precision="ieee")
        o = pid_k * M * N + m[:, None] * N + n[None, :]
        tl.store(out_ptr + o, acc, mask=m_ok[:, None] & n_ok[None, :])


def use_matvec(x: torch.Tensor, packed: torch.Tensor) -> bool:
    """The dispatch rule: CUDA with triton, a float x of at most MAX_ROWS rows."""
    return (packed.is_cuda and x.is_cuda and triton is not None and x.dtype in _X_DTYPES
            and x.numel() <= MAX_ROWS * x.shape[-1])


def _rows(x: torch.Tensor, state: NF4State) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] != state.shape[1] or len(state.shape) != 2:
        raise ValueError(f"x of shape {tuple(x.shape)} does not fit a weight of shape {tuple(state.shape)}: "
                         "the last dim of x must be the weight's in_features")
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"x must be one of {_X_DTYPES}, got {x.dtype}")
    return x.reshape(-1, x.shape[-1])  # (M, K)


def nf4_matvec_reference(x: torch.Tensor, packed: torch.Tensor, state: NF4State,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(W).T + b in fp32 (decode and matmul), cast to x's dtype: what the kernel approximates."""
    x2 = _rows(x, state)
    y = x2.float() @ dequantize_nf4_reference(packed, state, torch.float32).T  # (M, N)
    y = y.to(x.dtype)
    return (y if bias is None else y + bias.to(x.dtype)).view(*x.shape[:-1], state.shape[0])


def nf4_matvec(x: torch.Tensor, packed: torch.Tensor, state: NF4State, bias: torch.Tensor | None = None,
               split_k: int | None = None) -> torch.Tensor:
    """x (..., K) @ dequant(W).T + b with the kernel, for at most MAX_ROWS rows of x, in x's dtype.
    `split_k`: slices of K computed by separate programs and summed after (default: enough
    programs to fill the device)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use nf4_matvec_reference")
    x2 = _rows(x, state)
    _check(packed, state, x.dtype)
    N, K = state.shape
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"nf4_matvec takes at most {MAX_ROWS} rows, got {M}: decode the weight and matmul")
    interpret = _check_launch(_nf4_matvec_kernel, "NF4 matvec", packed, state, x2)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    block_m = 1 if M == 1 else 16  # tl.dot needs 16 rows: fewer are masked
    block_n, block_k = (32, 128) if M == 1 else (64, 64)
    n_tiles, k_steps = triton.cdiv(N, block_n), triton.cdiv(K, block_k)
    if split_k is None:  # a few programs per SM: 8B-model rows are 1024-14336 wide, too few tiles
        sms = torch.cuda.get_device_properties(packed.device).multi_processor_count if packed.is_cuda else 1
        split_k = max(1, min(k_steps, (4 * sms) // n_tiles))
    split_k = max(1, min(split_k, k_steps))
    k_per_split = triton.cdiv(k_steps, split_k) * block_k
    split_k = triton.cdiv(K, k_per_split)  # no empty slice
    out = torch.empty(split_k, M, N, dtype=torch.float32, device=packed.device)
    nested = state.nested
    _nf4_matvec_kernel[(n_tiles, split_k)](
        x2, packed, state.absmax,
        state.nested_absmax if nested else state.absmax,  # unused when not NESTED
        state.nested_code if nested else state.code,
        state.offset if nested else state.code,
        state.code, out, M, N, K, x2.stride(0), k_per_split,
        BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=state.nested_blocksize if nested else 1,
        NESTED=nested, ALIGNED=K % state.blocksize == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT16=not interpret, num_warps=4,
    )
    y = (out[0] if split_k == 1 else out.sum(0)).to(x.dtype)  # (M, N)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*x.shape[:-1], N)

