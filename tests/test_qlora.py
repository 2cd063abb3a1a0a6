"""QLoRA: 4-bit loading (quantized while loading, or pre-quantized bnb checkpoints), LoRA over an
NF4 base, merge to a 16-bit export. Oracles: transformers models holding the dequantized weights,
bitsandbytes (quantizer, pre-quantized checkpoints) and a dense LoRA on the same weights."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import minidistill as md
from minidistill.lora import LoRALinear, NF4LoRALinear
from minidistill.prepacked import Linear
from minidistill.quant import NF4Linear, quantize_nf4
from model_fixtures import CONFIGS, ids, randomise_lora, rel_err, write_checkpoint

transformers = pytest.importorskip("transformers")

F32 = torch.float32
NF4_KEYS = {"weight", "absmax", "code", "nested_absmax", "nested_code", "offset"}


def block_modules(model: nn.Module) -> dict[str, nn.Module]:
    kinds = (nn.Linear, NF4Linear, LoRALinear)
    return {n: m for n, m in model.named_modules()
            if n.startswith("model.layers.") and ".lora_" not in n and isinstance(m, kinds)}


def with_weights(ref: nn.Module, model: nn.Module) -> nn.Module:
    """`ref` (transformers or ours) with every 4-bit weight of `model` copied in, decoded to fp32."""
    with torch.no_grad():
        for path, m in block_modules(model).items():
            if isinstance(m, (NF4Linear, NF4LoRALinear)):
                ref.get_submodule(path).weight.copy_(m.dequantize(F32))
    return ref


def nf4(folder, dtype=F32) -> md.Transformer:
    return md.load_model(folder, dtype=dtype, quantize="nf4")


# ---------------------------------------------------------------- quantize="nf4" while loading

@pytest.mark.parametrize("name", ["llama3", "qwen2", "phi4-mini"])
def test_nf4_load_quantizes_block_linears_only(tmp_path, name):
    ref = write_checkpoint(tmp_path, name)
    x = ids()
    with torch.no_grad():
        dense = ref(x).logits
    model = nf4(tmp_path)
    blocks = block_modules(model)
    n_linears = (4 if CONFIGS[name]["model_type"] == "phi3" else 7) * CONFIGS[name]["num_hidden_layers"]
    assert len(blocks) == n_linears and all(type(m) is NF4Linear for m in blocks.values())
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is Linear
    for n, t in model.state_dict().items():  # everything else stays in the compute dtype
        module = n.rpartition(".")[0]
        assert t.dtype == (torch.uint8 if n.endswith(".weight") and module in blocks
                           else F32 if module not in blocks or n.endswith("bias") else t.dtype), n
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == CONFIGS[name]["tie_word_embeddings"]
    # The codes are those of the file's weights, quantized bnb-exactly.
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    packed, state = quantize_nf4(w)
    layer = model.model.layers[1].mlp.down_proj
    assert torch.equal(layer.weight, packed) and torch.equal(layer.absmax, state.absmax)
    assert layer.nested_absmax is not None and layer.blocksize == 64

    with torch.no_grad():
        got = model(x)
        # NF4's error: ~9% RMS per Gaussian weight, which 2 random blocks amplify in the logits.
        w_err = [(m.dequantize(F32) - ref.get_submodule(p).weight).norm() / ref.get_submodule(p).weight.norm()
                 for p, m in blocks.items()]
        assert 0.05 < min(w_err) and max(w_err) < 0.11
        assert 1e-3 < ((got - dense).norm() / dense.norm()).item() < 0.35
        want = with_weights(ref, model)(x).logits
    assert rel_err(got, want) <= 1e-5  # exactly the model of its dequantized weights


def test_nf4_load_bf16_sharded_and_unknown_quantize(tmp_path):
    write_checkpoint(tmp_path, "llama3", shard=True)
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = nf4(tmp_path, torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, NF4Linear) and layer.weight_dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == model.model.norm.weight.dtype == torch.bfloat16
    assert model(ids()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"quantize='int4' is not supported; valid: None, 'nf4'"):
        md.load_model(tmp_path, quantize="int4")


# ---------------------------------------------------------------- LoRA over an NF4 base

def qlora_and_dense(folder, targets="all-linear"):
    """A QLoRA model and a dense LoRA model on its dequantized weights, same LoRA weights."""
    cfg = md.LoraConfig(r=4, alpha=8, targets=targets)
    q = md.apply_lora(nf4(folder), cfg, verbose=False)
    randomise_lora(q)
    d = md.apply_lora(with_weights(md.load_model(folder, dtype=F32), q), cfg, verbose=False)
    dense_params = dict(d.named_parameters())
    with torch.no_grad():
        for n, p in q.named_parameters():
            if p.requires_grad:
                dense_params[n].copy_(p)
    return q, d


def test_qlora_gradients_equal_lora_on_dequantized_weights(tmp_path):
    write_checkpoint(tmp_path, "qwen2")  # q/k/v biases on the 4-bit layers
    q, d = qlora_and_dense(tmp_path)
    assert all(type(m) is NF4LoRALinear for m in block_modules(q).values())
    x, labels = ids(), ids(seed=2)
    grads = []
    for model in (q, d):
        out = md.chunked_cross_entropy(model(x, return_hidden=True), model.head_weight, labels)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)
    # The base is frozen: no parameter outside LoRA requires grad, nothing else got a gradient.
    for n, p in q.named_parameters():
        assert p.requires_grad == (".lora_A." in n or ".lora_B." in n), n
        assert p.requires_grad or p.grad is None, n
    assert all(b.grad is None and not b.requires_grad for b in q.buffers())

    # One layer: the input gradient too, and nothing 16-bit of the weight kept for backward.
    lq, ld = q.model.layers[0].self_attn.q_proj, d.model.layers[0].self_attn.q_proj
    xq = torch.randn(2, 5, lq.in_features, requires_grad=True)
    xd = xq.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        yq = lq(xq)
    assert not any(t.numel() == lq.in_features * lq.out_features and t.is_floating_point() for t in saved)
    g = torch.randn_like(yq)
    yq.backward(g)
    ld(xd).backward(g)
    torch.testing.assert_close(xq.grad, xd.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lq.lora_B.weight.grad, ld.lora_B.weight.grad, rtol=1e-5, atol=1e-7)


def test_qlora_keys_targets_and_fp32_adapters(tmp_path, capsys):
    write_checkpoint(tmp_path, "llama3")
    model = md.apply_lora(nf4(tmp_path, torch.bfloat16), md.LoraConfig(r=4, targets=("q_proj", "v_proj")))
    # 4-bit weights counted by their elements, as PEFT counts bnb's: 80,192 base + 1,792 LoRA.
    assert "trainable params: 1,792 || all params: 81,984 ||" in capsys.readouterr().out
    attn = model.model.layers[0].self_attn
    assert type(attn.q_proj) is NF4LoRALinear and type(attn.k_proj) is NF4Linear
    assert type(model.model.layers[0].mlp.down_proj) is NF4Linear
    keys = {k.removeprefix("model.layers.0.self_attn.q_proj.") for k in model.state_dict()
            if k.startswith("model.layers.0.self_attn.q_proj.")}
    assert keys == NF4_KEYS | {"lora_A.weight", "lora_B.weight"}
    assert model.state_dict()["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert attn.q_proj.lora_A.weight.dtype == attn.q_proj.lora_B.weight.dtype == F32  # bf16 compute
    randomise_lora(model)
    out = model(ids())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert attn.q_proj.lora_A.weight.grad.dtype == F32
    with pytest.raises(TypeError, match="merge_lora"):
        attn.q_proj.merge()


def test_adapter_round_trip_on_qlora(tmp_path):
    write_checkpoint(tmp_path / "base", "llama3")
    q, d = qlora_and_dense(tmp_path / "base", targets=md.lora.DEFAULT_TARGETS)
    md.save_adapter(q, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    x = ids()
    with torch.no_grad():
        want = q(x)
        again = md.load_adapter(nf4(tmp_path / "base"), tmp_path / "adapter", verbose=False)
        assert torch.equal(again(x), want)
        assert rel_err(d(x), want) <= 1e-5  # the same adapter on the dense dequantized base


# ---------------------------------------------------------------- merge -> 16-bit export

@pytest.mark.parametrize("name", ["llama3", "phi4-mini"])
def test_merge_exports_16bit_checkpoint_for_transformers(tmp_path, name):
    write_checkpoint(tmp_path / "base", name)
    model = md.apply_lora(nf4(tmp_path / "base"), md.LoraConfig(r=4, alpha=8, targets=("q_proj", "down_proj")),
                          verbose=False)
    randomise_lora(model)
    x = ids()
    with torch.no_grad():
        want = model(x)
    md.merge_lora(model)
    assert all(type(m) is Linear and m.weight.dtype == F32 for m in block_modules(model).values())
    md.save_model(model, tmp_path / "merged")
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=F32,
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        assert rel_err(hf(x).logits, want) <= 1e-4


def test_merge_in_bf16_gives_bf16_linears(tmp_path):
    write_checkpoint(tmp_path, "qwen2")
    model = md.apply_lora(nf4(tmp_path, torch.bfloat16), md.LoraConfig(r=4), verbose=False)
    randomise_lora(model)
    layer = model.model.layers[0].self_attn.q_proj
    want = (layer.dequantize(F32) + layer.delta_weight()).to(torch.bfloat16)
    md.merge_lora(model)
    merged = model.model.layers[0].self_attn.q_proj
    assert type(merged) is Linear and torch.equal(merged.weight, want)
    assert merged.bias.dtype == torch.bfloat16 and not merged.weight.requires_grad
    assert md.merge_lora(model) is model  # idempotent


# ---------------------------------------------------------------- pre-quantized "-bnb-4bit" checkpoints

SKIP = ["lm_head", "model.layers.1.mlp.down_proj", "o_proj"]


def write_bnb_checkpoint(tmp_path):
    """A qwen2 checkpoint quantized by transformers + bitsandbytes on CPU, as hub repos are."""
    pytest.importorskip("bitsandbytes")
    # intermediate 128: every bnb block lies within one row, where bnb's CPU decode is right.
    write_checkpoint(tmp_path / "dense", "qwen2", intermediate_size=128)
    bnb_cfg = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=F32, llm_int8_skip_modules=SKIP)
    hf4 = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=bnb_cfg, dtype=F32, device_map="cpu").eval()
    hf4.save_pretrained(tmp_path / "q4")
    return hf4


def test_prequantized_bnb_checkpoint_loads_in_4bit(tmp_path):
    import bitsandbytes as bnb

    hf4 = write_bnb_checkpoint(tmp_path)
    qc = json.loads((tmp_path / "q4" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["llm_int8_skip_modules"] == SKIP
    x = ids()
    for quantize in (None, "nf4"):
        model = md.load_model(tmp_path / "q4", dtype=F32, quantize=quantize)
        blocks = block_modules(model)
        dense = sorted(p for p, m in blocks.items() if type(m) is Linear)
        assert dense == ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj",
                         "model.layers.1.self_attn.o_proj"]
        assert sum(type(m) is NF4Linear for m in blocks.values()) == 14 - 3
        assert model.model.layers[0].self_attn.q_proj.bias.dtype == F32
    # Oracle: a dense transformers model holding the weights bitsandbytes decodes from its own layers.
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=F32,
                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        for path, m in hf4.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                assert torch.equal(model.get_submodule(path).dequantize(F32), w), path
                ref.get_submodule(path).weight.copy_(w)
        got = model(x)
        assert rel_err(got, ref(x).logits) <= 1e-5
        assert rel_err(got, hf4(x).logits) <= 2e-2  # bnb's own 4-bit forward: bf16 on CPU

    # QLoRA on it, merged and exported: a dense checkpoint transformers reads as such.
    model = md.apply_lora(model, md.LoraConfig(r=4, alpha=8), verbose=False)
    randomise_lora(model)
    with torch.no_grad():
        want = model(x)
    md.save_model(md.merge_lora(model), tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=F32,
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        assert rel_err(hf(x).logits, want) <= 1e-4


def test_prequantized_skip_list_must_agree_with_file(tmp_path):
    write_bnb_checkpoint(tmp_path)
    path = tmp_path / "q4" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["quantization_config"]["llm_int8_skip_modules"] = ["lm_head", "q_proj"]
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="q_proj.*4-bit in the file but llm_int8_skip_modules"):
        md.load_model(tmp_path / "q4", dtype=F32)


@pytest.mark.parametrize("qc", [
    {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    {"quant_method": "bitsandbytes", "load_in_8bit": True},
    {"quant_method": "gptq", "bits": 4},
], ids=["fp4", "8bit", "gptq"])
def test_unsupported_quantization_config_fails(tmp_path, qc):
    write_checkpoint(tmp_path, "llama3")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, quantization_config=qc)))
    with pytest.raises(ValueError, match=r"is not supported; supported: quant_method 'bitsandbytes' "
                                         r"with load_in_4bit=true and bnb_4bit_quant_type 'nf4'"):
        md.load_model(tmp_path, dtype=F32)


# ---------------------------------------------------------------- a tiny QLoRA run

def test_tiny_qlora_training_lowers_loss(tmp_path):
    write_checkpoint(tmp_path, "llama3")
    model = md.apply_lora(nf4(tmp_path), md.LoraConfig(r=8, alpha=16), verbose=False).train()
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, labels = ids(16, 4), ids(16, 4, seed=2)
    losses = []
    for _ in range(8):
        out = md.chunked_cross_entropy(model(x, return_hidden=True), model.head_weight, labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # the 4-bit base never moves


@pytest.mark.gpu
def test_nf4_load_on_cuda_matches_cpu(tmp_path):
    write_checkpoint(tmp_path, "llama3")
    cpu = nf4(tmp_path)
    gpu = md.load_model(tmp_path, dtype=F32, device="cuda", quantize="nf4")
    for path, m in block_modules(cpu).items():
        g = gpu.get_submodule(path)
        assert g.weight.is_cuda and torch.equal(g.weight.cpu(), m.weight), path  # same codes
        torch.testing.assert_close(g.dequantize(F32).cpu(), m.dequantize(F32), rtol=1e-6, atol=1e-7)
    q = md.apply_lora(gpu, md.LoraConfig(r=4), verbose=False)
    randomise_lora(q)
    x, labels = ids().cuda(), ids(seed=2).cuda()
    out = md.chunked_cross_entropy(q(x, return_hidden=True), q.head_weight, labels)
    out.loss.backward()
    assert all(p.grad is not None for p in q.parameters() if p.requires_grad)


def test_save_model_refuses_unmerged_4bit(tmp_path):
    write_checkpoint(tmp_path / "src", "llama3")
    model = md.load_model(tmp_path / "src", dtype=torch.float32, quantize="nf4")
    with pytest.raises(ValueError, match="4-bit .*merge_lora"):
        md.save_model(model, tmp_path / "out")
