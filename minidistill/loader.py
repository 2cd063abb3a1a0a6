"""Safetensors checkpoints in (single or sharded, HF layout) and out.

Weights come from safetensors only: nothing here unpickles a file. The model is built on
the meta device and each tensor is read, converted and moved one at a time, so host
memory holds at most about one copy of the model. With quantize="nf4" each block linear is
quantized on the device as it arrives; pre-quantized bitsandbytes NF4 checkpoints are read
as they are (helpers for both in quant.py).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .hub import INDEX_FILE, SINGLE_FILE, resolve_model_dir
from .model import Transformer
from .bnb_format import (BNB_SUFFIXES, block_linear_paths, bnb_nf4_config, check_quantize,
                         nf4_state_from_bnb_tensors, prequantized_paths)
from .quant import NF4Linear, NF4State, quantize_nf4
from .rope import parse_rope_scaling
from .tokenizer import load_tokenizer

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


def _read_bnb(tensors: dict[str, torch.Tensor], shape: tuple[int, ...], where: str) -> tuple[torch.Tensor, NF4State]:
    """One module's bnb tensors (`weight`, `weight.absmax`, ...) -> packed bytes and NF4State."""
    packed, qstate = nf4_state_from_bnb_tensors(tensors, "weight")
    if qstate.shape != shape or packed.numel() != (math.prod(shape) + 1) // 2:
        raise ValueError(f"{where}: 4-bit weight of shape {qstate.shape} ({packed.numel()} bytes), "
                         f"the config implies {shape}")
    return packed, qstate


@contextmanager
def open_weights(path: Path):
    """safe_open, with a damaged (truncated, partly downloaded) file named in a one-line error."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{path} is damaged ({e}); it is not a complete safetensors file: download it again "
                         "(huggingface-cli download REPO --force-download, or delete it from the hub cache)") from None


def load_model(name_or_path: str, dtype: torch.dtype | str | None = torch.bfloat16,
               device: str | torch.device = "cpu", quantize: str | None = None,
               rope_scaling: dict | str | None = None) -> Transformer:
    """Load a checkpoint (preset name, hub repo id or local folder) into a Transformer.

    dtype: torch dtype, "bf16"/"fp16"/"fp32", or "auto" for the checkpoint's own; the compute
        dtype, and the dtype of every weight kept in 16 bits.
    quantize: None, or "nf4" for a 4-bit base (QLoRA): the linear layers of the blocks become
        NF4Linear, quantized one tensor at a time on `device`; embeddings, norms and the head
        stay in `dtype`. A pre-quantized bitsandbytes NF4 checkpoint ("-bnb-4bit" repos) loads
        in 4-bit whatever `quantize` says; its 16-bit modules (llm_int8_skip_modules) stay so.
    rope_scaling: extend the context of a model with plain rope: a rope_scaling dict, or
        "linear:F" / "dynamic:F" / "yarn:F[:ORIGINAL]" (`rope.parse_rope_scaling`). The model's
        config (and so a merged export's config.json) then carries it.
    """
    check_quantize(quantize)
    folder = resolve_model_dir(str(name_or_path))
    cfg = ModelConfig.from_file(folder / "config.json")
    if rope_scaling:
        cfg = cfg.with_rope_scaling(parse_rope_scaling(rope_scaling) if isinstance(rope_scaling, str)
                                    else rope_scaling)
    dtype = resolve_dtype(dtype, cfg)
    prequant = bnb_nf4_config(cfg.raw, str(folder / "config.json"))
    with torch.device("meta"):
        model = Transformer(cfg)
    files = weight_files(folder)
    nf4: set[str] = set()  # module paths that become NF4Linear
    if prequant is not None:
        keys = set()
        for path in files:
            with open_weights(path) as f:
                keys.update(f.keys())
        nf4 = prequantized_paths(keys, block_linear_paths(model), prequant, str(folder))
    elif quantize == "nf4":
        nf4 = set(block_linear_paths(model))
    expected = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in nf4
                or not k.endswith(".weight")}  # a 4-bit module's bias stays 16-bit
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, tuple[torch.Tensor, NF4State]] = {}  # path -> packed bytes, state
    bnb: dict[str, dict[str, torch.Tensor]] = {p: {} for p in nf4}  # path -> file's bnb tensors
    unexpected: list[str] = []
    for path in files:
        with open_weights(path) as f:
            for key in f.keys():
                module, _, leaf = key.partition(".weight")
                if module in nf4 and leaf.removeprefix(".") in ("", *BNB_SUFFIXES):
                    t = f.get_tensor(key)
                    if prequant is not None:  # already packed: bytes and scales as they are
                        bnb[module]["weight" + leaf] = t.to(device)
                        continue
                    shape = tuple(model.get_submodule(module).weight.shape)
                    if tuple(t.shape) != shape:
                        raise ValueError(f"{path.name}: {key} has shape {tuple(t.shape)}, the config implies {shape}")
                    # Quantize on the device in the compute dtype, then drop the dense copy:
                    # the whole 16-bit model is never resident there.
                    quantized[module] = quantize_nf4(t.to(device=device, dtype=dtype))
                    del t
                    continue
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
    if prequant is not None:
        for p in nf4:
            if "weight" in bnb[p]:
                quantized[p] = _read_bnb(bnb.pop(p), tuple(model.get_submodule(p).weight.shape), f"{folder}: {p}")
    missing = sorted(set(expected) - set(state)) + sorted(f"{p}.weight" for p in nf4 - set(quantized))
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match a {cfg.model_type} model: "
                         f"missing keys {missing[:10]}{' …' if len(missing) > 10 else ''}, "
                         f"unexpected keys {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}")
    # Swap the meta nn.Linears for NF4Linear before assigning the 16-bit rest.
    for p, (packed, qstate) in quantized.items():
        parent, _, name = p.rpartition(".")
        setattr(model.get_submodule(parent), name, NF4Linear(packed, qstate, state.pop(f"{p}.bias", None)))
    model.load_state_dict(state, assign=True, strict=False)  # keys were checked above
    model.tie_weights()
    model.source = str(name_or_path)  # recorded in adapters as base_model_name_or_path
    return model.eval()


# ---------------------------------------------------------------------------- inference

def default_device() -> str:
    """"cuda" when a GPU is visible, else "cpu": the --device default of the inference commands."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(dtype: str, device: str) -> str:
    """A --dtype flag's value, with "auto" read as bf16 on GPU and fp32 on CPU."""
    return dtype if dtype != "auto" else ("bf16" if str(device).startswith("cuda") else "fp32")


def load_for_inference(model_name: str, adapter: str | None = None, dtype: str = "auto",
                       device: str | None = None, rope_scaling: dict | str | None = None):
    """(model in eval mode with the adapter applied, tokenizer) for generation and evaluation;
    dtype "auto" is bf16 on GPU, fp32 on CPU; device defaults to `default_device()`; rope_scaling
    as `load_model`'s (the one an adapter was trained with, its README says which)."""
    from .adapter import load_adapter  # the adapter format sits above the loader: import on use

    device = device or default_device()
    model = load_model(model_name, dtype=inference_dtype(dtype, device), device=device, rope_scaling=rope_scaling)
    if adapter:
        load_adapter(model, adapter)
    # An adapter trained with --add-tokens carries the tokenizer that knows them.
    tok_from = adapter if adapter and (Path(adapter) / "tokenizer.json").is_file() else model_name
    return model.eval(), load_tokenizer(tok_from)  # eval after the swap: LoRA dropout stays off
