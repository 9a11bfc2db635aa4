"""Per-row adapter routing: row i of a batch uses adapter names[i] (None = the base model).

The names become index tensors once per batch shape and device, then every LoRA layer reuses
them: no layer turns strings into indices on its own, and no layer loops over rows. A linear
layer's per-row factors are gathered once per routing too (`row_factors`), so each forward is
two batched matmuls, in prefill and in every decoding step alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Routing:
    names: list[str | None]
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.adapters: list[str] = sorted({n for n in self.names if n is not None})

    def _rows(self, batch: int) -> list[str | None]:
        n = len(self.names)
        if batch == n:
            return self.names
        if batch % n == 0:  # generate() with num_beams / num_return_sequences repeats each row
            k = batch // n
            return [name for name in self.names for _ in range(k)]
        raise ValueError(f"per_row was given {n} adapter names but the batch has {batch} rows; "
                         f"pass exactly one name (or None) per row")

    def groups(self, batch: int, device: torch.device) -> list[tuple[str, Tensor]]:
        """[(adapter, row indices)] for the adapters present in a batch of this size."""
        key = ("groups", batch, device)
        if key not in self._cache:
            rows = self._rows(batch)
            self._cache[key] = [
                (a, torch.tensor([i for i, n in enumerate(rows) if n == a], dtype=torch.long, device=device))
                for a in self.adapters
            ]
        return self._cache[key]

    def row_index(self, batch: int, device: torch.device) -> Tensor:
        """(batch,) index into self.adapters per row; len(self.adapters) marks a base-model row."""
        key = ("index", batch, device)
        if key not in self._cache:
            slot = {a: i for i, a in enumerate(self.adapters)}
            rows = self._rows(batch)
            self._cache[key] = torch.tensor([slot[n] if n is not None else len(self.adapters) for n in rows],
                                            dtype=torch.long, device=device)
        return self._cache[key]

    def layer_cache(self, layer: object) -> dict:
        """Scratch space for one layer during this routing (e.g. its stacked adapter weights)."""
        return self._cache.setdefault(("layer", id(layer)), {})

    def row_factors(self, layer, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Row i's A (batch, r, k) and s·B (batch, d, r) for `layer`, gathered once per routing.

        The gather reads the layer's stack of all its adapters (`adapter_stack`, kept across
        routings), so a new batch costs one index_select per factor, or nothing when the rows
        are the layer's adapters in order. Memory: batch · r · (k + d) per layer while the
        routing lives (the `per_row` block), reused by every forward inside it.
        """
        cache = self.layer_cache(layer)
        key = (batch, device, dtype)
        if key not in cache:
            cache[key] = gathered_factors(layer, self._rows(batch), device, dtype)
        return cache[key]


def gathered_factors(layer, rows: list[str | None], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A (len(rows), r_max, k) and s·B (len(rows), d, r_max): entry i for adapter rows[i], zeros for
    None and for an adapter the layer lacks."""
    names, a_all, b_all = adapter_stack(layer, device, dtype)
    slot = {n: i + 1 for i, n in enumerate(names)}                  # 0: the zero entry
    idx = [slot.get(n, 0) if n is not None else 0 for n in rows]
    if idx == list(range(1, len(names) + 1)):                      # the rows are the adapters, in order
        return a_all[1:], b_all[1:]
    index = torch.tensor(idx, dtype=torch.long, device=device)
    return a_all.index_select(0, index), b_all.index_select(0, index)


def adapter_stack(layer, device: torch.device, dtype: torch.dtype) -> tuple[tuple[str, ...], Tensor, Tensor]:
    """All of a LoraLinear's adapters as A (1 + n, r_max, k) and s·B (1 + n, d, r_max), entry 0 zeros.

    Kept on the layer and reused by every routing until an adapter changes: the key holds each
    factor's identity, storage and version counter (bumped by every in-place update: an
    optimizer step, a load, a merge's copy) and each scale, so a stale stack is never used.
    Costs one copy of the layer's adapters (in `dtype`, on `device`); one stack per layer is kept.
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
