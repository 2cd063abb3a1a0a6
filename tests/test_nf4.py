"""NF4: Triton kernel == torch reference bit for bit (interpreter on CPU), quantizer == bitsandbytes
code for code, the bnb state-dict layout round trip, and the QLoRA linear's gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from minidistill.kernels import nf4 as kernels_nf4
from minidistill.kernels.nf4 import dequantize_nf4_lut, dequantize_nf4_reference, dequantize_nf4_triton
from minidistill.quant import (
    NF4_CODE,
    NF4Linear,
    dequantize_nf4,
    dynamic_map,
    nf4_matmul_weight,
    nf4_state_from_bnb_tensors,
    nf4_state_to_bnb_tensors,
    quantize_nf4,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: conftest sets TRITON_INTERPRET=1
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def _ties_and_zeros(blocksize: int) -> torch.Tensor:
    """Blocks whose absmax is 1 (so x / absmax is exact) holding every fp32 midpoint between NF4
    codes, the codes themselves, and ±1; then an all-zero block and a sign-only block."""
    code = torch.tensor(NF4_CODE)
    mids = (code[:-1] + code[1:]) / 2
    vals = torch.cat([mids, -mids, code, torch.tensor([1.0, -1.0])])
    vals = F.pad(vals, (0, -vals.numel() % blocksize)).view(-1, blocksize)
    vals[:, 0] = 1.0  # absmax 1 in every block
    zero = torch.zeros(1, blocksize)
    small = torch.full((1, blocksize), -3e-3)
    return torch.cat([vals, zero, small, vals * 2.0]).reshape(-1)  # *2: power of two, exact


# ---- kernel == reference ---------------------------------------------------------------------
ODD_SHAPES = [(64,), (4096 + 64,), (17, 320), (5, 2048), (3, 1000, 64), (333,)]


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
def test_kernel_matches_reference_bitwise(shape, blocksize):
    packed, state = quantize_nf4(_weight(shape, seed=blocksize), blocksize)
    packed, state = packed.to(DEVICE), state.to(DEVICE)
    for dtype in OUT_DTYPES:
        got = dequantize_nf4_triton(packed, state, dtype)
        want = dequantize_nf4_reference(packed, state, dtype)
        assert got.dtype == dtype and got.shape == shape
        n_bad = (got != want).sum().item()
        assert n_bad == 0, f"{shape} blocksize {blocksize} {dtype}: {n_bad} elements differ"


@pytest.mark.parametrize("blocksize", [64, 4096])
def test_kernel_without_double_quant_and_large_blocks(blocksize):
    packed, state = quantize_nf4(_weight((9, 1000)), blocksize, compress_statistics=False)
    assert state.absmax.dtype == torch.float32 and not state.nested
    packed, state = packed.to(DEVICE), state.to(DEVICE)
    for dtype in OUT_DTYPES:
        got = dequantize_nf4_triton(packed, state, dtype)
        assert torch.equal(got, dequantize_nf4_reference(packed, state, dtype))


def test_kernel_rejects_bad_inputs():
    packed, state = quantize_nf4(_weight((4, 64)))
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
        packed, state = quantize_nf4(_weight(shape, seed=blocksize), blocksize, compress_statistics)
        for dtype in OUT_DTYPES:
            want = dequantize_nf4_reference(packed, state, dtype)
            got = dequantize_nf4_lut(packed, state, dtype)
            assert got.shape == shape and got.dtype == dtype
            assert torch.equal(got, want), f"{shape} blocksize {blocksize} {dtype}"
            out = torch.full((math.prod(shape),), float("nan"), dtype=dtype)  # a reused, dirty buffer
            assert torch.equal(dequantize_nf4_lut(packed, state, dtype, out=out), want)


def test_lut_ties_zeros_and_bad_out():
    packed, state = quantize_nf4(_ties_and_zeros(64), 64)
    assert torch.equal(dequantize_nf4_lut(packed, state, torch.float32),
                       dequantize_nf4_reference(packed, state, torch.float32))
    with pytest.raises(ValueError, match="out must be a contiguous torch.bfloat16 tensor"):
        dequantize_nf4_lut(packed, state, torch.bfloat16, out=torch.empty(7, dtype=torch.bfloat16))


def test_matmul_weight_reuses_one_buffer_per_dtype():
    big, sb = quantize_nf4(_weight((40, 96)), 32)
    small, ss = quantize_nf4(_weight((8, 64), seed=1), 32)
    w1 = nf4_matmul_weight(big, sb, torch.float32)
    assert torch.equal(w1, dequantize_nf4(big, sb, torch.float32))
    ptr = w1.untyped_storage().data_ptr()
    w2 = nf4_matmul_weight(small, ss, torch.float32)  # fits: same memory, the old values overwritten
    assert w2.untyped_storage().data_ptr() == ptr and torch.equal(w2, dequantize_nf4(small, ss, torch.float32))
    assert nf4_matmul_weight(small, ss, torch.bfloat16).untyped_storage().data_ptr() != ptr


# ---- quantizer == bitsandbytes ---------------------------------------------------------------
def test_dynamic_map_matches_bnb():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(dynamic_map(), bnbf.create_dynamic_map(signed=True))


@pytest.mark.parametrize(
    "shape,blocksize,dtype",
    [
        ((17, 320), 64, torch.float32),
        ((5, 2048), 32, torch.bfloat16),
        ((300, 128), 32, torch.float32),  # 1200 blocks: several nested blocks of 256
        ((7, 96), 128, torch.float16),  # ragged last block
        ((333,), 64, torch.float32),  # odd numel: half-filled last byte
        ((64,), 64, torch.float32),  # one block: nested scale of 0/0
        ((3, 64), 64, torch.float32),
        ((9, 1024), 4096, torch.float32),
        ("ties", 64, torch.float32),
        ("ties", 32, torch.float32),
        ("zeros", 64, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("compress_statistics", [True, False])
def test_quantizer_matches_bnb(shape, blocksize, dtype, compress_statistics):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    if shape == "ties":
        w = _ties_and_zeros(blocksize).to(dtype)
    elif shape == "zeros":
        w = torch.zeros(6, 128, dtype=dtype)
    else:
        w = _weight(shape, dtype)
    packed, state = quantize_nf4(w, blocksize, compress_statistics)
    bp, bs = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                compress_statistics=compress_statistics)
    assert torch.equal(packed, bp)
    assert torch.equal(state.absmax, bs.absmax)
    assert torch.equal(state.code, bs.code)
    assert state.shape == tuple(bs.shape) and state.dtype == bs.dtype
    if compress_statistics:
        assert torch.equal(state.nested_absmax, bs.state2.absmax)
        assert torch.equal(state.nested_code, bs.state2.code)
        assert torch.equal(state.offset, bs.offset)
    # bnb decodes to the original dtype: ours must agree to within its rounding. bnb's AVX-512
    # CPU decode indexes absmax per row, wrong when blocks straddle rows: compare elsewhere only.
    if w.dim() > 1 and w.shape[-1] % blocksize:
        return
    want = bnbf.dequantize_4bit(bp, bs).reshape(w.shape)  # bnb gives 1-D shapes as [1, n]
    got = dequantize_nf4(packed, state)
    assert got.dtype == want.dtype == dtype
    tol = {torch.float32: 0.0, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=0)


def test_quantize_rejects_bad_blocksize():
    with pytest.raises(ValueError, match="got 48"):
        quantize_nf4(_weight((4, 96)), blocksize=48)


# ---- bnb state-dict layout ---------------------------------------------------------------------
def test_bnb_state_dict_round_trip(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file, save_file

    w = _weight((48, 192), torch.bfloat16)
    lin = bnb.nn.Linear4bit(192, 48, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                            compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, blocksize=64)
    lin = lin.to("cpu")  # quantizes
    theirs = lin.state_dict()

    packed, state = quantize_nf4(w, 64)
    ours = nf4_state_to_bnb_tensors(packed, state, prefix="weight")
    assert sorted(ours) == sorted(theirs)
    for k in theirs:  # same bytes, including the JSON blob
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k

    # Through a safetensors file with a module prefix, as in a "-bnb-4bit" checkpoint.
    prefix = "model.layers.0.mlp.up_proj.weight"
    save_file({k.replace("weight", prefix, 1): v for k, v in theirs.items()}, tmp_path / "m.st")
    packed2, state2 = nf4_state_from_bnb_tensors(load_file(tmp_path / "m.st"), prefix=prefix)
    assert torch.equal(packed2, packed) and state2.shape == (48, 192)
    assert state2.dtype == torch.bfloat16 and state2.blocksize == 64
    assert torch.equal(dequantize_nf4(packed2, state2), dequantize_nf4(packed, state))
    want = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert want.dtype == torch.bfloat16 and torch.equal(dequantize_nf4(packed2, state2), want)


def test_from_bnb_tensors_names_missing_keys():
    with pytest.raises(KeyError, match="bitsandbytes__nf4"):
        nf4_state_from_bnb_tensors({"weight": torch.zeros(8, 1, dtype=torch.uint8)})


# ---- NF4Linear -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_matches_dense_and_has_no_weight_grad(dtype):
    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 40, bias=True).to(dtype)
    layer = NF4Linear.from_linear(dense, blocksize=32)
    w = layer.dequantize(dtype)
    assert w.shape == (40, 96)
    assert not any(p.requires_grad for p in layer.parameters())

    x = torch.randn(3, 5, 96, dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    # Only the packed 4-bit bytes are kept for backward, never a 16-bit copy of the weight.
    assert saved and all(t.dtype == torch.uint8 for t in saved)
    g = torch.randn_like(y)
    y.backward(g)

    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, w, dense.bias.detach())
    y2.backward(g)
    assert torch.equal(y, y2)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    assert layer.bias.grad is None
    assert all(b.grad is None for b in layer.buffers())


def test_nf4_linear_state_dict_loads_into_fresh_module():
    dense = torch.nn.Linear(64, 24, bias=False)
    layer = NF4Linear.from_linear(dense)
    sd = layer.state_dict()
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (24 * 64 // 2, 1)
    clone = NF4Linear.from_linear(torch.nn.Linear(64, 24, bias=False))
    clone.load_state_dict(sd)
    x = torch.randn(2, 64)
    assert torch.equal(clone(x), layer(x))


@pytest.mark.gpu
def test_kernel_on_cuda_matches_reference_large():
    packed, state = quantize_nf4(_weight((1024, 4096 + 64), torch.bfloat16).cuda(), 64)
    for dtype in OUT_DTYPES:
        got = dequantize_nf4_triton(packed, state, dtype)
        assert torch.equal(got, dequantize_nf4_reference(packed, state, dtype))
    assert math.prod(got.shape) == 1024 * (4096 + 64)
