"""inject: rewrite a module tree so the targeted modules carry a named LoRA adapter.

Target matching follows PEFT exactly, so a config means the same thing in both:
- a list matches a module whose name equals an entry or ends with "." + entry;
- a string is a regular expression that must match the whole module name;
- "all-linear" is every nn.Linear / Conv1D except the output head.

`inject` also chooses, per target, the layer kind (`bases.kind`: LoraLinear, LoraEmbedding,
LoraConv; AdaLoRA's SVDLinear for an AdaLoraConfig) and the adapter kind (DoraAdapter when
``use_dora``, else Adapter); a config only describes.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from . import bases
from .adalora import AdaLoraConfig, wrap_svd_layer
from .config import LoraConfig
from .dora import DoraAdapter
from .layers import Adapter, LoraConv, LoraEmbedding, LoraLayer
from .linear import LoraLinear
from .modules_to_save import ModulesToSave
from .pissa import apply_init
from .state import LoraState, get_state, lora_layers, set_child
from .tasks import peft_task_type

_SEQ_CLS_HEADS = ("classifier", "score")
_LAYER_KINDS: dict[str, type[LoraLayer]] = {"linear": LoraLinear, "embedding": LoraEmbedding, "conv": LoraConv}


def is_suffix_match(name: str, keys: list[str]) -> bool:
    return any(name == k or name.endswith("." + k) for k in keys)


def _layer_index(name: str, pattern: list[str] | str | None) -> int | None:
    if not pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m:
                break
    return int(m.group("idx")) if m else None


def _matches(cfg: LoraConfig, name: str) -> bool:
    excl = cfg.exclude_modules
    if excl and (re.fullmatch(excl, name) if isinstance(excl, str) else is_suffix_match(name, excl)):
        return False
    if cfg.modules_to_save and any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in cfg.modules_to_save):
        return False
    targets = cfg.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if not is_suffix_match(name, targets):
        return False
    if cfg.layers_to_transform is not None:
        return _layer_index(name, cfg.layers_pattern) in cfg.layers_to_transform
    return True


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Module names a target may refer to: everything but LoRA internals and saved copies."""
    out, skip = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            skip.append(name)
        out.append((name, module))
    return out


def resolve_all_linear(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """PEFT's "all-linear": every Linear/Conv1D except the output head (or the classifier head)."""
    names = [n for n, m in _candidates(model)
             if bases.is_linear(m) or (isinstance(m, LoraLayer) and bases.is_linear(m.base_layer))]
    exclude = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None and (cfg.task_type or peft_task_type(type(model).__name__)) == "SEQ_CLS":
        head = next((getattr(model, h) for h in _SEQ_CLS_HEADS if getattr(model, h, None) is not None), None)
    if head is not None:
        exclude |= {n for n, m in model.named_modules() if m is head or getattr(m, "base_layer", None) is head}
    return sorted(set(names) - exclude)


def find_targets(model: nn.Module, cfg: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs cfg adapts, in model order. Raises if nothing matches."""
    if cfg.target_modules is None:
        raise ValueError("target_modules is not set: pass module-name suffixes such as ['q_proj', 'v_proj'], "
                         "a regex, or 'all-linear'")
    if isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear":
        cfg = cfg.replace(target_modules=resolve_all_linear(model, cfg))
    found = [(n, m) for n, m in _candidates(model) if _matches(cfg, n)]
    if not found:
        raise ValueError(_no_match_message(model, cfg))
    return found


def _no_match_message(model: nn.Module, cfg: LoraConfig) -> str:
    names = [n for n, _ in _candidates(model)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = [cfg.target_modules] if isinstance(cfg.target_modules, str) else cfg.target_modules
    close = sorted({c for w in wanted for c in difflib.get_close_matches(w, leaves + names, n=5, cutoff=0.5)})
    hint = f"closest module names: {close}" if close else f"module names in this model include: {leaves[:20]}"
    extra = f" (with layers_to_transform={cfg.layers_to_transform})" if cfg.layers_to_transform is not None else ""
    return f"target_modules={cfg.target_modules!r} matched no module of {type(model).__name__}{extra}; {hint}"


def inject(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Add a LoRA adapter called `name` to `model` in place and return the same model.

    The base model's parameters are frozen; the new adapter's parameters (plus `bias` and
    `modules_to_save` as configured) are trainable. The first adapter injected becomes active;
    later ones are added inactive (as PEFT's add_adapter), switch with `set_adapter`.
    """
    inject_layers(model, config, name)
    return model


def inject_layers(model: nn.Module, config: LoraConfig, name: str = "default") -> dict[str, LoraLayer]:
    """`inject`, returning {module name: LoRA layer} for the layers that got adapter `name`.

    Callers that go on to touch those layers (load_adapter) use this instead of walking the
    model again: after injection a walk visits every adapter submodule too.
    """
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
    state = get_state(model, create=True)
    if name in state.configs:
        raise ValueError(f"an adapter named {name!r} already exists on this model "
                         f"(adapters: {sorted(state.configs)}); pick another name or delete_adapter() it first")
    cfg = config
    if cfg.task_type is None:
        cfg = cfg.replace(task_type=peft_task_type(type(model).__name__))
    if cfg.base_model_name_or_path is None:
        path = getattr(getattr(model, "config", None), "name_or_path", None) or getattr(model, "name_or_path", None)
        if path:
            cfg = cfg.replace(base_model_name_or_path=str(path))
    if isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == "all-linear":
        cfg = cfg.replace(target_modules=resolve_all_linear(model, cfg))
    targets = find_targets(model, cfg)
    if any(bases.is_conv1d(getattr(m, "base_layer", m)) for _, m in targets):
        cfg = cfg.replace(fan_in_fan_out=True)

    first = not state.configs
    for param in model.parameters():
        param.requires_grad_(False)
    if not first:
        _restore_trainable(model, state)
    modules = dict(model.named_modules())  # parents by name: one walk instead of a lookup per target
    injected: dict[str, LoraLayer] = {}
    kind = DoraAdapter if cfg.use_dora else Adapter
    for mod_name, module in targets:
        layer = _layer_for(module, cfg, state, mod_name)
        r, alpha = cfg.rank_and_alpha(mod_name)
        adapter = layer.add_adapter(name, r, alpha, cfg, kind)
        adapter.requires_grad_(True)
        if layer is not module:
            parent_name, _, child = mod_name.rpartition(".")
            setattr(modules[parent_name], child, layer)
        injected[mod_name] = layer
        if cfg.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(True)
    _add_modules_to_save(model, cfg, name, state)
    if cfg.bias == "all":  # as PEFT: every ".bias" except the frozen originals behind modules_to_save copies
        for pname, param in model.named_parameters():
            if (pname == "bias" or pname.endswith(".bias")) and ".original_module." not in pname:
                param.requires_grad_(True)
    state.configs[name] = cfg
    if first:
        state.active = (name,)
    apply_init(model, name, cfg)  # PiSSA / OLoRA rewrite base weights; plain inits are done already
    return injected


def _layer_for(module: nn.Module, cfg: LoraConfig, state: LoraState, name: str) -> LoraLayer:
    """The layer that will hold cfg's adapter on `module` (the module itself when it is one already)."""
    if isinstance(cfg, AdaLoraConfig):  # AdaLoRA's SVD-form update has a layer kind of its own
        return wrap_svd_layer(module, state, name)
    if isinstance(module, LoraLayer):
        return module
    layer_kind = _LAYER_KINDS.get(bases.kind(module))
    if layer_kind is None:
        raise TypeError(f"module {name!r} is a {type(module).__name__}; LoRA supports {bases.SUPPORTED}. "
                        f"Narrow target_modules so it matches only supported layers")
    return layer_kind(module, state, name)


def _restore_trainable(model: nn.Module, state: LoraState) -> None:
    """Re-enable what earlier inject calls made trainable (freezing the base must not freeze them)."""
    for _, layer in lora_layers(model):
        for ad_name, adapter in layer.adapters.items():
            adapter.requires_grad_(getattr(adapter, "_trainable", True))
    for module in model.modules():
        if isinstance(module, ModulesToSave):
            for copy_ in module.modules_to_save.values():
                copy_.requires_grad_(getattr(copy_, "_trainable", True))


def _add_modules_to_save(model: nn.Module, cfg: LoraConfig, name: str, state: LoraState) -> None:
    if not cfg.modules_to_save:
        return
    found = False
    for mod_name, module in _candidates(model):
        if not is_suffix_match(mod_name, cfg.modules_to_save):
            continue
        found = True
        if not isinstance(module, ModulesToSave):
            wrapper = ModulesToSave(module, state)
            set_child(model, mod_name, wrapper)
            module = wrapper
        module.add_adapter(name)
    if not found:
        raise ValueError(f"modules_to_save={cfg.modules_to_save!r} matched no module of {type(model).__name__}; "
                         f"use the module's name as printed by print(model), e.g. 'classifier' or 'score'")


def set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    """Make one adapter's parameters (and its modules_to_save copies) trainable or frozen."""
    for _, layer in lora_layers(model):
        if name in layer.adapters:
            layer.adapters[name].requires_grad_(trainable)
            layer.adapters[name]._trainable = trainable
    for module in model.modules():
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            module.modules_to_save[name].requires_grad_(trainable)
            module.modules_to_save[name]._trainable = trainable
