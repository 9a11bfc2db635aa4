"""Dropout on the LoRA branch: masks drawn from seeds, and (inside `lorakit.shared_dropout`) shared.

A `DropoutDraw` is one mask: nothing mask-sized is saved for backward (the CPU keeps the dropped
positions, other devices draw the mask again); its seed comes from torch's default generator,
so ``torch.manual_seed`` and activation checkpointing's RNG replay reproduce it.

Which layers share a draw is the caller's choice, made explicit:

- by default every LoRA linear draws its own mask, as PEFT's ``nn.Dropout`` does;
- inside ``with lorakit.shared_dropout(model):`` the model's state holds a `DropoutDraws` for that
  forward (and backward): the LoRA branches of layers reading the *same input tensor* (q/k/v of
  attention, gate/up of a gated MLP) share one draw. Each branch still sees inverted dropout of
  its input with probability p, but the masked input is built once for all of them, in forward
  and again in backward. The trainer uses it around every micro-batch.

On the CPU a mask is the list of its dropped positions (`drop_positions`: geometric gaps, ~p·n
random numbers instead of n), drawn once in forward and kept for backward (p = 0.05: 8 bytes
for every 20 elements); elsewhere ``bernoulli_``, drawn again in backward from the seed.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import Tensor

def drop_rate(p: float, device: torch.device) -> float:
    """The probability a mask actually drops with: p itself on every device (kept for callers that
    scale the kept values by 1 / (1 - drop_rate))."""
    return p


GAP_SIGMAS = 6  # drop_positions draws p·n + 6 standard deviations of gaps at once (more rounds are rare)


def drop_positions(n: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """The flat indices (sorted, int64) that a dropout of n elements with probability p drops.

    Each element is dropped independently with probability p exactly: the gaps between
    consecutive drops of a Bernoulli(p) sequence are geometric, G = 1 + ⌊log(1 - u) / log(1 - p)⌋
    with u uniform in [0, 1) (53-bit doubles), so only ~p·n random numbers are drawn instead of
    one per element (p = 0.05: 20 times fewer), and the result is a list ~p·n long rather than an
    n-sized mask: kept for backward instead of drawn again.
    """
    if p <= 0 or n == 0:
        return torch.empty(0, dtype=torch.int64)
    if p >= 1:
        return torch.arange(n)
    log_keep = math.log1p(-p)
    chunks, last = [], -1
    while True:
        left = n - 1 - last                                              # elements not yet covered
        m = max(1, int(left * p + GAP_SIGMAS * math.sqrt(left * p)) + 16)  # enough gaps, but for ~1e-9 odds
        u = torch.rand(m, dtype=torch.float64, generator=generator)
        pos = torch.log1p(u.neg_()).div_(log_keep).floor_().to(torch.int64).add_(1).cumsum_(0).add_(last)
        if int(pos[-1]) >= n:
            chunks.append(pos[: int(torch.searchsorted(pos, n))])
            break
        chunks.append(pos)
        last = int(pos[-1])
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device,
              generator: torch.Generator | None = None, dtype: torch.dtype = torch.bool) -> Tensor:
    """Keep-mask with P(keep) = 1 - p, as bool or as 0./1. in a float `dtype`.

    On the CPU it is `drop_positions` written into a mask of ones; elsewhere ``bernoulli_``.
    """
    if device.type != "cpu":
        mask = torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=generator)
        return mask if dtype == torch.bool else mask.to(dtype)
    n = math.prod(shape)
    return torch.ones(n, dtype=dtype).index_fill_(0, drop_positions(n, p, generator), 0).view(shape)


class _Scratch(threading.local):
    buffers: dict[tuple[str, torch.dtype], Tensor]

    def __init__(self) -> None:
        self.buffers = {}


_scratch = _Scratch()


def scratch(name: str, numel: int, dtype: torch.dtype) -> Tensor:
    """A per-thread CPU buffer reused call after call, for temporaries that die inside one call
    (backward's pre-mask dL/dx): allocating them afresh each time
    churns, and fragments, the heap. Holds no state a result depends on."""
    buf = _scratch.buffers.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = _scratch.buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


class DropoutDraw:
    """One dropout mask over an input x viewed as (N, k).

    On the CPU the mask is its dropped positions (`drop_positions`, ~p·N·k indices), drawn in
    forward and kept until the last branch's backward: xm = x ⊙ mask is a copy of x with those
    positions zeroed, and backward zeroes them in dL/dx. Elsewhere it is a seed: backward draws
    the dense mask again. Either way the seed comes from torch's default generator, so
    ``torch.manual_seed`` and activation checkpointing's RNG replay reproduce it.

    Forward builds xm once for every branch that takes this draw; `release` drops it. Backward
    rebuilds xm once and drops it with the rest after the last branch that counted itself in
    (`users`).
    """

    __slots__ = ("seed", "p", "rate", "shape", "device", "users", "_positions", "_mask", "_masked")

    def __init__(self, p: float, x: Tensor) -> None:
        k = x.shape[-1]
        self.seed = int(torch.empty((), dtype=torch.int64).random_())
        self.p, self.shape, self.device = p, (x.numel() // max(k, 1), k), x.device
        self.rate = drop_rate(p, x.device)  # what the mask drops with: kept values are scaled by 1 / (1 - rate)
        self.users = 0                      # branches whose backward will still ask for xm
        self._positions: Tensor | None = None  # CPU: the dropped flat indices, kept until backward is done
        self._mask: Tensor | None = None    # (N, k) 0./1. (off the CPU)
        self._masked: Tensor | None = None  # (N, k) x ⊙ mask

    def _generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed)

    def positions(self) -> Tensor:
        """CPU: the flat indices of the dropped elements, drawn once."""
        if self._positions is None:
            self._positions = drop_positions(self.shape[0] * self.shape[1], self.p, self._generator())
        return self._positions

    def mask(self, dtype: torch.dtype) -> Tensor:
        """The keep-mask as 0./1. in `dtype`."""
        if self._mask is None or self._mask.dtype != dtype:
            if self.device.type == "cpu":
                n = self.shape[0] * self.shape[1]
                self._mask = torch.ones(n, dtype=dtype).index_fill_(0, self.positions(), 0).view(self.shape)
            else:
                self._mask = keep_mask(self.shape, self.p, self.device, self._generator(), dtype)
        return self._mask

    def masked(self, xf: Tensor, keep_mask: bool = False) -> Tensor:
        """x ⊙ mask in xf's dtype, built once and reused by the other branches.

        Forward needs only this product, so a dense mask goes as soon as it is made unless
        `keep_mask` (backward, which also masks dL/dx).
        """
        xm = self._masked
        if xm is None or xm.dtype != xf.dtype:
            if self.device.type == "cpu":
                xm = xf.clone(memory_format=torch.contiguous_format)
                xm.view(-1).index_fill_(0, self.positions(), 0)
            else:
                xm = xf * self.mask(xf.dtype)
                if not keep_mask:
                    self._mask = None
            self._masked = xm
        return xm

    def zero_dropped_(self, t: Tensor) -> Tensor:
        """t ⊙ mask, in place (t contiguous, shaped like the input)."""
        if self.device.type == "cpu":
            return t.view(-1).index_fill_(0, self.positions(), 0).view(t.shape)
        return t.mul_(self.mask(t.dtype))

    def release(self) -> None:
        """Drop the input-sized tensors (forward is done with them). The positions stay: backward
        uses them."""
        self._mask = self._masked = None

    def done(self) -> None:
        """One branch's backward no longer needs the mask."""
        self.users -= 1
        if self.users <= 0:
            self.release()
            self._positions = None


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
