"""The LoRA linear as one autograd function: base matmul and every active adapter, fused.

    x (N, k) ──► x Wᵀ + b ──────────────────────────────► y (N, d)
       │                                      ▲ addmm_ (in place, alpha = s)
       └─► dropout ──► xd Aᵀ = xa (N, r) ──► xa Bᵀ

Autograd on the plain formula keeps, per module, a dropped-out copy of x (N, k) in float, its
mask, and a fresh output tensor for every ``+``. This function keeps only what backward needs:
x itself (shared with whatever produced it), a bool mask (1 byte per element) when dropout is on,
and xa (N, r). Backward, with g = dL/dy (N, d) and s the scaling:

    dL/dB = s gᵀ xa                      (d, r)
    gxa   = s g B                        (N, r)
    dL/dA = gxaᵀ xd                      (r, k)     xd = x ⊙ mask / (1-p), rebuilt on the fly
    dL/dx = g W + (gxa A) ⊙ mask / (1-p)            accumulated in place into one (N, k) tensor
    dL/db = Σ_rows g                     (only when the base bias is trainable)

The math is exactly ``base(x) + s * B(A(dropout(x)))``: tests compare values and gradients with
the plain formula and with PEFT.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def dropout_mask(x: Tensor, p: float) -> Tensor:
    """Bool keep-mask with P(keep) = 1 - p, one byte per element and no float temporary."""
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ (+ b) + Σ_i s_i B_i A_i dropout(x), with W frozen. See the module docstring."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, fan_in_fan_out: bool, p: float,
                scales: tuple[float, ...], *factors: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        lead, k = x.shape[:-1], x.shape[-1]
        xf = x.reshape(-1, k).to(dtype)                                  # (N, k)
        w = weight.to(dtype)
        w_t = w if fan_in_fan_out else w.t()                             # (k, d)
        y = torch.addmm(bias.to(dtype), xf, w_t) if bias is not None else xf @ w_t  # (N, d)
        mask = dropout_mask(xf, p) if p > 0 else None
        xd = xf * mask / (1.0 - p) if mask is not None else xf
        xas = []
        for i, s in enumerate(scales):
            a, b = factors[2 * i].to(dtype), factors[2 * i + 1].to(dtype)  # (r, k), (d, r)
            xa = xd @ a.t()                                              # (N, r)
            y.addmm_(xa, b.t(), alpha=s)
            xas.append(xa)
        ctx.fan_in_fan_out, ctx.p, ctx.scales, ctx.has_bias = fan_in_fan_out, p, scales, bias is not None
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(xf, weight, mask, *factors, *xas)
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        xf, weight, mask, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        factors, xas = rest[: 2 * n], rest[2 * n:]
        g = grad_y.reshape(-1, grad_y.shape[-1])                         # (N, d)
        dtype = g.dtype
        keep = 1.0 / (1.0 - ctx.p)
        xd = None
        grads_factors: list[Tensor | None] = []
        gx = None
        if ctx.needs_input_grad[0]:
            w = weight.to(dtype)
            gx = g @ (w.t() if ctx.fan_in_fan_out else w)                # (N, k)
        for i, s in enumerate(ctx.scales):
            a_param, b_param = factors[2 * i], factors[2 * i + 1]
            a, b = a_param.to(dtype), b_param.to(dtype)
            gxa = (g @ b).mul_(s)                                        # (N, r)
            grad_a = grad_b = None
            if ctx.needs_input_grad[6 + 2 * i]:
                if xd is None:
                    xd = xf.to(dtype) * mask * keep if mask is not None else xf.to(dtype)
                grad_a = (gxa.t() @ xd).to(a_param.dtype)                # (r, k)
            if ctx.needs_input_grad[7 + 2 * i]:
                grad_b = (g.t() @ xas[i].to(dtype)).mul_(s).to(b_param.dtype)  # (d, r)
            if gx is not None:
                if mask is None:
                    gx.addmm_(gxa, a)
                else:
                    gx.add_((gxa @ a).mul_(mask).mul_(keep))
            grads_factors += [grad_a, grad_b]
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if gx is not None:
            gx = gx.view(*grad_y.shape[:-1], gx.shape[-1]).to(ctx.x_dtype)
        return (gx, None, grad_bias, None, None, None, *grads_factors)


class LoraDeltaFunction(torch.autograd.Function):
    """out = base_out + Σ_i s_i B_i A_i dropout(x), added in place into base_out.

    For bases this module cannot fuse (quantized layers, trainable base weights): the base runs
    as itself, then its output receives the LoRA branches without extra full-size temporaries.
    """

    @staticmethod
    def forward(ctx, base_out: Tensor, x: Tensor, p: float, scales: tuple[float, ...], *factors: Tensor) -> Tensor:
        dtype = base_out.dtype
        xf = x.reshape(-1, x.shape[-1]).to(dtype)                         # (N, k)
        y = base_out.view(-1, base_out.shape[-1])                         # (N, d), same storage
        mask = dropout_mask(xf, p) if p > 0 else None
        xd = xf * mask / (1.0 - p) if mask is not None else xf
        xas = []
        for i, s in enumerate(scales):
            a, b = factors[2 * i].to(dtype), factors[2 * i + 1].to(dtype)
            xa = xd @ a.t()
            y.addmm_(xa, b.t(), alpha=s)
            xas.append(xa)
        ctx.mark_dirty(base_out)
        ctx.p, ctx.scales, ctx.x_dtype = p, scales, x.dtype
        ctx.save_for_backward(xf, mask, *factors, *xas)
        return base_out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        xf, mask, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        factors, xas = rest[: 2 * n], rest[2 * n:]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        dtype = g.dtype
        keep = 1.0 / (1.0 - ctx.p)
        xd = xf.to(dtype) * mask * keep if mask is not None else xf.to(dtype)
        gx = torch.zeros_like(xd) if ctx.needs_input_grad[1] else None
        grads = []
        for i, s in enumerate(ctx.scales):
            a_param, b_param = factors[2 * i], factors[2 * i + 1]
            a, b = a_param.to(dtype), b_param.to(dtype)
            gxa = (g @ b).mul_(s)
            grads.append((gxa.t() @ xd).to(a_param.dtype) if ctx.needs_input_grad[4 + 2 * i] else None)
            grads.append((g.t() @ xas[i].to(dtype)).mul_(s).to(b_param.dtype)
                         if ctx.needs_input_grad[5 + 2 * i] else None)
            if gx is not None:
                gx.addmm_(gxa, a)
        if gx is not None:
            if mask is not None:
                gx.mul_(mask).mul_(keep)
            gx = gx.view(*grad_out.shape[:-1], gx.shape[-1]).to(ctx.x_dtype)
        return (grad_out, gx, None, None, *grads)
