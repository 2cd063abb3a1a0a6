"""merge_lora + save_model: the merged checkpoint loads in transformers with the LoRA model's logits."""

import json

import pytest
import torch

import minidistill as md
from minidistill.export import parse_size
from model_fixtures import CONFIGS, ids, rel_err, write_checkpoint

transformers = pytest.importorskip("transformers")


def lora_model(folder, **cfg) -> md.Transformer:
    model = md.apply_lora(md.load_model(folder, dtype=torch.float32), md.LoraConfig(r=4, alpha=8, **cfg), verbose=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("name", ["llama3", "llama3-tied", "phi3.5", "phi4-mini", "qwen2", "qwen3", "qwen3-untied"])
def test_merged_export_matches_lora_logits(tmp_path, name):
    write_checkpoint(tmp_path / "base", name)
    (tmp_path / "base" / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "do_sample": False}))
    model = lora_model(tmp_path / "base", targets="all-linear")
    x = ids()
    with torch.no_grad():
        want = model(x)
    md.merge_lora(model)
    assert not any("lora" in k for k in model.state_dict())
    with torch.no_grad():
        assert rel_err(model(x), want) <= 1e-5
    w = model.model.layers[0].self_attn.o_proj.weight.clone()
    md.merge_lora(model)  # twice: nothing changes
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, w)

    md.save_model(model, tmp_path / "merged")
    out = tmp_path / "merged"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == dict(CONFIGS[name], torch_dtype="float32")  # faithful to the source's config.json
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 7]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert ("lm_head.weight" in f.keys()) == (not CONFIGS[name]["tie_word_embeddings"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(hf(x).logits, want) <= 1e-4
        assert rel_err(md.load_model(out, dtype=torch.float32)(x), want) <= 1e-5


def test_merge_in_bf16_casts_back(tmp_path):
    write_checkpoint(tmp_path, "llama3")
    model = md.apply_lora(md.load_model(tmp_path, dtype=torch.bfloat16), md.LoraConfig(r=4), verbose=False)
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_B.weight.normal_(0, 0.1)
    want = (q.weight.float() + q.delta_weight()).to(torch.bfloat16)
    md.merge_lora(model)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, want)


def test_lora_forward_after_merge_is_base_only(tmp_path):
    write_checkpoint(tmp_path, "llama3")
    model = lora_model(tmp_path)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = q(x)
        q.merge()
        q.merge()  # idempotent
        assert q.merged and torch.allclose(q(x), want, atol=1e-6)
        assert torch.allclose(q(x), torch.nn.functional.linear(x, q.weight), atol=0)


def test_sharded_export(tmp_path):
    write_checkpoint(tmp_path / "base", "phi3.5")
    model = md.merge_lora(lora_model(tmp_path / "base"))
    md.save_model(model, tmp_path / "out", max_shard_size="40KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    x = ids()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(hf(x).logits, model(x)) <= 1e-4
    # Saving again unsharded removes the old shards, which would otherwise shadow the new file.
    md.save_model(model, out)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_refuses_unmerged_lora(tmp_path):
    write_checkpoint(tmp_path / "base", "llama3")
    with pytest.raises(ValueError, match="merge_lora.*save_adapter"):
        md.save_model(lora_model(tmp_path / "base"), tmp_path / "out")


def test_bf16_export_records_dtype(tmp_path):
    write_checkpoint(tmp_path / "base", "qwen2")
    model = md.load_model(tmp_path / "base", dtype=torch.bfloat16)
    md.save_model(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = md.load_model(tmp_path / "out", dtype="auto")
    assert again.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("4GiB") == 4 * 2**30 and parse_size(1000) == 1000
    assert parse_size("40KB") == 40_000
    with pytest.raises(ValueError, match="5 gigs"):
        parse_size("5 gigs")


def test_qwen3_qk_norms_stay_frozen_and_are_exported(tmp_path):
    ref = write_checkpoint(tmp_path / "base", "qwen3")
    model = lora_model(tmp_path / "base", targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # q_norm / k_norm are frozen base weights
    assert "model.layers.0.self_attn.q_norm.weight" in dict(model.named_parameters())
    x = ids()
    with torch.no_grad():
        want = model(x)
    md.save_model(md.merge_lora(model), tmp_path / "merged")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "merged" / "model.safetensors")
    for i in range(2):
        for norm in ("q_norm", "k_norm"):
            key = f"model.layers.{i}.self_attn.{norm}.weight"
            assert torch.equal(saved[key], ref.state_dict()[key])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(hf(x).logits, want) <= 1e-4
