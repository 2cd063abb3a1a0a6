"""LoRA as a module swap: `LoRALinear` / `NF4LoRALinear`, `apply_lora`, `merge_lora`.

`apply_lora` replaces target linears in the blocks by `LoRALinear`, which keeps the frozen base
under the same state-dict keys (`...q_proj.weight`) and adds `lora_A` / `lora_B` like PEFT
(`...q_proj.lora_A.weight`); adapter files are adapter.py's business, new-token rows
new_tokens.py's. QLoRA: an `NF4Linear` target becomes `NF4LoRALinear`, the same layer over the
4-bit base (its packed keys unchanged); `merge_lora` decodes such layers into 16-bit `nn.Linear`s.
Fused Phi-3 models: q/k/v_proj mean `qkv_proj` and gate/up_proj `gate_up_proj` (every family).

The LoRA branch (`_LoRAFunction`): A and B stay fp32 master weights, the matmuls run in the
compute dtype (autocast's inside autocast, else the input's), and backward keeps only what it
needs: the input once (for A's gradient), x @ A^T (r wide, for B's), and references to the
frozen weights; the base needs no saved input. Projections reading the same input (q/k/v,
gate/up) run one A matmul through `LoRALinear.group_forward`. Two prologues go further: given
the block's RMSNorm, `group_forward` runs the norm inside and saves only the norm's input (which
its own backward needs anyway), not its output; `swiglu_forward` takes gate and up for the down
projection and rebuilds silu(gate) * up in backward (fused.py holds the maths).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import prepacked
from .cli import flag_field
from .fused import rms_norm_backward, rms_norm_forward, swiglu, swiglu_backward
from .new_tokens import merge_token_rows
from .quant import (NF4Linear, NF4State, dense_linear, dequantize_nf4, nf4_linear, nf4_matmul, nf4_matmul_weight,
                    nf4_state_of, register_nf4_weight)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class LoraConfig:
    """r, alpha (scale alpha/r, or alpha/sqrt(r) with rsLoRA), dropout on the LoRA input, targets.

    targets: last module-name components (`q_proj`, ...), or "all-linear" for every linear in the
    blocks. On fused Phi-3 models q/k/v_proj mean `qkv_proj` and gate/up_proj mean `gate_up_proj`.
    """

    r: int = flag_field(16, "LoRA rank", flag="--lora-r")
    alpha: float = flag_field(16.0, "LoRA alpha (scale = alpha / r)", flag="--lora-alpha")
    dropout: float = flag_field(0.0, "dropout on the LoRA input", flag="--lora-dropout")
    targets: tuple[str, ...] | str = flag_field(DEFAULT_TARGETS, "comma-separated module names, or all-linear",
                                                flag="--lora-targets")
    use_rslora: bool = flag_field(False, "rank-stabilised LoRA: scale = alpha / sqrt(r)", flag="--use-rslora")

    def scaling(self, r: int | None = None, alpha: float | None = None) -> float:
        r, alpha = r or self.r, self.alpha if alpha is None else alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmuls of `x` run in: autocast's inside autocast, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _LoRAFunction(torch.autograd.Function):
    """y_i = base_i(x) + s_i * (xl @ A_i^T) @ B_i^T for LoRA layers i reading the same x, every
    matmul in `cdt`, one A matmul for all layers ([A_0; A_1; ...], split by rank).

    x comes from `kind` and the inputs p0, p1:
    - None: x = p0 (already in cdt); xl = p1 (the dropout output) or, when p1 is None, x itself.
      Saved: xl, for A's gradient.
    - "rmsnorm": x = xl = rmsnorm(p0; weight p1, `eps`) in cdt, the block's norm run here so
      that its output is never saved: p0 and 1/rms are, and x is rebuilt in backward.
    - "swiglu": x = xl = silu(p0) * p1 in cdt (the MLP's down projection); saved: p0 and p1,
      which plain autograd would keep anyway, instead of x.
    Also saved: a = xl @ A^T (r wide, B's gradient), the frozen base weights by reference (an NF4
    base is decoded again in backward). Inputs after p1: (W, b, A, B) per layer. out_needed=False (a
    recomputed block, whose output is dropped): the same tensors saved, no base matmul, zeros out.
    """

    @staticmethod
    def forward(ctx, mods: tuple, cdt: torch.dtype, kind: str | None, eps: float, out_needed: bool, p0: Tensor,
                p1: Tensor | None, *weights: Tensor | None):
        W, b, A, B = weights[0::4], weights[1::4], weights[2::4], weights[3::4]
        rstd = None
        if kind == "rmsnorm":
            h, rstd = rms_norm_forward(p0, p1, eps)
            x = xl = h.to(cdt)
        elif kind == "swiglu":
            x = xl = (F.silu(p0) * p1).to(cdt)
        else:
            x, xl = p0, p0 if p1 is None else p1
        a = F.linear(xl, torch.cat([t.to(cdt) for t in A]))  # (..., sum r_i)
        a2 = a.view(-1, a.shape[-1])  # (N, sum r_i)
        outs, lo = [], 0
        for m, w, bias, Bi in zip(mods, W, b, B):
            if not out_needed:  # a checkpointed block's recomputation: only what is saved matters
                outs.append(a.new_zeros(()).expand(*x.shape[:-1], m.out_features))
                continue
            y = m._base_matmul(x, w, None if bias is None else bias.to(cdt), cdt)  # (..., out_i)
            hi = lo + Bi.shape[1]
            # In place, scale folded into the (out_i, r_i) B: no (N, out_i) temporaries.
            y.view(-1, y.shape[-1]).addmm_(a2[:, lo:hi], (Bi * m.scaling).to(cdt).t())
            outs.append(y)
            lo = hi
        need = ctx.needs_input_grad[7:]
        ctx.mods, ctx.cdt, ctx.kind, ctx.x_shape = mods, cdt, kind, x.shape
        if kind == "rmsnorm":
            keep = (p0, p1, rstd)
        elif kind == "swiglu":
            keep = (p0, p1)
        else:
            keep = (xl if any(need[2::4]) else None,)
        ctx.n_keep = len(keep)
        ctx.save_for_backward(*keep, a if any(need[3::4]) else None, *weights)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        saved = ctx.saved_tensors
        keep, a, weights = saved[:ctx.n_keep], saved[ctx.n_keep], saved[ctx.n_keep + 1:]
        W, A, B = weights[0::4], weights[2::4], weights[3::4]
        mods, cdt, kind = ctx.mods, ctx.cdt, ctx.kind
        need_p0, need_p1 = ctx.needs_input_grad[5:7]
        need = ctx.needs_input_grad[7:]
        has_xl = kind is None and need_p1  # a separate dropout output with its own gradient
        need_x = need_p0 if kind is None else (need_p0 or need_p1)
        gx, ga, per_layer = None, [], []
        lo = 0
        for i, (m, g, w, Bi) in enumerate(zip(mods, grads, W, B)):
            g2 = g.reshape(-1, g.shape[-1])  # (N, out_i)
            if need_x:  # through the frozen base
                wd = m._dense_base(w, cdt)  # (out_i, in)
                gx = g2 @ wd if gx is None else gx.addmm_(g2, wd)
            ga.append(g2 @ (Bi * m.scaling).to(cdt))  # (N, r_i): dL/da_i
            hi = lo + Bi.shape[1]
            gb = g2.sum(0) if need[4 * i + 1] else None
            gB = None
            if need[4 * i + 3]:
                gB = (g2.t() @ a.view(-1, a.shape[-1])[:, lo:hi]).mul_(m.scaling).to(Bi.dtype)  # (out_i, r_i)
            per_layer.append([gb, gB])
            lo = hi
        ga = torch.cat(ga, dim=1) if len(ga) > 1 else ga[0]  # (N, sum r_i)
        gA = [None] * len(mods)
        # What the prologue's output and its backward share, computed once: x / rms (fp32) of the
        # norm, silu(gate) of the SwiGLU.
        pre = None
        if kind is not None and (need_x or any(need[2::4])):
            pre = keep[0].float() * keep[2] if kind == "rmsnorm" else F.silu(keep[0])
        if any(need[2::4]):
            if kind == "rmsnorm":
                xl = (keep[1] * pre.to(keep[0].dtype)).to(cdt)  # the norm's output again, bit for bit
            elif kind == "swiglu":
                xl = (pre * keep[1]).to(cdt)
            else:
                xl = keep[0]
            gA_cat = ga.t() @ xl.reshape(-1, xl.shape[-1])  # (sum r_i, in)
            gA = [t.to(Ai.dtype) for t, Ai in zip(gA_cat.split([Ai.shape[0] for Ai in A]), A)]
            del xl  # not kept through the input gradient below
        g0 = g1 = None
        if has_xl or need_x:
            A_cat = torch.cat([t.to(cdt) for t in A])  # (sum r_i, in)
            if has_xl:
                g1 = (ga @ A_cat).view(ctx.x_shape)
            else:  # xl is x: one gradient, accumulated in place
                gx = ga @ A_cat if gx is None else gx.addmm_(ga, A_cat)
        if need_x:
            gx = gx.view(ctx.x_shape)
            if kind == "rmsnorm":
                g0, g1 = rms_norm_backward(gx, keep[0], keep[1], keep[2], need_p1, n32=pre)
            elif kind == "swiglu":
                g0, g1 = swiglu_backward(gx, keep[0], keep[1], silu_gate=pre)
            else:
                g0 = gx
        out = [None, None, None, None, None, g0 if need_p0 else None, g1 if need_p1 else None]
        for (gb, gB), gAi in zip(per_layer, gA):
            out += [None, gb, gAi, gB]
        return tuple(out)


def _fusable(m: nn.Module) -> bool:
    """A LoRA layer the shared-input function serves: unmerged, frozen base, no active dropout."""
    return (isinstance(m, LoRALinear) and not m.merged and not m.weight.requires_grad
            and (isinstance(m.dropout, nn.Identity) or not m.dropout.training))


class LoRALinear(nn.Module):
    """y = base(x) + lora_B(lora_A(dropout(x))) * scaling; the base is frozen.

    The base lives in `base_forward` / `_dense_base` only, so a quantized base (NF4) subclasses
    and overrides those two. With dropout > 0 (in training) each layer draws its own mask, as
    PEFT's do, so `group_forward` runs such layers one by one (each still saves its input once).
    """

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # same keys as the nn.Linear replaced
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # LoRA weights stay fp32 whatever the base dtype: bf16 would round away small updates
        # (and AdamW's state follows the parameter dtype).
        self._init_adapter(r, scaling, dropout, base.weight.device, torch.float32)

    def _init_adapter(self, r: int, scaling: float, dropout: float, device: torch.device, dtype: torch.dtype) -> None:
        kw = dict(device=device, dtype=dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)  # kaiming_uniform(a=√5), PEFT's init
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapter starts as the identity
        self.r, self.scaling = r, scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def base_forward(self, x: Tensor) -> Tensor:
        return prepacked.linear(x, self.weight, self.bias)

    def _dense_base(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """The base weight (out, in) in `dtype` for one matmul; `weight` is this layer's `weight`."""
        return weight.to(dtype)

    def _base_matmul(self, x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
        """x @ base^T + bias in `dtype` (x and bias already in it): the forward's base matmul."""
        return prepacked.linear(x, self._dense_base(weight, dtype), bias)

    def delta_weight(self) -> Tensor:
        """B @ A * scaling in fp32, (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge(self) -> None:
        """Fold the update into the base weight (fp32 sum, cast back). Idempotent."""
        if self.merged:
            return
        with torch.no_grad():
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    def _function_inputs(self) -> tuple[Tensor | None, ...]:
        return self.weight, self.bias, self.lora_A.weight, self.lora_B.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_forward(x)
        cdt = compute_dtype(x)
        if self.weight.requires_grad:  # someone unfroze the base: plain autograd, which gives its gradient
            a = F.linear(self.dropout(x).to(cdt), self.lora_A.weight.to(cdt))
            y = self.base_forward(x)
            return y + (F.linear(a, self.lora_B.weight.to(cdt)) * self.scaling).to(y.dtype)
        x = x.to(cdt)  # one cast (none when x is already in cdt), shared by base and A
        xl = self.dropout(x)
        xl = None if xl is x else xl  # no dropout: x passed once (a tensor twice breaks a compiled graph)
        return _LoRAFunction.apply((self,), cdt, None, 0.0, True, x, xl, *self._function_inputs())[0]

    group_takes_norm = True  # model.linear_group may hand group_forward the norm before the group

    @staticmethod
    def group_forward(x: Tensor, mods: Sequence[nn.Module], norm: nn.Module | None = None) -> list[Tensor]:
        """[m(x) for m in mods] (or [m(norm(x)) ...]), with one A matmul for LoRA layers sharing x.

        With `norm` (an RMSNorm: `weight`, `eps`) the norm runs inside the LoRA function, which
        saves norm's input instead of its output. Falls back to one call per module when the
        group is mixed (a plain or merged linear, active dropout, an unfrozen base); the results
        are the same either way.
        """
        if not all(_fusable(m) for m in mods) or (norm is None and len(mods) < 2):
            x = x if norm is None else norm(x)
            return [m(x) for m in mods]
        cdt = compute_dtype(x)
        inputs = [t for m in mods for t in m._function_inputs()]
        if norm is not None:
            return list(_LoRAFunction.apply(tuple(mods), cdt, "rmsnorm", norm.eps, True, x, norm.weight, *inputs))
        return list(_LoRAFunction.apply(tuple(mods), cdt, None, 0.0, True, x.to(cdt), None, *inputs))

    def swiglu_forward(self, gate: Tensor, up: Tensor, out_needed: bool = True) -> Tensor:
        """self(silu(gate) * up), saving gate and up, not their product; out_needed: _LoRAFunction's."""
        if not _fusable(self):
            return self(swiglu(gate, up))
        return _LoRAFunction.apply((self,), compute_dtype(gate), "swiglu", 0.0, out_needed, gate, up,
                                   *self._function_inputs())[0]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


class NF4LoRALinear(LoRALinear):
    """QLoRA: LoRALinear over a frozen NF4 base (an `NF4Linear`'s buffers, same state-dict keys).

    The base is decoded per matmul (Triton on CUDA; a lookup table into a reused buffer on the
    CPU) and again in backward for the input gradient: no 16-bit copy is kept, no weight gradient
    exists. The LoRA weights are fp32 whatever the compute dtype.
    """

    def __init__(self, base: NF4Linear, r: int, scaling: float, dropout: float = 0.0):
        nn.Module.__init__(self)
        register_nf4_weight(self, base.weight, base.state)  # shares the tensors, no copy
        self.register_parameter("bias", base.bias)  # frozen by NF4Linear
        self._init_adapter(r, scaling, dropout, base.weight.device, torch.float32)

    @property
    def state(self) -> NF4State:
        return nf4_state_of(self)

    def base_forward(self, x: Tensor) -> Tensor:
        return nf4_linear(x, self.weight, self.state, self.bias)

    def _dense_base(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        return nf4_matmul_weight(weight, self.state, dtype)  # valid until the next decode: used at once

    def _base_matmul(self, x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
        return nf4_matmul(x, weight, self.state, bias)  # few rows on CUDA: the 4-bit matvec kernel

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The base weight [out, in] decoded to `dtype` (default: the original weight's)."""
        return dequantize_nf4(self.weight, self.state, dtype)

    def merge(self) -> None:
        raise TypeError("a 4-bit base cannot hold a merged weight; call md.merge_lora(model), which "
                        "replaces this layer by a 16-bit nn.Linear (or use merged_linear(dtype))")

    def merged_linear(self, dtype: torch.dtype) -> nn.Linear:
        """A dense nn.Linear in `dtype` holding dequant(W) + B @ A * scaling, summed in fp32."""
        with torch.no_grad():
            return dense_linear(self.dequantize(torch.float32) + self.delta_weight(), self.bias, dtype)


# ---------------------------------------------------------------- choosing and wrapping targets

def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers inside the blocks (`model.layers.*`), the ones that can take LoRA."""
    return {n: m for n, m in model.named_modules()
            if n.startswith("model.layers.") and isinstance(m, (nn.Linear, LoRALinear, NF4Linear))}


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith("." + target)  # PEFT's rule for a list of targets


def _map_fused(targets: list[str], names: set[str]) -> list[str]:
    """q/k/v_proj -> qkv_proj and gate/up_proj -> gate_up_proj on a fused model."""
    out = []
    for t in targets:
        fused = next((f for f, parts in FUSED.items() if t in parts and f in names and t not in names), None)
        out.append(fused or t)
    return list(dict.fromkeys(out))


def resolve_targets(model: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """Module paths selected by `targets` (names, "all-linear", or a PEFT regex string)."""
    linears = _linears(model)
    names = {p.rsplit(".", 1)[-1] for p in linears}
    if targets == "all-linear" or (not isinstance(targets, str) and "all-linear" in targets):
        return list(linears)
    if isinstance(targets, str):  # PEFT: a string is a regex over the whole module path
        paths = [p for p in linears if re.fullmatch(targets, p)]
        if not paths:
            raise ValueError(f"target regex {targets!r} matches no module; modules that can take LoRA: {sorted(names)}")
        return paths
    targets = _map_fused(list(targets), names)
    for t in targets:
        if not any(_matches(p, t) for p in linears):
            raise ValueError(f"target {t!r} not found in this {model.config.model_type} model; "
                             f"modules that can take LoRA: {sorted(names)} (or 'all-linear')")
    return [p for p in linears if any(_matches(p, t) for t in targets)]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Only LoRA weights and new-token rows require grad afterwards."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 2)[-2] in ("lora_A", "lora_B") or name.endswith("new_rows"))


def print_trainable(model: nn.Module) -> None:
    """PEFT's line: trainable params, all params, trainable %."""
    params = {id(p): p for p in model.parameters()}.values()
    # 4-bit weights are buffers: count their elements too, as PEFT counts bnb's Params4bit.
    total = sum(p.numel() for p in params) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, (NF4Linear, NF4LoRALinear)))
    trainable = sum(p.numel() for p in params if p.requires_grad)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


def wrap_linears(model: nn.Module, paths: list[str], cfg: LoraConfig,
                 ranks: dict[str, tuple[int, float]] | None = None) -> None:
    """Replace each linear at `paths` by a (NF4)LoRALinear: rank and scale from `ranks` or `cfg`."""
    for path in paths:
        base = model.get_submodule(path)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{path} already has LoRA; load or apply adapters on a fresh model "
                             "(or call merge_lora first)")
        r, scaling = (ranks or {}).get(path, (cfg.r, cfg.scaling()))
        cls = NF4LoRALinear if isinstance(base, NF4Linear) else LoRALinear
        _set_module(model, path, cls(base, r, scaling, cfg.dropout))


def apply_lora(model: nn.Module, cfg: LoraConfig, *, verbose: bool = True) -> nn.Module:
    """Swap the target linears of the blocks for LoRALinear and freeze everything else.

    An NF4Linear target (a model loaded with quantize="nf4") becomes NF4LoRALinear (QLoRA, fp32
    LoRA weights); NF4 linears not targeted stay NF4Linear. Only the LoRA weights (and new-token
    rows from `add_tokens`) require grad afterwards. Prints the trainable parameter count (verbose); returns the model.
    """
    wrap_linears(model, resolve_targets(model, cfg.targets), cfg)
    model.lora_config = cfg
    freeze_all_but_adapters(model)
    if verbose:
        print_trainable(model)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Path -> LoRA layer, for every LoRALinear / NF4LoRALinear of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update (and new-token rows) into the base weights; plain modules again.

    A 4-bit base is decoded, merged in fp32 and becomes a 16-bit nn.Linear in the model's compute
    dtype (the embedding's); NF4 linears without LoRA are decoded too, so the model is dense.
    Idempotent. Afterwards the state dict has exactly the keys of an HF checkpoint.
    """
    dtype = model.model.embed_tokens.weight.dtype
    dequantized = False
    for path, m in lora_layers(model).items():
        if isinstance(m, NF4LoRALinear):
            _set_module(model, path, m.merged_linear(dtype))
            dequantized = True
            continue
        m.merge()
        lin = prepacked.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight, lin.bias = m.weight, m.bias
        _set_module(model, path, lin)
    for path, m in [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]:
        _set_module(model, path, m.to_linear(dtype))
        dequantized = True
    if dequantized and "quantization_config" in model.config.raw:
        # A pre-quantized source: the export is dense now, and readers must not expect 4-bit.
        model.config.raw.pop("quantization_config")
    merge_token_rows(model)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
