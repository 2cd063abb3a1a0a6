"""fused.py (RMSNorm and SwiGLU saving fewer activations) and the LoRA function's norm / SwiGLU
prologues, against plain autograd: values, gradients (fp32 and bf16, odd shapes) and what is saved."""

import pytest
import torch
from torch import nn

import minidistill as md
from minidistill import fused
from minidistill.attention import doc_layout
from minidistill.config import ModelConfig
from minidistill.lora import LoRALinear
from minidistill.model import RMSNorm, Transformer, linear_group, swiglu_linear
from model_fixtures import randomise_lora

SHAPES = [(1, 1, 8), (3, 7, 33), (2, 5, 4, 17)]  # one token; odd widths; (B, T, heads, head_dim) as q/k norms
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def grads_of(fn, inputs, g):
    """fn(*inputs) and the gradients of every input for output gradient g."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(g)
    return [out.detach().float()] + [t.grad.float() for t in inputs]


def check(got, ref, truth, dtype):
    """fp32: tight against the reference. bf16: error to the fp32 truth <= 2x the bf16 reference's."""
    for i, (a, b, t) in enumerate(zip(got, ref, truth)):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"tensor {i}")
        else:
            err, ref_err = (a - t).abs().max().item(), (b - t).abs().max().item()
            assert err <= 2 * ref_err + 1e-6, (i, err, ref_err)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(len(shape))
    x, go = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g)
    w = 1 + torch.randn(shape[-1], generator=g) * 0.2
    lowp = [t.to(dtype) for t in (x, w)]
    got = grads_of(lambda x, w: fused.rms_norm(x, w, 1e-5), lowp, go.to(dtype))
    ref = grads_of(lambda x, w: fused.rms_norm_reference(x, w, 1e-5), lowp, go.to(dtype))
    truth = grads_of(lambda x, w: fused.rms_norm_reference(x, w, 1e-5), [x, w], go)
    check(got, ref, truth, dtype)
    assert torch.equal(got[0], ref[0])  # forward: the same ops in the same order, bit for bit


def test_rms_norm_bf16_input_fp32_weight_and_autocast():
    # fp32 weights over a bf16 input (the output is fp32, as in HF) and under autocast (nothing changes).
    x, w = torch.randn(4, 9, 24).bfloat16(), 1 + torch.randn(24) * 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused.rms_norm(x.requires_grad_(), w, 1e-6)
        ref = fused.rms_norm_reference(x, w, 1e-6)
    assert got.dtype == ref.dtype == torch.float32 and torch.equal(got, ref)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(len(shape))
    gate, up, go = (torch.randn(shape, generator=g) * 2 for _ in range(3))
    lowp = [t.to(dtype) for t in (gate, up)]
    got = grads_of(fused.swiglu, lowp, go.to(dtype))
    ref = grads_of(fused.swiglu_reference, lowp, go.to(dtype))
    truth = grads_of(fused.swiglu_reference, [gate, up], go)
    check(got, ref, truth, dtype)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))  # the same kernels plain autograd runs


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_backwards_given_the_shared_prologue_value_are_bit_identical(dtype):
    # lora's backward computes x / rms (or silu(gate)) once and hands it in: same bits as without.
    g = torch.Generator().manual_seed(3)
    x, go, gate, up = (torch.randn(6, 40, generator=g).to(dtype) for _ in range(4))
    w = (torch.rand(40, generator=g) + 0.5).to(dtype)
    _, rstd = fused.rms_norm_forward(x, w, 1e-5)
    plain = fused.rms_norm_backward(go, x, w, rstd, True)
    shared = fused.rms_norm_backward(go, x, w, rstd, True, n32=x.float() * rstd)
    assert all(torch.equal(a, b) for a, b in zip(plain, shared))
    plain = fused.swiglu_backward(go, gate, up)
    shared = fused.swiglu_backward(go, gate, up, silu_gate=torch.nn.functional.silu(gate))
    assert all(torch.equal(a, b) for a, b in zip(plain, shared))
    gx, gw = plain  # (gate, up gradients) and against plain autograd of silu(gate) * up
    ref = grads_of(fused.swiglu_reference, [gate, up], go)
    assert torch.equal(gx.float(), ref[1]) and torch.equal(gw.float(), ref[2])


def saved_storages(fn, exclude=()):
    """Shapes and dtypes of the distinct storages autograd saves during fn() (parameters excluded)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen.setdefault(ptr, (tuple(t.shape), t.dtype))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sorted(seen.values(), key=str)


def test_fused_functions_save_less_than_plain_autograd():
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(16, dtype=torch.bfloat16)
    _, ours = saved_storages(lambda: fused.rms_norm(x, w, 1e-5), [w])
    _, plain = saved_storages(lambda: fused.rms_norm_reference(x, w, 1e-5), [w])
    assert ours == [((2, 5, 1), torch.float32), ((2, 5, 16), torch.bfloat16)]  # x itself and 1/rms
    assert ((2, 5, 16), torch.float32) in plain  # plain autograd keeps an fp32 copy of x
    gate, up = (torch.randn(2, 5, 16, requires_grad=True) for _ in range(2))
    _, ours = saved_storages(lambda: fused.swiglu(gate, up))
    _, plain = saved_storages(lambda: fused.swiglu_reference(gate, up))
    assert len(ours) == 2 and len(plain) == 3  # gate and up; plain also keeps silu(gate)


# ------------------------------------------------------------- prologues of the LoRA function

def lora_layers(outs=(40, 24), in_f=48, dtype=torch.float32):
    mods = []
    for i, o in enumerate(outs):
        torch.manual_seed(i)
        m = LoRALinear(nn.Linear(in_f, o).to(dtype), r=4 + i, scaling=0.5)
        randomise_lora(m, seed=i + 1)
        mods.append(m)
    return mods


def lora_grads(fn, mods, inputs, gs):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    for m in mods:
        m.zero_grad(set_to_none=True)
    outs = fn(*inputs)
    torch.autograd.backward(outs, gs)
    grads = [t.grad for t in inputs] + [p.grad for m in mods for p in (m.lora_A.weight, m.lora_B.weight)]
    return [o.detach().float() for o in outs] + [g.float() for g in grads]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_norm_inside_the_lora_group_equals_norm_then_group(autocast):
    mods = lora_layers()
    norm = RMSNorm(48, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(48) * 0.2)
    norm.weight.requires_grad_(True)  # a trained norm weight gets its gradient too
    x = torch.randn(3, 7, 48) * 2
    dt = torch.bfloat16 if autocast else torch.float32
    gs = [torch.randn(3, 7, o).to(dt) for o in (40, 24)]

    def run(fused_norm):
        norm.weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = lora_grads(lambda x: LoRALinear.group_forward(x, mods, norm=norm) if fused_norm
                             else [m(fused.rms_norm_reference(x, norm.weight, norm.eps)) for m in mods], mods, [x], gs)
        return out + [norm.weight.grad.float()]
    got, want = run(True), run(False)
    for i, (a, b) in enumerate(zip(got, want)):
        tol = 2e-2 if autocast else 1e-5
        assert ((a - b).abs().max() / b.abs().max()).item() <= tol, i


def test_swiglu_inside_the_down_projection_equals_plain():
    (down,) = lora_layers(outs=(24,), in_f=40)
    gate, up, g = torch.randn(2, 6, 40), torch.randn(2, 6, 40), torch.randn(2, 6, 24)
    got = lora_grads(lambda a, b: [swiglu_linear(a, b, down)], [down], [gate, up], [g])
    want = lora_grads(lambda a, b: [down(fused.swiglu_reference(a, b))], [down], [gate, up], [g])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_prologues_save_the_norm_input_and_gate_up_not_their_products():
    # bf16 weights under autocast, the GPU recipe: per token the group keeps the norm's input and
    # 1/rms (not the normalised x), the down projection keeps gate and up (not silu(gate) * up).
    mods = lora_layers(outs=(40, 40), dtype=torch.bfloat16)  # gate, up
    norm = RMSNorm(48, 1e-5).bfloat16().requires_grad_(False)
    (down,) = lora_layers(outs=(48,), in_f=40, dtype=torch.bfloat16)
    x = torch.randn(2, 6, 48, dtype=torch.bfloat16, requires_grad=True)
    params = [p for m in [*mods, norm, down] for p in m.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (a, b), saved = saved_storages(lambda: linear_group(x, mods, norm), params)
        assert sorted(saved, key=str) == sorted([((2, 6, 48), torch.bfloat16), ((2, 6, 1), torch.float32),
                                                 ((2, 6, 9), torch.bfloat16)], key=str)  # x, 1/rms, x @ [A; A']^T
        gate, up = a, b
        y, saved = saved_storages(lambda: swiglu_linear(gate, up, down), params)
    assert sorted(saved, key=str) == sorted([((2, 6, 40), torch.bfloat16), ((2, 6, 40), torch.bfloat16),
                                             ((2, 6, 4), torch.bfloat16)], key=str)  # gate, up, a
    y.float().sum().backward()
    assert x.grad is not None and all(m.lora_A.weight.grad is not None for m in [*mods, down])


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("fused_proj", [False, True], ids=["q-k-v", "qkv"])
def test_a_block_saves_each_activation_once(fused_proj, packed):
    # fp32, LoRA r 4 on the seven projections: one block's saved storages are exactly its input,
    # q / k / v (each its own: a v sliced from the fused qkv output would keep that whole output),
    # the attention output once (o_proj's input is a view of what attention keeps), the logsumexp,
    # the MLP norm's input, gate and up, the 1/rms of both norms and the r-wide x @ A^T of each
    # LoRA function. Measured as saved(2 blocks) - saved(1 block), so the shared RoPE tables drop out.
    H, I, nh, nkv, hd, r, T = 64, 112, 4, 2, 16, 4, 12
    cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                      num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd,
                      fused_qkv=fused_proj, fused_gate_up=fused_proj)
    torch.manual_seed(0)
    model = md.apply_lora(Transformer(cfg), md.LoraConfig(r=r, alpha=8), verbose=False).train()
    randomise_lora(model)
    rows = [[5, 7]] if packed else [[T]]
    ids = torch.randint(0, 96, (1, T))
    pos = torch.cat([torch.arange(n) for n in rows[0]])[None]
    kw = dict(position_ids=pos, layout=doc_layout(rows, T)) if packed else {}
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    layers = model.model.layers
    saved = []
    for k in (1, 2):
        model.model.layers = nn.ModuleList(list(layers)[:k])
        storages = {}  # whole storages: a saved view keeps all of its storage alive

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                storages[s.data_ptr()] = s.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, **kw).logsumexp(-1).sum()
        saved.append(sum(storages.values()))
    model.model.layers = layers
    lora_a = (1 if fused_proj else 3) + 1 + (1 if fused_proj else 2) + 1  # qkv, o, gate/up, down functions
    per_token = H + (nh + 2 * nkv) * hd + nh * hd + nh + H + 2 * I + 2 + lora_a * r  # floats
    assert saved[1] - saved[0] == T * per_token * 4
