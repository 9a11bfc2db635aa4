"""LoraLinear: LoRA around a linear base, h = W0 x + Σ_i s_i · B_i(A_i(dropout(x))).

The base is anything `bases.is_linear` accepts: nn.Linear, transformers' Conv1D (weight stored
(in, out): ``fan_in_fan_out``) or a bitsandbytes quantized linear. A and B are bias-free
nn.Linear modules (PEFT's layout: A (r, k), B (d, r)) whatever the base's layout.

The forward is `LoraLayer.forward`'s formula; `fast_forward` hands it to `kernels.lora_linear`,
which computes the same numbers faster where it can (fused autograd, folded inference, in-place
branches, batched per-row routing: the table in kernels.py) and leaves the rest to the formula.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import kernels, qlora
from .bases import is_4bit, linear_shape
from .layers import Adapter, LoraLayer

if TYPE_CHECKING:
    from .routing import Routing
    from .state import LoraState


class LoraLinear(LoraLayer):
    """LoRA around nn.Linear, transformers' Conv1D (weight (in, out)) or a quantized linear."""

    def __init__(self, base_layer: nn.Module, state: LoraState, name: str = "") -> None:
        super().__init__(base_layer, state, name)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        if is_4bit(base_layer):
            qlora.keep_standard_layout(base_layer)

    def _make_adapter(self, kind, r, alpha, scaling, dropout) -> Adapter:
        device, dtype = self.adapter_device_dtype()
        ad = kind(r, alpha, scaling, dropout)
        ad.lora_A = _linear(torch.empty(r, self.in_features, device=device, dtype=dtype))   # (r, k)
        ad.lora_B = _linear(torch.zeros(self.out_features, r, device=device, dtype=dtype))  # (d, r)
        return ad

    def delta_weight(self, name: str) -> Tensor:
        ad = self.adapters[name]
        delta = (ad.lora_B.weight.float() @ ad.lora_A.weight.float()) * ad.scaling  # (d, k)
        return delta.t() if self.fan_in_fan_out else delta

    def fast_forward(self, x: Tensor, adapters: list[Adapter], routing: Routing | None) -> Tensor | None:
        return kernels.lora_linear(self, x, adapters, routing, self.state.dropout_draws)

    def _add_delta_inplace(self, name: str, sign: float) -> bool:
        """Plain LoRA on a float32 weight: W.addmm_(B, A, alpha=±s), no (d, k) temporary."""
        w, ad = getattr(self.base_layer, "weight", None), self.adapters[name]
        if (w is None or w.dtype != torch.float32 or not ad.additive or is_4bit(self.base_layer)
                or ad.lora_A.weight.dtype != torch.float32):
            return False
        a, b = ad.lora_A.weight.detach(), ad.lora_B.weight.detach()     # (r, k), (d, r)
        with torch.no_grad():
            if self.fan_in_fan_out:
                w.addmm_(a.t(), b.t(), alpha=sign * ad.scaling)          # W stored (k, d)
            else:
                w.addmm_(b, a, alpha=sign * ad.scaling)
        return True


def _linear(weight: Tensor) -> nn.Linear:
    """An nn.Linear (no bias) around `weight` (out, in), without nn.Linear's own kaiming init:
    the adapter's init (or a loader) fills it, so initialising twice would only cost time.
    Built the way nn.Linear.__init__ leaves it, minus reset_parameters (inject makes 420 of these)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.__dict__.update(in_features=weight.shape[1], out_features=weight.shape[0])
    lin._parameters["weight"] = nn.Parameter(weight)
    lin._parameters["bias"] = None
    return lin
