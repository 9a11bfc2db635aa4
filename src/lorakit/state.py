"""What a model with adapters carries: the shared `LoraState`, and walks over its LoRA modules.

``inject`` hangs one ``LoraState`` on the model (``model.__dict__["_lorakit_state"]``, not a
submodule, so ``state_dict`` and ``save_pretrained`` never see it); every LoRA layer of that model
holds the same object. It records each adapter's config and which adapters are in use; the named
calls (``set_adapter``, ``disabled``, ``per_row``, ``shared_dropout``) edit it, and ``forward`` only
reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from .layers import LoraLayer
from .modules_to_save import ModulesToSave

if TYPE_CHECKING:
    from .config import LoraConfig
    from .dropout import DropoutDraws
    from .routing import Routing

STATE_KEY = "_lorakit_state"


@dataclass
class LoraState:
    """What all LoRA layers of one model share: the adapters' configs and which are in use."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    """Every adapter on the model, by name, in the order they were added."""
    active: tuple[str, ...] = ()
    """Adapters a forward applies (their updates add up)."""
    disabled: bool = False
    """Inside `lorakit.disabled(model)`: every layer computes its base output only."""
    routing: Routing | None = None
    """Inside `lorakit.per_row(model, names)`: row i of a batch uses names[i]."""
    dropout_draws: DropoutDraws | None = None
    """Inside `lorakit.shared_dropout(model)`: the forward's dropout draws, one per input tensor, shared
    by the LoRA linears that read it. None: every layer draws its own mask."""


def get_state(model: nn.Module, create: bool = False) -> LoraState | None:
    """The model's LoraState (None when it has no adapters, unless `create`)."""
    state = model.__dict__.get(STATE_KEY)
    if state is None and create:
        state = LoraState()
        model.__dict__[STATE_KEY] = state
    return state


def require_state(model: nn.Module) -> LoraState:
    """The model's LoraState, or an error saying how to give the model adapters."""
    state = get_state(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters; call lorakit.inject(model, config) "
                         f"or lorakit.load_adapter(model, path) first")
    return state


def drop_state(model: nn.Module) -> None:
    """Forget the model's adapters' bookkeeping (after its last LoRA module is gone)."""
    model.__dict__.pop(STATE_KEY, None)


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(qualified name, layer) of every LoRA layer, in named_modules() order."""
    return [(name, module) for name, _, _, module in wrapped_modules(model) if isinstance(module, LoraLayer)]


def wrapped_modules(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(qualified name, parent, attribute, module) of every LoraLayer and ModulesToSave, in
    named_modules() order. Walks the module tree without entering LoRA layers (their adapters
    are most of a model's modules), so merge / unload / save visit each wrapper cheaply."""
    found: list[tuple[str, nn.Module, str, nn.Module]] = []
    seen: set[int] = {id(model)}

    def walk(prefix: str, parent: nn.Module) -> None:
        for key, child in parent._modules.items():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(child, (LoraLayer, ModulesToSave)):
                found.append((name, parent, key, child))
            if not isinstance(child, LoraLayer):
                walk(name, child)

    walk("", model)
    return found


def set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` ("a.b.c") is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
