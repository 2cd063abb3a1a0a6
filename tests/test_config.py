"""ModelConfig from config.json: family flags, rope variants in both hub layouts, windows, the
errors that name the value; the presets table."""

import copy
import json
import math
import re

import pytest
import torch

import minidistill as md
import model_fixtures
from minidistill.config import PRESETS, ModelConfig, preset_repo
from minidistill.rope import parse_rope_scaling

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
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'; supported: llama, mistral, qwen2, qwen3, phi3"),
    ({"rope_scaling": {"rope_type": "ntk-by-parts", "factor": 4.0}},
     "unsupported rope type 'ntk-by-parts'.*supported: default, linear, dynamic, yarn, llama3, longrope"),
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


# ---------------------------------------------------------------------------- qwen3, rope variants, --rope-scaling

def test_qwen3_flags_and_presets():
    cfg = ModelConfig.from_hf(CONFIGS["qwen3"])
    assert cfg.qk_norm and cfg.head_dim == 24 and cfg.rotary_dim == 24  # explicit head_dim, not 64 / 4
    assert cfg.tie_word_embeddings and not (cfg.attention_bias or cfg.o_proj_bias or cfg.fused_qkv)
    assert not ModelConfig.from_hf(CONFIGS["qwen3-untied"]).tie_word_embeddings
    biased = ModelConfig.from_hf(dict(CONFIGS["qwen3"], attention_bias=True))
    assert biased.attention_bias and biased.o_proj_bias  # qwen3's flag biases o_proj too (unlike qwen2)
    assert not ModelConfig.from_hf(CONFIGS["qwen2"]).qk_norm
    windowed = ModelConfig.from_hf(dict(CONFIGS["qwen3"], use_sliding_window=True, sliding_window=8,
                                        max_window_layers=1))
    assert [windowed.layer_window(i) for i in range(2)] == [None, 8]
    typed = ModelConfig.from_hf(dict(CONFIGS["qwen3"], use_sliding_window=True, sliding_window=8,
                                     layer_types=["sliding_attention", "full_attention"]))
    assert [typed.layer_window(i) for i in range(2)] == [8, None]  # explicit layer_types win
    assert ModelConfig.from_hf(dict(CONFIGS["qwen3"], sliding_window=8)).layer_window(1) is None  # not in use
    assert [preset_repo(n) for n in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "r1-0528-qwen3-8b")] == [
        "Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B", "deepseek-ai/DeepSeek-R1-0528-Qwen3-8B"]


def test_rope_variants_read_from_both_layouts():
    lin = ModelConfig.from_hf(CONFIGS["llama-linear"])
    assert (lin.rope_type, lin.rope_factor, lin.attention_factor) == ("linear", 4.0, 1.0)
    dyn = ModelConfig.from_hf(CONFIGS["llama-dynamic"])
    assert (dyn.rope_type, dyn.rope_factor, dyn.max_position_embeddings) == ("dynamic", 4.0, 32)
    yarn = ModelConfig.from_hf(CONFIGS["llama-yarn"])
    assert (yarn.rope_type, yarn.rope_factor, yarn.original_max_position_embeddings) == ("yarn", 3.0, 32)
    assert (yarn.beta_fast, yarn.beta_slow, yarn.yarn_truncate) == (16.0, 2.0, True)
    assert yarn.attention_factor == pytest.approx(0.1 * math.log(3.0) + 1)  # transformers' default mscale
    for name in ("llama-linear", "llama-dynamic", "llama-yarn"):
        d = copy.deepcopy(CONFIGS[name])
        d["rope_parameters"] = dict(d.pop("rope_scaling"), rope_theta=d.pop("rope_theta"))
        new, old = ModelConfig.from_hf(d), ModelConfig.from_hf(CONFIGS[name])
        assert {k: v for k, v in vars(new).items() if k != "raw"} == {k: v for k, v in vars(old).items() if k != "raw"}


def test_yarn_attention_factor_defaults_and_overrides():
    base = dict(CONFIGS["llama-yarn"])
    rs = base["rope_scaling"]
    assert ModelConfig.from_hf(dict(base, rope_scaling=dict(rs, attention_factor=0.7))).attention_factor == 0.7
    ms = ModelConfig.from_hf(dict(base, rope_scaling=dict(rs, mscale=1.0, mscale_all_dim=0.5)))
    assert ms.attention_factor == pytest.approx((0.1 * math.log(3) + 1) / (0.05 * math.log(3) + 1))
    implicit = ModelConfig.from_hf(dict(base, rope_scaling={"rope_type": "yarn", "factor": None,
                                                             "original_max_position_embeddings": 24}))
    assert implicit.rope_factor == 96 / 24 and implicit.beta_fast == 32.0 and implicit.beta_slow == 1.0
    no_orig = ModelConfig.from_hf(dict(base, rope_scaling={"rope_type": "yarn", "factor": 2.0, "truncate": False}))
    assert no_orig.original_max_position_embeddings == 96 and not no_orig.yarn_truncate
    with pytest.warns(UserWarning, match="attn_factor=0.878.*ignored by transformers"):
        r1 = ModelConfig.from_hf(CONFIGS["qwen3-yarn"])  # DeepSeek-R1-0528-Qwen3-8B's vLLM-only key
    assert r1.attention_factor == pytest.approx(0.1 * math.log(4) + 1)


@pytest.mark.parametrize("spec,want", [
    ("linear:4", {"rope_type": "linear", "factor": 4.0}),
    ("dynamic:2.5", {"rope_type": "dynamic", "factor": 2.5}),
    ("yarn:4", {"rope_type": "yarn", "factor": 4.0}),
    ("yarn:4:32768", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
])
def test_parse_rope_scaling(spec, want):
    assert parse_rope_scaling(spec) == want


@pytest.mark.parametrize("spec,match", [
    ("ntk:4", "not understood"), ("linear", "not understood"), ("linear:4:9", "not understood"),
    ("yarn:x", "are not numbers"), ("linear:0.5", "must be > 1"), ("dynamic:1", "must be > 1"),
])
def test_parse_rope_scaling_errors(spec, match):
    with pytest.raises(ValueError, match=match) as err:
        parse_rope_scaling(spec)
    assert spec in str(err.value) and "yarn:4" in str(err.value)


def test_with_rope_scaling_rewrites_the_config_dict():
    plain = ModelConfig.from_hf(CONFIGS["qwen3"])
    lin = plain.with_rope_scaling(parse_rope_scaling("linear:4"))
    assert (lin.rope_type, lin.rope_factor, lin.max_position_embeddings) == ("linear", 4.0, 512)
    assert lin.raw["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert lin.raw["max_position_embeddings"] == 512
    assert plain.raw["rope_scaling"] is None and plain.raw["max_position_embeddings"] == 128  # the source untouched
    yarn = plain.with_rope_scaling(parse_rope_scaling("yarn:4:32"))
    assert (yarn.original_max_position_embeddings, yarn.max_position_embeddings) == (32, 128)
    assert yarn.raw["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    dyn = plain.with_rope_scaling({"rope_type": "dynamic", "factor": 2.0})
    assert dyn.max_position_embeddings == 128 and dyn.rope_type == "dynamic"  # dynamic scales past it itself
    # The newer layout: the scaling goes into rope_parameters, next to rope_theta.
    d = dict(CONFIGS["llama-plain"])
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
    new = ModelConfig.from_hf(d).with_rope_scaling(parse_rope_scaling("yarn:2"))
    assert new.raw["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 2.0,
                                          "original_max_position_embeddings": 32}
    assert "rope_scaling" not in new.raw and new.max_position_embeddings == 64


def test_with_rope_scaling_refuses_what_cannot_round_trip():
    with pytest.raises(ValueError, match="already scales its rope \\('llama3'\\)"):
        ModelConfig.from_hf(CONFIGS["llama3"]).with_rope_scaling(parse_rope_scaling("linear:2"))
    with pytest.raises(ValueError, match="'yarn' in a phi3 config as LongRoPE"):
        ModelConfig.from_hf(CONFIGS["phi4"]).with_rope_scaling(parse_rope_scaling("yarn:2"))
    with pytest.raises(ValueError, match="expected rope_type linear, dynamic or yarn"):
        ModelConfig.from_hf(CONFIGS["phi4"]).with_rope_scaling({"rope_type": "llama3", "factor": 8.0})
