"""Many adapters on one base: list, switch, disable, delete, route per row, share dropout; parameter counts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .dropout import DropoutDraws
from .merge import merge, unmerge
from .modules_to_save import ModulesToSave
from .routing import Routing
from .state import get_state, lora_layers, require_state, wrapped_modules


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on `model`, in the order they were added."""
    state = get_state(model)
    return list(state.configs) if state else []


def active_adapters(model: nn.Module) -> list[str]:
    return list(require_state(model).active)


def _check_known(model: nn.Module, names: Sequence[str], what: str) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{what}: unknown adapter name(s) {unknown}; this model has {known}")


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Activate one adapter, or several at once (their updates add up)."""
    names = [names] if isinstance(names, str) else list(names)
    _check_known(model, names, "set_adapter")
    state = require_state(model)
    merged = {n for _, layer in lora_layers(model) for n in layer.merged}
    stray = merged - set(names)
    if stray:
        raise ValueError(f"set_adapter: adapters {sorted(stray)} are merged into the base weights; "
                         f"call lorakit.unmerge(model) before switching")
    state.active = tuple(names)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, the model computes the base model's outputs (merged adapters are unmerged, then re-merged)."""
    state = require_state(model)
    merged = _merged_names(model)
    unmerge(model)
    previous, state.disabled = state.disabled, True
    try:
        yield model
    finally:
        state.disabled = previous
        if merged:
            merge(model, merged)


def _merged_names(model: nn.Module) -> list[str]:
    seen: list[str] = []
    for _, layer in lora_layers(model):
        seen += [n for n in layer.merged if n not in seen]
    return seen


@contextmanager
def per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Row i of every batch inside uses adapter names[i]; None means the base model for that row.

    Works for a plain forward and for `model.generate` (the batch keeps its rows while decoding;
    beam search repeats each row, and the routing follows). Inference only, unmerged only.
    Entering builds everything the layers need (index tensors, each linear's per-row factors:
    `routing.Routing`); forward only reads it, so change adapter weights outside the block.
    """
    names = list(names)
    if not names:
        raise ValueError("per_row needs one adapter name (or None) per batch row, got an empty list")
    _check_known(model, [n for n in names if n is not None], "per_row")
    state = require_state(model)
    if _merged_names(model):
        raise ValueError("per_row cannot route rows while adapters are merged into the base weights; "
                         "call lorakit.unmerge(model) first")
    if model.training and any(p.requires_grad for p in model.parameters()):
        raise ValueError("per_row is for inference: call model.eval() first (mixed-adapter batches are not "
                         "supported in training mode)")
    previous, state.routing = state.routing, Routing(names, [m for _, _, _, m in wrapped_modules(model)])
    try:
        yield model
    finally:
        state.routing = previous


def reroute(model: nn.Module, names: Sequence[str | None]) -> None:
    """Inside a `per_row` block: route a batch whose rows changed (rows joined or left, as in the
    serving engine) to `names`, re-using the adapter factors the block prepared (`Routing.regroup`)."""
    names = list(names)
    state = require_state(model)
    if state.routing is None:
        raise RuntimeError("reroute works inside a per_row block; use lorakit.per_row(model, names) to enter one")
    if not names:
        raise ValueError("reroute needs one adapter name (or None) per batch row, got an empty list")
    _check_known(model, [n for n in names if n is not None], "reroute")
    state.routing = state.routing.regroup(names)


@contextmanager
def using(model: nn.Module, rows: Sequence[str | None] | str | None) -> Iterator[nn.Module]:
    """Inside, the model runs with the adapters `rows` asks for; the one place that chooses how.

    - None: whatever is active now (nothing changes);
    - a name, or a list whose rows all name it: that adapter alone (`set_adapter`; the previous
      active adapters come back on exit);
    - a list of Nones: the base model (`disabled`; nothing to do on a model without adapters);
    - a list naming different adapters (None: the base model for that row): row i uses rows[i]
      (`per_row`).
    """
    if rows is None:
        yield model
        return
    names = [rows] if isinstance(rows, str) else list(rows)
    distinct = set(names)
    if distinct == {None}:
        if get_state(model) is None:
            yield model
        else:
            with disabled(model):
                yield model
        return
    if len(distinct) > 1:
        with per_row(model, names):
            yield model
        return
    state = require_state(model)
    previous = state.active
    set_adapter(model, names[0])
    try:
        yield model
    finally:
        state.active = previous


@contextmanager
def shared_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, LoRA branches that read the same input tensor share one dropout mask per forward.

    q, k and v of an attention block (gate and up of a gated MLP) read the same hidden states;
    inside this block their LoRA branches take the same draw: each still sees inverted dropout of
    its input with probability p, but the masked input is built once for all of them, in forward
    and again in backward (faster; PEFT draws one mask per module). Outside it every layer draws
    its own mask, as PEFT. Masks stay reproducible either way: a draw comes from a seed from
    torch's generator, which activation checkpointing replays.

    Use one block per forward + backward, as the trainer does for each micro-batch::

        with lorakit.shared_dropout(model):
            model(**batch).loss.backward()
    """
    state = require_state(model)
    previous, state.dropout_draws = state.dropout_draws, DropoutDraws()
    try:
        yield model
    finally:
        state.dropout_draws.release()
        state.dropout_draws = previous


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter's tensors everywhere. Refuses if it is merged into the base."""
    _check_known(model, [name], "delete_adapter")
    state = require_state(model)
    layers = lora_layers(model)
    if any(name in layer.merged for _, layer in layers):
        raise ValueError(f"adapter {name!r} is merged into the base weights; call lorakit.unmerge(model) "
                         f"before deleting it")
    for _, layer in layers:
        if name in layer.adapters:
            del layer.adapters[name]
    for module in model.modules():
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            del module.modules_to_save[name]
    del state.configs[name]
    state.active = tuple(n for n in state.active if n != name)
    if not state.active and state.configs:
        state.active = (next(iter(state.configs)),)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counted as PEFT does (4-bit packed weights count twice per byte)."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if type(param).__name__ == "Params4bit":
            n *= 2 * param.element_size()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print exactly PEFT's line: `trainable params: X || all params: Y || trainable%: Z`."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / total:.4f}")
