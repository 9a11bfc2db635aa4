"""PiSSA and OLoRA: initialisations that move the top of the base weight into A and B.

Both rewrite the base weight as W0 - s·B·A so the model's output is unchanged at step 0:
- PiSSA (Meng et al. 2024): W0 = U S Vᵀ; B = U_r √(S_r/s), A = √(S_r/s) V_rᵀ.
- OLoRA (Büyükakyüz 2024): W0 = Q R; B = Q_r, A = R_r.
Because the base changes, an adapter trained from these inits is only valid on the rewritten base.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import LoraConfig
from .linear import LoraLinear


def apply_init(model: nn.Module, name: str, cfg: LoraConfig) -> None:
    if cfg.init not in ("pissa", "olora"):
        return
    for module_name, layer in model.named_modules():
        if isinstance(layer, LoraLinear) and name in layer.adapters:
            _init_layer(layer, name, cfg.init, module_name)


@torch.no_grad()
def _init_layer(layer: LoraLinear, name: str, method: str, module_name: str) -> None:
    ad = layer.adapters[name]
    base_w = layer.base_layer.weight
    if not base_w.dtype.is_floating_point:
        raise ValueError(f"init={method!r} needs a float base weight, but {module_name} is {base_w.dtype}; "
                         f"initialise before quantizing")
    w = base_w.float()
    w = w.t() if layer.fan_in_fan_out else w                     # (d, k)
    r, s = ad.r, ad.scaling
    if method == "pissa":
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        root = torch.sqrt(sv[:r] / s)
        b = u[:, :r] * root                                      # (d, r)
        a = root[:, None] * vh[:r]                               # (r, k)
    else:
        q, rr = torch.linalg.qr(w)
        b, a = q[:, :r], rr[:r]
    ad.lora_A.weight.copy_(a)
    ad.lora_B.weight.copy_(b)
    new_w = w - s * (b @ a)
    base_w.copy_((new_w.t() if layer.fan_in_fan_out else new_w).to(base_w.dtype))
