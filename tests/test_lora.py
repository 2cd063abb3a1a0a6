"""LoRA layers and adapters, with PEFT + transformers as the oracle in both directions."""

import json

import pytest
import torch

import minidistill as md
from minidistill.lora import LoRALinear
from model_fixtures import CONFIGS, write_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "llama": list(SEVEN), "qwen2": list(SEVEN)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def ids(n: int = 12, batch: int = 2, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(1))


def randomise_lora(module: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def ours(folder) -> md.Transformer:
    return md.load_model(folder, dtype=torch.float32)


CASES = [(n, rs) for n in ("llama3", "qwen2", "phi3.5", "phi4-mini") for rs in (False, True)]


@pytest.mark.parametrize("name,rslora", CASES, ids=[f"{n}-{'rs' if r else 'plain'}" for n, r in CASES])
def test_our_adapter_loads_in_peft(tmp_path, capsys, name, rslora):
    ref = write_checkpoint(tmp_path / "base", name)
    model = md.apply_lora(ours(tmp_path / "base"), md.LoraConfig(r=4, alpha=8, use_rslora=rslora))
    assert "trainable params:" in capsys.readouterr().out
    randomise_lora(model)
    md.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base") and cfg["use_rslora"] == rslora
    assert cfg["target_modules"] == sorted(PEFT_TARGETS[CONFIGS[name]["model_type"]])
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    x = ids()
    with torch.no_grad():
        want, got = peft_model(x).logits, model(x)
        assert rel_err(got, want) <= 1e-4
        with peft_model.disable_adapter():
            assert rel_err(peft_model(x).logits, want) > 1e-2  # the adapter does something


@pytest.mark.parametrize("name,rslora", CASES, ids=[f"{n}-{'rs' if r else 'plain'}" for n, r in CASES])
def test_peft_adapter_loads_here(tmp_path, name, rslora):
    ref = write_checkpoint(tmp_path / "base", name)
    x = ids()
    with torch.no_grad():
        base_logits = ref(x).logits
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, task_type="CAUSAL_LM",
                           target_modules=PEFT_TARGETS[CONFIGS[name]["model_type"]])
    peft_model = peft.get_peft_model(ref, pcfg)
    randomise_lora(peft_model)  # B = 0 would make every adapter look right
    peft_model.save_pretrained(tmp_path / "adapter")
    model = md.load_adapter(ours(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        want, got = peft_model.eval()(x).logits, model(x)
    assert rel_err(want, base_logits) > 1e-2  # the adapter does something
    assert rel_err(got, want) <= 1e-4


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


@pytest.mark.parametrize("rslora", [False, True])
def test_split_adapter_fuses_back_exactly(tmp_path, rslora):
    ref = write_checkpoint(tmp_path / "base", "phi3.5")
    model = md.apply_lora(ours(tmp_path / "base"), md.LoraConfig(r=4, alpha=8, use_rslora=rslora))
    randomise_lora(model)
    md.save_adapter(model, tmp_path / "split", split_fused=True)
    cfg = json.loads((tmp_path / "split" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(SEVEN)
    x = ids()
    with torch.no_grad():
        want = model(x)
    fused = md.load_adapter(ours(tmp_path / "base"), tmp_path / "split")
    qkv = fused.model.layers[0].self_attn.qkv_proj
    assert qkv.r == 12 and fused.model.layers[0].mlp.gate_up_proj.r == 8  # r_q + r_k + r_v, r_gate + r_up
    with torch.no_grad():
        assert rel_err(fused(x), want) <= 1e-5
    # Saved again, the rank-3r modules go through rank_pattern / alpha_pattern, which PEFT reads.
    md.save_adapter(fused, tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert set(cfg["rank_pattern"].values()) == {12, 8}
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "again").eval()
    with torch.no_grad():
        assert rel_err(peft_model(x).logits, want) <= 1e-4


def test_peft_q_v_adapter_fuses_into_phi3(tmp_path):
    # PEFT's classic llama default (q_proj, v_proj), written for a split layout, into a fused model:
    # build it from our own fused LoRA, keep q and v only, and compare with the same zero k.
    write_checkpoint(tmp_path / "base", "phi4-mini")
    model = md.apply_lora(ours(tmp_path / "base"), md.LoraConfig(r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj")))
    randomise_lora(model)
    q_out = CONFIGS["phi4-mini"]["num_attention_heads"] * 16
    kv_out = CONFIGS["phi4-mini"]["num_key_value_heads"] * 16
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.lora_B.weight[q_out:q_out + kv_out] = 0  # no k update
    md.save_adapter(model, tmp_path / "split", split_fused=True)
    from safetensors.torch import load_file, save_file

    f = tmp_path / "split" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if ".k_proj." not in k}, f)
    c = json.loads((tmp_path / "split" / "adapter_config.json").read_text())
    c["target_modules"] = ["q_proj", "v_proj"]
    (tmp_path / "split" / "adapter_config.json").write_text(json.dumps(c))
    x = ids()
    fused = md.load_adapter(ours(tmp_path / "base"), tmp_path / "split")
    assert fused.model.layers[0].self_attn.qkv_proj.r == 8
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-5


def test_load_errors(tmp_path):
    write_checkpoint(tmp_path / "llama", "llama3")
    write_checkpoint(tmp_path / "tied", "llama3-tied")
    model = md.apply_lora(ours(tmp_path / "llama"), md.LoraConfig(r=4, targets=("q_proj", "o_proj")))
    md.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="already has LoRA"):
        md.load_adapter(model, tmp_path / "a")
    # Same shapes, another folder: base_model_name_or_path differs -> a warning, not an error.
    with pytest.warns(UserWarning, match="trained on"):
        md.load_adapter(ours(tmp_path / "tied"), tmp_path / "a")
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(dict(cfg, r=8)))
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight has shape \(4, 64\).*\(8, 64\)"):
        md.load_adapter(ours(tmp_path / "llama"), tmp_path / "a")
    cfg_file.write_text(json.dumps(dict(cfg, target_modules=["q_proj"])))
    with pytest.raises(ValueError, match="not used.*o_proj"):
        md.load_adapter(ours(tmp_path / "llama"), tmp_path / "a")
    cfg_file.write_text(json.dumps(dict(cfg, target_modules=["q_proj", "qkv_proj"])))
    with pytest.raises(ValueError, match="'qkv_proj' not found"):
        md.load_adapter(ours(tmp_path / "llama"), tmp_path / "a")
    cfg_file.write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(ValueError, match="use_dora"):
        md.load_adapter(ours(tmp_path / "llama"), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        md.load_adapter(ours(tmp_path / "llama"), tmp_path / "nowhere")


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


# ---------------------------------------------------------------- new tokens

THINK = ["<think>", "</think>"]


def model_and_tok(tmp_path, name: str, family: str, pad: int = 0):
    """A checkpoint whose vocabulary fits the family's test tokenizer (plus `pad` spare rows)."""
    tok_fixtures = pytest.importorskip("tok_fixtures")
    from minidistill.tokenizer import Tokenizer

    tok_fixtures.write_tokenizer(family, tmp_path / "base")
    n = len(Tokenizer.from_dir(tmp_path / "base"))
    ref = write_checkpoint(tmp_path / "base", name, vocab_size=n + pad)
    return ref, ours(tmp_path / "base"), Tokenizer.from_dir(tmp_path / "base")


def think_ids(tok, n: int = 10) -> torch.Tensor:
    x = ids(n, vocab=50)
    x[:, 2], x[:, 6] = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    return x


@pytest.mark.parametrize("name,family", [("llama3", "llama-3.1"), ("llama3-tied", "llama-3.2")])
def test_add_tokens_grows_and_trains_only_new_rows(tmp_path, name, family):
    _, model, tok = model_and_tok(tmp_path, name, family)
    rows = model.model.embed_tokens.weight.shape[0]
    mean = model.model.embed_tokens.weight[:rows].mean(0)
    assert md.add_tokens(model, tok, THINK) == THINK
    assert md.add_tokens(model, tok, THINK) == []  # already there: nothing added
    new = [tok.token_to_id(t) for t in THINK]
    assert model.model.embed_tokens.weight.shape[0] == len(tok) == rows + 2 == model.config.vocab_size
    assert model.config.raw["vocab_size"] == len(tok) and model.lm_head.weight.shape[0] == len(tok)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == CONFIGS[name]["tie_word_embeddings"]
    assert torch.allclose(model.model.embed_tokens.new_rows, mean.expand(2, -1), atol=1e-6)
    md.apply_lora(model, md.LoraConfig(r=4), verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.new_rows" in trainable
    assert all("lora_" in n or n.endswith("new_rows") for n in trainable)
    model(think_ids(tok)).logsumexp(-1).sum().backward()
    assert model.model.embed_tokens.weight.grad is None
    assert model.model.embed_tokens.new_rows.grad.abs().sum(-1).gt(0).all()
    assert model(think_ids(tok)).shape[-1] == len(tok) and max(new) == len(tok) - 1


def test_add_tokens_only_absent_and_reuses_padded_rows(tmp_path):
    _, model, tok = model_and_tok(tmp_path, "phi4-mini", "phi-4-mini", pad=8)  # Phi-4-mini: 200064 rows > tokens
    rows = model.model.embed_tokens.weight.shape[0]
    assert md.add_tokens(model, tok, ["<|end|>", *THINK]) == THINK  # <|end|> exists already
    assert model.model.embed_tokens.weight.shape[0] == rows == model.config.vocab_size
    assert len(tok) == rows - 6


@pytest.mark.parametrize("name,family", [("llama3", "llama-3.1"), ("llama3-tied", "llama-3.2"), ("phi4-mini", "phi-4-mini")])
def test_new_tokens_round_trip_and_peft(tmp_path, name, family):
    ref, model, tok = model_and_tok(tmp_path, name, family)
    md.add_tokens(model, tok, THINK)
    md.apply_lora(model, md.LoraConfig(r=4, alpha=8), verbose=False)
    randomise_lora(model)
    with torch.no_grad():  # trained rows differ from their mean initialisation
        model.model.embed_tokens.new_rows.normal_(0, 0.2)
        if model.lm_head.new_rows is not model.model.embed_tokens.new_rows:
            model.lm_head.new_rows.normal_(0, 0.2)
    md.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    new = [tok.token_to_id(t) for t in THINK]
    assert cfg["trainable_token_indices"]["embed_tokens"] == new
    x = think_ids(tok)
    with torch.no_grad():
        want = model(x)
    # Into a base model that has never seen the tokens: the rows grow on load.
    again = md.load_adapter(ours(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(again(x), want) <= 1e-6
    # PEFT, after the usual resize_token_embeddings of the base model.
    ref.resize_token_embeddings(len(tok))
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert rel_err(peft_model(x).logits, want) <= 1e-4
    # Merged export: vocab_size updated, tokenizer written, transformers agrees.
    md.merge_lora(again)
    md.save_model(again, tmp_path / "merged", tokenizer=tok)
    out = tmp_path / "merged"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(tok)
    assert (out / "tokenizer.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(hf(x).logits, want) <= 1e-4


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
