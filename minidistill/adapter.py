"""LoRA adapters on disk in PEFT's layout: `save_adapter` and `load_adapter`.

A folder holds `adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (and new-token rows under
PEFT's trainable-token keys, see new_tokens.py). Adapters written by PEFT load too.

Fused Phi-3 models (`qkv_proj`, `gate_up_proj`) against split adapters (q/k/v_proj,
gate/up_proj), both exact: splitting keeps A and slices B by output rows; fusing stacks the
A's along the rank and makes B block-diagonal (rank r_q + r_k + r_v), recorded in
`rank_pattern` / `alpha_pattern` when saved again.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .lora import FUSED, LoraConfig, freeze_all_but_adapters, lora_layers, print_trainable, resolve_targets, wrap_linears
from .new_tokens import load_token_rows, token_rows_state

CONFIG_FILE, WEIGHTS_FILE, README_FILE = "adapter_config.json", "adapter_model.safetensors", "README.md"
PREFIX = "base_model.model."
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "modules_to_save": None,
                "layers_to_transform": None, "layer_replication": None, "target_parameters": None,
                "exclude_modules": None}


# ---------------------------------------------------------------- fused <-> split maths

def fused_sizes(model: nn.Module, fused: str) -> list[int]:
    """Output rows of each part of a fused projection: [q, k, v] for qkv_proj, [gate, up] for gate_up_proj."""
    c = model.config
    if fused == "qkv_proj":
        return [c.num_attention_heads * c.head_dim] + [c.num_key_value_heads * c.head_dim] * 2
    return [c.intermediate_size] * 2


def fuse_split_lora(parts: list[tuple[int, Tensor | None, Tensor | None]], out_features: int) -> tuple[Tensor, Tensor]:
    """One exact LoRA for a fused projection from its parts' (rows, A_i, B_i * s_i / s_0).

    sum_i s_i B_i A_i = s_0 * blockdiag(B_i s_i / s_0) @ [A_0; A_1; ...], rank sum r_i; a part
    missing from the adapter (A_i None) gets zero rows of B. Returns A (sum r_i, in), B (out, sum r_i).
    """
    A = torch.cat([a for _, a, _ in parts if a is not None])  # (sum r_i, in)
    B = torch.zeros(out_features, A.shape[0])  # (out, sum r_i), block-diagonal
    row = col = 0
    for rows, a, b in parts:
        if a is not None:
            B[row:row + rows, col:col + a.shape[0]] = b
            col += a.shape[0]
        row += rows
    return A, B


# ---------------------------------------------------------------- writing

def save_adapter(model: nn.Module, path: str | Path, *, split_fused: bool = False, note: str | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout, and a README.md.

    split_fused=True writes fused Phi-3 qkv_proj / gate_up_proj LoRAs as q/k/v_proj and
    gate/up_proj ones (same A for each, B sliced by rows: exact), for servers that want those.
    The README names the base and the LoRA settings, says how to load the base when it was
    loaded with rope scaling (`load_model(..., rope_scaling=)`), and ends with `note` if given.
    """
    cfg: LoraConfig | None = getattr(model, "lora_config", None)
    layers = lora_layers(model)
    if cfg is None or not layers:
        raise ValueError("model has no LoRA layers: call apply_lora or load_adapter first")
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for p, m in layers.items():
        name = p.rsplit(".", 1)[-1]
        A, B = m.lora_A.weight.detach(), m.lora_B.weight.detach()
        if split_fused and name in FUSED:
            parts = [(p[: -len(name)] + part, b) for part, b in zip(FUSED[name], B.split(fused_sizes(model, name)))]
        else:
            parts = [(p, B)]
        for q, b in parts:
            tensors[f"{PREFIX}{q}.lora_A.weight"] = A.cpu().clone()  # split parts share A: own copies
            tensors[f"{PREFIX}{q}.lora_B.weight"] = b.cpu().clone()
            ranks[q] = (m.r, m.scaling)
    # Modules whose rank or scale differ from the config's (a split adapter fused back) are
    # described per path in rank_pattern / alpha_pattern, so PEFT builds them identically.
    rank_pattern, alpha_pattern = {}, {}
    for q, (r, s) in ranks.items():
        if r != cfg.r or not math.isclose(s, cfg.scaling(), rel_tol=1e-9):
            rank_pattern[q] = r
            alpha_pattern[q] = s * (math.sqrt(r) if cfg.use_rslora else r)
    token_indices, token_tensors = token_rows_state(model)
    tensors.update({PREFIX + k: v for k, v in token_tensors.items()})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
        "target_modules": sorted({q.rsplit(".", 1)[-1] for q in ranks}),
        "use_rslora": cfg.use_rslora, "lora_dropout": cfg.dropout, "bias": "none",
        "base_model_name_or_path": getattr(model, "source", "") or "",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_dora": False, "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
        "trainable_token_indices": token_indices, "revision": None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / README_FILE).write_text(adapter_readme(config, getattr(model.config, "rope_extension", None), note))


def adapter_readme(config: dict, rope: dict | None, note: str | None) -> str:
    """The adapter folder's README.md: base model, LoRA settings, the base's rope scaling if any, a note."""
    base = config["base_model_name_or_path"] or "(unknown)"
    repo = re.fullmatch(r"[\w.-]+/[\w.-]+", base) is not None and not Path(base).exists()
    lines = ["---", *([f"base_model: {base}"] if repo else []), "library_name: peft", "tags: [lora, minidistill]",
             "---", "# LoRA adapter", "",
             f"A LoRA adapter for `{base}`, written by minidistill in PEFT's layout: r={config['r']}, "
             f"alpha={config['lora_alpha']}{', rsLoRA' if config['use_rslora'] else ''}, targets "
             f"{', '.join(config['target_modules'])}. Load it with `md.load_adapter(md.load_model(BASE), DIR)` "
             "or PEFT's `PeftModel.from_pretrained`."]
    if rope:
        lengths = ("max_position_embeddings", "source_max_position_embeddings")
        scaling = {k: v for k, v in rope.items() if k not in lengths}
        flag = f"{scaling['rope_type']}:{scaling['factor']:g}"
        if "original_max_position_embeddings" in scaling and scaling["rope_type"] == "yarn":
            flag += f":{scaling['original_max_position_embeddings']}"
        lines += ["", "## Context extension", "",
                  f"Trained on the base with RoPE scaling `{json.dumps(scaling)}`: max_position_embeddings "
                  f"{rope['max_position_embeddings']} (the checkpoint says {rope['source_max_position_embeddings']}). "
                  f"Load the base the same way before this adapter: `md.load_model(BASE, rope_scaling={flag!r})`, "
                  f"`--rope-scaling {flag}`, or for other tools set `rope_scaling` to that dict and "
                  f"`max_position_embeddings` to {rope['max_position_embeddings']} in the base's config.json. "
                  "A merged export (md.save_model) carries both already."]
    if note:
        lines += ["", note.strip()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- reading

def read_adapter(folder: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """The adapter's config dict and its tensors (keys without `base_model.model.`), checked for
    the LoRA variants minidistill supports."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        found = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else "folder missing"
        raise FileNotFoundError(f"{folder} needs {CONFIG_FILE} and {WEIGHTS_FILE} (found: {found}); "
                                "minidistill reads safetensors adapters only, never .bin pickles")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except ValueError as e:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON ({e}); re-save the adapter") from None
    _check_types(config, folder / CONFIG_FILE)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: peft_type {config['peft_type']!r} is not supported; valid: LORA")
    for key, ok in _UNSUPPORTED.items():
        if config.get(key, ok) not in (ok, [], {}):
            raise ValueError(f"{folder}: {key}={config[key]!r} is not supported (only {ok!r})")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{folder}: bias={config['bias']!r} is not supported (only 'none')")
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        tensors = {k.removeprefix(PREFIX): f.get_tensor(k) for k in f.keys()}
    return config, tensors


# adapter_config.json fields minidistill reads, and the JSON types they must have.
_FIELD_TYPES = {"r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float),
                "target_modules": (list, str), "use_rslora": (bool,), "rank_pattern": (dict,),
                "alpha_pattern": (dict,)}


def _check_types(config, where: Path) -> None:
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(config).__name__}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{where}: field {key!r} is missing")
    for key, types in _FIELD_TYPES.items():
        v = config.get(key)
        if v is not None and (not isinstance(v, types) or (isinstance(v, bool) and bool not in types)):
            raise ValueError(f"{where}: field {key!r} must be {' or '.join(t.__name__ for t in types)}, "
                             f"got {v!r}")
    if config["r"] < 1:
        raise ValueError(f"{where}: field 'r' must be >= 1, got {config['r']}")


def lora_config_of(config: dict) -> LoraConfig:
    """The LoraConfig an adapter_config.json dict describes."""
    targets = config["target_modules"]
    return LoraConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                      targets=targets if isinstance(targets, str) else tuple(targets),
                      use_rslora=config.get("use_rslora", False))


def _pattern_key(patterns: dict, path: str) -> str | None:
    """PEFT's rank_pattern / alpha_pattern matching: the key is a suffix regex of the path."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", path)), None)


def load_adapter(model: nn.Module, path: str | Path, *, verbose: bool = True) -> nn.Module:
    """Apply a LoRA adapter saved by `save_adapter` or by PEFT (safetensors) to a fresh model.

    A split q/k/v (gate/up) adapter is fused exactly into a fused Phi-3 model: rank r_q+r_k+r_v.
    Fails on shape mismatches, targets missing from the model and unused weights; warns when
    `base_model_name_or_path` differs from the model's source. LoRA weights stay trainable.
    """
    folder = Path(path)
    config, tensors = read_adapter(folder)
    cfg = lora_config_of(config)
    base_name, source = config.get("base_model_name_or_path") or "", getattr(model, "source", "") or ""
    if base_name and source and base_name != source:
        warnings.warn(f"adapter {folder} was trained on {base_name!r}; this model was loaded from {source!r}")
    if lora_layers(model):
        raise ValueError(f"model already has LoRA layers; load {folder} into a freshly loaded model")
    rank_p, alpha_p = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}

    def rank_scale(p: str) -> tuple[int, float]:
        rk, ak = _pattern_key(rank_p, p), _pattern_key(alpha_p, p)
        r = rank_p[rk] if rk else cfg.r
        return r, cfg.scaling(r, alpha_p[ak] if ak else cfg.alpha)

    def take(key: str, shape: tuple[int, ...]) -> Tensor:
        if key not in tensors:
            raise ValueError(f"{folder}: no weight {PREFIX}{key} for a targeted module")
        t = tensors.pop(key)
        if tuple(t.shape) != shape:
            raise ValueError(f"{folder}: {PREFIX}{key} has shape {tuple(t.shape)}, this model needs {shape} "
                             f"(rank or model size differs)")
        return t

    plan: dict[str, tuple[int, float, Tensor, Tensor]] = {}
    for p in resolve_targets(model, cfg.targets):
        lin = model.get_submodule(p)
        name = p.rsplit(".", 1)[-1]
        split = [p[: -len(name)] + part for part in FUSED.get(name, ())]
        if f"{p}.lora_A.weight" in tensors or not any(f"{q}.lora_A.weight" in tensors for q in split):
            r, s = rank_scale(p)
            A = take(f"{p}.lora_A.weight", (r, lin.in_features))
            plan[p] = (r, s, A, take(f"{p}.lora_B.weight", (lin.out_features, r)))
            continue
        parts, s0 = [], None  # split adapter, fused model
        for q, rows in zip(split, fused_sizes(model, name)):
            if f"{q}.lora_A.weight" not in tensors:
                parts.append((rows, None, None))
                continue
            r, s = rank_scale(q)
            s0 = s if s0 is None else s0
            A = take(f"{q}.lora_A.weight", (r, lin.in_features)).float()
            parts.append((rows, A, take(f"{q}.lora_B.weight", (rows, r)).float() * (s / s0)))
        A, B = fuse_split_lora(parts, lin.out_features)
        plan[p] = (A.shape[0], s0, A, B)

    wrap_linears(model, list(plan), cfg, {p: (r, s) for p, (r, s, _, _) in plan.items()})
    with torch.no_grad():
        for p, (_, _, A, B) in plan.items():
            m = model.get_submodule(p)
            m.lora_A.weight.copy_(A)
            m.lora_B.weight.copy_(B)
    load_token_rows(model, config.get("trainable_token_indices"), tensors, take, folder)
    if tensors:
        raise ValueError(f"{folder}: weights not used by this model: {sorted(PREFIX + k for k in tensors)[:10]} "
                         f"(target_modules {config['target_modules']!r})")
    model.lora_config = cfg
    freeze_all_but_adapters(model)
    if verbose:
        print_trainable(model)
    return model
