"""The bitsandbytes checkpoint format of NF4 weights ("-bnb-4bit" repos), and what
`loader.load_model` quantizes.

`nf4_state_from_bnb_tensors` / `nf4_state_to_bnb_tensors` read and write the state-dict keys of
bnb's Linear4bit (`X.weight`, `X.weight.absmax`, ..., `X.weight.quant_state.bitsandbytes__nf4`);
`bnb_nf4_config` accepts only NF4 quantization configs; `prequantized_paths` finds the 4-bit
modules of a pre-quantized file; `block_linear_paths` the linears quantized while loading.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn as nn

from .quant import NF4State


# ---- pre-quantized "-bnb-4bit" checkpoints ------------------------------------------------
def nf4_state_from_bnb_tensors(
    tensors: Mapping[str, torch.Tensor], prefix: str = "weight"
) -> tuple[torch.Tensor, NF4State]:
    """Read `{prefix}`, `{prefix}.absmax`, … (bnb Linear4bit state-dict keys) into an NF4State."""
    qs_key = f"{prefix}.quant_state.bitsandbytes__nf4"
    if qs_key not in tensors:
        found = sorted(k for k in tensors if k.startswith(f"{prefix}.quant_state."))
        raise KeyError(f"{qs_key!r} not found (only NF4 is supported); quant_state keys: {found}")
    meta = json.loads(bytes(tensors[qs_key].cpu().tolist()).decode("utf-8"))
    if meta["quant_type"] != "nf4":
        raise ValueError(f"{prefix}: quant_type {meta['quant_type']!r} is not 'nf4'")
    packed = tensors[prefix]
    if packed.dtype != torch.uint8:  # bnb's quant_storage may be another dtype over the same bytes
        packed = packed.contiguous().view(torch.uint8).reshape(-1, 1)
    state = NF4State(
        absmax=tensors[f"{prefix}.absmax"], code=tensors[f"{prefix}.quant_map"].float(),
        blocksize=int(meta["blocksize"]), shape=tuple(meta["shape"]),
        dtype=getattr(torch, meta["dtype"]),
    )
    if f"{prefix}.nested_absmax" in tensors:
        state = replace(
            state, nested_absmax=tensors[f"{prefix}.nested_absmax"].float(),
            nested_code=tensors[f"{prefix}.nested_quant_map"].float(),
            offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32,
                                device=state.absmax.device),
            nested_blocksize=int(meta["nested_blocksize"]),
        )
    return packed, state


def nf4_state_to_bnb_tensors(
    packed: torch.Tensor, state: NF4State, prefix: str = "weight"
) -> dict[str, torch.Tensor]:
    """The inverse: the tensors bnb's Linear4bit writes to its state dict, under `prefix`."""
    out = {prefix: packed, f"{prefix}.absmax": state.absmax, f"{prefix}.quant_map": state.code}
    # Same keys, order and json.dumps defaults as bnb's QuantState.as_dict(packed=True).
    meta = {"quant_type": "nf4", "blocksize": state.blocksize,
            "dtype": str(state.dtype).removeprefix("torch."), "shape": list(state.shape)}
    if state.nested:
        out[f"{prefix}.nested_absmax"] = state.nested_absmax
        out[f"{prefix}.nested_quant_map"] = state.nested_code.clone()  # unshared for safetensors
        meta |= {"nested_blocksize": state.nested_blocksize, "nested_dtype": "float32",
                 "nested_offset": state.offset.item()}
    blob = json.dumps(meta).encode("utf-8")
    out[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
    return out


# ---- loading: quantize while loading, or read a pre-quantized "-bnb-4bit" checkpoint --------
QUANTIZE_MODES = (None, "nf4")
BNB_NF4_KEY = "quant_state.bitsandbytes__nf4"  # suffix of `X.weight.` marking a 4-bit module
BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", BNB_NF4_KEY)
_SUPPORTED_CONFIG = ("quant_method 'bitsandbytes' with load_in_4bit=true and "
                     "bnb_4bit_quant_type 'nf4' (with or without double quant)")


def check_quantize(quantize: str | None) -> None:
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r} is not supported; valid: {', '.join(map(repr, QUANTIZE_MODES))}")


def bnb_nf4_config(raw: Mapping, where: str) -> dict | None:
    """The `quantization_config` of a pre-quantized bitsandbytes NF4 checkpoint, None when the
    config has none; any other quantization (fp4, 8-bit, GPTQ, AWQ, ...) fails naming what works."""
    qc = raw.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method")
    four_bit = qc.get("load_in_4bit", qc.get("_load_in_4bit", False))
    eight_bit = qc.get("load_in_8bit", qc.get("_load_in_8bit", False))
    qtype = qc.get("bnb_4bit_quant_type", "fp4")  # bnb's own default is fp4
    if method != "bitsandbytes" or not four_bit or eight_bit or qtype != "nf4":
        found = {k: qc.get(k) for k in ("quant_method", "load_in_4bit", "load_in_8bit",
                                        "bnb_4bit_quant_type", "bits") if k in qc}
        raise ValueError(f"{where}: quantization_config {found} is not supported; supported: "
                         f"{_SUPPORTED_CONFIG}, or a 16-bit checkpoint (with quantize='nf4' to "
                         "quantize while loading)")
    return dict(qc)


def block_linear_paths(model: nn.Module) -> list[str]:
    """The nn.Linear layers inside the blocks (`model.layers.*`): what gets quantized."""
    return [n for n, m in model.named_modules()
            if n.startswith("model.layers.") and isinstance(m, nn.Linear)]


def _skip_listed(path: str, skip: list[str]) -> bool:
    # transformers' prefix-at-a-module-boundary and suffix rules (its regex rule is left out:
    # older writers matched plain substrings, which these two rules imply).
    return any(path.endswith(k) or path == k or path.startswith(k + ".") for k in skip)


def prequantized_paths(keys: set[str], linears: list[str], qc: dict, where: str) -> set[str]:
    """Module paths stored in 4-bit in a pre-quantized checkpoint: those whose weight carries a
    bnb NF4 quant state. The file decides; `llm_int8_skip_modules` must agree with it."""
    bad = sorted(k for k in keys if ".weight.quant_state." in k and not k.endswith(BNB_NF4_KEY))
    if bad:
        raise ValueError(f"{where}: {bad[:3]} are not NF4 quant states; supported: {_SUPPORTED_CONFIG}")
    paths = {k[: -len(".weight." + BNB_NF4_KEY)] for k in keys if k.endswith(".weight." + BNB_NF4_KEY)}
    outside = sorted(paths - set(linears))
    if outside:
        raise ValueError(f"{where}: {outside[:5]} are 4-bit, but only the linear layers of the blocks "
                         "can be; embeddings, norms and the head must be 16-bit in the file")
    skip = list(qc.get("llm_int8_skip_modules") or [])
    contradict = sorted(p for p in paths if _skip_listed(p, skip))
    if contradict:
        raise ValueError(f"{where}: {contradict[:5]} are 4-bit in the file but llm_int8_skip_modules "
                         f"{skip} says they are not quantized; the checkpoint is inconsistent")
    return paths
