"""loader.py: sharded and single-file checkpoints, dtype handling, key and shape checks, the tied
head, and loading for inference (adapter applied, eval mode, tokenizer)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import minidistill as md
from minidistill.demo import build_demo_model
from minidistill.loader import default_device, inference_dtype, load_for_inference, resolve_dtype
from model_fixtures import rel_err, write_checkpoint

transformers = pytest.importorskip("transformers")

X = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def test_sharded_checkpoint_loads_like_the_reference(tmp_path):
    ref = write_checkpoint(tmp_path, "qwen2", shard=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    with torch.no_grad():
        assert rel_err(md.load_model(tmp_path, dtype=torch.float32)(X), ref(X).logits) <= 1e-5
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"names shards that are not on disk.*{shard}"):
        md.load_model(tmp_path)


def test_dtypes_auto_names_and_unknown(tmp_path):
    write_checkpoint(tmp_path, "llama3", torch_dtype="bfloat16")
    for dtype in ("auto", None):
        assert {p.dtype for p in md.load_model(tmp_path, dtype=dtype).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in md.load_model(tmp_path, dtype="fp16").parameters()} == {torch.float16}
    assert resolve_dtype(torch.float32, None) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; valid: auto, bf16"):
        md.load_model(tmp_path, dtype="fp8")


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    write_checkpoint(tmp_path, "llama3")
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight has shape \(100, 64\), the config "
                                         r"implies \(112, 64\)"):
        md.load_model(tmp_path, dtype=torch.float32)


def test_tied_head_ignores_a_stored_head_copy(tmp_path):
    ref = write_checkpoint(tmp_path, "llama3-tied")
    state = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = torch.full_like(state["model.embed_tokens.weight"], 7.0)  # a stale copy
    save_file(state, tmp_path / "model.safetensors")
    model = md.load_model(tmp_path, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])
    with torch.no_grad():
        assert rel_err(model(X), ref(X).logits) <= 1e-5


def test_inference_dtype_and_device_defaults():
    assert inference_dtype("auto", "cpu") == "fp32"
    assert inference_dtype("auto", "cuda:1") == "bf16"
    assert inference_dtype("fp16", "cpu") == "fp16"
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_load_for_inference_applies_the_adapter(tmp_path):
    folder = build_demo_model(tmp_path / "demo")
    model = md.apply_lora(md.load_model(folder, dtype=torch.float32), md.LoraConfig(r=4, alpha=8), verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    md.save_adapter(model, tmp_path / "adapter")
    loaded, tok = load_for_inference(str(folder), str(tmp_path / "adapter"), "auto", "cpu")
    assert not loaded.training and {p.dtype for p in loaded.parameters()} == {torch.float32}
    x = torch.tensor([tok.encode("Ana has 3 pens")])
    with torch.no_grad():
        want, got = model.eval()(x), loaded(x)
        assert rel_err(got, want) <= 1e-6
        plain, _ = load_for_inference(str(folder))
        assert rel_err(plain(x), want) > 1e-3  # the adapter changed the outputs
    assert tok.decode(tok.encode("Ana has 3 pens")) == "Ana has 3 pens"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_file_is_named_with_what_to_do(tmp_path, damage):
    write_checkpoint(tmp_path, "llama3")
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\0" * 64)
    with pytest.raises(ValueError, match=r"model.safetensors is damaged .*download it again"):
        md.load_model(tmp_path, dtype=torch.float32)


def test_load_for_inference_with_the_adapters_rope_scaling(tmp_path):
    folder = build_demo_model(tmp_path / "demo")
    model = md.apply_lora(md.load_model(folder, dtype=torch.float32, rope_scaling="linear:4"),
                          md.LoraConfig(r=4, alpha=8), verbose=False)
    md.save_adapter(model, tmp_path / "adapter")
    loaded, _ = load_for_inference(str(folder), str(tmp_path / "adapter"), "fp32", "cpu", rope_scaling="linear:4")
    plain, _ = load_for_inference(str(folder), str(tmp_path / "adapter"), "fp32", "cpu")
    assert loaded.config.rope_type == "linear" and plain.config.rope_type == "default"
    x = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(loaded(x), model.eval()(x)) <= 1e-6 and rel_err(plain(x), model(x)) > 1e-3
