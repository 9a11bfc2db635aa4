"""The fast paths of a LoRA linear, behind one entry point: `lora_linear`.

Every path computes exactly the layer's formula ``h = W0 x + Σ_i s_i · B_i(A_i(dropout(x)))``
(`LoraLayer.forward` holds the plain version); tests compare values and gradients with that
formula and with PEFT. `lora_linear` picks the path:

| path                                    | when                                              | why |
|-----------------------------------------|---------------------------------------------------|-----|
| fused `LoraLinearFunction`              | autograd on; the base is exactly nn.Linear or      | one autograd node keeps only x and xAᵀ (N, r); the |
|                                         | Conv1D with a frozen weight                       | mask's positions (CPU) or seed; branches in place |
| `LoraDeltaFunction`                     | autograd on; any other base (quantized, a         | the base runs as itself; the branches are added into |
|                                         | subclass, a trainable weight)                     | its output in place, same backward as the fused path |
| folded W' (`folded_linear`)             | no autograd, no dropout, exact base, float32,     | one pass over W' = W + Σ s·B·A instead of two over |
|                                         | a long input (`fold_pays`)                        | the activations |
| in-place branches (`add_lora_branches`) | no autograd otherwise                             | no autograd bookkeeping: added into the base output |
| batched per row (`per_row_linear`)      | inside `per_row`; no DoRA adapter on this layer;  | rows grouped by adapter, its A and s·B stacked when |
|                                         | input ≥ 2-D without grad; no dropout in training  | per_row was entered: two batched matmuls per batch |
| none (None: the caller's formula)       | a DoRA adapter; adapters with different dropout p | each adapter's own math and its own mask, as PEFT |
|                                         | in training; per_row otherwise                    | |

The fused linear, forward and backward:

    x (N, k) ──► x Wᵀ + b ──────────────────────────────────────► y (N, d)
       │                                             ▲ addmm_ (in place, alpha = s')
       └─► xm = x ⊙ mask ──► xa = xm Aᵀ (N, r) ──► xa Bᵀ             s' = s / (1 - p)

Autograd on the plain formula keeps, per module, a dropped-out copy of x (N, k) in float, its
float mask, and a fresh (N, d) tensor for every ``+`` and ``*``. This function keeps only what
backward needs: x itself (shared with whatever produced it) and xa (N, r); a dropout mask is
kept as its dropped positions on the CPU (~p·N·k indices) or as a seed elsewhere
(`dropout.DropoutDraw`). With g = dL/dy (N, d):

    gxa   = s' g B                       (N, r)
    dL/dA = gxaᵀ xm                      (r, k)     xm rebuilt from x and the mask
    dL/dB = s' gᵀ xa                     (d, r)     computed as (xaᵀ g)ᵀ, the faster layout
    dL/dx = g W + mask ⊙ (gxa A)         one (N, k) tensor, accumulated in place
    dL/db = Σ_rows g                     (only when the base bias is trainable)

Which branches share a mask is `dropout.py`'s business (`lorakit.shared_dropout`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .bases import is_exact_linear
from .dropout import DropoutDraw, DropoutDraws, scratch

if TYPE_CHECKING:
    from .layers import Adapter
    from .linear import LoraLinear
    from .routing import Routing


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# --- the entry point ----------------------------------------------------------------------------------
def lora_linear(layer: LoraLinear, x: Tensor, adapters: list[Adapter], routing: Routing | None,
                draws: DropoutDraws | None) -> Tensor | None:
    """`layer`'s output for input x by the fastest path that applies (the table above), or None
    when none does and the caller computes the formula.

    Args:
        adapters: the active adapters, applied together (ignored under `routing`).
        routing: inside `per_row`, which adapter each row uses; else None.
        draws: inside `shared_dropout`, the forward's shared dropout draws; None: a mask of its own.
    """
    if routing is not None:
        return per_row_linear(layer, x, routing)
    if not all(ad.additive for ad in adapters):
        return None                                                      # DoRA: its formula in dora.py
    p = max(ad.dropout for ad in adapters) if layer.training else 0.0
    if p > 0 and len({ad.dropout for ad in adapters}) > 1:
        return None                                                      # each adapter its own mask, as PEFT
    scales = tuple(ad.scaling for ad in adapters)
    factors = [t for ad in adapters for t in (ad.lora_A.weight, ad.lora_B.weight)]
    drop = None
    if p > 0:
        drop = draws.draw(x, p, layer) if draws is not None else DropoutDraw(p, x)
        scales = tuple(s / (1.0 - drop.rate) for s in scales)           # inverted dropout's 1/(1-p), folded in
    try:
        return _unrouted(layer, x, drop, scales, factors)
    finally:
        if drop is not None and draws is None:
            drop.release()                                               # its own draw: backward re-draws it


def _unrouted(layer: LoraLinear, x: Tensor, drop: DropoutDraw | None, scales: tuple[float, ...],
              factors: list[Tensor]) -> Tensor:
    """The first four rows of the table: every row of x through the same adapters."""
    base = layer.base_layer
    bias = getattr(base, "bias", None)
    grad = torch.is_grad_enabled() and (x.requires_grad or any(f.requires_grad for f in factors)
                                        or (bias is not None and bias.requires_grad))
    exact = is_exact_linear(base)
    if grad and exact and not base.weight.requires_grad:
        return LoraLinearFunction.apply(x, base.weight, bias, layer.fan_in_fan_out, drop, scales, *factors)
    if not grad and drop is None and exact and fold_pays(x, base.weight, layer.out_features):
        return folded_linear(x, base.weight, bias, layer.fan_in_fan_out, scales, factors)
    out = base(x)
    if grad:
        return LoraDeltaFunction.apply(out, x, drop, scales, *factors)
    out = out if out.is_contiguous() else out.contiguous()
    flat = out.view(-1, out.shape[-1])                                   # (N, d)
    xf = x.reshape(-1, x.shape[-1]).to(flat.dtype)                       # (N, k)
    add_lora_branches(flat, drop.masked(xf) if drop is not None else xf, scales, factors, flat.dtype)
    return out


def per_row_linear(layer: LoraLinear, x: Tensor, routing: Routing) -> Tensor | None:
    """Mixed batch in two batched matmuls (`routing.plan`'s factors, `routing.grouping`'s rows):

    - a few tokens a row (decoding: fewer than the rank), rows grouped by adapter slot (U slots
      of g positions, a padding position's term masked to zero), so each adapter's factors are
      read once however many rows use it (index_select, bmm, bmm, index_select, add_):

          xg (U, g·L, k) = x's rows by slot      out += bmm(bmm(xg, Aᵀ), (s·B)ᵀ)[each row's position]

    - many tokens a row (a prefill), each row's own A and s·B gathered (smaller than moving its
      activations): out (n, L, d) += bmm(bmm(x, A_rowsᵀ), (s·B)_rowsᵀ); rows already in slot
      order use the factors as they are.

    A generate() pays for preparing the factors once (when per_row is entered). A batch of n·m rows (beam search repeats each row m times, consecutively) is
    read as (n, m·L, k). None: the per-adapter path must serve this call (see the table).
    """
    plan = routing.plan(layer)
    if (plan is None or not plan.batched or x.dim() < 2 or layer.training and plan.dropout
            or torch.is_grad_enabled() and x.requires_grad):
        return None
    out = layer.base_layer(x)
    if plan.a is None:                                                   # no adapter of this routing here
        return out
    n = routing.check_batch(x.shape[0])
    out = out if out.is_contiguous() else out.contiguous()
    a, bt = plan.a, plan.bt                                              # (1 + U, r, k), (1 + U, r, d)
    if a.dtype != out.dtype or a.device != out.device:                   # e.g. under autocast: not cached
        a, bt = a.to(out.device, out.dtype), bt.to(out.device, out.dtype)
    groups = routing.grouping(plan.slots, out.device)
    k, d = x.shape[-1], out.shape[-1]
    x3, out3 = x.reshape(n, -1, k).to(out.dtype), out.view(n, -1, d)   # (n, m·L, k), (n, m·L, d)
    if x3.shape[1] >= a.shape[1] or groups.identity:
        # many tokens a row (a prefill): each row's own factors are smaller than its activations
        if not groups.identity:
            a, bt = a.index_select(0, groups.row_slot), bt.index_select(0, groups.row_slot)  # (n, r, k), (n, r, d)
        else:
            a, bt = a[1:], bt[1:]
        out3.baddbmm_(torch.bmm(x3, a.transpose(1, 2)), bt)
        return out
    slots = a.shape[0] - 1                                               # a few tokens a row (decoding): by slot
    xg = x3.index_select(0, groups.gather)                              # (U·g, m·L, k)
    xa = torch.bmm(xg.view(slots, -1, k), a[1:].transpose(1, 2))        # (U, g·m·L, r)
    if groups.pad is not None:
        xa.view(slots, groups.size, -1, xa.shape[-1]).masked_fill_(groups.pad, 0)
    terms = torch.bmm(xa, bt[1:]).view(len(groups.gather), -1, d)      # (U·g, m·L, d)
    if groups.scatter is not None:
        out3.add_(terms.index_select(0, groups.scatter))
    else:
        out3.index_add_(0, groups.gather, terms)
    return out


# --- the fused LoRA linear -----------------------------------------------------------------------------
def add_lora_branches(y: Tensor, xm: Tensor, scales: tuple[float, ...], factors: tuple[Tensor, ...],
                   dtype: torch.dtype) -> list[Tensor]:
    """y += Σ s_i (xm A_iᵀ) B_iᵀ in place; returns the xa_i (N, r) backward needs."""
    xas = []
    for i, s in enumerate(scales):
        a, b = factors[2 * i].to(dtype), factors[2 * i + 1].to(dtype)  # (r, k), (d, r)
        xa = torch.mm(xm, a.t())                                         # (N, r)
        y.addmm_(xa, b.t(), alpha=s)
        xas.append(xa)
    return xas


def _lora_backward(ctx, g: Tensor, xf: Tensor, factors, xas, gx: Tensor | None,
                   first_factor: int) -> list[Tensor | None]:
    """Gradients of the factors; adds the branches' share of dL/dx into gx in place."""
    dtype, drop = g.dtype, ctx.drop
    xm = xf if drop is None else None
    grads: list[Tensor | None] = []
    lora_gx = None                                                       # Σ gxa_i A_i (N, k), pre-mask
    for i, s in enumerate(ctx.scales):
        a_param, b_param = factors[2 * i], factors[2 * i + 1]
        a, b = a_param.to(dtype), b_param.to(dtype)
        gxa = torch.mm(g, b).mul_(s)                                     # (N, r)
        grad_a = grad_b = None
        if ctx.needs_input_grad[first_factor + 2 * i]:
            if xm is None:
                xm = drop.masked(xf, keep_mask=True)                     # once for all branches of the draw
            grad_a = torch.mm(gxa.t(), xm).to(a_param.dtype)             # (r, k)
        if ctx.needs_input_grad[first_factor + 2 * i + 1]:
            grad_b = torch.mm(g.t(), xas[i].to(dtype)).mul_(s).to(b_param.dtype)  # (d, r), contiguous like B
        if gx is not None:
            if drop is None:
                gx.addmm_(gxa, a)
            elif lora_gx is None:  # consumed by the addcmul_ below: a reused buffer will do (CPU)
                out = scratch("lora_gx", gx.numel(), dtype).view(gx.shape) if gx.device.type == "cpu" else None
                lora_gx = torch.mm(gxa, a, out=out)
            else:
                lora_gx.addmm_(gxa, a)
        grads += [grad_a, grad_b]
    if lora_gx is not None:
        gx.add_(drop.zero_dropped_(lora_gx))
    if drop is not None:
        drop.done()
    return grads


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ (+ b) + Σ_i s'_i B_i A_i (x ⊙ mask), with W frozen. See the module docstring.

    Args (of ``apply``): x (..., k); weight (d, k), or (k, d) when fan_in_fan_out; bias (d,) or
    None; fan_in_fan_out; drop: a DropoutDraw or None; scales: s_i / (1 - p) per adapter;
    factors: A_1, B_1, A_2, B_2, ... as matrices (r, k), (d, r).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, fan_in_fan_out: bool,
                drop: DropoutDraw | None, scales: tuple[float, ...], *factors: Tensor) -> Tensor:
        dtype = compute_dtype(x)
        lead, k = x.shape[:-1], x.shape[-1]
        xf = x.reshape(-1, k).to(dtype)                                  # (N, k)
        w = weight.to(dtype)
        w_t = w if fan_in_fan_out else w.t()                             # (k, d)
        y = torch.addmm(bias.to(dtype), xf, w_t) if bias is not None else torch.mm(xf, w_t)  # (N, d)
        xm = drop.masked(xf) if drop is not None else xf
        xas = add_lora_branches(y, xm, scales, factors, dtype)
        ctx.fan_in_fan_out, ctx.scales, ctx.has_bias, ctx.x_dtype = fan_in_fan_out, scales, bias is not None, x.dtype
        ctx.drop = drop
        if drop is not None:
            drop.users += 1
        ctx.save_for_backward(xf, weight, *factors, *xas)
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        xf, weight, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        factors, xas = rest[: 2 * n], rest[2 * n:]
        g = grad_y.reshape(-1, grad_y.shape[-1])                         # (N, d)
        gx = None
        if ctx.needs_input_grad[0]:
            w = weight.to(g.dtype)
            gx = torch.mm(g, w.t() if ctx.fan_in_fan_out else w)        # (N, k)
        grads = _lora_backward(ctx, g, xf.to(g.dtype), factors, xas, gx, first_factor=6)
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if gx is not None:
            gx = gx.view(*grad_y.shape[:-1], gx.shape[-1]).to(ctx.x_dtype)
        return (gx, None, grad_bias, None, None, None, *grads)


class LoraDeltaFunction(torch.autograd.Function):
    """out = base_out + Σ_i s'_i B_i A_i (x ⊙ mask), added in place into base_out.

    For bases this module cannot fuse (quantized layers, trainable base weights): the base runs
    as itself, then its output receives the LoRA branches without extra full-size temporaries.
    Arguments as `LoraLinearFunction`, with the base's output in place of weight and bias.
    """

    @staticmethod
    def forward(ctx, base_out: Tensor, x: Tensor, drop: DropoutDraw | None, scales: tuple[float, ...],
                *factors: Tensor) -> Tensor:
        dtype = base_out.dtype
        xf = x.reshape(-1, x.shape[-1]).to(dtype)                         # (N, k)
        y = base_out.view(-1, base_out.shape[-1])                         # (N, d), same storage
        xm = drop.masked(xf) if drop is not None else xf
        xas = add_lora_branches(y, xm, scales, factors, dtype)
        ctx.mark_dirty(base_out)
        ctx.scales, ctx.x_dtype, ctx.drop = scales, x.dtype, drop
        if drop is not None:
            drop.users += 1
        ctx.save_for_backward(xf, *factors, *xas)
        return base_out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        xf, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        factors, xas = rest[: 2 * n], rest[2 * n:]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gx = torch.zeros_like(xf, dtype=g.dtype) if ctx.needs_input_grad[1] else None
        grads = _lora_backward(ctx, g, xf.to(g.dtype), factors, xas, gx, first_factor=4)
        if gx is not None:
            gx = gx.view(*grad_out.shape[:-1], gx.shape[-1]).to(ctx.x_dtype)
        return (grad_out, gx, None, None, *grads)


# --- inference on long inputs -------------------------------------------------------------------------
FOLD_RATIO = 2.5  # fold when N·(k + 2d) > FOLD_RATIO · d·k: the measured break-even on CPU, float32


def fold_pays(x: Tensor, weight: Tensor, d: int) -> bool:
    """Inference on a long input: is one pass over W' = W + Σ s·B·A cheaper than the branches?

    The branches cost a read of x (N, k) and a read-write of y (N, d); folding costs a read of W
    and a write of W' (d, k) plus the rank-r product, whatever N is. Float32 only: in half
    precision W' would round the update away.
    """
    if weight.dtype != torch.float32 or compute_dtype(x) != torch.float32:
        return False
    k = x.shape[-1]
    return (x.numel() // k) * (k + 2 * d) > FOLD_RATIO * weight.numel()


def folded_linear(x: Tensor, weight: Tensor, bias: Tensor | None, fan_in_fan_out: bool,
                  scales: tuple[float, ...], factors: list[Tensor]) -> Tensor:
    """x W'ᵀ + b with a temporary W' = W + Σ s_i B_i A_i: the same math, the base weight untouched."""
    w = weight.detach()
    for i, s in enumerate(scales):
        a, b = factors[2 * i].detach(), factors[2 * i + 1].detach()     # (r, k), (d, r)
        lhs, rhs = (a.t(), b.t()) if fan_in_fan_out else (b, a)          # W stored (k, d) / (d, k)
        w = torch.addmm(w, lhs, rhs, alpha=s) if i == 0 else w.addmm_(lhs, rhs, alpha=s)
    return torch.nn.functional.linear(x, w.t() if fan_in_fan_out else w, bias)
