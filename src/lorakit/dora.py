"""DoRA (Liu et al. 2024, arXiv:2402.09353): LoRA with a learned magnitude per output feature.

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_c          ‖·‖_c: the norm of each output feature's weights
       = f ⊙ (W0 + s·B·A),   f = m / ‖W0 + s·B·A‖_c  (the norm is a constant: detached, paper §4.3)

so a layer never builds W'; it corrects the base output instead (exactly PEFT 0.21's forward):

    x ──► base ──► y0 ─────────────────────────────────────────────┐
    └──► dropout ──► xd ──► A ──► B ──► ·s ──► ·f ────────────────(+)──► y0 + (f−1)⊙(y0 − b) + f⊙s·B·A·xd

With dropout active, `y0 − b` is recomputed as W0·dropout(x), as PEFT does. Several active
adapters apply in order, each DoRA term scaling the running output (PEFT's order semantics).

DoRA is an adapter kind, `DoraAdapter`, chosen once when the adapter is added (``use_dora``):
a layer asks its adapters what they add (`add_to`) and what merging writes (`merged_weight`),
and never checks which kind it holds. Being not ``additive``, a DoRA adapter takes the layer's
formula path, never the fused or batched kernels.

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

from .layers import Adapter

if TYPE_CHECKING:
    from .layers import LoraLayer

class DoraAdapter(Adapter):
    """A DoRA adapter: LoRA's A and B plus `lora_magnitude_vector`, a learned magnitude per output feature."""

    additive = False

    def initialise(self, layer: LoraLayer, name: str, init: str) -> None:
        """Always initialised (even inside `uninitialised()`): the magnitude starts as ‖W0 + s·B·A‖_c,
        so the model's output is unchanged at step 0."""
        layer.reset_adapter(name, init)
        ref = next(self.parameters())
        norm = weight_norm(layer, name, layer.base_weight())
        self.lora_magnitude_vector = nn.Parameter(norm.to(device=ref.device, dtype=ref.dtype))

    def add_to(self, layer: LoraLayer, name: str, x: Tensor, base_out: Tensor, added: Tensor | int) -> Tensor:
        """added + (f − 1)⊙(y0 + added − b) + f⊙s·B·A·xd (the diagram above), f = m / ‖W0 + s·B·A‖_c."""
        if _is_embedding(layer):
            lora = layer.branch(self, x)                                   # (..., dim)
            scale = _scale(layer, name, layer.base_weight())               # (dim,)
            return added + (scale - 1) * (base_out + added) + scale * lora  # = f·(running + lora) − running
        xd = layer.lora_input(self, x)
        lora = layer.branch(self, xd)
        weight = layer.base_weight()
        scale = _scale(layer, name, weight)                                # (out,) or (1, out, 1, ...)
        if layer.training and self.dropout > 0:                           # W0·dropout(x), no bias, as PEFT
            w = weight.to(xd.dtype)
            base = layer.base_layer
            base_term = base._conv_forward(xd, w, None) if _is_conv(layer) else \
                F.linear(xd, w.t() if layer.fan_in_fan_out else w)
        else:
            base_term = base_out + added
            bias = getattr(layer.base_layer, "bias", None)
            if bias is not None:
                base_term = base_term - (bias.view(1, -1, *([1] * (x.dim() - 2))) if _is_conv(layer) else bias)
        return added + (scale - 1) * base_term + scale * lora

    def merged_weight(self, layer: LoraLayer, name: str, weight: Tensor) -> Tensor:
        """f ⊙ (W + s·B·A) for the current float32 weight W; f uses the norm of the unmerged base."""
        delta = layer.delta_weight(name)
        norm = weight_norm(layer, name, _unmerged_base(layer, weight))
        self._merged_norm = norm                                           # unmerge needs this exact value
        scale = _on_weight(self.lora_magnitude_vector.detach().float() / norm.float(), layer, weight.dim())
        return scale * (weight + delta)

    def unmerged_weight(self, layer: LoraLayer, name: str, weight: Tensor) -> Tensor:
        """Invert `merged_weight`: W = W' / f − s·B·A, with the norm kept at merge time."""
        scale = _on_weight(self.lora_magnitude_vector.detach().float() / self._merged_norm.float(), layer,
                           weight.dim())
        return weight / scale - layer.delta_weight(name)


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


def _scale(layer: LoraLayer, name: str, weight: Tensor) -> Tensor:
    """f = m / ‖W0 + s·B·A‖_c; gradient flows to m only."""
    m = layer.adapters[name].lora_magnitude_vector
    return m / weight_norm(layer, name, weight).to(m.dtype)


def _unmerged_base(layer: LoraLayer, weight: Tensor) -> Tensor:
    """The base weight with every adapter merged so far taken out (on a copy)."""
    for name in reversed(layer.merged):
        weight = layer.adapters[name].unmerged_weight(layer, name, weight)
    return weight
