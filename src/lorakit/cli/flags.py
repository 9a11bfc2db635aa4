"""What every command shares on its command line: flag spellings, LoRA targets, `--config` YAML.

Flags are kebab-case (`--lora-rank`); ms-swift's snake_case spelling (`--lora_rank`) is the same
option (`add_flag`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, *aliases: str, **kwargs) -> None:
    """Add `--some-flag` with its ms-swift spelling `--some_flag` (and any `aliases`) as one option."""
    names = [flag]
    if "-" in flag[2:]:
        names.append("--" + flag[2:].replace("-", "_"))
    for alias in aliases:
        if alias not in names:
            names.append(alias)
    parser.add_argument(*names, **kwargs)


def parse_targets(values: list[str] | str) -> list[str] | str:
    """--target-modules: "all-linear", one regex (has regex characters), or names split on commas/spaces."""
    text = ",".join([values] if isinstance(values, str) else values)
    if text.lower() == "all-linear" or any(c in text for c in "*[]()|^$\\?+"):
        return text
    return [t.strip() for t in text.replace(" ", ",").split(",") if t.strip()]


def apply_inference_config(args: argparse.Namespace) -> None:
    """--config YAML: flag names as keys, plus `lora_config: {enabled, weights_path, merge_and_unload}`."""
    if not getattr(args, "config", None):
        return
    path = Path(args.config)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: file not found")
    cfg = yaml.safe_load(path.read_text()) or {}
    lora = cfg.pop("lora_config", None) or {}
    if lora.get("enabled", True) and lora.get("weights_path"):
        paths = lora["weights_path"]
        args.adapter = (args.adapter or []) + ([paths] if isinstance(paths, str) else list(paths))
        args.merge = args.merge or bool(lora.get("merge_and_unload", False))
    for key, value in cfg.items():
        name = key.replace("-", "_")
        if not hasattr(args, name):
            raise ValueError(f"--config {path}: unknown key {key!r}")
        if getattr(args, name) in (None, False, []):
            setattr(args, name, value)


DEFAULTS = {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "seed": 0, "batch_size": 16}


def settle_inference(args: argparse.Namespace) -> None:
    """Flags > --config > defaults."""
    apply_inference_config(args)
    for key, value in DEFAULTS.items():
        if getattr(args, key, value) is None:
            setattr(args, key, value)


def add_inference_flags(p: argparse.ArgumentParser) -> None:
    add_flag(p, "--model", default=None, help="base model (default: the embedded smollm2-135m-instruct)")
    add_flag(p, "--adapter", action="append", help="adapter directory, or NAME=DIR; repeatable")
    add_flag(p, "--merge", action="store_true", help="merge the adapters into the weights before generating")
    add_flag(p, "--max-new-tokens", type=int, default=None, help="tokens to generate at most (default 256)")
    add_flag(p, "--temperature", type=float, default=None, help="0 = greedy (default); > 0 samples")
    add_flag(p, "--top-p", type=float, default=None, help="nucleus sampling threshold when sampling (default 1.0)")
    add_flag(p, "--seed", type=int, default=None, help="random seed for sampling (default 0)")
    add_flag(p, "--system", default=None, help="system prompt")
    add_flag(p, "--config", default=None, help="YAML with these flags as keys, and/or "
                                               "lora_config: {enabled, weights_path, merge_and_unload}")
