"""The LoRA linear as one autograd function: base matmul and every active adapter, fused.

    x (N, k) ──► x Wᵀ + b ──────────────────────────────────────► y (N, d)
       │                                             ▲ addmm_ (in place, alpha = s')
       └─► xm = x ⊙ mask ──► xa = xm Aᵀ (N, r) ──► xa Bᵀ             s' = s / (1 - p)

Autograd on the plain formula keeps, per module, a dropped-out copy of x (N, k) in float, its
float mask, and a fresh (N, d) tensor for every ``+`` and ``*``. This function keeps only what
backward needs: x itself (shared with whatever produced it) and xa (N, r); a dropout mask is
kept as a seed and drawn again in backward. Backward, with g = dL/dy (N, d):

    gxa   = s' g B                       (N, r)
    dL/dA = gxaᵀ xm                      (r, k)     xm rebuilt from x and the re-drawn mask
    dL/dB = s' gᵀ xa                     (d, r)     computed as (xaᵀ g)ᵀ, the faster layout
    dL/dx = g W + mask ⊙ (gxa A)         one (N, k) tensor, accumulated in place (addmm_ / addcmul_)
    dL/db = Σ_rows g                     (only when the base bias is trainable)

Dropout: the LoRA branches of modules that read the *same input tensor* (q/k/v of attention,
gate/up of a gated MLP) share one mask, drawn once (`SharedDropout`): each branch still sees
inverted dropout of its input with probability p, as in PEFT, but the branches' masks are the
same draw instead of independent ones. The masked input xm is computed once for all of them,
in forward and again in backward. On CPU a mask is 16-bit random integers against a threshold
(P(drop) = p rounded to a multiple of 2⁻¹⁶, and the kept values scaled by the rounded rate, so
the expectation is exact), written straight out as 0./1. floats; elsewhere ``bernoulli_``.

Inference on long inputs (`fold_pays`, `folded_linear`) multiplies by a temporary
W' = W + Σ s·B·A instead: the same math, one pass over W instead of two over the activations.

The math is exactly ``base(x) + s * B(A(dropout(x)))``: tests compare values and gradients with
the plain formula and with PEFT.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# --- dropout ------------------------------------------------------------------------------------------
DRAW_BITS = 16  # CPU masks: one 16-bit random draw per element, P(drop) a multiple of 2⁻¹⁶


def drop_rate(p: float, device: torch.device) -> float:
    """The probability `keep_mask` actually drops with: p itself off the CPU; on the CPU, p rounded
    to a multiple of 2⁻¹⁶ (|error| ≤ 2⁻¹⁷, e.g. 0.05 → 0.0500031). Callers scale the kept
    values by 1 / (1 - drop_rate), so the expectation is exact."""
    if device.type != "cpu":
        return p
    return min(round(p * 2**DRAW_BITS), 2**DRAW_BITS - 1) / 2**DRAW_BITS


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device,
              generator: torch.Generator | None = None, dtype: torch.dtype = torch.bool) -> Tensor:
    """Keep-mask with P(keep) = 1 - drop_rate(p, device), as bool or as 0./1. in a float `dtype`.

    On the CPU the draw is 16 random bits per element (64-bit words viewed as int16) compared with
    a threshold, written straight into the output dtype: about 2.5 times faster than 32-bit draws
    and a separate bool-to-float conversion, and 5 times faster than ``bernoulli_``, which is what
    other devices use.
    """
    if device.type != "cpu":
        mask = torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=generator)
        return mask if dtype == torch.bool else mask.to(dtype)
    n = math.prod(shape)
    words = _scratch("words", (n + 3) // 4, torch.int64).random_(-2**63, None, generator=generator)
    bits = words.view(torch.int16)[:n]                                  # uniform over all int16 values
    threshold = round(drop_rate(p, device) * 2**DRAW_BITS) - 2**(DRAW_BITS - 1)  # P(bits < threshold) = rate
    if dtype in (torch.float32, torch.float64):  # every int16 is exact here: compare in place, no bool temporary
        return torch.empty(n, dtype=dtype).copy_(bits).ge_(threshold).view(shape)
    return torch.ge(bits, threshold, out=torch.empty(n, dtype=dtype)).view(shape)


def _scratch(name: str, numel: int, dtype: torch.dtype) -> Tensor:
    """A per-thread CPU buffer reused call after call, for temporaries that die inside one call
    (keep_mask's random words, backward's pre-mask dL/dx): allocating them afresh
    each time churns, and fragments, the heap."""
    buf = _last.scratch.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = _last.scratch[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


class SharedDropout:
    """One dropout draw for every LoRA branch that reads the same input tensor.

    Nothing mask-sized is kept for backward: the draw is a seed (taken from torch's default
    generator, so ``torch.manual_seed`` and checkpointing's RNG replay reproduce it), and
    backward draws the same mask again. Forward builds xm = x ⊙ mask (N, k) once for all the
    branches (the mask itself goes right away) and drops it when another input arrives;
    backward rebuilds mask and xm once and drops them after the last branch that counted
    itself in (`users`).
    """

    __slots__ = ("seed", "p", "rate", "shape", "device", "users", "readers", "_mask", "_masked")

    def __init__(self, p: float, shape: tuple[int, int], device: torch.device) -> None:
        self.seed = int(torch.empty((), dtype=torch.int64).random_())
        self.p, self.shape, self.device = p, shape, device
        self.rate = drop_rate(p, device)   # what the mask drops with: kept values are scaled by 1 / (1 - rate)
        self.users = 0                     # branches whose backward will still ask for xm
        self.readers: set[int] = set()     # the layers that took this draw (a layer never takes one twice)
        self._mask: Tensor | None = None   # (N, k) 0./1.
        self._masked: Tensor | None = None  # (N, k) x ⊙ mask

    def mask(self, dtype: torch.dtype) -> Tensor:
        """The keep-mask as 0./1. in `dtype` (a float multiplier: bool-to-float ops are slow on CPU)."""
        if self._mask is None or self._mask.dtype != dtype:
            gen = torch.Generator(device=self.device).manual_seed(self.seed)
            self._mask = keep_mask(self.shape, self.p, self.device, gen, dtype)
        return self._mask

    def masked(self, xf: Tensor, keep_mask: bool = False) -> Tensor:
        """x ⊙ mask in xf's dtype, built once and reused by the other branches.

        Forward needs only this product, so the (N, k) mask goes as soon as it is made unless
        `keep_mask` (backward, which also masks dL/dx).
        """
        xm = self._masked
        if xm is None or xm.dtype != xf.dtype:
            xm = self._masked = xf * self.mask(xf.dtype)
            if not keep_mask:
                self._mask = None
        return xm

    def release(self) -> None:
        """Forward moved on to another input (or backward's last branch is done)."""
        self._mask = self._masked = None

    def done(self) -> None:
        """One branch's backward no longer needs the mask."""
        self.users -= 1
        if self.users <= 0:
            self.release()


class _LastDraw(threading.local):
    """Per thread: the input the last mask was drawn for (a weak reference), and the draw."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.drop: SharedDropout | None = None
        self.scratch: dict[tuple[str, torch.dtype], Tensor] = {}


_last = _LastDraw()


def shared_dropout(x: Tensor, p: float, reader: object) -> SharedDropout:
    """The dropout draw for input x, as seen by layer `reader`.

    Reused when the previous draw was for the very same tensor (unchanged since) and `reader`
    has not taken it yet: q, k and v share one; a layer called again on the same x (the next
    step, the same batch) gets a fresh one, as with nn.Dropout.
    """
    key = _last.key
    if (key is not None and key[0]() is x and key[1] == x._version and key[2] == p
            and id(reader) not in _last.drop.readers):
        _last.drop.readers.add(id(reader))
        return _last.drop
    if _last.drop is not None:
        _last.drop.release()  # its branches are done with the forward copies
    k = x.shape[-1]
    drop = SharedDropout(p, (x.numel() // max(k, 1), k), x.device)
    drop.readers.add(id(reader))
    _last.key, _last.drop = (weakref.ref(x), x._version, p), drop
    return drop


def forget_dropout() -> None:
    """Drop the per-thread reference to the last draw (tests; the end of a training run)."""
    if _last.drop is not None:
        _last.drop.release()
    _last.key = _last.drop = None


# --- fused LoRA linear ----------------------------------------------------------------------------------
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
                xm = drop.masked(xf, keep_mask=True)                     # shared by q/k/v: built once
            grad_a = torch.mm(gxa.t(), xm).to(a_param.dtype)             # (r, k)
        if ctx.needs_input_grad[first_factor + 2 * i + 1]:
            grad_b = torch.mm(g.t(), xas[i].to(dtype)).mul_(s).to(b_param.dtype)  # (d, r), contiguous like B
        if gx is not None:
            if drop is None:
                gx.addmm_(gxa, a)
            elif lora_gx is None:  # consumed by the addcmul_ below: a reused buffer will do (CPU)
                out = _scratch("lora_gx", gx.numel(), dtype).view(gx.shape) if gx.device.type == "cpu" else None
                lora_gx = torch.mm(gxa, a, out=out)
            else:
                lora_gx.addmm_(gxa, a)
        grads += [grad_a, grad_b]
    if lora_gx is not None:
        gx.addcmul_(lora_gx, drop.mask(lora_gx.dtype))
    if drop is not None:
        drop.done()
    return grads


class LoraLinearFunction(torch.autograd.Function):
    """y = x Wᵀ (+ b) + Σ_i s'_i B_i A_i (x ⊙ mask), with W frozen. See the module docstring.

    Args (of ``apply``): x (..., k); weight (d, k), or (k, d) when fan_in_fan_out; bias (d,) or
    None; fan_in_fan_out; drop: a SharedDropout or None; scales: s_i / (1 - p) per adapter;
    factors: A_1, B_1, A_2, B_2, ... as matrices (r, k), (d, r).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, fan_in_fan_out: bool,
                drop: SharedDropout | None, scales: tuple[float, ...], *factors: Tensor) -> Tensor:
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
    def forward(ctx, base_out: Tensor, x: Tensor, drop: SharedDropout | None, scales: tuple[float, ...],
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
