"""The base modules LoRA wraps, recognised in one place.

| kind        | base modules                                                        | LoRA layer      |
|-------------|---------------------------------------------------------------------|-----------------|
| "linear"    | nn.Linear, transformers' Conv1D (GPT-2: weight stored (in, out)),    | `LoraLinear`    |
|             | bitsandbytes' Linear4bit / Linear8bitLt                             |                 |
| "embedding" | nn.Embedding                                                        | `LoraEmbedding` |
| "conv"      | nn.Conv1d / Conv2d / Conv3d                                         | `LoraConv`      |

Neither transformers nor bitsandbytes is imported here: a model can only hold a transformers
``Conv1D`` once ``transformers.pytorch_utils`` has been imported, so `is_conv1d` looks it up in
``sys.modules`` (``import lorakit`` stays free of transformers' ~1 s import), and the quantized
linears are recognised by class name (bitsandbytes is optional).
"""

from __future__ import annotations

import sys

from torch import nn

SUPPORTED = ("nn.Linear, nn.Embedding, nn.Conv1d/2d/3d, transformers' Conv1D and bitsandbytes "
             "Linear4bit/Linear8bitLt")
"""The supported base modules, as error messages name them."""

_QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt")


def _conv1d_type() -> type | None:
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and friends): a linear whose weight is stored (in, out)."""
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_quantized_linear(module: nn.Module) -> bool:
    """A bitsandbytes quantized linear (4-bit or 8-bit), checked by class name."""
    return type(module).__name__ in _QUANTIZED_LINEARS and hasattr(module, "in_features")


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes Linear4bit holding packed 4-bit weights (what QLoRA can dequantize and merge)."""
    return type(module).__name__ == "Linear4bit" and type(module.weight).__name__ == "Params4bit"


def is_linear(module: nn.Module) -> bool:
    """Anything `LoraLinear` wraps (PEFT's "all-linear" set): nn.Linear, Conv1D, quantized linears."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized_linear(module)


def is_exact_linear(module: nn.Module) -> bool:
    """Exactly nn.Linear or Conv1D (not a subclass, not quantized): its math is known, so it can be fused."""
    if type(module) is nn.Linear:
        return True
    conv1d = _conv1d_type()
    return conv1d is not None and type(module) is conv1d


def kind(module: nn.Module) -> str | None:
    """"linear", "embedding" or "conv" (the table above); None for a module LoRA cannot wrap."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    return "linear" if is_linear(module) else None


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear base; fan_in_fan_out: weight stored (in, out)."""
    if is_conv1d(module):
        k, d = module.weight.shape
        return k, d, True
    return module.in_features, module.out_features, False
