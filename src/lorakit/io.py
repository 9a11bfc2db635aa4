"""Adapters as files, in PEFT's format: adapter_config.json + adapter_model.safetensors.

In memory an adapter's tensors live at ``<module>.adapters.<name>.<tensor>``; on disk, as PEFT
writes them, at ``base_model.model.<module>.<tensor>`` with these tensor names:

    lora_A.weight  lora_B.weight  lora_embedding_A  lora_embedding_B  lora_magnitude_vector

A ``modules_to_save`` copy is stored under the original module path (``…classifier.weight``).
Every file is written atomically (temp file in the same folder, then os.replace); weights load
only from safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import adalora
from .config import LoraConfig
from .inject import inject_layers, set_trainable
from .layers import LoraLayer, uninitialised
from .modules_to_save import ModulesToSave
from .state import drop_state, get_state, lora_layers, require_state, set_child

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                   "lora_A", "lora_B", "lora_E")  # the last three: AdaLoRA's bare parameters (adalora.py)


# --- atomic writes -------------------------------------------------------------------------------
def atomic_write(path: str | Path, write: Any) -> None:
    """Call write(tmp_path) on a temp file next to `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_dir(path: str | Path, write: Any, replace: bool = False) -> Path:
    """Build a folder whole, then put it at `path` in one rename.

    write(tmp) fills a hidden temp folder beside `path`. A crash leaves `path` as it was (and no
    temp folder). An existing non-empty `path` raises FileExistsError unless `replace`, in which
    case the old folder is moved aside, the new one renamed in, and the old one removed.
    """
    path = Path(path)
    check_dir_free(path, replace)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            if not replace and _non_empty(path):  # another process got there first
                raise FileExistsError(f"{path} appeared while it was being written")
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def check_dir_free(path: str | Path, replace: bool = False) -> None:
    """Raise FileExistsError when `path` is a file or a non-empty folder and may not be replaced
    (commands call it before slow work, so the refusal comes first)."""
    path = Path(path)
    if _non_empty(path) and not replace:
        raise FileExistsError(f"{path} is not empty; pick a new folder or pass --force to replace it")


def _non_empty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        bin_path = path.with_suffix(".bin")
        if bin_path.is_file():
            raise ValueError(f"{bin_path} is a pickle file; lorakit loads weights only from safetensors. Convert it "
                             f"once in a trusted environment: safetensors.torch.save_file(torch.load(...), "
                             f"'{path.name}')")
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a valid safetensors file ({e}); it may be truncated or damaged: "
                         f"save the adapter again") from e


# --- saving ----------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's on-disk keys."""
    state = require_state(model)
    if name not in state.configs:
        raise ValueError(f"no adapter named {name!r}; this model has {list(state.configs)}")
    cfg = state.configs[name]
    out: dict[str, torch.Tensor] = {}
    for mod_name, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        for key, tensor in layer.adapters[name].state_dict().items():
            out[f"{PREFIX}{mod_name}.{key}"] = tensor
        bias = getattr(layer.base_layer, "bias", None)
        if cfg.bias == "lora_only" and bias is not None:
            out[f"{PREFIX}{mod_name}.base_layer.bias"] = bias
    for mod_name, module in model.named_modules():
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            for key, tensor in module.modules_to_save[name].state_dict().items():
                out[f"{PREFIX}{mod_name}.{key}"] = tensor
    if cfg.bias == "all":
        for pname, param in model.named_parameters():
            if pname.endswith("bias") and ".adapters." not in pname and ".modules_to_save." not in pname:
                out.setdefault(PREFIX + pname.replace(".original_module.", "."), param)
    if isinstance(cfg, adalora.AdaLoraConfig):  # PEFT saves only the ranks AdaLoRA kept
        out = adalora.file_tensors(out, cfg, PREFIX)
    return out


def adapter_param_names(model: nn.Module, name: str = "default") -> dict[str, str]:
    """PEFT key -> the model's own parameter name, for every tensor `adapter_state_dict` saves."""
    layers = dict(lora_layers(model))
    savers = {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSave)}
    return {key: _memory_key(key[len(PREFIX):], name, layers, savers) for key in adapter_state_dict(model, name)}


def save_adapter(model: nn.Module, path: str | Path, name: str = "default",
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter `name` to directory `path` in PEFT's format; returns the directory.

    `tensors`: the adapter's tensors under PEFT's keys when gathered elsewhere (a sharded model).
    """
    path = Path(path)
    tensors = adapter_state_dict(model, name) if tensors is None else tensors
    cfg = require_state(model).configs[name]
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / WEIGHTS_NAME, tensors)
    write_json(path / CONFIG_NAME, cfg.to_peft_dict())
    return path


# --- loading ----------------------------------------------------------------------------------------
def read_adapter_config(path: str | Path) -> LoraConfig:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); the file is damaged") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(raw).__name__}")
    config_type = adalora.AdaLoraConfig if raw.get("peft_type") == adalora.PEFT_TYPE else LoraConfig
    return config_type.from_peft_dict(raw, source=str(file))


def resolve_adapter_dir(path: str | Path, name: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    if not (path / CONFIG_NAME).is_file() and (path / name / CONFIG_NAME).is_file():
        return path / name  # PEFT saves non-default adapters in a sub-folder named after them
    return path


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", trainable: bool = False) -> nn.Module:
    """Load a lorakit- or PEFT-saved adapter into `model` as `name`, injecting LoRA layers as needed."""
    path = resolve_adapter_dir(path, name)
    cfg = read_adapter_config(path)
    tensors = read_safetensors(path / WEIGHTS_NAME)
    state = get_state(model)
    if state is not None and name in state.configs:
        raise ValueError(f"an adapter named {name!r} is already loaded; pass another name= or delete_adapter() it")
    plan = _plan_load(model, cfg, tensors, path)  # validate before touching the model
    grad_before = [(p, p.requires_grad) for p in model.parameters()]
    with uninitialised():  # every tensor is about to be overwritten: no init to pay for
        layers = inject_layers(model, cfg.replace(init="default"), name=name)
    try:
        _copy_tensors(model, name, plan, path, layers)
    except BaseException:  # e.g. a shape mismatch: leave no half-loaded adapter behind
        _undo_inject(model, name, grad_before)
        raise
    if cfg.modules_to_save:
        set_trainable(model, name, trainable)
    else:  # the layers are known: no walk over the (now much larger) module tree
        for layer in layers.values():
            layer.adapters[name].requires_grad_(trainable)
            layer.adapters[name]._trainable = trainable
    return model


def copy_adapter_weights(model: nn.Module, path: str | Path, name: str = "default") -> None:
    """Overwrite the tensors of adapter `name`, already on `model`, with those saved in `path`
    (a checkpoint being resumed): same checks as `load_adapter`, nothing injected."""
    path = Path(path)
    tensors = read_safetensors(path / WEIGHTS_NAME)
    _copy_tensors(model, name, _plan_load(model, read_adapter_config(path), tensors, path), path)


def _undo_inject(model: nn.Module, name: str, grad_before: list[tuple[torch.Tensor, bool]]) -> None:
    """Remove adapter `name` and unwrap every layer it left empty; restore requires_grad flags."""
    from .adapters import delete_adapter

    delete_adapter(model, name)
    for mod_name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and not module.adapters:
            set_child(model, mod_name, module.base_layer)
        elif isinstance(module, ModulesToSave) and not module.modules_to_save:
            set_child(model, mod_name, module.original_module)
    if not require_state(model).configs:
        drop_state(model)
    for param, flag in grad_before:
        param.requires_grad_(flag)


def _plan_load(model: nn.Module, cfg: LoraConfig, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, t in tensors.items():
        stripped[key[len(PREFIX):] if key.startswith(PREFIX) else key] = t
    modules = dict(model.named_modules())
    for key in stripped:
        mod_name = _owner(key)
        base_name = mod_name.removesuffix(".base_layer")
        if base_name not in modules and mod_name not in modules:
            raise ValueError(f"{path / WEIGHTS_NAME}: key {PREFIX + key!r} is for module {base_name!r}, which "
                             f"{type(model).__name__} does not have; was this adapter made for another model?")
    return stripped


def _owner(key: str) -> str:
    for tail in ADAPTER_TENSORS:
        if key.endswith("." + tail):
            return key[: -len(tail) - 1]
    return key.rsplit(".", 1)[0]


def _copy_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: Path,
                  layers: dict[str, LoraLayer] | None = None) -> None:
    """Copy file tensors into adapter `name`; `layers` (from inject_layers) spares a walk of the model."""
    layers = dict(lora_layers(model)) if layers is None else layers
    params: dict[str, torch.Tensor] | None = None  # every named parameter: built only for non-adapter keys
    savers: dict[str, ModulesToSave] = {}
    loaded: dict[str, set[str]] = {}
    with torch.no_grad():
        for key, value in tensors.items():
            dest, target_key = _adapter_tensor(key, name, layers)
            if dest is None:
                if params is None:
                    params = dict(model.named_parameters())
                    params.update(dict(model.named_buffers()))
                    savers = {n: m for n, m in model.named_modules() if isinstance(m, ModulesToSave)}
                target_key = _memory_key(key, name, layers, savers)
                if target_key not in params:
                    raise ValueError(f"{path / WEIGHTS_NAME}: key {PREFIX + key!r} has no place in the model "
                                     f"(looked for {target_key!r}); the adapter config and weights disagree")
                dest = params[target_key]
            if dest.shape != value.shape:
                raise ValueError(f"{path / WEIGHTS_NAME}: shape mismatch for {_owner(key)!r} ({key.rsplit('.', 1)[-1] if key.endswith('weight') else key.split('.')[-1]}): "
                                 f"file has {tuple(value.shape)}, model expects {tuple(dest.shape)}; "
                                 f"was it trained with another r or for another model?")
            dest.copy_(value)
            mod, _, tail = target_key.partition(f".adapters.{name}.")
            loaded.setdefault(mod, set()).add(tail)
    _init_missing(layers, name, loaded, path)


def _adapter_tensor(key: str, name: str, layers: dict[str, LoraLayer]) -> tuple[torch.Tensor | None, str]:
    """(the in-memory tensor, its key) for an adapter tensor of a known layer; (None, "") otherwise."""
    for tail in ADAPTER_TENSORS:
        if key.endswith("." + tail):
            mod = key[: -len(tail) - 1]
            layer = layers.get(mod)
            if layer is not None and name in layer.adapters:
                try:
                    return layer.adapters[name].get_parameter(tail), f"{mod}.adapters.{name}.{tail}"
                except AttributeError:
                    return None, ""
    return None, ""


def _init_missing(layers: dict[str, LoraLayer], name: str, loaded: dict[str, set[str]], path: Path) -> None:
    """Adapter tensors the file lacks get their usual init (they were left uninitialised), with a warning."""
    missing = []
    for mod, layer in layers.items():
        adapter = layer.adapters[name] if name in layer.adapters else None
        absent = [] if adapter is None else [k for k, _ in adapter.named_parameters() if k not in loaded.get(mod, ())]
        if not absent:
            continue
        missing += [f"{mod}.adapters.{name}.{k}" for k in absent]
        kept = {k: p.detach().clone() for k, p in adapter.named_parameters() if k not in absent}
        layer.reset_adapter(name)
        with torch.no_grad():
            for k, value in kept.items():
                adapter.get_parameter(k).copy_(value)
    if missing:
        warnings.warn(f"{path / WEIGHTS_NAME} has no tensors for {len(missing)} adapter weights "
                      f"(e.g. {missing[:3]}); those keep their initial values", stacklevel=4)


def _memory_key(key: str, name: str, layers: dict[str, Any], savers: dict[str, ModulesToSave]) -> str:
    for tail in ADAPTER_TENSORS:
        if key.endswith("." + tail):
            mod = key[: -len(tail) - 1]
            if mod in layers:
                return f"{mod}.adapters.{name}.{tail}"
    for mod in savers:
        if key.startswith(mod + "."):
            return f"{mod}.modules_to_save.{name}.{key[len(mod) + 1:]}"
    return key
