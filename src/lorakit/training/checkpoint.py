"""Training checkpoints: everything `--resume` needs to continue exactly, without pickle.

    checkpoints/step-N/
        adapter_config.json, adapter_model.safetensors   the adapter (PEFT format)
        optimizer.safetensors + trainer_state.json        optimizer tensors; scalars, scheduler,
                                                          RNG, data position, last loss
A checkpoint is built in a hidden temp folder and renamed into place, so a crash leaves either
a whole checkpoint or none.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..io import (WEIGHTS_NAME, atomic_dir, copy_adapter_weights, read_safetensors, save_adapter, write_json,
                  write_safetensors)

_STEP = re.compile(r"^step-(\d+)$")


def _optimizer_to_files(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as safetensors (the tensors) plus JSON (the rest)."""
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars[f"state.{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(root: Path, step: int, model: nn.Module, adapter: str, optimizer: torch.optim.Optimizer,
                    scheduler: Any, trainer_state: dict, keep: int | None = None,
                    tensors: dict[str, torch.Tensor] | None = None, optimizer_state: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically; then keep only the newest `keep` checkpoints.

    `tensors` (the adapter under PEFT keys) and `optimizer_state` (a state_dict): when gathered
    whole from a sharded model (distributed.full_adapter / full_optimizer); else read from
    `model` and `optimizer`.
    """
    def write(tmp: Path) -> None:
        save_adapter(model, tmp, name=adapter, tensors=tensors)
        opt_tensors, opt_meta = _optimizer_to_files(optimizer_state or optimizer.state_dict())
        rng_tensors, rng_meta = rng_state()
        write_safetensors(tmp / "optimizer.safetensors", opt_tensors)
        write_safetensors(tmp / "rng_state.safetensors", rng_tensors)
        state = dict(trainer_state, step=step, optimizer=opt_meta, scheduler=scheduler.state_dict(), rng=rng_meta)
        write_json(tmp / "trainer_state.json", state)

    final = atomic_dir(root / f"step-{step}", write, replace=True)
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, model: nn.Module, adapter: str, optimizer: torch.optim.Optimizer,
                    scheduler: Any, load_weights: Callable[[dict, dict], None] | None = None) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG from `path`; return the trainer state.

    `load_weights(adapter_tensors, optimizer_state)` replaces the plain copy into `model` and
    `optimizer` (a sharded model: distributed.load_full_state).
    """
    state = json.loads((path / "trainer_state.json").read_text())
    opt_state = _optimizer_from_files(read_safetensors(path / "optimizer.safetensors"), state["optimizer"])
    if load_weights is None:
        copy_adapter_weights(model, path, adapter)
        optimizer.load_state_dict(opt_state)
    else:
        load_weights(read_safetensors(path / WEIGHTS_NAME), opt_state)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(read_safetensors(path / "rng_state.safetensors"), state["rng"])
    return state
