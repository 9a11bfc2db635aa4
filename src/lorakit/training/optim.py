"""Optimizer and schedule for LoRA training: AdamW over the trainable parameters only, LoRA+ groups."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                 loraplus_lr_ratio: float | None = None) -> list[dict]:
    """Trainable parameters only. With LoRA+ (Hayou et al. 2024), B matrices get lr * ratio.

    As PEFT's create_loraplus_optimizer, 1-D parameters (biases, DoRA magnitudes) join B's group.
    """
    a_group, b_group = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_b = "lora_B" in name or "lora_embedding_B" in name or param.ndim == 1
        (b_group if loraplus_lr_ratio and is_b else a_group).append(param)
    if not a_group and not b_group:
        raise ValueError("the model has no trainable parameters: inject an adapter (lorakit.inject) or load one "
                         "with trainable=True; a run that trains nothing would silently do nothing")
    groups = [{"params": a_group, "lr": lr, "weight_decay": weight_decay}]
    if b_group:
        groups.append({"params": b_group, "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay})
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                   loraplus_lr_ratio: float | None = None) -> torch.optim.Optimizer:
    """AdamW, fused where this torch build offers it (one kernel for all parameters)."""
    groups = param_groups(model, lr, weight_decay, loraplus_lr_ratio)
    try:
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, foreach=True)


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base learning rate at step s: linear warmup, then cosine / linear / constant."""
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"--lr-scheduler must be cosine, linear or constant, got {kind!r}")

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return f


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup_steps, total_steps))
