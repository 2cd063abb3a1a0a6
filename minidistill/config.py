"""Model configuration read from a checkpoint's config.json, and the presets table.

One dataclass covers every supported family (llama, mistral, qwen2, qwen3, phi3); the families
differ only by flags (fused projections, q/k/v biases, q/k norms, tied head, partial rotary, rope
scaling, sliding window). Values always come from the checkpoint's own config.json;
`with_rope_scaling` extends a model's context (`--rope-scaling`), rewriting that dict.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Preset name -> hub repo id. Anything else passed as a model is a repo id or a folder.
PRESETS: dict[str, str] = {
    "phi-4-mini": "microsoft/Phi-4-mini-instruct",
    "phi-4-mini-reasoning": "microsoft/Phi-4-mini-reasoning",
    "phi-4": "microsoft/phi-4",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3.5-mini": "microsoft/Phi-3.5-mini-instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "r1-distill-llama-8b": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    "r1-distill-qwen-1.5b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "r1-distill-qwen-7b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "r1-0528-qwen3-8b": "deepseek-ai/DeepSeek-R1-0528-Qwen3-8B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
}

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def preset_repo(name: str) -> str:
    """The hub repo id of a preset name; an unknown name fails listing the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))} "
                         "(or pass a hub repo id 'org/name' or a local folder)")
    return PRESETS[name]


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    # Rotary embedding
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_type: str = "default"  # one of SUPPORTED_ROPE_TYPES (maths in rope.py)
    rope_factor: float = 1.0  # linear / dynamic / yarn / llama3 factor; longrope: max_pos / original_max unless given
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # yarn, llama3 and longrope (dynamic uses max_pos)
    short_factor: list[float] | None = None  # longrope
    long_factor: list[float] | None = None  # longrope
    beta_fast: float = 32.0  # yarn: ramp bounds, in rotations over the original context
    beta_slow: float = 1.0  # yarn
    yarn_truncate: bool = True  # yarn: round the ramp bounds to whole dims (transformers' default)
    attention_factor: float = 1.0  # multiplies cos and sin (longrope / yarn mscale)
    # Family flags
    fused_qkv: bool = False  # phi3: one qkv_proj
    fused_gate_up: bool = False  # phi3: one gate_up_proj (gate rows first)
    attention_bias: bool = False  # q/k/v biases (qwen2; llama/mistral/qwen3 `attention_bias`)
    o_proj_bias: bool = False  # llama/mistral/qwen3 `attention_bias` also biases o_proj; qwen2 does not
    mlp_bias: bool = False  # llama `mlp_bias`
    qk_norm: bool = False  # qwen3: per-head RMSNorm of q and k (q_norm / k_norm) before RoPE
    sliding_window: int | None = None  # keys allowed: q - window < k <= q
    max_window_layers: int = 0  # qwen2/qwen3: layers below this index use full attention
    layer_types: tuple[str, ...] | None = None  # qwen2/qwen3 explicit per-layer "sliding_attention" / "full_attention"
    # Special ids from config.json (the tokenizer and generation_config may say more)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # The config.json dict as read, written back unchanged by save_model.
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    # The rope scaling `with_rope_scaling` added to the checkpoint's config (None: as the checkpoint
    # has it), so an adapter's README can say how to load the base it was trained on.
    rope_extension: dict[str, Any] | None = None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of one layer, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[layer_idx] == "sliding_attention" else None
        return None if layer_idx < self.max_window_layers else self.sliding_window

    def with_rope_scaling(self, scaling: dict[str, Any]) -> "ModelConfig":
        """This config with its plain rope replaced by `scaling` (a `rope.parse_rope_scaling` dict:
        linear / dynamic / yarn): linear and yarn extend max_position_embeddings to factor x the
        original context (dynamic scales itself past the context it has). `raw`, the config.json a
        merged export writes, carries the new rope dict and max_position_embeddings."""
        kind = scaling.get("rope_type")
        if kind not in ("linear", "dynamic", "yarn") or not float(scaling.get("factor", 0)) > 1:
            raise ValueError(f"rope scaling {scaling!r}: expected rope_type linear, dynamic or yarn with a factor > 1 "
                             "(minidistill.rope.parse_rope_scaling('yarn:4') builds one)")
        if self.rope_type != "default":
            raise ValueError(f"this {self.model_type} model already scales its rope ({self.rope_type!r}); "
                             "--rope-scaling only extends models with plain rope")
        if self.model_type == "phi3" and kind == "yarn":
            raise ValueError("transformers reads rope type 'yarn' in a phi3 config as LongRoPE, so the export would "
                             "not load as trained; use linear or dynamic for phi3 models")
        raw, new = copy.deepcopy(self.raw), dict(scaling)
        context = int(raw.get("max_position_embeddings", self.max_position_embeddings))
        if kind == "yarn":
            new.setdefault("original_max_position_embeddings", context)
        if kind != "dynamic":  # dynamic's original context is max_position_embeddings itself
            raw["max_position_embeddings"] = int(round(new.get("original_max_position_embeddings", context)
                                                       * float(new["factor"])))
        if isinstance(raw.get("rope_parameters"), dict):  # newer layout: rope_theta lives in the dict
            keep = ("rope_theta", "partial_rotary_factor")
            raw["rope_parameters"] = {**{k: v for k, v in raw["rope_parameters"].items() if k in keep}, **new}
        if raw.get("rope_scaling") is not None or not isinstance(raw.get("rope_parameters"), dict):
            raw["rope_scaling"] = new
        out = ModelConfig.from_hf(raw)
        out.rope_extension = dict(new, max_position_embeddings=out.max_position_embeddings,
                                  source_max_position_embeddings=context)
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_hf(json.load(f))

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a hub config.json dict (old `rope_scaling` or new `rope_parameters`)."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is implemented")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads

        # Rope settings live in `rope_scaling` (+ top-level rope_theta / partial_rotary_factor)
        # in most hub files, or in one `rope_parameters` dict in newer ones. Merge both views.
        rp = dict(d.get("rope_scaling") or {})
        rp.update(d.get("rope_parameters") or {})
        theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
        partial = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        rtype = rp.get("rope_type", rp.get("type", "default")) or "default"
        if mt == "phi3" and rtype in ("su", "yarn"):  # legacy Phi-3 names for longrope (transformers' reading too)
            rtype = "longrope"
        if rtype not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope type {rtype!r} for model_type {mt!r}; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        max_pos = d.get("max_position_embeddings", 4096)
        orig_max = rp.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
        cfg = dict(rope_theta=float(theta), partial_rotary_factor=float(partial), rope_type=rtype)
        if rtype in ("linear", "dynamic"):
            cfg.update(rope_factor=float(rp["factor"]))
        elif rtype == "yarn":
            cfg.update(_yarn_settings(rp, max_pos, orig_max))
        elif rtype == "llama3":
            cfg.update(rope_factor=float(rp["factor"]), low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
                       high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
                       original_max_position_embeddings=int(orig_max))
        elif rtype == "longrope":
            if orig_max is None:
                raise ValueError("longrope config without original_max_position_embeddings")
            factor = rp.get("factor") or max_pos / orig_max
            attn = rp.get("attention_factor")
            if attn is None:
                attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig_max))
            n = int(head_dim * partial) // 2
            for key in ("short_factor", "long_factor"):
                if len(rp[key]) != n:
                    raise ValueError(f"longrope {key} has {len(rp[key])} entries, expected rotary_dim/2 = {n}")
            cfg.update(rope_factor=float(factor), attention_factor=float(attn),
                       original_max_position_embeddings=int(orig_max),
                       short_factor=[float(x) for x in rp["short_factor"]],
                       long_factor=[float(x) for x in rp["long_factor"]])

        window = d.get("sliding_window")
        max_window_layers, layer_types = 0, None
        if mt in ("qwen2", "qwen3"):
            if not d.get("use_sliding_window", False):
                window = None
            else:
                max_window_layers = d.get("max_window_layers", 0)
                if d.get("layer_types") is not None:
                    layer_types = tuple(d["layer_types"])
                    if len(layer_types) != d["num_hidden_layers"]:
                        raise ValueError(f"layer_types has {len(layer_types)} entries for "
                                         f"{d['num_hidden_layers']} layers")
        if window is not None and window >= max_pos:
            window = None  # a window as long as the context masks nothing

        return cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            max_position_embeddings=max_pos,
            fused_qkv=mt == "phi3",
            fused_gate_up=mt == "phi3",
            attention_bias=mt == "qwen2" or bool(d.get("attention_bias", False)),
            o_proj_bias=mt in ("llama", "mistral", "qwen3") and bool(d.get("attention_bias", False)),
            mlp_bias=mt == "llama" and bool(d.get("mlp_bias", False)),
            qk_norm=mt == "qwen3",
            sliding_window=window,
            max_window_layers=max_window_layers,
            layer_types=layer_types,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            raw=dict(d),
            **cfg,
        )


def _yarn_settings(rp: dict[str, Any], max_pos: int, orig_max: int | None) -> dict[str, Any]:
    """ModelConfig fields of a yarn rope dict, defaults and attention factor as transformers sets them."""
    orig = int(orig_max or max_pos)
    factor = rp.get("factor") or max_pos / orig
    attn = rp.get("attention_factor")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attn is None:
        m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    if "attn_factor" in rp:  # DeepSeek-R1-0528-Qwen3-8B's config.json has this vLLM-only key
        warnings.warn(f"rope_scaling attn_factor={rp['attn_factor']} is read by vLLM / SGLang (cos/sin scale "
                      f"{mscale(factor) * rp['attn_factor']:.4f}) but ignored by transformers (scale {attn:.4f}); "
                      "minidistill follows transformers: set attention_factor in config.json to choose", stacklevel=3)
    return dict(rope_factor=float(factor), attention_factor=float(attn), original_max_position_embeddings=orig,
                beta_fast=float(rp.get("beta_fast") or 32), beta_slow=float(rp.get("beta_slow") or 1),
                yarn_truncate=bool(rp.get("truncate", True)))
