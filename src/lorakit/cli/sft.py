"""`lorakit sft`: flags built from TrainConfig's fields, plus `--config run.yaml`.

Precedence: flags given on the command line > keys in --config > TrainConfig defaults.
Every flag takes its kebab-case name (`--lora-rank`) and ms-swift's snake_case one (`--lora_rank`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import yaml

from .flags import add_flag
from ..training.trainer import TrainConfig

HELP = {
    "dataset": "training data file (JSONL/JSON/CSV/Parquet); repeat the flag for several files",
    "eval_dataset": "held-out data file for evaluation; repeatable",
    "model": "base model: 'smollm2-135m-instruct' (embedded), a local Hugging Face folder, or a hub id",
    "output_dir": "where the adapter, checkpoints/, metrics.jsonl, loss.png, run.yaml and report.md go",
    "task": "causal_lm | seq_cls | seq2seq | auto (decided from the first row's shape)",
    "train_type": "lora | dora | qlora (4-bit NF4 quantized base, needs bitsandbytes) | adalora (rank "
                  "--lora-rank shrinking to half of it on average, allocated by importance)",
    "lora_rank": "LoRA rank r", "lora_alpha": "LoRA alpha; the update is scaled by alpha / r",
    "lora_dropout": "dropout on the LoRA branch input", "target_modules":
    "modules to adapt: comma-separated name suffixes (q_proj,v_proj), one regex, or all-linear",
    "adapter": "continue training this existing adapter directory",
    "resume": "continue exactly from the newest checkpoint in --output-dir",
    "dry_run": "print a few tokenised rows with the trained tokens highlighted, then exit",
    "config": "YAML file whose keys are these flags' names (run.yaml of an earlier run works)",
    "loraplus_lr_ratio": "LoRA+: B matrices learn at learning-rate x this ratio (e.g. 16)",
    "max_steps": "number of optimizer steps; -1 means use --epochs",
    "precision": "auto (bf16 on a bf16 GPU, fp16 on an older one, fp32 on CPU) | fp32 | bf16 (the frozen base "
                 "kept in bf16, LoRA weights, grads and optimizer in fp32; fast only where the hardware has bf16 "
                 "units, e.g. CPU flags avx512_bf16 / amx_bf16) | fp16 (CUDA)",
    "packing": "concatenate each batch's rows into one sequence without padding (llama-family causal LMs; "
               "other models train on padded batches)",
    "batch_size": "rows per micro-batch in each process (N processes train on global batches of N x this)",
    "distributed": "auto | ddp | fsdp: how several processes share the work; auto is ddp when there are several "
                   "(fsdp also shards the frozen base, one decoder block at a time)",
    "dist_backend": "auto | gloo | nccl: torch.distributed backend; auto is nccl with GPUs, else gloo (CPU)",
    "nproc": "processes on this node: N > 1 relaunches this command as `torchrun --nproc-per-node N -m lorakit sft`",
    "nnodes": "torchrun --nnodes: how many nodes (or MIN:MAX); more than 1 needs --rdzv-endpoint",
    "rdzv_backend": "torchrun --rdzv-backend (with --rdzv-endpoint)",
    "rdzv_endpoint": "torchrun --rdzv-endpoint HOST:PORT: where the nodes meet (a host every node can reach)",
    "rdzv_id": "torchrun --rdzv-id: one id per job, the same on every node",
}
ALIASES = {"lora_rank": ["--rank", "-r"], "learning_rate": ["--lr"], "epochs": ["--num-train-epochs", "--num_train_epochs"],
           "batch_size": ["--per-device-train-batch-size", "--per_device_train_batch_size"],
           "grad_accum": ["--gradient-accumulation-steps", "--gradient_accumulation_steps"],
           "dataset": ["--train-file"], "eval_dataset": ["--val-dataset", "--val_dataset"],
           "nproc": ["--nproc-per-node", "--nproc_per_node"]}


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = _optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = HELP.get(f.name, f.name.replace("_", " ")) + (f" (default: {default})" if default not in ([], None) else "")
        kwargs: dict = {"dest": f.name, "help": help_, "default": argparse.SUPPRESS}
        if tp is bool:
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        elif typing.get_origin(tp) is list:
            kwargs.update(action="extend", nargs="+", type=str, metavar="FILE")
        else:
            kwargs.update(type=tp, metavar=f.name.split("_")[-1].upper())
        add_flag(parser, flag, **kwargs)
        for alias in ALIASES.get(f.name, []):
            parser.add_argument(alias, **{k: v for k, v in kwargs.items()})
    add_flag(parser, "--config", dest="config", default=None, metavar="YAML", help=HELP["config"])
    add_flag(parser, "--debug", dest="debug", action="store_true", help="show full tracebacks")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge --config YAML and explicit flags into a validated TrainConfig."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: not valid YAML ({e})") from e
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a mapping of flag names to values")
        loaded.pop("resolved", None)  # the summary block a run writes into its run.yaml
        for key, value in loaded.items():
            name = key.replace("-", "_")
            if name not in names:
                raise ValueError(f"--config {path}: unknown key {key!r}; keys are the `lorakit sft` flag names, "
                                 f"e.g. lora_rank, learning_rate, dataset")
            values[name] = value
    for name in names:
        if hasattr(args, name):
            values[name] = getattr(args, name)
    return TrainConfig(**values)


_LAUNCHER = {"command", "func", "nproc", "nnodes", "rdzv_backend", "rdzv_endpoint", "rdzv_id"}


def torchrun_command(cfg: TrainConfig, args: argparse.Namespace) -> list[str]:
    """`torchrun --nproc-per-node N [rendezvous] -m lorakit sft FLAGS`: this command under torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.nproc), "--nnodes", cfg.nnodes]
    if cfg.rdzv_endpoint:
        cmd += ["--rdzv-backend", cfg.rdzv_backend, "--rdzv-endpoint", cfg.rdzv_endpoint, "--rdzv-id", cfg.rdzv_id]
    elif cfg.nnodes == "1":
        cmd.append("--standalone")  # one node: a free local port for the rendezvous
    else:
        raise ValueError(f"--nnodes {cfg.nnodes} needs --rdzv-endpoint HOST:PORT, a host and free port every "
                         f"node can reach (e.g. the first node's name and 29500)")
    flags = []
    for name, value in vars(args).items():
        if name in _LAUNCHER or value is None or (name == "debug" and not value):
            continue  # torchrun's options stay with torchrun (an abbreviation like --nproc would confuse it)
        flag = "--" + name.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            flags += [flag] if name == "debug" else [flag, str(v).lower() if isinstance(v, bool) else str(v)]
    return cmd + ["-m", "lorakit", "sft", *flags]


def run_sft(args: argparse.Namespace) -> int:
    from ..training import distributed
    from ..training.trainer import Trainer

    cfg = config_from_args(args)
    if (cfg.nproc > 1 or cfg.nnodes != "1" or cfg.rdzv_endpoint) and not (distributed.launched() or cfg.dry_run):
        cmd = torchrun_command(cfg, args)
        print("launching: torchrun " + shlex.join(cmd[3:]), flush=True)
        return subprocess.call(cmd)
    Trainer(cfg).train()
    if not cfg.dry_run and int(os.environ.get("RANK", "0")) == 0:
        print(f"adapter written to {cfg.output_dir}/ (adapter_config.json, adapter_model.safetensors)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="fine-tune a model with LoRA on your data",
                       description="Supervised fine-tuning with LoRA. Example:\n  lorakit sft --dataset data.jsonl "
                                   "--lora-rank 16 --max-steps 200 --output-dir runs/my-adapter",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_flags(p)
    p.set_defaults(func=run_sft)
