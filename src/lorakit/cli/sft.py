"""`lorakit sft`: one flag per TrainConfig field (its docstring is the help), plus `--config run.yaml`.

Precedence (`flags.settle`): flags typed on the command line > keys in --config > TrainConfig defaults.
Every flag takes its kebab-case name (`--lora-rank`), its snake_case one (`--lora_rank`) and the
names ms-swift 4 gives it (`ALIASES`); values in other tools' spellings are read as lorakit's
(`SPELLINGS`), and what makes no sense here is refused with the reason (`REFUSED`, `REFUSED_FLAGS`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Callable

from ..training.config import CHOICES, TrainConfig
from .flags import add_config_flags, add_flag, defaults_of, settle

ALIASES = {  # other names of a flag (ms-swift 4's among them), shown on the flag's help line
    "lora_rank": ["--rank", "-r"], "learning_rate": ["--lr"], "dataset": ["--train-file"],
    "epochs": ["--num-train-epochs", "--num_train_epochs"],
    "batch_size": ["--per-device-train-batch-size", "--per_device_train_batch_size"],
    "grad_accum": ["--gradient-accumulation-steps", "--gradient_accumulation_steps"],
    "eval_dataset": ["--val-dataset", "--val_dataset"],
    "train_type": ["--tuner-type", "--tuner_type"],
    "lr_scheduler": ["--lr-scheduler-type", "--lr_scheduler_type"],
    "precision": ["--torch-dtype", "--torch_dtype"],
    "nproc": ["--nproc-per-node", "--nproc_per_node"],
}
SPELLINGS = {  # values other tools use -> lorakit's
    "precision": {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"},
    "lr_scheduler": {"constant_with_warmup": "constant"},
}
REFUSED = {  # values lorakit does not take, and why
    "train_type": {"full": "full fine-tuning trains every weight; lorakit trains adapters only"},
    "save_strategy": {"epoch": "lorakit checkpoints every --save-steps optimizer steps (and at the end); pass "
                               "--save-steps N instead",
                      "best": "lorakit does not pick checkpoints by a metric; it keeps the newest --save-total-limit"},
}
WHY_NOT = {  # the reason for any other value outside the choices
    "train_type": "an ms-swift tuner lorakit does not implement",
    "lr_scheduler": "a transformers schedule lorakit does not implement",
}
REFUSED_FLAGS = {  # ms-swift flags that make no sense here
    "--model_type": "lorakit reads the model's type from its config.json; drop the flag",
    "--template": "lorakit formats chat rows with the tokenizer's own chat template (--system adds a system prompt)",
    "--quant_bits": "lorakit quantizes the base only to 4-bit NF4, with --train-type qlora",
    "--deepspeed": "lorakit scales out with torchrun and PyTorch's DDP/FSDP, not DeepSpeed",
}
SAVE_STRATEGIES = ("steps", "no")
GROUPS = {  # the sections of `lorakit sft --help`; fields not listed go under "other settings"
    "data and model": ("model", "dataset", "eval_dataset", "output_dir", "task", "max_length", "system",
                       "num_labels", "adapter", "dry_run"),
    "LoRA": ("train_type", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init"),
    "optimization": ("epochs", "max_steps", "learning_rate", "loraplus_lr_ratio", "weight_decay", "batch_size",
                     "grad_accum", "group_by_length", "packing", "warmup_ratio", "warmup_steps", "lr_scheduler", "max_grad_norm", "precision",
                     "gradient_checkpointing", "seed"),
    "checkpoints, evaluation and logs": ("save_steps", "save_total_limit", "eval_steps", "eval_metric",
                                         "eval_max_new_tokens", "eval_max_rows", "logging_steps", "resume"),
    "several processes (torchrun)": ("nproc", "distributed", "dist_backend", "nnodes", "rdzv_backend",
                                     "rdzv_endpoint", "rdzv_id"),
}
LORA_FLAGS = GROUPS["LoRA"][:5]  # the LoRA flags `lorakit analyze` shares


def choice(name: str, allowed: tuple[str, ...]) -> Callable[[str], str]:
    """A flag's value converter: other tools' spellings become lorakit's; the rest is refused, saying why."""
    def convert(text: str) -> str:
        value = SPELLINGS.get(name, {}).get(text.lower(), text)
        if value in allowed:
            return value
        why = REFUSED.get(name, {}).get(text)
        why = why or (f"{text!r} is {WHY_NOT[name]}" if name in WHY_NOT else f"got {text!r}")
        raise argparse.ArgumentTypeError(f"{why}; choose one of {', '.join(allowed)}")
    return convert


CONVERTERS = {name: choice(name, allowed) for name, allowed in CHOICES.items()}


class _Refused(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} is not supported: {REFUSED_FLAGS[self.option_strings[0]]}")


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag, in help sections; then --config, --save-strategy, --debug."""
    grouped = {name for names in GROUPS.values() for name in names}
    rest = tuple(name for name in defaults_of(TrainConfig) if name not in grouped)
    for title, names in [*GROUPS.items(), ("other settings", rest)]:
        if names:
            add_config_flags(parser.add_argument_group(title), TrainConfig, names, ALIASES, CHOICES, CONVERTERS)
    run = parser.add_argument_group("this command")
    add_flag(run, "--config", dest="config", default=None, metavar="YAML",
             help="YAML file whose keys are these flags' names (an earlier run's run.yaml works); "
                  "flags typed on the command line win over it")
    add_flag(run, "--save-strategy", dest="save_strategy", default=argparse.SUPPRESS, metavar="S",
             type=choice("save_strategy", SAVE_STRATEGIES),
             help="ms-swift's checkpoint policy: steps (every --save-steps) or no (only at the end)")
    add_flag(run, "--debug", dest="debug", action="store_true", help="show full tracebacks on errors")
    for flag in REFUSED_FLAGS:
        parser.add_argument(flag, flag.replace("_", "-"), nargs="?", action=_Refused, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The flags and --config YAML (`flags.settle`) as a validated TrainConfig."""
    values = settle(args, {**defaults_of(TrainConfig), "save_strategy": "steps"})
    if values.pop("save_strategy") == "no":
        if values["save_steps"]:
            raise ValueError(f"--save-strategy no saves only at the end; drop --save-steps {values['save_steps']}")
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
        if name in _LAUNCHER or name.startswith("_") or value is None or (name == "debug" and not value):
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
    p = sub.add_parser("sft", help="fine-tune a model with LoRA on your data", usage="%(prog)s --dataset FILE [flags]",
                       description="Supervised fine-tuning with LoRA. Every flag is also a key of --config YAML; "
                                   "ms-swift's spellings work too.\n\nexample:\n  lorakit sft --dataset data.jsonl "
                                   "--lora-rank 16 --max-steps 200 --output-dir runs/my-adapter")
    add_train_flags(p)
    p.set_defaults(func=run_sft)
