"""Merge adapters into the base weights (W ← W + s·B·A), undo it, export a plain model, combine adapters."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .adalora import AdaLoraConfig
from .inject import inject, set_trainable
from .layers import LoraEmbedding, LoraLayer
from .state import drop_state, lora_layers, require_state, wrapped_modules


def merge(model: nn.Module, names: Sequence[str] | None = None, safe: bool = False) -> None:
    """Fold adapters (default: the active ones) into the base weights; the delta is computed in float32.

    safe=True checks every merged weight for NaN/Inf before writing it, and raises naming the
    layer and adapter. Merging an adapter twice is a no-op.
    """
    _merge_layers(model, [layer for _, layer in lora_layers(model)], names, safe)


def _merge_layers(model: nn.Module, layers: list[LoraLayer], names: Sequence[str] | None, safe: bool) -> None:
    state = require_state(model)
    names = list(state.active if names is None else names)
    known = list(state.configs)
    if unknown := [n for n in names if n not in known]:
        raise ValueError(f"merge: unknown adapter name(s) {unknown}; this model has {known}")
    if safe:  # check every layer before writing any: a broken adapter leaves the model as it was
        for layer in layers:
            _check_finite(layer, names)
    for layer in layers:
        layer.merge(names, safe=safe)


def _check_finite(layer: LoraLayer, names: list[str]) -> None:
    """Raise if merging `names` would put a NaN/Inf into this layer (the same sums LoraLayer.merge does)."""
    merged = layer.base_weight()                                     # float32, dequantized if 4-bit
    for name in names:
        if name in layer.adapters and name not in layer.merged:
            merged = layer.adapters[name].merged_weight(layer, name, merged)
            if not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or Infs detected in the merged weights of {layer._debug_name()}: "
                                 f"the adapter {name!r} seems to be broken; nothing was merged")


def unmerge(model: nn.Module) -> None:
    """Subtract every merged adapter from the base weights, in reverse order."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, safe: bool = False) -> nn.Module:
    """Merge the active adapters and return the model with every LoRA module and key removed."""
    state = require_state(model)
    wrappers = wrapped_modules(model)                                # one walk serves the merge and the swap
    _merge_layers(model, [m for _, _, _, m in wrappers if isinstance(m, LoraLayer)], None, safe)
    active = state.active
    for _, parent, key, module in wrappers:
        if isinstance(module, LoraLayer):
            setattr(parent, key, module.base_layer)
        else:
            setattr(parent, key, next((module.modules_to_save[n] for n in active if n in module.modules_to_save),
                                      module.original_module))
    drop_state(model)
    return model


# --- combining adapters (PEFT's add_weighted_adapter for linear / cat / svd) -------------------------
def combine(model: nn.Module, names: Sequence[str], weights: Sequence[float], name: str,
            method: str = "linear", rank: int | None = None) -> None:
    """Add adapter `name` built from `names` weighted by `weights`, as PEFT's add_weighted_adapter.

    - linear: A = Σ √|w_i s_i|·sign·A_i, B = Σ √|w_i s_i|·B_i (all ranks equal; an approximation).
    - cat: A = [w_i s_i A_i], B = [B_i] stacked along the rank (exact: Σ w_i ΔW_i; rank Σ r_i).
    - svd: the exact Σ w_i ΔW_i truncated to `rank` (default max r_i) by SVD.
    The new adapter has alpha = r, so its scaling is 1.
    """
    state = require_state(model)
    names, weights = list(names), [float(w) for w in weights]
    known = list(state.configs)
    if unknown := [n for n in names if n not in known]:
        raise ValueError(f"combine: unknown adapter name(s) {unknown}; this model has {known}")
    if len(weights) != len(names) or not names:
        raise ValueError(f"combine: got {len(names)} adapters and {len(weights)} weights; give one weight each")
    if name in known:
        raise ValueError(f"combine: an adapter named {name!r} already exists; pick a new name")
    if method not in ("linear", "cat", "svd"):
        raise ValueError(f"combine: method={method!r} is not supported; use 'linear', 'cat' or 'svd'")
    cfgs = [state.configs[n] for n in names]
    if svd := [n for n, c in zip(names, cfgs) if isinstance(c, AdaLoraConfig)]:
        raise ValueError(f"combine: {svd} are AdaLoRA adapters, which combine does not support (PEFT's "
                         f"add_weighted_adapter refuses them too); merge them into the base instead")
    if dora_names := [n for n, c in zip(names, cfgs) if c.use_dora]:
        raise ValueError(f"combine: {dora_names} are DoRA adapters; their magnitude vectors cannot be mixed "
                         f"(PEFT cannot either). Merge them into the base instead, or combine plain LoRA adapters")
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in cfgs]
    method = "linear" if len(names) == 1 else method
    if method == "linear" and len(set(ranks)) != 1:
        raise ValueError(f"combine: method='linear' needs adapters of equal rank, got ranks {dict(zip(names, ranks))}; "
                         f"use method='cat' or 'svd'")
    new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": rank or max(ranks)}[method]
    targets = [c.target_modules for c in cfgs]
    if len({type(t) for t in targets}) > 1:
        raise ValueError("combine: adapters mix a regex target_modules with a list; they were made for different "
                         "target sets and cannot be combined")
    if isinstance(targets[0], str):
        new_targets = "|".join(f"({t})" for t in targets)
    else:
        new_targets = sorted(set().union(*targets))
    mts = [m for c in cfgs for m in (c.modules_to_save or [])]
    if len(mts) != len(set(mts)):
        raise ValueError("combine: several adapters have their own copy of the same modules_to_save module")
    base_cfg = cfgs[0].replace(r=new_rank, alpha=new_rank, target_modules=new_targets, rank_pattern={},
                               alpha_pattern={}, use_rslora=False, modules_to_save=None, layers_to_transform=None,
                               init="default")  # never re-run PiSSA/OLoRA: they would rewrite the base
    inject(model, base_cfg, name=name)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.adapters:
                _combine_layer(layer, names, weights, name, method, new_rank)
    set_trainable(model, name, False)


def _combine_layer(layer: LoraLayer, names: list[str], weights: list[float], new: str, method: str,
                   new_rank: int) -> None:
    target = layer.adapters[new]
    a_t, b_t = _factor_params(target)
    a_t.zero_(), b_t.zero_()
    present = [(n, w) for n, w in zip(names, weights) if n in layer.adapters]
    if not present:
        return
    if method == "cat":
        a_parts = [_factor_params(layer.adapters[n])[0] * (w * layer.adapters[n].scaling) for n, w in present]
        b_parts = [_factor_params(layer.adapters[n])[1] for n, _ in present]
        a_cat, b_cat = torch.cat(a_parts, 0), torch.cat(b_parts, 1)
        a_t[: a_cat.shape[0]] = a_cat
        b_t[:, : b_cat.shape[1]] = b_cat
    elif method == "linear":
        a_sum = b_sum = 0
        for n, w in present:
            ws = w * layer.adapters[n].scaling
            a, b = _factor_params(layer.adapters[n])
            a_sum = a_sum + math.copysign(math.sqrt(abs(ws)), ws) * a
            b_sum = b_sum + math.sqrt(abs(ws)) * b
        a_t[: a_sum.shape[0]] = a_sum                                # a rank_pattern may give this layer
        b_t[:, : b_sum.shape[1]] = b_sum                             # fewer ranks than the new adapter
    else:  # svd
        delta = sum(w * layer.delta_weight(n) for n, w in present)
        if delta.dim() > 2:
            delta = delta.flatten(1)                                 # conv: (out, in·k·k)
        transposed = getattr(layer, "fan_in_fan_out", False) or isinstance(layer, LoraEmbedding)
        if transposed:
            delta = delta.t()                                        # back to (d, k)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(new_rank, s.numel())
        b_t[:, :r] = (u[:, :r] * s[:r]).view(b_t.shape[0], r, *b_t.shape[2:])
        a_t[:r] = vh[:r].view(r, *a_t.shape[1:])


def _factor_params(adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw A and B tensors of an adapter (their stored shapes)."""
    if hasattr(adapter, "lora_embedding_A"):
        return adapter.lora_embedding_A.data, adapter.lora_embedding_B.data
    return adapter.lora_A.weight.data, adapter.lora_B.weight.data
