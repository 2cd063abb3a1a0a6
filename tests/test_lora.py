"""lora.py: LoRA layers, apply / merge, and the LoRA branch's autograd function against a plain
reference (values and gradients, LoRA and NF4 bases, fp32 and bf16 autocast)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minidistill as md
from minidistill.lora import LoRALinear, NF4LoRALinear
from minidistill.quant import NF4Linear
from model_fixtures import CONFIGS, ids, ours, randomise_lora, rel_err, write_checkpoint

transformers = pytest.importorskip("transformers")


def test_zero_b_changes_nothing_and_only_lora_trains(tmp_path):
    write_checkpoint(tmp_path, "qwen2")
    x = ids()
    with torch.no_grad():
        before = ours(tmp_path)(x)
    model = md.apply_lora(ours(tmp_path), md.LoraConfig(r=4, alpha=16, targets="all-linear"))
    with torch.no_grad():
        assert torch.equal(model(x), before)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * CONFIGS["qwen2"]["num_hidden_layers"]
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.bias is not None  # qwen2 q bias kept, frozen
    keys = set(model.state_dict())
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.q_proj.lora_B.weight"} <= keys
    model(x).sum().backward()
    assert torch.count_nonzero(layer.lora_A.weight.grad) == 0  # B = 0: only B moves on the first step
    assert torch.count_nonzero(layer.lora_B.weight.grad) > 0
    assert layer.weight.grad is None


def test_scaling_and_init():
    base = torch.nn.Linear(32, 24)
    m = LoRALinear(base, r=8, scaling=md.LoraConfig(r=8, alpha=16, use_rslora=True).scaling())
    assert m.scaling == pytest.approx(16 / 8 ** 0.5)
    assert md.LoraConfig(r=8, alpha=16).scaling() == 2.0
    assert torch.count_nonzero(m.lora_B.weight) == 0 and m.lora_A.weight.abs().max() <= 1 / 32 ** 0.5 + 1e-6


def test_fused_mapping_and_unknown_target(tmp_path):
    write_checkpoint(tmp_path, "phi4-mini")
    model = md.apply_lora(ours(tmp_path), md.LoraConfig(r=2, targets=("q_proj", "v_proj", "down_proj")))
    wrapped = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    assert wrapped == ["down_proj", "qkv_proj"]
    with pytest.raises(ValueError, match=r"'w1'.*\['down_proj', 'gate_up_proj', 'o_proj', 'qkv_proj'\]"):
        md.apply_lora(ours(tmp_path), md.LoraConfig(targets=("q_proj", "w1")))
    with pytest.raises(ValueError, match="lm_head"):
        md.apply_lora(ours(tmp_path), md.LoraConfig(targets=("lm_head",)))
    model = md.apply_lora(ours(tmp_path), md.LoraConfig(targets="all-linear"))
    assert not isinstance(model.lm_head, LoRALinear)
    assert len([m for m in model.modules() if isinstance(m, LoRALinear)]) == 4 * CONFIGS["phi4-mini"]["num_hidden_layers"]


def test_dropout_only_in_training(tmp_path):
    write_checkpoint(tmp_path, "llama3")
    model = md.apply_lora(ours(tmp_path), md.LoraConfig(r=4, dropout=0.5), verbose=False)
    randomise_lora(model)
    x = ids()
    with torch.no_grad():
        a, b = model.eval()(x), model(x)
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(0)
        assert not torch.allclose(model(x), a)


def test_lora_weights_are_fp32_in_a_bf16_model(tmp_path):
    write_checkpoint(tmp_path, "llama3")
    model = md.load_model(tmp_path, dtype=torch.bfloat16)
    md.apply_lora(model, md.LoraConfig(r=4, alpha=8), verbose=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B.weight.normal_()
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---------------------------------------------------------------- the LoRA branch (_LoRAFunction)


def make_layer(kind: str, in_f: int = 48, out_f: int = 40, r: int = 4, dropout: float = 0.0,
               seed: int = 0, dtype: torch.dtype = torch.float32) -> LoRALinear:
    """A LoRA layer over a dense or NF4 base with random A and B (B = 0 would hide mistakes)."""
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f).to(dtype)
    m = (NF4LoRALinear(NF4Linear.from_linear(base, blocksize=32), r, 0.75, dropout) if kind == "nf4"
         else LoRALinear(base, r, 0.75, dropout))
    randomise_lora(m, seed + 1)
    return m


def plain_reference(m: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """base(x) + B(A(dropout(x))) * s in plain autograd ops (autocast, if on, casts as usual)."""
    w = m.dequantize(torch.float32) if isinstance(m, NF4LoRALinear) else m.weight
    return F.linear(x, w, m.bias) + F.linear(F.linear(m.dropout(x), m.lora_A.weight), m.lora_B.weight) * m.scaling


def values_and_grads(fn, mods, x, g):
    """Outputs of fn(x) and the gradients of x, every A and B, for output gradients g."""
    x = x.detach().clone().requires_grad_(True)
    for m in mods:
        m.zero_grad(set_to_none=True)
    outs = fn(x)
    torch.autograd.backward(outs, g)
    grads = [x.grad] + [p.grad.clone() for m in mods for p in (m.lora_A.weight, m.lora_B.weight)]
    return [o.detach().float() for o in outs], [t.float() for t in grads]


def max_rel(got: list, want: list) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_lora_branch_matches_plain_reference_fp32(kind):
    m = make_layer(kind)
    x, g = torch.randn(3, 5, 48), torch.randn(3, 5, 40)
    got = values_and_grads(lambda x: [m(x)], [m], x, [g])
    want = values_and_grads(lambda x: [plain_reference(m, x)], [m], x, [g])
    assert max_rel(got[0] + got[1], want[0] + want[1]) <= 1e-5
    assert all(p.grad.dtype == torch.float32 for p in (m.lora_A.weight, m.lora_B.weight))
    assert m.weight.grad is None and m.bias.grad is None  # the base stays frozen


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_lora_branch_bf16_autocast_within_bf16_error(kind):
    # Autocast with fp32 weights and input (the cast happens inside): ours must be as close to
    # the fp32 truth as the plain reference under the same autocast (STYLE: <= 2x its error).
    m = make_layer(kind)
    x, g = torch.randn(4, 7, 48), torch.randn(4, 7, 40)
    truth = values_and_grads(lambda x: [plain_reference(m, x)], [m], x, [g])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = values_and_grads(lambda x: [m(x)], [m], x, [g.bfloat16()])
        ref = values_and_grads(lambda x: [plain_reference(m, x)], [m], x, [g.bfloat16()])
    for ours, theirs, t in zip(got[0] + got[1], ref[0] + ref[1], truth[0] + truth[1]):
        err, ref_err = max_rel([ours], [t]), max_rel([theirs], [t])
        assert err <= 2 * ref_err + 1e-3, (err, ref_err)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x).dtype == torch.bfloat16


def test_lora_branch_with_dropout_matches_reference():
    m = make_layer("dense", dropout=0.3).train()
    x, g = torch.randn(3, 5, 48), torch.randn(3, 5, 40)
    torch.manual_seed(7)
    got = values_and_grads(lambda x: [m(x)], [m], x, [g])
    torch.manual_seed(7)  # the same mask
    want = values_and_grads(lambda x: [plain_reference(m, x)], [m], x, [g])
    assert max_rel(got[0] + got[1], want[0] + want[1]) <= 1e-5
    no_drop = values_and_grads(lambda x: [plain_reference(m.eval(), x)], [m], x, [g])
    assert max_rel(got[0], no_drop[0]) > 1e-3  # the dropout did something


def group(kinds=("dense", "nf4", "dense"), ranks=(4, 2, 6), outs=(40, 24, 24), **kw) -> list[LoRALinear]:
    return [make_layer(k, out_f=o, r=r, seed=10 * i, **kw) for i, (k, r, o) in enumerate(zip(kinds, ranks, outs))]


@pytest.mark.parametrize("autocast", [False, True])
def test_group_forward_equals_separate_calls(autocast):
    mods = group()  # q/k/v-like: different ranks and widths, one NF4 base among them
    x = torch.randn(2, 6, 48)
    g = [torch.randn(2, 6, o) for o in (40, 24, 24)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if autocast:
            g = [t.bfloat16() for t in g]
        fused = values_and_grads(lambda x: LoRALinear.group_forward(x, mods), mods, x, g)
        separate = values_and_grads(lambda x: [m(x) for m in mods], mods, x, g)
    tol = 1e-2 if autocast else 1e-6
    assert max_rel(fused[0] + fused[1], separate[0] + separate[1]) <= tol
    truth = values_and_grads(lambda x: [plain_reference(m, x) for m in mods], mods, x, g)
    assert max_rel(fused[0] + fused[1], [t.float() for t in truth[0] + truth[1]]) <= (2e-2 if autocast else 1e-5)


def test_group_forward_falls_back_for_mixed_groups():
    x = torch.randn(2, 3, 48)
    plain = nn.Linear(48, 8)
    mods = [make_layer("dense"), plain]
    outs = LoRALinear.group_forward(x, mods)
    assert torch.allclose(outs[0], plain_reference(mods[0], x), atol=1e-6) and torch.equal(outs[1], plain(x))
    drop = group(dropout=0.5)
    for m in drop:
        m.train()
    torch.manual_seed(3)
    outs = LoRALinear.group_forward(x, drop)
    torch.manual_seed(3)
    assert all(torch.equal(a, m(x)) for a, m in zip(outs, drop))  # one mask per layer, as PEFT


def test_group_saves_the_input_once_and_nothing_weight_sized():
    # bf16 weights under autocast, as on a GPU: what is kept for backward is x (once, for the
    # A gradient) and x @ A^T (r wide); the frozen bases keep no input and no weight copy.
    mods = group(dtype=torch.bfloat16)
    x = torch.randn(2, 6, 48, dtype=torch.bfloat16, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for m in mods for p in [*m.parameters(), *m.buffers()]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = LoRALinear.group_forward(x, mods)
    activations = {t.untyped_storage().data_ptr(): t for t in saved if t.untyped_storage().data_ptr() not in params}
    shapes = sorted(tuple(t.shape) for t in activations.values())
    assert shapes == [(2, 6, 12), (2, 6, 48)]  # a = x @ [A_q; A_k; A_v]^T (r 4 + 2 + 6), and x itself
    assert x.untyped_storage().data_ptr() in activations
    sum(o.float().sum() for o in outs).backward()
    assert all(m.lora_A.weight.grad.dtype == torch.float32 for m in mods)


def test_lora_model_gradients_match_plain_reference(tmp_path):
    # The whole model (q/k/v and gate/up grouped by the model's linear_group) against plain modules.
    write_checkpoint(tmp_path, "qwen2")
    model = md.apply_lora(ours(tmp_path), md.LoraConfig(r=4, alpha=8), verbose=False)
    randomise_lora(model)
    x = ids()
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for n, m in model.named_modules():  # swap every LoRA layer for the plain reference
        if isinstance(m, LoRALinear):
            m.forward = (lambda m: lambda x: plain_reference(m, x))(m)
            m.group_forward = m.swiglu_forward = None  # model.py then runs plain norm, SwiGLU and module calls
    model.zero_grad(set_to_none=True)
    want_loss = model(x).logsumexp(-1).mean()
    want_loss.backward()
    assert torch.allclose(loss, want_loss, rtol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, quantize):
    write_checkpoint(tmp_path, "llama3")
    model = md.apply_lora(md.load_model(tmp_path, dtype=torch.float32, quantize=quantize),
                          md.LoraConfig(r=4, alpha=8), verbose=False).train()
    randomise_lora(model)
    grads, matmuls = [], []
    base_matmul = type(model.model.layers[0].mlp.down_proj)._base_matmul
    for ckpt, part in ((False, "block"), (True, "block"), (True, "mlp")):
        model.gradient_checkpointing, model.checkpoint_part = ckpt, part
        model.zero_grad(set_to_none=True)
        calls = []

        def counted(self, *args):
            calls.append(self)
            return base_matmul(self, *args)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(model.model.layers[0].mlp.down_proj), "_base_matmul", counted)
            model(ids()).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        matmuls.append([tuple(sum(c is m for c in calls) for m in (b.self_attn.q_proj, b.mlp.gate_proj, b.mlp.down_proj))
                         for b in model.model.layers])
    assert len(grads[0]) == 2 * 7 * CONFIGS["llama3"]["num_hidden_layers"]
    for g in grads[1:]:
        for n in grads[0]:
            torch.testing.assert_close(g[n], grads[0][n], rtol=0, atol=0, msg=n)
    # Forward base matmuls per block (q_proj, gate_proj, down_proj): a recomputed block runs q_proj's
    # and gate_proj's again but not down_proj's, whose output only the dropped block output needs;
    # with checkpoint_part "mlp" attention is not recomputed at all. The last block is never recomputed.
    n = len(model.model.layers)
    assert matmuls == [[(1, 1, 1)] * n, [(2, 2, 1)] * (n - 1) + [(1, 1, 1)], [(1, 2, 1)] * (n - 1) + [(1, 1, 1)]]
