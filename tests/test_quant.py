"""NF4 in the bitsandbytes layout (quant.py): the quantizer against an independent nearest-code
decode and against bitsandbytes code for code, double quantization of the scales, the bnb
state-dict layout, NF4Linear, and the checks that decide what a checkpoint loads in 4-bit.
The Triton and lookup-table decoders are tested in test_nf4.py."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidistill import prepacked, quant
from minidistill.config import ModelConfig
from minidistill.kernels.nf4 import dequantize_nf4_reference
from minidistill.model import Transformer
from minidistill.bnb_format import (
    block_linear_paths,
    bnb_nf4_config,
    check_quantize,
    nf4_state_from_bnb_tensors,
    nf4_state_to_bnb_tensors,
    prequantized_paths,
)
from minidistill.quant import (
    NF4_CODE,
    NF4Linear,
    NF4State,
    decoded_weights,
    dequantize_nf4,
    dynamic_map,
    nf4_matmul_weight,
    quantize_nf4,
    register_nf4_weight,
)
from model_fixtures import CONFIGS
from model_fixtures import nf4_ties_and_zeros as _ties_and_zeros
from model_fixtures import nf4_weight as _weight


def _nearest_code_decode(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Independent reference: per block of the flat weight, absmax, the nearest NF4 code of each
    x / absmax (argmin, no midpoints), and code * absmax."""
    code = torch.tensor(NF4_CODE)
    flat = w.reshape(-1).float()
    blocks = list(flat.split(blocksize))
    absmax = torch.stack([b.abs().max() for b in blocks])
    q = torch.cat([(b[:, None] / a - code[None]).abs().argmin(1) for b, a in zip(blocks, absmax)])  # (n,)
    sizes = torch.tensor([b.numel() for b in blocks])
    return absmax, q, (code[q] * absmax.repeat_interleave(sizes)).reshape(w.shape)


@pytest.mark.parametrize("shape,blocksize", [((6, 100), 64), ((3, 64), 32), ((333,), 128)])  # ragged, even, odd
def test_round_trip_is_the_nearest_code_times_absmax(shape, blocksize):
    w = _weight(shape, seed=3)
    packed, state = quantize_nf4(w, blocksize, compress_statistics=False)
    absmax, q, want = _nearest_code_decode(w, blocksize)
    assert torch.equal(state.absmax, absmax) and not state.nested
    assert state.shape == shape and state.dtype == torch.float32 and state.blocksize == blocksize
    n = w.numel()
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 1) // 2, 1)
    codes = torch.stack([packed[:, 0] >> 4, packed[:, 0] & 15], 1).reshape(-1)[:n]  # even index: high nibble
    assert torch.equal(codes.long(), q)
    assert torch.equal(dequantize_nf4(packed, state), want)
    assert dequantize_nf4(packed, state, torch.bfloat16).dtype == torch.bfloat16


def test_double_quant_stores_8bit_scales_close_to_the_true_absmax():
    w = _weight((40, 512), seed=4)  # 320 blocks of 64: two nested blocks of 256
    packed, state = quantize_nf4(w, 64)
    single_packed, single = quantize_nf4(w, 64, compress_statistics=False)
    assert torch.equal(packed, single_packed)  # the codes do not depend on how the scales are stored
    assert state.nested and state.absmax.dtype == torch.uint8 and state.nested_absmax.shape == (2,)
    assert torch.equal(state.offset, single.absmax.mean())
    sizes = torch.full((2,), 256)
    sizes[-1] = 320 - 256
    scale = state.nested_absmax.repeat_interleave(sizes)  # (320,) the nested block's scale of each absmax
    absmax = state.nested_code[state.absmax.long()] * scale + state.offset
    err = (absmax - single.absmax).abs()
    # At most half the widest step of the 8-bit map, in units of the nested scale (plus bnb's
    # 65536-point grid, which moves the thresholds by ~1e-5); not exact, so not zero everywhere.
    bound = (dynamic_map().diff().max() / 2 + 2e-5) * scale
    assert (err <= bound).all() and err.max() > 0
    got, ref = dequantize_nf4(packed, state), dequantize_nf4(single_packed, single)
    assert torch.equal(got, dequantize_nf4_reference(packed, state, torch.float32))
    assert 0 < (got - ref).abs().max() <= bound.max()  # |code| <= 1: a weight errs by at most its scale's error


def test_nf4_state_moves_and_keeps_its_fields():
    packed, state = quantize_nf4(_weight((4, 64)), 64)
    moved = state.to("cpu")
    assert isinstance(moved, NF4State) and moved.nested and moved.shape == (4, 64)
    assert torch.equal(moved.absmax, state.absmax) and torch.equal(moved.offset, state.offset)
    plain = quantize_nf4(_weight((4, 64)), 64, compress_statistics=False)[1].to("cpu")
    assert not plain.nested and plain.nested_code is None and plain.offset is None


def test_quantize_and_layer_inputs_are_checked():
    with pytest.raises(ValueError, match="can quantize bf16/fp16/fp32 weights only, got torch.int32"):
        quantize_nf4(torch.zeros(4, 64, dtype=torch.int32))
    packed, state = quantize_nf4(_weight((2, 4, 64)), 64)
    with pytest.raises(ValueError, match=r"needs a 2-D weight shape, got \(2, 4, 64\)"):
        register_nf4_weight(torch.nn.Module(), packed, state)
    check_quantize(None)
    check_quantize("nf4")
    with pytest.raises(ValueError, match="quantize='int8' is not supported; valid: None, 'nf4'"):
        check_quantize("int8")


def test_to_linear_gives_the_decoded_frozen_weight():
    dense = torch.nn.Linear(64, 8, bias=True)
    layer = NF4Linear.from_linear(dense, blocksize=32, compress_statistics=False)
    lin = layer.to_linear(torch.bfloat16)
    assert type(lin) is prepacked.Linear and lin.weight.dtype == lin.bias.dtype == torch.bfloat16
    assert torch.equal(lin.weight, layer.dequantize(torch.bfloat16)) and not lin.weight.requires_grad
    assert torch.equal(lin.bias, dense.bias.detach().to(torch.bfloat16))
    assert repr(layer).endswith("(in_features=64, out_features=8, bias=True, blocksize=32, double_quant=False)")


# ---- which modules a checkpoint holds in 4-bit -------------------------------------------------
def test_bnb_nf4_config_accepts_nf4_only():
    assert bnb_nf4_config({}, "x") is None
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    assert bnb_nf4_config({"quantization_config": qc}, "x") == qc
    with pytest.raises(ValueError, match=r"repo: quantization_config \{'quant_method': 'bitsandbytes', "
                                         r"'load_in_4bit': True\} is not supported"):
        bnb_nf4_config({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, "repo")  # fp4


def test_block_linears_and_prequantized_paths():
    model = Transformer(ModelConfig.from_hf(CONFIGS["llama3"]))
    linears = block_linear_paths(model)
    assert len(linears) == 7 * 2 and "model.layers.1.mlp.down_proj" in linears and "lm_head" not in linears
    key = lambda p: f"{p}.weight.quant_state.bitsandbytes__nf4"  # noqa: E731
    four_bit = {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"}
    keys = {key(p) for p in four_bit} | {"model.layers.0.self_attn.o_proj.weight", "lm_head.weight"}
    qc = {"llm_int8_skip_modules": ["lm_head", "o_proj"]}
    assert prequantized_paths(keys, linears, qc, "x") == four_bit  # the file decides, the skip list agrees
    with pytest.raises(ValueError, match=r"\['model.layers.0.self_attn.q_proj'\] are 4-bit in the file but "
                                         r"llm_int8_skip_modules \['q_proj'\]"):
        prequantized_paths(keys, linears, {"llm_int8_skip_modules": ["q_proj"]}, "x")
    with pytest.raises(ValueError, match=r"\['lm_head'\] are 4-bit, but only the linear layers of the blocks"):
        prequantized_paths(keys | {key("lm_head")}, linears, qc, "x")
    with pytest.raises(ValueError, match="are not NF4 quant states"):
        prequantized_paths(keys | {"model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4"}, linears, qc, "x")


# ---- moved from test_nf4.py --------------------------------------------------------------------
def test_matmul_weight_reuses_one_buffer_per_dtype():
    big, sb = quantize_nf4(_weight((40, 96)), 32)
    small, ss = quantize_nf4(_weight((8, 64), seed=1), 32)
    w1 = nf4_matmul_weight(big, sb, torch.float32)
    assert torch.equal(w1, dequantize_nf4(big, sb, torch.float32))
    ptr = w1.untyped_storage().data_ptr()
    w2 = nf4_matmul_weight(small, ss, torch.float32)  # fits: same memory, the old values overwritten
    assert w2.untyped_storage().data_ptr() == ptr and torch.equal(w2, dequantize_nf4(small, ss, torch.float32))
    assert nf4_matmul_weight(small, ss, torch.bfloat16).untyped_storage().data_ptr() != ptr


def test_decoded_weights_keep_within_budget_then_reuse_one_buffer():
    layers = [NF4Linear.from_linear(nn.Linear(96, n, bias=False)) for n in (40, 8, 24)]
    x = torch.randn(3, 96)
    want = [x @ m.dequantize(torch.float32).T for m in layers]
    with torch.no_grad(), decoded_weights(budget_mb=(40 * 96 + 8 * 96) * 4 / 2**20) as cache:
        for _ in range(3):  # three "steps": the first two layers fit, the third is decoded per step
            assert all(torch.equal(m(x), w) for m, w in zip(layers, want))
        assert len(cache.kept) == 2 and cache.kept_bytes == (40 + 8) * 96 * 4 and cache.decodes == 2 + 3
        (buf,) = cache.step_bufs.values()  # one reused buffer, the third layer's size
        assert buf.numel() == 24 * 96
    assert cache.kept == {} and cache.step_bufs == {} and not quant._scratch.active
    with pytest.raises(RuntimeError, match="under torch.no_grad"), decoded_weights():  # grad on: refused
        pass
    assert not quant._scratch.active


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


