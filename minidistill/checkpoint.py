"""Safetensors checkpoints in (single or sharded, HF layout) and out.

Weights come from safetensors only: nothing here unpickles a file. The model is built on
the meta device and each tensor is read, converted and moved one at a time, so host
memory holds at most about one copy of the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .hub import INDEX_FILE, SINGLE_FILE, resolve_model_dir
from .model import Transformer

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(dtype: torch.dtype | str | None, cfg: ModelConfig) -> torch.dtype:
    """A torch dtype from a dtype, a name ("bf16", "fp32", ...) or "auto" (the checkpoint's)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = cfg.raw.get("torch_dtype") or cfg.raw.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, read from the index when sharded."""
    index = folder / INDEX_FILE
    if index.exists():
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [folder / s for s in shards]
        missing = [str(p) for p in files if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not on disk: {missing}")
        return files
    if (folder / SINGLE_FILE).exists():
        return [folder / SINGLE_FILE]
    found = sorted(p.name for p in folder.glob("*"))
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder} (found: {found}); "
                            "minidistill reads safetensors only, never .bin/.pth pickles")


def load_model(name_or_path: str, dtype: torch.dtype | str | None = torch.bfloat16,
               device: str | torch.device = "cpu", quantize: str | None = None) -> Transformer:
    """Load a checkpoint (preset name, hub repo id or local folder) into a Transformer.

    dtype: torch dtype, "bf16"/"fp16"/"fp32", or "auto" for the checkpoint's own.
    quantize: None, or "nf4" for a 4-bit base (QLoRA).
    """
    if quantize is not None:
        raise ValueError(f"quantize={quantize!r} is not supported yet; valid: None")
    folder = resolve_model_dir(str(name_or_path))
    cfg = ModelConfig.from_file(folder / "config.json")
    dtype = resolve_dtype(dtype, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key not in expected:
                    # Tied checkpoints sometimes still carry the head; rotary tables are derived.
                    if not (key == "lm_head.weight" and cfg.tie_word_embeddings) and not key.endswith("rotary_emb.inv_freq"):
                        unexpected.append(key)
                    continue
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(expected[key].shape):
                    raise ValueError(f"{path.name}: {key} has shape {tuple(t.shape)}, the config "
                                     f"implies {tuple(expected[key].shape)}")
                state[key] = t.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match a {cfg.model_type} model: "
                         f"missing keys {missing[:10]}{' …' if len(missing) > 10 else ''}, "
                         f"unexpected keys {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}")
    model.load_state_dict(state, assign=True, strict=not cfg.tie_word_embeddings)
    model.tie_weights()
    model.source = str(name_or_path)  # recorded in adapters as base_model_name_or_path
    return model.eval()
