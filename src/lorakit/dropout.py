"""Dropout on the LoRA branch: masks kept as seeds, and (inside `lorakit.shared_dropout`) shared.

A `DropoutDraw` is one mask, kept as a seed: nothing mask-sized is saved for backward, which
draws the same mask again; the seed comes from torch's default generator, so ``torch.manual_seed``
and activation checkpointing's RNG replay reproduce it.

Which layers share a draw is the caller's choice, made explicit:

- by default every LoRA linear draws its own mask, as PEFT's ``nn.Dropout`` does;
- inside ``with lorakit.shared_dropout(model):`` the model's state holds a `DropoutDraws` for that
  forward (and backward): the LoRA branches of layers reading the *same input tensor* (q/k/v of
  attention, gate/up of a gated MLP) share one draw. Each branch still sees inverted dropout of
  its input with probability p, but the masked input is built once for all of them, in forward
  and again in backward. The trainer uses it around every micro-batch.

On the CPU a mask is 16-bit random integers against a threshold (P(drop) = p rounded to a
multiple of 2⁻¹⁶, and the kept values scaled by the rounded rate, so the expectation is exact),
written straight out as 0./1. floats; elsewhere ``bernoulli_``.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import Tensor

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
    words = scratch("words", (n + 3) // 4, torch.int64).random_(-2**63, None, generator=generator)
    bits = words.view(torch.int16)[:n]                                  # uniform over all int16 values
    threshold = round(drop_rate(p, device) * 2**DRAW_BITS) - 2**(DRAW_BITS - 1)  # P(bits < threshold) = rate
    if dtype in (torch.float32, torch.float64):  # every int16 is exact here: compare in place, no bool temporary
        return torch.empty(n, dtype=dtype).copy_(bits).ge_(threshold).view(shape)
    return torch.ge(bits, threshold, out=torch.empty(n, dtype=dtype)).view(shape)


class _Scratch(threading.local):
    buffers: dict[tuple[str, torch.dtype], Tensor]

    def __init__(self) -> None:
        self.buffers = {}


_scratch = _Scratch()


def scratch(name: str, numel: int, dtype: torch.dtype) -> Tensor:
    """A per-thread CPU buffer reused call after call, for temporaries that die inside one call
    (keep_mask's random words, backward's pre-mask dL/dx): allocating them afresh each time
    churns, and fragments, the heap. Holds no state a result depends on."""
    buf = _scratch.buffers.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = _scratch.buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


class DropoutDraw:
    """One dropout mask over an input x viewed as (N, k), kept as a seed.

    Forward builds xm = x ⊙ mask once for every branch that takes this draw (the mask itself goes
    right away); `release` drops it. Backward rebuilds mask and xm once and drops them after the
    last branch that counted itself in (`users`).
    """

    __slots__ = ("seed", "p", "rate", "shape", "device", "users", "_mask", "_masked")

    def __init__(self, p: float, x: Tensor) -> None:
        k = x.shape[-1]
        self.seed = int(torch.empty((), dtype=torch.int64).random_())
        self.p, self.shape, self.device = p, (x.numel() // max(k, 1), k), x.device
        self.rate = drop_rate(p, x.device)  # what the mask drops with: kept values are scaled by 1 / (1 - rate)
        self.users = 0                      # branches whose backward will still ask for xm
        self._mask: Tensor | None = None    # (N, k) 0./1.
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
        """Drop the mask-sized tensors (forward is done with them; or backward's last branch is)."""
        self._mask = self._masked = None

    def done(self) -> None:
        """One branch's backward no longer needs the mask."""
        self.users -= 1
        if self.users <= 0:
            self.release()


class DropoutDraws:
    """The draws of one forward (and its backward): one per input tensor, shared by its readers.

    Made by `lorakit.shared_dropout` and held by the model's `LoraState` while that block runs;
    only the newest draw is kept (forward moves from one input to the next), so at most one
    masked copy of an input is alive between layers.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None       # (weakref to x, x._version, p) of the newest draw
        self._draw: DropoutDraw | None = None
        self._readers: set[int] = set()       # the layers that took the newest draw

    def draw(self, x: Tensor, p: float, reader: object) -> DropoutDraw:
        """The draw for input x as seen by layer `reader`: the newest one when it was made for this
        very tensor (unchanged since) and `reader` has not taken it yet; else a new one. So q, k
        and v share one, and a layer called again on the same x (the next step) gets a fresh one,
        as with nn.Dropout."""
        key = self._key
        if key is not None and key[0]() is x and key[1] == x._version and key[2] == p \
                and id(reader) not in self._readers:
            self._readers.add(id(reader))
            return self._draw
        self.release()  # the previous input's branches are done with their forward copies
        self._draw, self._key, self._readers = DropoutDraw(p, x), (weakref.ref(x), x._version, p), {id(reader)}
        return self._draw

    def release(self) -> None:
        """Forget the newest draw (its forward copies go; backward still holds what it needs)."""
        if self._draw is not None:
            self._draw.release()
        self._key = self._draw = None
        self._readers = set()
