"""DoRA (Liu et al. 2024, arXiv:2402.09353): LoRA with a learned magnitude per output feature.

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_c          ‖·‖_c: the norm of each output feature's weights
       = f ⊙ (W0 + s·B·A),   f = m / ‖W0 + s·B·A‖_c  (the norm is a constant: detached, paper §4.3)

so a layer never builds W'; it corrects the base output instead (exactly PEFT 0.21's forward):

    x ──► base ──► y0 ─────────────────────────────────────────────┐
    └──► dropout ──► xd ──► A ──► B ──► ·s ──► ·f ────────────────(+)──► y0 + (f−1)⊙(y0 − b) + f⊙s·B·A·xd

With dropout active, `y0 − b` is recomputed as W0·dropout(x), as PEFT does. Several active
adapters apply in order, each DoRA term scaling the running output (PEFT's order semantics).

The magnitude is the adapter's parameter ``lora_magnitude_vector``, so PEFT's key table covers
it: shape (out,) for nn.Linear and GPT-2's Conv1D, (embedding_dim,) for nn.Embedding,
(1, out, 1, 1) for Conv2d ((1, out, 1) Conv1d, ...). It starts as ‖W0 + s·B·A‖_c, so the model's
output is unchanged at step 0. Merging writes f ⊙ (W + s·B·A) with the norm taken on the unmerged
base (cached for unmerge), as PEFT does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .layers import Adapter, LoraLayer

MAGNITUDE = "lora_magnitude_vector"


def is_dora(adapter: nn.Module) -> bool:
    return MAGNITUDE in adapter._parameters


# --- where the magnitude sits ------------------------------------------------------------------------
def _is_embedding(layer: LoraLayer) -> bool:
    return isinstance(layer.base_layer, nn.Embedding)


def _is_conv(layer: LoraLayer) -> bool:
    return isinstance(layer.base_layer, nn.modules.conv._ConvNd)


def _axis(layer: LoraLayer) -> int:
    """The axis of the stored base weight that indexes output features (the magnitude's entries)."""
    return 1 if _is_embedding(layer) or getattr(layer, "fan_in_fan_out", False) else 0


def _on_weight(vec: Tensor, layer: LoraLayer, ndim: int) -> Tensor:
    """A per-feature vector shaped to broadcast over the stored base weight."""
    shape = [1] * ndim
    shape[_axis(layer)] = -1
    return vec.reshape(shape)


def weight_norm(layer: LoraLayer, name: str, weight: Tensor) -> Tensor:
    """‖W + s·B·A‖_c per output feature, detached, in the magnitude's shape.

    Args:
        weight: the float32 base weight in its stored layout (`LoraLayer.base_weight()`).
    """
    with torch.no_grad():
        full = weight + layer.delta_weight(name)                       # stored layout, e.g. (out, in)
        axis = _axis(layer)
        norm = torch.linalg.vector_norm(full, dim=[d for d in range(full.dim()) if d != axis])  # (out,)
    if _is_conv(layer):
        norm = norm.view(1, -1, *([1] * (full.dim() - 2)))           # (1, out, 1, 1) like PEFT
    return norm


def add_magnitude(layer: LoraLayer, name: str) -> None:
    """Give adapter `name` its magnitude, initialised to ‖W0 + s·B·A‖_c (no change at step 0)."""
    adapter = layer.adapters[name]
    ref = next(adapter.parameters())
    norm = weight_norm(layer, name, layer.base_weight())
    adapter.lora_magnitude_vector = nn.Parameter(norm.to(device=ref.device, dtype=ref.dtype))


def _scale(layer: LoraLayer, name: str, weight: Tensor) -> Tensor:
    """f = m / ‖W0 + s·B·A‖_c; gradient flows to m only."""
    adapter = layer.adapters[name]
    m = adapter.lora_magnitude_vector
    return m / weight_norm(layer, name, weight).to(m.dtype)


# --- forward -----------------------------------------------------------------------------------------
def forward(layer: LoraLayer, x: Tensor, names: list[str], delta_only: bool = False) -> Tensor:
    """The layer's output with adapters `names` (some of them DoRA) applied in order.

    delta_only=True returns only what the adapters add to base(x) (for per-row routing).
    """
    if _is_embedding(layer):
        return _embedding_forward(layer, x, names, delta_only)
    return _linear_or_conv_forward(layer, x, names, delta_only)


def _linear_or_conv_forward(layer: LoraLayer, x: Tensor, names: list[str], delta_only: bool) -> Tensor:
    base = layer.base_layer
    conv = _is_conv(layer)
    bias = getattr(base, "bias", None)
    result = None if delta_only else base(x)                           # (..., out) or (b, out, *spatial)
    added: Tensor | int = 0                                            # what the adapters have added so far
    weight = None
    for name in names:
        adapter = layer.adapters[name]
        xa = x.to(adapter.lora_A.weight.dtype)
        dropped = layer.training and adapter.dropout > 0
        xd = F.dropout(xa, adapter.dropout, True) if dropped else xa
        lora = adapter.lora_B(adapter.lora_A(xd)) * adapter.scaling
        if not is_dora(adapter):
            added = added + lora
            continue
        weight = layer.base_weight() if weight is None else weight
        scale = _scale(layer, name, weight)                            # (out,) or (1, out, 1, ...)
        if dropped or result is None:
            w = weight.to(xd.dtype)
            plain = base._conv_forward(xd, w, None) if conv else F.linear(xd, w.t() if layer.fan_in_fan_out else w)
            base_term = plain if dropped else plain + added            # W0·x (+ earlier adapters), no bias
        else:
            base_term = result + added
            if bias is not None:
                base_term = base_term - (bias.view(1, -1, *([1] * (x.dim() - 2))) if conv else bias)
        added = added + (scale - 1) * base_term + scale * lora
    if delta_only:
        return added
    return (result + added).to(result.dtype)


def _embedding_forward(layer: LoraLayer, x: Tensor, names: list[str], delta_only: bool) -> Tensor:
    base = layer.base_layer
    result = base(x)                                                   # (..., dim)
    added: Tensor | int = 0
    for name in names:
        adapter = layer.adapters[name]
        after_a = F.embedding(x, adapter.lora_embedding_A.t(), base.padding_idx, base.max_norm,
                              base.norm_type, base.scale_grad_by_freq, base.sparse)  # (..., r)
        lora = (after_a @ adapter.lora_embedding_B.t()) * adapter.scaling            # (..., dim)
        if is_dora(adapter):
            scale = _scale(layer, name, layer.base_weight())           # (dim,)
            added = added + (scale - 1) * (result + added) + scale * lora  # = f·(running + lora) − running
        else:
            added = added + lora
    if delta_only:
        return added
    return (result + added).to(result.dtype)


# --- merging -----------------------------------------------------------------------------------------
def merged_weight(layer: LoraLayer, name: str, weight: Tensor) -> Tensor:
    """f ⊙ (W + s·B·A) for the current float32 weight W; f uses the norm of the unmerged base."""
    adapter = layer.adapters[name]
    delta = layer.delta_weight(name)
    norm = weight_norm(layer, name, _unmerged_base(layer, weight))
    adapter._merged_norm = norm                                        # unmerge needs this exact value
    scale = _on_weight(adapter.lora_magnitude_vector.detach().float() / norm.float(), layer, weight.dim())
    return scale * (weight + delta)


def unmerged_weight(layer: LoraLayer, name: str, weight: Tensor, forget: bool = True) -> Tensor:
    """Invert `merged_weight`: W = W' / f − s·B·A, with the norm cached at merge time."""
    adapter = layer.adapters[name]
    norm = adapter._merged_norm
    if forget:
        del adapter._merged_norm
    scale = _on_weight(adapter.lora_magnitude_vector.detach().float() / norm.float(), layer, weight.dim())
    return weight / scale - layer.delta_weight(name)


def _unmerged_base(layer: LoraLayer, weight: Tensor) -> Tensor:
    """The base weight with every adapter merged so far taken out (on a copy)."""
    for name in reversed(layer.merged):
        if is_dora(layer.adapters[name]):
            weight = unmerged_weight(layer, name, weight, forget=False)
        else:
            weight = weight - layer.delta_weight(name)
    return weight
