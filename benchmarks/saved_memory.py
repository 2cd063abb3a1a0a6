"""What a training step holds in memory: saved-activation bytes (saved_tensors_hooks), the step's
peak, and the bytes a model and its optimizer own.

    from saved_memory import saved_bytes, saved_bytes_per_token   # benchmarks/ on sys.path
    n = saved_bytes(lambda: block(x), exclude=model.parameters())

Each storage counts once (a view saved by several ops, or one input saved by base and LoRA
alike, is one allocation), whole (a saved view keeps its whole storage alive). Tensors sharing
storage with `exclude` (parameters, buffers) are not activations and are skipped.
`saved_bytes_per_token` takes the slope between two token counts, so per-step constants
(casts of weights, r x in LoRA matrices) drop out and only what grows with the tokens remains.

`step_peak_bytes` runs a step and returns the most memory it held above what was allocated when
it began: CUDA's caching-allocator counters, or on the CPU the allocation and free events of
torch.profiler (profile_memory=True), summed in time order (tensor allocations only, like CUDA's
counter: no Python objects, no allocator slack). `owned_bytes` is what a model's parameters,
buffers (bitsandbytes quant states too) and optimizer state hold, so that owned + step peak is
a step's peak with nothing else that happens to be resident counted.

    python benchmarks/saved_memory.py   # one SmolLM2-135M-shaped block, LoRA r16 on the seven projections
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable
from typing import Any

import torch


def saved_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while fn() runs (fn's result is kept alive
    until counting is done, so nothing saved is freed and re-used under the same address)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip and s.nbytes():
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def saved_bytes_per_token(fn_of_tokens: Callable[[int], Any], exclude: Iterable[torch.Tensor] = (),
                          tokens: tuple[int, int] = (128, 256)) -> float:
    """(saved(T2) - saved(T1)) / (T2 - T1): bytes saved per extra token, constants removed.
    fn_of_tokens(T) runs the forward on T tokens (e.g. a (1, T, H) input)."""
    exclude = list(exclude)
    a, b = (saved_bytes(lambda n=n: fn_of_tokens(n), exclude) for n in tokens)
    return (b - a) / (tokens[1] - tokens[0])


def _quant_state_tensors(p: torch.Tensor) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes Params4bit's quant state (absmax, code, nested absmax), which
    are attributes of the parameter, not buffers of the module."""
    qs, out = getattr(p, "quant_state", None), []
    while qs is not None:
        out += [t for t in (getattr(qs, "absmax", None), getattr(qs, "code", None)) if isinstance(t, torch.Tensor)]
        qs = getattr(qs, "state2", None)
    return out


def owned_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer | None = None,
                device: torch.device | str | None = None) -> int:
    """Bytes of the distinct storages of model's parameters and buffers (with bitsandbytes quant
    states) and opt's state, on `device` when given."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for p in model.parameters() for t in _quant_state_tensors(p)]
    if opt is not None:
        tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    dev = None if device is None else torch.device(device)
    seen: dict[int, int] = {}
    for t in tensors:
        if dev is not None and t.device.type != dev.type:
            continue
        s = t.untyped_storage()
        seen.setdefault(s.data_ptr(), s.nbytes())
    return sum(seen.values())


def step_peak_bytes(step: Callable[[], Any], device: torch.device | str) -> int:
    """Run step() once; return the most bytes it had allocated at any moment above what was
    allocated when it began (see the module docstring for how, per device)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def _block_rows(layers: int = 1) -> list[dict]:
    """Ours, one SmolLM2-135M-shaped block: LoRA and QLoRA, fp32 and bf16 autocast (bf16 weights)."""
    import minidistill as md
    from minidistill.config import ModelConfig
    from minidistill.model import Transformer
    from minidistill.quant import NF4Linear

    shape = dict(model_type="llama", vocab_size=512, hidden_size=576, intermediate_size=1536,
                 num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                 rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True, hidden_act="silu")
    rows = []
    for quant in (False, True):
        for mode in ("fp32", "bf16-autocast"):
            dtype = torch.bfloat16 if mode != "fp32" else torch.float32
            torch.manual_seed(0)
            model = Transformer(ModelConfig.from_hf(shape)).to(dtype)
            model.requires_grad_(False)
            if quant:
                for mod in list(model.model.layers.modules()):
                    for name, child in list(mod.named_children()):
                        if isinstance(child, torch.nn.Linear):
                            setattr(mod, name, NF4Linear.from_linear(child))
            md.apply_lora(model, md.LoraConfig(r=16, alpha=16), verbose=False)
            block = model.model.layers[0]
            exclude = [*model.parameters(), *model.buffers()]

            def run(T: int, block=block, model=model, dtype=dtype, mode=mode):
                x = torch.randn(1, T, shape["hidden_size"], dtype=dtype, requires_grad=True)
                cos, sin = model.rotary(torch.arange(T)[None], dtype, T)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
                    return block(x, cos, sin, None, None)

            per_tok = saved_bytes_per_token(run, exclude)
            rows.append(dict(base="nf4" if quant else "dense", mode=mode, saved_bytes_per_token=per_tok,
                             hidden_units=per_tok / (shape["hidden_size"] * (2 if dtype != torch.float32 else 4))))
    return rows


if __name__ == "__main__":
    rows = _block_rows()
    print("saved activations per token, one block (hidden 576, MLP 1536, 9/3 heads), LoRA r16 x 7, ours")
    print(f"{'base':6s} {'mode':14s} {'bytes/token':>12s} {'x hidden':>9s}")
    for r in rows:
        print(f"{r['base']:6s} {r['mode']:14s} {r['saved_bytes_per_token']:12.0f} {r['hidden_units']:9.2f}")
    print(json.dumps({"bench": "saved_memory", "rows": rows}))
