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
        """Row i's A (batch, r, k) and s·B (batch, d, r) for `layer`, built once per routing.

        `stacked_factors` lays the factors out by row (zeros for base-model rows) in two
        stacks. Memory: batch · r · (k + d) per layer, held while the routing lives (the
        `per_row` block), reused by every forward inside it (each decoding step).
        """
        cache = self.layer_cache(layer)
        key = (batch, device, dtype)
        if key not in cache:
            cache[key] = stacked_factors(layer, self._rows(batch), device, dtype)
        return cache[key]


def stacked_factors(layer, rows: list[str | None], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A (len(rows), r_max, k) and s·B (len(rows), d, r_max) of a LoraLinear: entry i for adapter rows[i].

    Two stacks and one scale, not work per adapter. None, an adapter the layer lacks and the
    ranks beyond an adapter's own r are zeros, which add exactly nothing.
    """
    present = [layer.adapters[n] if n is not None and n in layer.adapters else None for n in rows]
    r = max((ad.r for ad in present if ad is not None), default=1)
    k, d = layer.in_features, layer.out_features
    with torch.no_grad():
        if all(ad is None or ad.r == r for ad in present):
            zero_a = torch.zeros(r, k, device=device, dtype=dtype)
            zero_b = torch.zeros(d, r, device=device, dtype=dtype)
            a = torch.stack([zero_a if ad is None else ad.lora_A.weight.to(device, dtype) for ad in present])
            b = torch.stack([zero_b if ad is None else ad.lora_B.weight.to(device, dtype) for ad in present])
        else:
            a = torch.zeros(len(rows), r, k, device=device, dtype=dtype)
            b = torch.zeros(len(rows), d, r, device=device, dtype=dtype)
            for j, ad in enumerate(present):
                if ad is not None:
                    a[j, : ad.r] = ad.lora_A.weight
                    b[j, :, : ad.r] = ad.lora_B.weight
        scale = torch.tensor([0.0 if ad is None else ad.scaling for ad in present], dtype=dtype)
        b.mul_(scale.to(device).view(-1, 1, 1))                      # (len(rows), d, r): s·B
    return a, b
