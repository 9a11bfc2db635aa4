"""Per-row adapter routing: row j of a batch uses adapter names[j] (None = the base model).

`per_row` builds one `Routing` when its block is entered, and forward only reads it:

- the names become index tensors once (one per adapter present, on each device the model's
  LoRA modules sit on): no layer turns strings into indices, and no layer loops over rows;
- every LoRA linear gets its `LinearPlan`: the A and s·B of each adapter "slot" (its whole
  adapter stack, `adapter_stack`, when the batch uses at least half of it: no copy; else the
  adapters it uses), and the rows are grouped by slot (`Grouping`, shared by every layer with
  the same slots), so a decoding step is two batched matmuls over the slots
  (`kernels.per_row_linear`): each adapter's factors are read once per step, whatever the
  number of its rows (a prefill gathers each row's factors instead: `Grouping.row_slot`);
- `Routing.regroup` routes a changed batch (rows joined or left: the serving engine) inside the
  same block, re-using the stacks without checking them again (the block's promise: adapter
  weights do not change inside it), so it costs index tensors, not copies of factors.

A batch of n·m rows (generate() with num_beams / num_return_sequences repeats each of the n rows
m times, consecutively) is read as n groups of m rows, so the same indices and factors serve it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

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
    """(1 + U, r_max, k): entry 0 zeros, then slot u's A at 1 + u (zeros past its rank, and for an
    adapter this layer lacks); None: no adapter here."""
    bt: Tensor | None = None
    """(1 + U, r_max, d): slot u's (s·B)ᵀ at 1 + u, zeros likewise (this layout makes the second bmm
    the faster one)."""
    slots: tuple[str, ...] = ()
    """The adapter of each slot; the routing groups the rows by them (`Routing.grouping`)."""


@dataclass(frozen=True)
class Grouping:
    """The rows of a batch grouped by slot: position u·g + i holds the i-th row of slot u's adapter."""

    gather: Tensor
    """(U·g,) the row at each position; a padding position repeats a row."""
    size: int
    """g: the rows of the largest slot."""
    scatter: Tensor | None
    """(n,) the position whose term each row takes: its own, or a padding one (a zero term) for a row
    no slot serves (None, or an adapter the layer lacks). None when such a row has no padding
    position to take: then the terms are added back with index_add_ (slower)."""
    pad: Tensor | None
    """(U, g, 1, 1) True at padding positions, to zero their terms; None when no padding term is used."""
    row_slot: Tensor
    """(n,) each row's entry in the plan's factors: 1 + its slot, 0 (zeros) for a row no slot serves."""
    identity: bool
    """Row j is slot j's only row, every slot has one: the rows are already grouped."""


KEPT_PLANS = 8  # adapter sets whose plans a per_row block keeps (a plan may hold copies of factors)


@dataclass
class _Prepared:
    """Shared by the routings of one per_row block (`Routing.regroup`)."""

    devices: dict[nn.Module, torch.device | None]
    """Each LoRA module (and ModulesToSave wrapper) and where it computes."""
    plans: dict[tuple[str, ...], dict[nn.Module, LinearPlan]] = field(default_factory=dict)
    """Per sorted set of adapters used: each LoRA linear's plan (the KEPT_PLANS most recently used)."""


class Routing:
    """Which adapter each row uses, and what each LoRA module needs for it, built once.

    Args:
        names: one adapter name (or None) per batch row.
        modules: the model's LoRA layers and ModulesToSave wrappers (`state.wrapped_modules`).
        prepared: what an earlier routing of the same per_row block prepared (`regroup`): the
            modules' devices and, per set of adapters used, the layers' plans; reused without
            checking the stacks against the weights again (inside the block they do not change).
    """

    def __init__(self, names: list[str | None], modules: Iterable[nn.Module] = (),
                 prepared: _Prepared | None = None) -> None:
        self.names = list(names)
        self.adapters: list[str] = sorted({n for n in self.names if n is not None})
        trusted = prepared is not None
        self._prepared = prepared = prepared or _Prepared({m: _device(m) for m in modules})
        self._groups: dict[torch.device, list[tuple[str, Tensor]]] = {}
        for device in dict.fromkeys(d for d in prepared.devices.values() if d is not None):
            self._groups[device] = self._index(device)
        plans = prepared.plans.pop(tuple(self.adapters), None)
        if plans is None:
            plans = {m: linear_plan(m, self.adapters, trusted) for m in prepared.devices if isinstance(m, LoraLinear)}
        prepared.plans[tuple(self.adapters)] = plans                      # the most recently used last
        while len(prepared.plans) > KEPT_PLANS:                           # a long-lived block: bounded
            prepared.plans.pop(next(iter(prepared.plans)))
        self._plans: dict[nn.Module, LinearPlan] = plans
        self._groupings: dict[tuple[tuple[str, ...], torch.device], Grouping] = {}
        for plan in plans.values():
            if plan.a is not None and (plan.slots, plan.a.device) not in self._groupings:
                self._groupings[plan.slots, plan.a.device] = self._grouping(plan.slots, plan.a.device)

    def regroup(self, names: list[str | None]) -> Routing:
        """The routing of a changed batch over the same modules, re-using what this one prepared."""
        return Routing(names, prepared=self._prepared)

    def _index(self, device: torch.device) -> list[tuple[str, Tensor]]:
        return [(a, torch.tensor([j for j, n in enumerate(self.names) if n == a], dtype=torch.long, device=device))
                for a in self.adapters]

    def _grouping(self, slots: tuple[str, ...], device: torch.device) -> Grouping:
        members = [[j for j, n in enumerate(self.names) if n == s] for s in slots]
        size = max(len(rows) for rows in members)
        gather = [rows[i] if i < len(rows) else (rows[0] if rows else 0) for rows in members for i in range(size)]
        padding = [u * size + i for u, rows in enumerate(members) for i in range(len(rows), size)]
        position = {j: u * size + i for u, rows in enumerate(members) for i, j in enumerate(rows)}
        unserved = len(position) < len(self.names)
        scatter = None if unserved and not padding else \
            [position.get(j, padding[0] if padding else 0) for j in range(len(self.names))]
        pad = None
        if padding and (unserved or scatter is None):                     # padding terms are read: zero them
            pad = torch.tensor([[i >= len(rows) for i in range(size)] for rows in members], device=device)
            pad = pad.view(len(slots), size, 1, 1)
        as_index = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        row_slot = [1 + position[j] // size if j in position else 0 for j in range(len(self.names))]
        identity = size == 1 and not padding and not unserved and gather == list(range(len(self.names)))
        return Grouping(as_index(gather), size, None if scatter is None else as_index(scatter), pad,
                        as_index(row_slot), identity)

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

    def grouping(self, slots: tuple[str, ...], device: torch.device) -> Grouping:
        """The rows grouped by `slots` (a plan's), on `device`."""
        found = self._groupings.get((slots, device))
        return found if found is not None else self._grouping(slots, device)  # not prepared: not kept

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


def linear_plan(layer: LoraLinear, adapters: list[str], trusted: bool = False) -> LinearPlan:
    """`layer`'s plan for a batch using `adapters` (sorted); the factors in the dtype its base outputs
    (its weight's, if float). Slots: the whole stack when the batch uses at least half of it (a view,
    no copy; an unused slot costs a few zero rows), else the adapters used (a copy of theirs)."""
    present = [layer.adapters[a] for a in adapters if a in layer.adapters]
    batched, dropout = all(ad.additive for ad in present), any(ad.dropout > 0 for ad in present)
    if not present or not batched:
        return LinearPlan(batched, dropout)
    w = layer.base_layer.weight
    dtype = w.dtype if w.dtype.is_floating_point else present[0].lora_A.weight.dtype
    stack = layer.__dict__.get("_lorakit_stack") if trusted else None
    names, a_all, bt_all = stack[1] if stack is not None and stack[0][:2] == (w.device, dtype) else \
        adapter_stack(layer, w.device, dtype)
    if 2 * len(adapters) >= len(names):
        return LinearPlan(True, dropout, a_all, bt_all, names)
    slot = {n: i + 1 for i, n in enumerate(names)}                  # 0: the stack's zero entry
    index = torch.tensor([0] + [slot.get(n, 0) for n in adapters], dtype=torch.long, device=w.device)
    return LinearPlan(True, dropout, a_all.index_select(0, index), bt_all.index_select(0, index), tuple(adapters))


def adapter_stack(layer: LoraLinear, device: torch.device, dtype: torch.dtype) -> tuple[tuple[str, ...], Tensor, Tensor]:
    """All of a LoraLinear's adapters as A (1 + n, r_max, k) and (s·B)ᵀ (1 + n, r_max, d), entry 0 zeros.

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
        bt = torch.zeros(1 + len(ads), r, d, device=device, dtype=dtype)
        for j, ad in enumerate(ads.values(), start=1):
            a[j, : ad.r] = ad.lora_A.weight
            torch.mul(ad.lora_B.weight.t(), ad.scaling, out=bt[j, : ad.r])
    value = (tuple(ads), a, bt)
    layer.__dict__["_lorakit_stack"] = (key, value)
    return value
