"""NF4 decoding (kernels/nf4.py): Triton kernel == torch reference bit for bit (interpreter on CPU),
and the lookup-table torch path == reference. The quantizer and NF4Linear are tested in test_quant.py."""

import math

import pytest
import torch

from minidistill.kernels import nf4 as kernels_nf4
from minidistill.kernels.nf4 import dequantize_nf4_lut, dequantize_nf4_reference, dequantize_nf4_triton
from minidistill.quant import quantize_nf4
from model_fixtures import nf4_ties_and_zeros, nf4_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: conftest sets TRITON_INTERPRET=1
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- kernel == reference ---------------------------------------------------------------------
ODD_SHAPES = [(64,), (4096 + 64,), (17, 320), (5, 2048), (3, 1000, 64), (333,)]


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
def test_kernel_matches_reference_bitwise(shape, blocksize):
    packed, state = quantize_nf4(nf4_weight(shape, seed=blocksize), blocksize)
    packed, state = packed.to(DEVICE), state.to(DEVICE)
    for dtype in OUT_DTYPES:
        got = dequantize_nf4_triton(packed, state, dtype)
        want = dequantize_nf4_reference(packed, state, dtype)
        assert got.dtype == dtype and got.shape == shape
        n_bad = (got != want).sum().item()
        assert n_bad == 0, f"{shape} blocksize {blocksize} {dtype}: {n_bad} elements differ"


@pytest.mark.parametrize("blocksize", [64, 4096])
def test_kernel_without_double_quant_and_large_blocks(blocksize):
    packed, state = quantize_nf4(nf4_weight((9, 1000)), blocksize, compress_statistics=False)
    assert state.absmax.dtype == torch.float32 and not state.nested
    packed, state = packed.to(DEVICE), state.to(DEVICE)
    for dtype in OUT_DTYPES:
        got = dequantize_nf4_triton(packed, state, dtype)
        assert torch.equal(got, dequantize_nf4_reference(packed, state, dtype))
        out = torch.full((9 * 1000,), float("nan"), dtype=dtype, device=DEVICE)  # a reused, dirty buffer
        again = dequantize_nf4_triton(packed, state, dtype, out=out)
        assert torch.equal(again, got) and again.data_ptr() == out.data_ptr()


def test_kernel_rejects_bad_inputs():
    packed, state = quantize_nf4(nf4_weight((4, 64)))
    with pytest.raises(ValueError, match="output dtype"):
        dequantize_nf4_triton(packed, state, torch.int8)
    with pytest.raises(ValueError, match="needs 128"):
        dequantize_nf4_triton(packed[:100], state, torch.float32)
    with pytest.raises(ValueError, match="must be uint8"):
        dequantize_nf4_triton(packed.to(torch.int16), state, torch.float32)


# ---- lookup-table torch path == reference -------------------------------------------------------
@pytest.mark.parametrize("compress_statistics", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_lut_matches_reference_bitwise(monkeypatch, blocksize, compress_statistics):
    # A small chunk so that several passes, and a ragged last one, are exercised.
    monkeypatch.setattr(kernels_nf4, "_CHUNK", 4 * blocksize)
    for shape in ODD_SHAPES:
        packed, state = quantize_nf4(nf4_weight(shape, seed=blocksize), blocksize, compress_statistics)
        for dtype in OUT_DTYPES:
            want = dequantize_nf4_reference(packed, state, dtype)
            got = dequantize_nf4_lut(packed, state, dtype)
            assert got.shape == shape and got.dtype == dtype
            assert torch.equal(got, want), f"{shape} blocksize {blocksize} {dtype}"
            out = torch.full((math.prod(shape),), float("nan"), dtype=dtype)  # a reused, dirty buffer
            assert torch.equal(dequantize_nf4_lut(packed, state, dtype, out=out), want)


def test_lut_ties_zeros_and_bad_out():
    packed, state = quantize_nf4(nf4_ties_and_zeros(64), 64)
    assert torch.equal(dequantize_nf4_lut(packed, state, torch.float32),
                       dequantize_nf4_reference(packed, state, torch.float32))
    with pytest.raises(ValueError, match="out must be a contiguous torch.bfloat16 tensor"):
        dequantize_nf4_lut(packed, state, torch.bfloat16, out=torch.empty(7, dtype=torch.bfloat16))


@pytest.mark.gpu
def test_kernel_on_cuda_matches_reference_large():
    packed, state = quantize_nf4(nf4_weight((1024, 4096 + 64), torch.bfloat16).cuda(), 64)
    for dtype in OUT_DTYPES:
        got = dequantize_nf4_triton(packed, state, dtype)
        assert torch.equal(got, dequantize_nf4_reference(packed, state, dtype))
    assert math.prod(got.shape) == 1024 * (4096 + 64)
