"""The small-batch NF4 matrix-vector kernel (kernels/nf4_matvec.py) against its plain-torch
reference (fp32 decode, fp32 matmul): the interpreter on CPU over odd shapes, CUDA when present."""

import pytest
import torch

from minidistill import quant
from minidistill.kernels.nf4_matvec import MAX_ROWS, nf4_matvec, nf4_matvec_reference, use_matvec
from minidistill.quant import NF4Linear, quantize_nf4
from model_fixtures import nf4_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: conftest sets TRITON_INTERPRET=1
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # relative to max |y|


def close(got, want, dtype):
    scale = want.float().abs().max().clamp(min=1e-6)
    return ((got.float() - want.float()).abs().max() / scale).item() <= TOL[dtype]


# (out, in, blocksize, rows, split_k): rows 1 takes the reduction path, 2-16 the dot path; in % blocksize
# == 0 the aligned path (scales per block), else blocks straddle rows (in 100, 75, odd in 75 and 33).
CASES = [(33, 192, 64, 1, None), (33, 192, 64, 5, 2), (17, 100, 64, 3, None), (7, 75, 64, 1, None),
         (9, 75, 64, 16, 1), (40, 512, 256, 2, 3), (3, 33, 32, 4, None), (65, 128, 64, 1, 4)]


@pytest.mark.parametrize("out_f, in_f, blocksize, rows, split_k", CASES)
@pytest.mark.parametrize("compress_statistics", [True, False])
def test_matvec_matches_reference_over_odd_shapes(out_f, in_f, blocksize, rows, split_k, compress_statistics):
    packed, state = quantize_nf4(nf4_weight((out_f, in_f), seed=out_f), blocksize, compress_statistics)
    assert state.nested == compress_statistics
    packed, state = packed.to(DEVICE), state.to(DEVICE)
    g = torch.Generator().manual_seed(in_f)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(rows, in_f, generator=g).to(DEVICE, dtype)
        bias = torch.randn(out_f, generator=g).to(DEVICE, dtype)
        got = nf4_matvec(x, packed, state, bias, split_k=split_k)
        want = nf4_matvec_reference(x, packed, state, bias)
        assert got.shape == (rows, out_f) and got.dtype == dtype
        assert close(got, want, dtype), f"{dtype}: {(got.float() - want.float()).abs().max()}"
    x3 = torch.randn(1, rows, in_f, generator=g).to(DEVICE)  # (batch, new tokens, in)
    assert nf4_matvec(x3, packed, state).shape == (1, rows, out_f)
    assert close(nf4_matvec(x3, packed, state), nf4_matvec_reference(x3, packed, state), torch.float32)


def test_matvec_checks_inputs_and_dispatch_rule():
    packed, state = quantize_nf4(nf4_weight((8, 64)))
    with pytest.raises(ValueError, match="last dim of x must be the weight's in_features"):
        nf4_matvec(torch.randn(1, 32), packed, state)
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows, got 17"):
        nf4_matvec(torch.randn(17, 64), packed, state)
    with pytest.raises(ValueError, match="x must be one of"):
        nf4_matvec(torch.randn(1, 64).double(), packed, state)
    assert not use_matvec(torch.randn(1, 64), packed)  # CPU tensors: decode + matmul (or the cache)


@pytest.mark.gpu
def test_matvec_on_cuda_and_in_the_nf4_layers():
    w = nf4_weight((4096 + 64, 1024 + 64), torch.bfloat16).cuda()
    lin = NF4Linear.from_linear(torch.nn.Linear(w.shape[1], w.shape[0], bias=True).cuda().to(torch.bfloat16))
    for rows in (1, 4, MAX_ROWS):
        x = torch.randn(rows, w.shape[1], device="cuda", dtype=torch.bfloat16)
        assert use_matvec(x, lin.weight)
        want = nf4_matvec_reference(x, lin.weight, lin.state, lin.bias)
        assert close(nf4_matvec(x, lin.weight, lin.state, lin.bias), want, torch.bfloat16)
        with torch.no_grad():
            assert close(lin(x), want, torch.bfloat16)  # NF4Linear's forward takes the kernel
    x = torch.randn(MAX_ROWS + 1, w.shape[1], device="cuda", dtype=torch.bfloat16)
    assert not use_matvec(x, lin.weight)
    assert close(quant.nf4_matmul(x, lin.weight, lin.state), nf4_matvec_reference(x, lin.weight, lin.state),
                 torch.bfloat16)
