"""Training precision: what `--precision` resolves to on this hardware, and the autocast it means.

    fp32   everything float32
    bf16   the frozen base's weights cast once to bfloat16 (half the memory, no per-step cast),
           matmuls in bf16 autocast; LoRA parameters, their gradients and AdamW states stay float32
    fp16   float16 autocast with a GradScaler (CUDA only); weights stay float32
    auto   bf16 on a bf16-capable GPU, fp16 on an older one; on a CPU, fp32, or bf16 where the CPU
           computes it natively (avx512_bf16 or amx_bf16) once `AUTO_CPU_BF16` is switched on.
           Without those units a CPU emulates bf16, ~50x slower than float32 (benchmarks/bf16_matmul.py)

`AUTO_CPU_BF16` stays off until the demo shows bf16 training's quality on such a CPU (held-out
exact match and loss curve within noise of fp32: `lorakit demo --precision bf16` vs `fp32`, and
sft_e2e's bf16 rows); the machine this was built on has no bf16 units, so it could not.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 matmul units
AUTO_CPU_BF16 = False  # let `auto` pick bf16 on such a CPU (see the module docstring for when to switch it on)


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_native(device: torch.device) -> bool:
    """Does this device compute bf16 matmuls in hardware (so bf16 is faster, not just smaller)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)
    return False


@dataclass(frozen=True)
class Precision:
    """A resolved `--precision`: the autocast dtype, and the dtype the frozen base is kept in."""

    name: str                               # fp32 | bf16 | fp16, never auto
    autocast_dtype: torch.dtype | None      # None: autocast off
    base_dtype: torch.dtype | None          # cast the frozen base's weights to this once; None: keep

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The autocast context a forward runs in (a disabled one for fp32)."""
        if self.autocast_dtype is None:
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling; bf16 has float32's exponent range and does not."""
        return torch.amp.GradScaler("cuda") if self.name == "fp16" else None


def resolve(requested: str, device: torch.device) -> Precision:
    """`--precision` (auto | fp32 | bf16 | fp16) for `device`; see the module docstring."""
    name = requested
    if name == "auto" and device.type == "cuda":
        name = "bf16" if bf16_native(device) else "fp16"
    elif name == "auto":
        name = "bf16" if AUTO_CPU_BF16 and bf16_native(device) else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    if name not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be one of auto, fp32, bf16, fp16; got {requested!r}")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return Precision(name, dtype, torch.bfloat16 if name == "bf16" else None)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every frozen floating-point parameter of `model` to `dtype`, in place; returns how many.

    Trainable parameters (LoRA factors, modules_to_save copies) keep their dtype, and so do
    buffers (rotary frequencies lose precision in bf16). A tied weight is one parameter, cast once.
    """
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n
