"""A (merged) model out in the Hugging Face layout, loadable by transformers, vLLM, llama.cpp's converter.

config.json is the source's own dict with only what changed updated (vocab_size, dtype);
weights are safetensors with `{"format": "pt"}` metadata, sharded with an index past
`max_shard_size`; a tied head is not written (the HF convention).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .hub import INDEX_FILE, SINGLE_FILE, repo_id_for
from .lora import lora_layers
from .new_tokens import has_token_rows
from .quant import NF4Linear

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_size(size: int | str) -> int:
    """Bytes from 5_000_000, "5GB" (10^9, as transformers counts) or "4GiB" (2^30)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r} not understood; use an int of bytes or e.g. '5GB', '500MB', '4GiB'")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def _source_folder(model: nn.Module) -> Path | None:
    """The folder the model was loaded from, if it is on this machine (never downloads)."""
    source = getattr(model, "source", "") or ""
    if not source:
        return None
    try:
        repo = repo_id_for(source)
    except (FileNotFoundError, ValueError):
        return None
    if repo is None:
        return Path(source)
    try:  # a hub id: use the cached files if they are there, without asking the network
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo, "config.json")
        return Path(hit).parent if isinstance(hit, str) else None
    except Exception:  # noqa: BLE001 - a missing cache only means no generation_config copy
        return None


def _shards(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in key order; a tensor larger than the limit gets a shard of its own."""
    shards, size = [{}], 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def save_model(model: nn.Module, path: str | Path, tokenizer=None, *, max_shard_size: int | str = "5GB") -> None:
    """Write the model in the HF layout: config.json, safetensors (sharded past max_shard_size),
    tokenizer files (tokenizer.save) and the source's generation_config.json when available."""
    if lora_layers(model) or has_token_rows(model):
        raise ValueError("model has LoRA layers or new-token rows: call md.merge_lora(model) first to "
                         "export a merged checkpoint, or md.save_adapter(model, dir) to save the adapter")
    if any(isinstance(m, NF4Linear) for m in model.modules()):
        raise ValueError("model has 4-bit (NF4) layers, which no HF tool reads in our layout: call "
                         "md.merge_lora(model) first, which decodes them into 16-bit weights")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("model*.safetensors"), out / INDEX_FILE]:  # stale shards would shadow the new files
        old.unlink(missing_ok=True)

    tied = model.lm_head.weight is model.model.embed_tokens.weight
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    dtype = model.model.embed_tokens.weight.dtype
    shards = _shards(state, parse_size(max_shard_size))
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    raw = dict(model.config.raw)
    raw["vocab_size"] = model.model.embed_tokens.weight.shape[0]
    raw["torch_dtype"] = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if "dtype" in raw:  # newer transformers write `dtype`; keep both in agreement
        raw["dtype"] = raw["torch_dtype"]
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")

    src = _source_folder(model)
    if src is not None and (src / "generation_config.json").exists() and src.resolve() != out.resolve():
        shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
    if tokenizer is not None:
        tokenizer.save(out)
