"""Several processes, one run: torch.distributed under torchrun, with DDP or FSDP2.

    torchrun --nproc-per-node N -m lorakit sft ...        (`lorakit sft --nproc N ...` launches this)
      every process   the same data order; rows g[rank::N] of each global micro-batch g (`share`)
      ddp             the whole model on every process; LoRA gradients all-reduced once per step
      fsdp            fully_shard per decoder block + the root: base and LoRA sharded,
                      LoRA gradients reduce-scattered once per step
      saving          the whole adapter and optimizer state gathered to rank 0, which alone writes

The gradient scale: a process divides its token-loss sum by the trained tokens of the whole step
(all processes, all micro-batches: an all-reduce of the counts) and multiplies by N, because DDP
and FSDP average gradients over processes. N processes with batch b then get the gradient one
process gets from batch N*b, so their losses and adapter agree to float32 rounding.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..io import PREFIX, adapter_param_names, adapter_state_dict
from ..state import require_state
from .checkpoint import list_checkpoints

_FULL = dict(full_state_dict=True, cpu_offload=True)  # gathered whole, onto rank 0's CPU only


@dataclass
class World:
    """Who this process is, and how the processes share the work."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mode: str = "none"                      # none (one plain process) | ddp | fsdp
    backend: str = "gloo"                   # gloo (CPU) | nccl (CUDA)
    device: torch.device = torch.device("cpu")
    owns_group: bool = False                # this World started the process group, so it ends it

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode != "none"


def launched() -> bool:
    """True inside a process started by torchrun (it sets these variables)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_from_env(cfg: Any) -> World:
    """This process's World from torchrun's variables and the config; every check that needs no
    model runs here, before any work (NCCL without GPUs, a batch the processes cannot share)."""
    size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    mode = cfg.distributed if cfg.distributed != "auto" else ("ddp" if size > 1 else "none")
    cuda = torch.cuda.is_available()
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ValueError("--dist-backend nccl needs CUDA GPUs, and torch sees none here; use --dist-backend gloo "
                         "(CPU processes) or run where GPUs are visible")
    if backend == "nccl" and mode != "none" and local >= torch.cuda.device_count():
        raise ValueError(f"process {local} on this node has no GPU of its own: {torch.cuda.device_count()} GPUs are "
                         f"visible; start at most that many processes per node (--nproc / --nproc-per-node)")
    if mode == "fsdp" and cfg.train_type in ("qlora", "adalora"):
        raise ValueError(f"--distributed fsdp does not support --train-type {cfg.train_type}; use --distributed ddp")
    if mode == "none":
        device = torch.device("cuda") if cuda else torch.device("cpu")
    else:
        device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    if device.index is not None:
        torch.cuda.set_device(device)  # before the model loads, so each process fills its own GPU
    world = World(rank=rank, size=size, local_rank=local, mode=mode, backend=backend, device=device)
    if cfg.resume:
        check_resume_batch(cfg, world)
    return world


def check_resume_batch(cfg: Any, world: World) -> None:
    """--resume continues the data order only with the checkpoint's global batch (processes x batch)."""
    found = list_checkpoints(Path(cfg.output_dir) / "checkpoints")
    if not found:
        return  # Trainer.resume says there is nothing to resume
    saved = json.loads((found[-1] / "trainer_state.json").read_text())
    procs = saved.get("world_size", 1)
    batch = saved["config"]["batch_size"]
    want, have = procs * batch, world.size * cfg.batch_size
    if want == have:
        return
    run = f"{found[-1]} was trained on global batches of {want} rows ({_procs(procs)} x --batch-size {batch})"
    if want % world.size:
        raise ValueError(f"--resume: {run}, which {_procs(world.size)} cannot share evenly (the world size must "
                         f"divide the global batch); resume with a number of processes that divides {want}")
    raise ValueError(f"--resume: {run}; with {_procs(world.size)} pass --batch-size {want // world.size} to keep "
                     f"its batches (this run has {world.size} x {cfg.batch_size} = {have})")


def _procs(n: int) -> str:
    return f"{n} process" + ("es" if n != 1 else "")


def start(world: World) -> None:
    """Join (or, for one process given --distributed, create) the process group."""
    if not world.active or dist.is_initialized():
        return
    if "MASTER_ADDR" in os.environ:  # torchrun's rendezvous
        dist.init_process_group(world.backend, timeout=timedelta(minutes=30))
    else:  # one process asked for --distributed without torchrun: a group of one
        dist.init_process_group(world.backend, store=dist.HashStore(), rank=0, world_size=1)
    world.owns_group = True


def close(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        world.owns_group = False


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def sum_all(world: World, *values: float) -> list[float]:
    """Each value summed over all processes (one all-reduce, in float64)."""
    if not world.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def share(world: World, rows: list[int]) -> tuple[list[int], bool]:
    """This process's rows of one global micro-batch: rows[rank::size], so the rows stay disjoint and
    long and short rows spread over the processes. A process left with none (the short last batch
    of an epoch) gets a stand-in row and False: it must still run forward and backward (the
    gradient reduction needs every process), with its loss weighted 0."""
    mine = rows[world.rank::world.size]
    return (mine, True) if mine else (rows[:1], False)


def step_seed(world: World, seed: int, step: int) -> None:
    """Under torch.distributed each process draws dropout from its own stream, fixed by (seed, step,
    rank), so masks differ between processes and a resumed run draws what the first run would."""
    if world.active:
        torch.manual_seed(seed * 1_000_003 + step * 1_009 + world.rank)


# --- wrapping -----------------------------------------------------------------------------------------
def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one at a time: the classes in `_no_split_modules` (Hugging Face
    models), else the members of the outermost nn.ModuleLists of one module type."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        taken: set[int] = set()
        for module in model.modules():
            if (isinstance(module, nn.ModuleList) and len(module) > 1 and id(module) not in taken
                    and len({type(child) for child in module}) == 1):
                blocks += list(module)
                taken.update(id(m) for m in module.modules())
    if not blocks:
        raise ValueError(f"--distributed fsdp shards the model one decoder block at a time, but "
                         f"{type(model).__name__} has no blocks it can recognise (no `_no_split_modules` classes, "
                         f"no nn.ModuleList of repeated layers); use --distributed ddp, which keeps a whole copy "
                         f"of the model in every process")
    return blocks


def wrap(world: World, model: nn.Module) -> nn.Module:
    """Join the process group and prepare `model` for it; returns what a training forward must call.

    ddp: a DistributedDataParallel wrapper that knows only the trainable parameters (the frozen base
    is never broadcast or reduced); no static_graph, which breaks with no_sync. fsdp: the model itself,
    sharded in place on an explicit mesh of the backend's device type (the default mesh follows the
    accelerator, which breaks gloo jobs on GPU machines).
    """
    if not world.active:
        return model
    blocks = decoder_blocks(model) if world.mode == "fsdp" else []  # refuse before starting anything
    start(world)
    if world.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen + [n for n, _ in model.named_buffers()])
        ids = [world.device.index] if world.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def grad_sync(world: World, train_model: nn.Module, sync: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: reduce gradients only when `sync` (the last
    micro-batch of a step); the others accumulate locally (DDP no_sync, FSDP2 requires_gradient_sync)."""
    if world.mode == "ddp" and not sync:
        with train_model.no_sync():
            yield
        return
    if world.mode == "fsdp":
        train_model.set_requires_gradient_sync(sync)
    yield


def to_float(value: torch.Tensor) -> float:
    """A scalar that may be a DTensor (FSDP's gradient norm) as a Python float."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)


# --- whole state for saving and resuming -------------------------------------------------------------
def full_adapter(world: World, model: nn.Module, name: str) -> dict[str, torch.Tensor] | None:
    """Adapter `name` under PEFT's keys, whole, on rank 0 (None on the others: all must call this).

    Under FSDP only the adapter is gathered, never the base (`ignore_frozen_params`). Every
    tensor is checked before it may reach a file: see `check_whole`.
    """
    if world.mode != "fsdp":  # every process holds the whole adapter
        return adapter_state_dict(model, name) if world.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    names = adapter_param_names(model, name)  # PEFT key -> parameter name
    full = get_model_state_dict(model, options=StateDictOptions(**_FULL, ignore_frozen_params=True))
    tensors = {key: full[fqn] for key, fqn in names.items() if fqn in full}
    if not world.is_main:
        return None
    check_whole(model, name, tensors)
    return tensors


def check_whole(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to write an adapter with a missing, empty or partial (one shard's) tensor: each must have
    the model's whole shape (a sharded parameter reports its global shape) and the config's rank r."""
    from torch.distributed.tensor import DTensor

    expected = {key: tuple(t.shape) for key, t in adapter_state_dict(model, name).items()}
    cfg = require_state(model).configs[name]
    problems = [f"{key}: missing" for key in expected if key not in tensors]
    for key, tensor in tensors.items():
        shape, want = tuple(tensor.shape), expected.get(key)
        module = key.removeprefix(PREFIX).rsplit(".", 2)[0]
        r = cfg.rank_and_alpha(module)[0]
        rank_dim = 0 if ".lora_A." in key else 1 if ".lora_B." in key else None
        if isinstance(tensor, DTensor) or tensor.numel() == 0 or shape != want or (
                rank_dim is not None and shape[rank_dim] != r):
            problems.append(f"{key}: {type(tensor).__name__} of shape {shape}, expected {want} (r={r})")
    if problems:
        raise RuntimeError(f"refusing to write adapter {name!r}: {len(problems)} tensors are not whole "
                           f"({'; '.join(problems[:3])}); a sharded model must be gathered before saving")


def full_optimizer(world: World, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """The optimizer's state_dict() as one process would have it (states by parameter index), on rank 0."""
    if world.mode != "fsdp":
        return optimizer.state_dict() if world.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**_FULL))
    if not world.is_main:
        return None
    order = {fqn: i for i, fqn in enumerate(fqn for g in full["param_groups"] for fqn in g["params"])}
    return {"state": {order[fqn]: st for fqn, st in full["state"].items()},
            "param_groups": [dict(g, params=[order[f] for f in g["params"]]) for g in full["param_groups"]]}


def state_loader(world: World, model: nn.Module, name: str,
                 optimizer: torch.optim.Optimizer) -> Callable[[dict, dict], None] | None:
    """For checkpoint.load_checkpoint: how a sharded model takes a checkpoint (None: copy in place)."""
    if world.mode != "fsdp":
        return None
    return lambda tensors, opt_state: load_full_state(model, name, optimizer, tensors, opt_state)


def load_full_state(model: nn.Module, name: str, optimizer: torch.optim.Optimizer,
                    tensors: dict[str, torch.Tensor], opt_state: dict) -> None:
    """Put a whole adapter (PEFT keys) and optimizer state (by parameter index) into a sharded model:
    every process passes the same whole state and keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = adapter_param_names(model, name)
    shapes = {key: tuple(t.shape) for key, t in adapter_state_dict(model, name).items()}  # global shapes
    bad = [f"{key} (file {tuple(t.shape)}, model {shapes.get(key, 'has no such tensor')})"
           for key, t in tensors.items() if tuple(t.shape) != shapes.get(key)]
    if bad:
        raise ValueError(f"the checkpoint's adapter does not fit this model's adapter {name!r}: {'; '.join(bad[:3])}; "
                         f"was it trained with another r or for another model?")
    by_fqn = {names[key]: t for key, t in tensors.items()}
    set_model_state_dict(model, by_fqn, options=StateDictOptions(full_state_dict=True, strict=False))
    fqn_of = {id(p): n for n, p in model.named_parameters()}
    order = [fqn_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    full = {"state": {order[int(i)]: st for i, st in opt_state["state"].items()},
            "param_groups": [dict(g, params=[order[i] for i in g["params"]]) for g in opt_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))
