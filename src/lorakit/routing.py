"""Per-row adapter routing: row j of a batch uses adapter names[j] (None = the base model).

`per_row` builds one `Routing` when its block is entered, and forward only reads it:

- the names become index tensors once (one per adapter present, on each device the model's
  LoRA modules sit on): no layer turns strings into indices, and no layer loops over rows;
- every LoRA linear gets its `LinearPlan`: row j's A and s·B gathered from the layer's stack of
  adapters (`adapter_stack`), so its forward is two batched matmuls (`kernels.per_row_linear`),
  in the prefill and in every decoding step alike.

A batch of n·m rows (generate() with num_beams / num_return_sequences repeats each of the n rows
m times, consecutively) is read as n groups of m rows, so the same indices and factors serve it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .linear import LoraLinear


@dataclass(frozen=True)
class LinearPlan:
    """How one LoRA linear serves a routing, decided when per_row is entered."""

    batched: bool
    """Every adapter of the routing on this layer adds s·B·A (no DoRA): two bmm's serve the batch."""
    dropout: bool
    """Some of them has dropout (in training mode, the per-adapter path draws the masks)."""
    a: Tensor | None = None
    """(n, r_max, k): row j's A, zeros for a None row or an adapter this layer lacks; None: no adapter here."""
    b: Tensor | None = None
    """(n, d, r_max): row j's s·B, zeros likewise."""


class Routing:
    """Which adapter each row uses, and what each LoRA module needs for it, built once.

    Args:
        names: one adapter name (or None) per batch row.
        modules: the model's LoRA layers and ModulesToSave wrappers (`state.wrapped_modules`).
    """

    def __init__(self, names: list[str | None], modules: Iterable[nn.Module] = ()) -> None:
        self.names = list(names)
        self.adapters: list[str] = sorted({n for n in self.names if n is not None})
        self._groups: dict[torch.device, list[tuple[str, Tensor]]] = {}
        self._plans: dict[nn.Module, LinearPlan] = {}
        for module in modules:
            device = _device(module)
            if device is not None and device not in self._groups:
                self._groups[device] = self._index(device)
            if isinstance(module, LoraLinear):
                self._plans[module] = linear_plan(module, self.names, self.adapters)

    def _index(self, device: torch.device) -> list[tuple[str, Tensor]]:
        return [(a, torch.tensor([j for j, n in enumerate(self.names) if n == a], dtype=torch.long, device=device))
                for a in self.adapters]

    def check_batch(self, batch: int) -> int:
        """n = len(names), after checking that a batch of this size is n rows, each repeated m times."""
        n = len(self.names)
        if batch % n:
            raise ValueError(f"per_row was given {n} adapter names but the batch has {batch} rows; "
                             f"pass exactly one name (or None) per row")
        return n

    def groups(self, device: torch.device) -> list[tuple[str, Tensor]]:
        """[(adapter, indices into names)] for the adapters present, on `device`."""
        found = self._groups.get(device)
        return found if found is not None else self._index(device)  # a device per_row did not see: not kept

    def plan(self, layer: nn.Module) -> LinearPlan | None:
        """The layer's plan; None for a layer per_row did not prepare (it takes the per-adapter path)."""
        return self._plans.get(layer)

    # a batch of n·m rows is viewed as (n, m, ...), so indices into names select every repeat
    def take(self, t: Tensor, rows: Tensor) -> Tensor:
        """The rows of t (batch n·m) whose names `rows` selects: (len(rows)·m, ...)."""
        return self._grouped(t).index_select(0, rows).flatten(0, 1)

    def add(self, out: Tensor, rows: Tensor, values: Tensor) -> None:
        """out[those rows] += values, in place (out must be contiguous)."""
        self._grouped(out).index_add_(0, rows, values.reshape(len(rows), -1, *values.shape[1:]))

    def replace(self, out: Tensor, rows: Tensor, values: Tensor) -> Tensor:
        """A copy of out with those rows replaced by values."""
        grouped = self._grouped(out).index_copy(0, rows, values.reshape(len(rows), -1, *values.shape[1:]))
        return grouped.flatten(0, 1)

    def _grouped(self, t: Tensor) -> Tensor:
        """t (n·m, ...) as (n, m, ...): a view when t is contiguous."""
        return t.view(len(self.names), -1, *t.shape[1:]) if t.is_contiguous() else \
            t.reshape(len(self.names), -1, *t.shape[1:])


def _device(module: nn.Module) -> torch.device | None:
    """Where a LoRA layer's base (a ModulesToSave's original) computes; None without parameters."""
    inner = getattr(module, "base_layer", None)
    inner = getattr(module, "original_module", module) if inner is None else inner
    param = next(inner.parameters(), None)
    return None if param is None else param.device


def linear_plan(layer: LoraLinear, names: list[str | None], adapters: list[str]) -> LinearPlan:
    """`layer`'s plan for rows `names`; the factors in the dtype its base outputs (its weight's, if float)."""
    present = [layer.adapters[a] for a in adapters if a in layer.adapters]
    batched, dropout = all(ad.additive for ad in present), any(ad.dropout > 0 for ad in present)
    if not present or not batched:
        return LinearPlan(batched, dropout)
    w = layer.base_layer.weight
    dtype = w.dtype if w.dtype.is_floating_point else present[0].lora_A.weight.dtype
    a, b = gathered_factors(layer, names, w.device, dtype)
    return LinearPlan(True, dropout, a, b)


def gathered_factors(layer: LoraLinear, rows: list[str | None], device: torch.device,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A (len(rows), r_max, k) and s·B (len(rows), d, r_max): entry i for adapter rows[i], zeros for
    None and for an adapter the layer lacks."""
    names, a_all, b_all = adapter_stack(layer, device, dtype)
    slot = {n: i + 1 for i, n in enumerate(names)}                  # 0: the zero entry
    idx = [slot.get(n, 0) if n is not None else 0 for n in rows]
    if idx == list(range(1, len(names) + 1)):                      # the rows are the adapters, in order
        return a_all[1:], b_all[1:]
    index = torch.tensor(idx, dtype=torch.long, device=device)
    return a_all.index_select(0, index), b_all.index_select(0, index)


def adapter_stack(layer: LoraLinear, device: torch.device, dtype: torch.dtype) -> tuple[tuple[str, ...], Tensor, Tensor]:
    """All of a LoraLinear's adapters as A (1 + n, r_max, k) and s·B (1 + n, d, r_max), entry 0 zeros.

    Kept on the layer and reused by every routing until an adapter changes: the key holds each
    factor's identity, storage and version counter (bumped by every in-place update: an
    optimizer step, a load, a merge's copy) and each scale, so a stale stack is never used.
    Costs one copy of the layer's adapters (in `dtype`, on `device`); one stack per layer is kept.
    Built by `per_row` when its block is entered, never by a forward.
    """
    ads = layer.adapters
    key = tuple((n, ad.r, ad.scaling, *(t for w in (ad.lora_A.weight, ad.lora_B.weight)
                                       for t in (id(w), w.data_ptr(), w._version)))
                for n, ad in ads.items())
    key = (device, dtype, key)
    hit = layer.__dict__.get("_lorakit_stack")                     # one entry: a new device or dtype replaces it
    if hit is not None and hit[0] == key:
        return hit[1]
    r = max((ad.r for ad in ads.values()), default=1)
    k, d = layer.in_features, layer.out_features
    with torch.no_grad():
        a = torch.zeros(1 + len(ads), r, k, device=device, dtype=dtype)
        b = torch.zeros(1 + len(ads), d, r, device=device, dtype=dtype)
        for j, ad in enumerate(ads.values(), start=1):
            a[j, : ad.r] = ad.lora_A.weight
            torch.mul(ad.lora_B.weight, ad.scaling, out=b[j, :, : ad.r])
    value = (tuple(ads), a, b)
    layer.__dict__["_lorakit_stack"] = (key, value)
    return value
