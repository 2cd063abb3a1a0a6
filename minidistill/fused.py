"""Autograd functions that keep fewer activations than the plain ops: RMSNorm and SwiGLU.

Plain autograd keeps, per token, an RMSNorm's fp32 copy of its input (under bf16 that is twice
the input's bytes) and, for SwiGLU, the gate, silu(gate) and the up projection. These functions
save only what their backward cannot cheaply rebuild:
- `rms_norm`: the input (in its own dtype) and 1/rms (one fp32 per row); the normalised value is
  recomputed in backward.
- `swiglu`: gate and up; silu(gate) is recomputed in backward.
The forward and backward maths live in plain functions (`rms_norm_forward`, `rms_norm_backward`,
`swiglu_backward`) that `lora._LoRAFunction` also uses as a prologue: there the norm (or the
SwiGLU product) feeding LoRA projections is recomputed from its inputs in backward, so the
projections' shared input is never saved at all. `rms_norm_reference` / `swiglu_reference` are
the plain-torch versions the tests compare against (the order of HF's LlamaRMSNorm: normalise in
fp32, cast back to the input dtype, then scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Plain autograd RMSNorm in HF's order: fp32 normalise, cast to x's dtype, scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """Plain autograd silu(gate) * up."""
    return F.silu(gate) * up


def rms_norm_forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(weight * normalised x, rstd): rstd (..., 1) fp32 is 1 / rms(x), what backward needs besides x."""
    x32 = x.float()
    rstd = x32.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # (..., 1)
    n = (x32 * rstd).to(x.dtype)  # a fresh tensor: scaled in place where no dtype promotion would differ
    return (n.mul_(weight) if n.dtype == weight.dtype else weight * n), rstd


def rms_norm_backward(grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, need_weight: bool,
                      n32: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Gradients of x and (if need_weight) of weight, for `grad` of the output.

    With n = x * rstd (fp32): dx = rstd * (dn - n * mean(dn * n)), dn = grad * weight; the casts
    follow the forward's (the weight product in the output dtype, dn rounded to x's dtype).
    n32: x.float() * rstd when the caller has it already (lora's backward rebuilds the output)."""
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    grad = grad.to(out_dtype)
    n32 = x.float() * rstd if n32 is None else n32  # (..., D)
    dn = (grad * weight).to(x.dtype).float()  # a fresh tensor: the steps below run in place
    gx = dn.sub_(n32 * (dn * n32).mean(-1, keepdim=True)).mul_(rstd).to(x.dtype)
    gw = None
    if need_weight:
        gw = (grad * n32.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)  # (D,)
    return gx, gw


def swiglu_backward(grad: Tensor, gate: Tensor, up: Tensor,
                    silu_gate: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gradients of gate and up for `grad` of silu(gate) * up (the ops plain autograd runs);
    silu_gate: F.silu(gate) when the caller has it already."""
    grad = grad.to(torch.promote_types(gate.dtype, up.dtype))
    return torch.ops.aten.silu_backward(grad * up, gate), grad * (F.silu(gate) if silu_gate is None else silu_gate)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        gx, gw = rms_norm_backward(grad, x, weight, rstd, ctx.needs_input_grad[1])
        return gx, gw, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_backward(grad, gate, up)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm (HF's order) saving x and 1/rms only; x (..., D), weight (D,)."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return rms_norm_forward(x, weight, eps)[0]
    return _RMSNorm.apply(x, weight, eps)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up saving gate and up only (silu is recomputed in backward)."""
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad):
        return F.silu(gate).mul_(up) if up.dtype == gate.dtype else F.silu(gate) * up
    return _SwiGLU.apply(gate, up)
