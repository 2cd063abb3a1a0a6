"""adapter.py: PEFT's adapter file format, with PEFT + transformers as the oracle in both directions."""

import json

import pytest
import torch

import minidistill as md
from minidistill.adapter import fuse_split_lora, fused_sizes, read_adapter
from model_fixtures import CONFIGS, ids, ours, randomise_lora, rel_err, write_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "llama": list(SEVEN), "qwen2": list(SEVEN),
                "qwen3": list(SEVEN)}


CASES = [(n, rs) for n in ("llama3", "qwen2", "phi3.5", "phi4-mini") for rs in (False, True)] + [("qwen3", False)]


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


def test_fuse_split_lora_is_exact():
    # sum_i s_i B_i A_i == s_0 * B_fused @ A_fused, with a missing middle part (zero rows of B).
    g = torch.Generator().manual_seed(0)
    A0, A2 = torch.randn(2, 8, generator=g), torch.randn(3, 8, generator=g)
    B0, B2 = torch.randn(4, 2, generator=g), torch.randn(5, 3, generator=g)
    s0, s2 = 2.0, 0.5
    A, B = fuse_split_lora([(4, A0, B0), (6, None, None), (5, A2, B2 * (s2 / s0))], out_features=15)
    assert A.shape == (5, 8) and B.shape == (15, 5)
    want = torch.cat([s0 * B0 @ A0, torch.zeros(6, 8), s2 * B2 @ A2])
    torch.testing.assert_close(s0 * B @ A, want, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(B[4:10]) == 0 and torch.count_nonzero(B[:4, 2:]) == 0


def test_read_adapter_rejects_other_peft_types(tmp_path):
    write_checkpoint(tmp_path / "base", "llama3")
    model = md.apply_lora(ours(tmp_path / "base"), md.LoraConfig(r=2, targets=("q_proj",)), verbose=False)
    md.save_adapter(model, tmp_path / "a")
    config, tensors = read_adapter(tmp_path / "a")
    assert config["r"] == 2 and sorted(tensors)[0] == "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert fused_sizes(ours(tmp_path / "base"), "gate_up_proj") == [CONFIGS["llama3"]["intermediate_size"]] * 2
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg_file.write_text(json.dumps(dict(config, peft_type="IA3")))
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported; valid: LORA"):
        read_adapter(tmp_path / "a")


@pytest.mark.parametrize("text,match", [
    ("{not json", r"adapter_config.json is not valid JSON"),
    ('{"r": "8", "lora_alpha": 16, "target_modules": ["q_proj"]}', r"field 'r' must be int, got '8'"),
    ('{"r": 8, "lora_alpha": true, "target_modules": ["q_proj"]}', r"field 'lora_alpha' must be int or float"),
    ('{"r": 8, "lora_alpha": 16}', r"field 'target_modules' is missing"),
])
def test_bad_adapter_config_names_the_file_and_field(tmp_path, text, match):
    from minidistill.adapter import read_adapter

    (tmp_path / "adapter_config.json").write_text(text)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=match):
        read_adapter(tmp_path)


def test_readme_names_base_settings_rope_scaling_and_note(tmp_path):
    write_checkpoint(tmp_path / "base", "qwen3")
    model = md.apply_lora(md.load_model(tmp_path / "base", dtype=torch.float32), md.LoraConfig(r=4, alpha=8),
                          verbose=False)
    md.save_adapter(model, tmp_path / "plain")
    plain = (tmp_path / "plain" / "README.md").read_text()
    assert f"for `{tmp_path / 'base'}`" in plain and "r=4, alpha=8" in plain and "k_proj" in plain
    assert "base_model:" not in plain and "Context extension" not in plain  # a local folder is no hub id

    scaled = md.load_model(tmp_path / "base", dtype=torch.float32, rope_scaling="yarn:4")
    scaled.source = "Qwen/Qwen3-0.6B"
    md.apply_lora(scaled, md.LoraConfig(r=4, alpha=8), verbose=False)
    md.save_adapter(scaled, tmp_path / "scaled", note="Distilled from R1 traces.")
    text = (tmp_path / "scaled" / "README.md").read_text()
    assert "base_model: Qwen/Qwen3-0.6B" in text and text.rstrip().endswith("Distilled from R1 traces.")
    assert "rope_scaling='yarn:4:128'" in text and "--rope-scaling yarn:4:128" in text
    assert "max_position_embeddings 512 (the checkpoint says 128)" in text
    # What the README says to do loads the base as it was trained.
    again = md.load_model(tmp_path / "base", dtype=torch.float32, rope_scaling="yarn:4:128")
    again.source = scaled.source
    assert again.config.raw == scaled.config.raw
    assert md.load_adapter(again, tmp_path / "scaled", verbose=False) is again
