"""QLoRA: a 4-bit NF4 base (bitsandbytes Linear4bit) under float LoRA adapters.

The base is quantized when loaded (`quantization_config()` for `from_pretrained`); LoRA layers
wrap `Linear4bit` like any linear, running the base as itself and adding the branches in place.
Merging dequantizes the weight, adds the float32 delta, and quantizes again.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def quantization_config(compute_dtype: torch.dtype | None = None):
    """transformers' BitsAndBytesConfig for an NF4 base with double quantization."""
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ValueError("--train-type qlora needs bitsandbytes: pip install 'lorakit[qlora]'") from e
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def dequantized_weight(module: nn.Module) -> Tensor:
    """The float32 (out, in) weight of a Linear4bit."""
    import bitsandbytes.functional as bnbf

    w = module.weight
    return bnbf.dequantize_4bit(w.data, w.quant_state).float()


def replace_weight(module: nn.Module, new: Tensor) -> None:
    """Quantize `new` (out, in) back into the module's 4-bit weight, same quantization settings."""
    import bitsandbytes as bnb

    old = module.weight
    qs = old.quant_state
    param = bnb.nn.Params4bit(new.to(qs.dtype).cpu(), requires_grad=False, quant_type=qs.quant_type,
                              compress_statistics=getattr(old, "compress_statistics", qs.nested),
                              blocksize=qs.blocksize, quant_storage=old.quant_storage)
    module.weight = param.to(old.device) if old.device.type != "cpu" else param._quantize("cpu")
