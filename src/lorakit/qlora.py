"""QLoRA: a 4-bit NF4 base (bitsandbytes ``Linear4bit``) under float LoRA adapters.

    from_pretrained(..., quantization_config=qlora.quantization_config())   # base → Linear4bit (NF4)
    lorakit.inject(model, cfg)              # LoraLinear wraps Linear4bit like any linear

The base stays a ``Linear4bit`` and runs as itself; the float32 branches are added to its output
in place (``kernels.LoraDeltaFunction``). QLoRA is only a base-module type: the one place it
matters beyond that is merging, which works on the float weight:

    W (4-bit) ──dequantize──► W (float32) ──+ ΔW──► W' ──quantize (same settings)──► W' (4-bit)

As in PEFT, ``merge_and_unload`` on a 4-bit model keeps ``Linear4bit`` modules (re-quantized with
the adapter folded in); it does not return float ``nn.Linear`` layers. Every merge/unmerge
re-quantizes, so each costs one round of 4-bit rounding (PEFT warns the same).

bitsandbytes on CPU: on a CPU with AVX512-BF16, a ``Linear4bit`` in eval mode called with an
input that does not require grad repacks its weight, in place, into a CPU-only layout (bf16
absmax, no double quantization; ``quant_state.packing_format_for_cpu``). ``dequantize_4bit`` on
that layout silently returns garbage, so `dequantized_weight` undoes the packing on copies first.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .bases import is_4bit


def quantization_config(compute_dtype: torch.dtype | None = None):
    """transformers' BitsAndBytesConfig for an NF4 base with double quantization.

    Args:
        compute_dtype: dtype of the 4-bit matmuls; default bfloat16 on CUDA, float32 on CPU.
    """
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ValueError("--train-type qlora needs bitsandbytes: pip install 'lorakit[qlora]' "
                         "(or pip install bitsandbytes)") from e
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _standard_layout(weight: Tensor) -> tuple[Tensor, object]:
    """(packed 4-bit data, quant_state) in bitsandbytes' standard layout, without touching `weight`."""
    qs = weight.quant_state
    if not getattr(qs, "packing_format_for_cpu", False):
        return weight.data, qs
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    # The inverse edits the state it is given and re-quantizes absmax when it was nested; work on
    # a copy and keep the bf16 absmax the CPU kernel really uses, so the values are the ones forward sees.
    qs = copy.copy(qs)
    absmax = qs.absmax                                                   # (in // blocksize, out), bf16
    qs.original_nested = False
    data, qs = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), qs)
    qs.absmax = absmax.t().reshape(-1).float()                           # back to block order
    qs.nested = False
    return data, qs


def dequantized_weight(module: nn.Module) -> Tensor:
    """The float32 (out, in) weight of a Linear4bit, whatever layout bitsandbytes holds it in."""
    import bitsandbytes.functional as bnbf

    data, qs = _standard_layout(module.weight)
    return bnbf.dequantize_4bit(data, qs).float()


def replace_weight(module: nn.Module, new: Tensor) -> None:
    """Quantize `new` (out, in) into the module's weight with the same quant type, blocksize,
    double quantization and storage dtype, on the module's device."""
    import bitsandbytes as bnb

    old = module.weight
    qs = old.quant_state
    dtype = getattr(qs, "original_dtype", qs.dtype) if getattr(qs, "packing_format_for_cpu", False) else qs.dtype
    param = bnb.nn.Params4bit(new.detach().to("cpu", dtype).contiguous(), requires_grad=False,
                              quant_type=old.quant_type, compress_statistics=old.compress_statistics,
                              blocksize=old.blocksize, quant_storage=old.quant_storage, module=module)
    module.weight = param.to(old.device)        # Params4bit.to quantizes (on CPU too) and sets module.quant_state


def keep_standard_layout(module: nn.Module) -> None:
    """Stop bitsandbytes from repacking this Linear4bit into its CPU inference layout.

    On an AVX512-BF16 CPU, Linear4bit's first eval-mode call with a no-grad input repacks the
    weight in place (bf16 absmax) and from then on runs `gemv_4bit`, which has no autograd: a
    later training step silently gets no gradient through the layer (or raises when it has a
    bias). Training and evaluating in turn is the normal QLoRA loop, so LoRA-wrapped layers keep
    the standard layout: same numbers in train and eval, at the cost of the faster CPU kernel.
    """
    module.support_avx512bf16_for_cpu = False
    qs = getattr(module.weight, "quant_state", None)
    if getattr(qs, "packing_format_for_cpu", False):  # already repacked before it was wrapped
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, qs)
        module.quant_state = module.weight.quant_state


def prepare_model(model: nn.Module) -> nn.Module:
    """`keep_standard_layout` on every Linear4bit of `model`, wrapped by LoRA or not (a frozen
    4-bit layer below a trained one must pass gradients too). Returns the same model."""
    for module in model.modules():
        if is_4bit(module):
            keep_standard_layout(module)
    return model
