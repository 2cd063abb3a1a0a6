"""ModelConfig from config.json: family flags, rope variants in both hub layouts, windows, the
errors that name the value; the presets table."""

import copy
import json
import re

import pytest
import torch

import minidistill as md
import model_fixtures
from minidistill.config import PRESETS, ModelConfig, preset_repo

# Copied when pytest imports this file, before any test runs: transformers writes into the nested
# rope dicts of a config it is given, and write_checkpoint hands it CONFIGS' own, so after other
# tests CONFIGS["phi4-mini"]["rope_scaling"] holds keys (rope_type, original_max_position_embeddings,
# ...) that no hub config.json has.
CONFIGS = copy.deepcopy(model_fixtures.CONFIGS)


def test_config_reads_phi4_mini_traits(tmp_path):
    cfg = ModelConfig.from_hf(CONFIGS["phi4-mini"])
    assert cfg.rotary_dim == 12 and cfg.head_dim == 16
    assert cfg.rope_type == "longrope" and cfg.original_max_position_embeddings == 32
    assert cfg.rope_factor == 1024 / 32
    assert cfg.attention_factor == pytest.approx((1 + torch.log(torch.tensor(32.0)) / torch.log(torch.tensor(32.0))).sqrt().item())
    assert cfg.fused_qkv and cfg.tie_word_embeddings and cfg.sliding_window is None
    qwen = ModelConfig.from_hf(CONFIGS["qwen2"])
    assert qwen.attention_bias and not qwen.o_proj_bias and qwen.sliding_window is None


def test_real_phi4_mini_config_attention_factor():
    # Phi-4-mini's config.json: 131072 / 4096 = 32 -> sqrt(1 + ln 32 / ln 4096) = sqrt(17/12).
    d = dict(CONFIGS["phi4-mini"], hidden_size=3072, num_attention_heads=24, num_key_value_heads=8,
             max_position_embeddings=131072, original_max_position_embeddings=4096,
             rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48})
    cfg = ModelConfig.from_hf(d)
    assert cfg.rotary_dim == 96 and cfg.attention_factor == pytest.approx((17 / 12) ** 0.5, rel=1e-9)


@pytest.mark.parametrize("bad,match", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'; supported: llama, mistral, qwen2, phi3"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'.*supported: default, llama3, longrope"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
])
def test_config_errors_name_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(dict(CONFIGS["llama3"], **bad))


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'phi-5'.*phi-4-mini"):
        md.load_model("phi-5")


# ---------------------------------------------------------------------------- beyond the moved tests

def test_llama3_rope_reads_the_same_from_both_hub_layouts():
    old = ModelConfig.from_hf(CONFIGS["llama3"])  # `rope_scaling` + top-level rope_theta
    assert (old.rope_type, old.rope_theta, old.rope_factor) == ("llama3", 500000.0, 8.0)
    assert (old.low_freq_factor, old.high_freq_factor, old.original_max_position_embeddings) == (1.0, 4.0, 64)
    assert old.head_dim == 64 // 4 and old.rotary_dim == 16 and old.num_key_value_heads == 2
    d = dict(CONFIGS["llama3"])
    d["rope_parameters"] = dict(d.pop("rope_scaling"), rope_theta=d.pop("rope_theta"))  # newer transformers
    new = ModelConfig.from_hf(d)
    assert {k: v for k, v in vars(new).items() if k != "raw"} == {k: v for k, v in vars(old).items() if k != "raw"}


def test_legacy_phi3_rope_name_and_longrope_factors():
    d = dict(CONFIGS["phi3.5"], rope_scaling=dict(CONFIGS["phi3.5"]["rope_scaling"], type="su"))
    cfg = ModelConfig.from_hf(d)  # Phi-3's old name for longrope
    assert cfg.rope_type == "longrope" and cfg.short_factor == CONFIGS["phi3.5"]["rope_scaling"]["short_factor"]
    assert len(cfg.long_factor) == cfg.rotary_dim // 2 == 8
    # An explicit attention_factor wins; a factor <= 1 means no scaling of cos / sin.
    explicit = dict(d, rope_scaling=dict(d["rope_scaling"], attention_factor=1.25))
    assert ModelConfig.from_hf(explicit).attention_factor == 1.25
    short = dict(d, max_position_embeddings=32)  # = original context: factor 1
    assert ModelConfig.from_hf(short).rope_factor == 1.0 and ModelConfig.from_hf(short).attention_factor == 1.0


def test_longrope_errors_name_the_problem():
    d = dict(CONFIGS["phi4-mini"])
    bad = dict(d, rope_scaling=dict(d["rope_scaling"], short_factor=[1.0] * 5))
    with pytest.raises(ValueError, match="longrope short_factor has 5 entries, expected rotary_dim/2 = 6"):
        ModelConfig.from_hf(bad)
    no_orig = {k: v for k, v in d.items() if k != "original_max_position_embeddings"}
    with pytest.raises(ValueError, match="without original_max_position_embeddings"):
        ModelConfig.from_hf(no_orig)


def test_sliding_windows_per_family_and_layer():
    assert ModelConfig.from_hf(CONFIGS["qwen2"]).layer_window(1) is None  # configured, use_sliding_window off
    qwen = ModelConfig.from_hf(dict(CONFIGS["qwen2"], use_sliding_window=True, max_window_layers=1))
    assert (qwen.sliding_window, [qwen.layer_window(i) for i in range(2)]) == (16, [None, 16])
    mistral = ModelConfig.from_hf(CONFIGS["mistral"])
    assert [mistral.layer_window(i) for i in range(2)] == [9, 9]
    # Phi-3.5's window (262144) is longer than its context (1024): it masks nothing, so none.
    assert ModelConfig.from_hf(CONFIGS["phi3.5"]).sliding_window is None
    assert ModelConfig.from_hf(CONFIGS["phi3-window"]).layer_window(0) == 7


def test_bias_flags_follow_the_family():
    llama = ModelConfig.from_hf(dict(CONFIGS["llama3"], attention_bias=True, mlp_bias=True))
    assert llama.attention_bias and llama.o_proj_bias and llama.mlp_bias  # llama's flag biases o_proj too
    plain = ModelConfig.from_hf(CONFIGS["llama3"])
    assert not (plain.attention_bias or plain.o_proj_bias or plain.mlp_bias or plain.fused_qkv)
    phi = ModelConfig.from_hf(dict(CONFIGS["phi4"], mlp_bias=True))
    assert phi.fused_qkv and phi.fused_gate_up and not phi.mlp_bias  # mlp_bias is llama's key only


def test_from_file_keeps_the_dict_as_read(tmp_path):
    d = dict(CONFIGS["qwen2"], some_future_key=[1, 2])
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = ModelConfig.from_file(tmp_path / "config.json")
    assert cfg.raw == d and cfg.vocab_size == 96 and cfg.rms_norm_eps == 1e-6
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    no_kv = {k: v for k, v in d.items() if k != "num_key_value_heads"}
    assert ModelConfig.from_hf(no_kv).num_key_value_heads == 4  # absent: multi-head attention


def test_presets_are_repo_ids():
    assert preset_repo("phi-4-mini") == "microsoft/Phi-4-mini-instruct"
    assert all(len(repo.split("/")) == 2 and all(repo.split("/")) for repo in PRESETS.values())
    with pytest.raises(ValueError, match=re.escape("valid presets: " + ", ".join(sorted(PRESETS)))):
        preset_repo("llama-9")
