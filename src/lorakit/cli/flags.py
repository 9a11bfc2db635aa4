"""What every command shares on its command line: flag spellings, help read from field docs, and
the one rule for `--config` YAML.

- Flags are kebab-case (`--lora-rank`); ms-swift's snake_case spelling (`--lora_rank`) is the same
  option (`add_flag`), listed on the same help line (`HelpFormatter`).
- A command whose settings are a dataclass (`TrainConfig` for `sft`, `InferenceSettings` for
  `generate`/`chat`) gets one flag per field (`add_config_flags`); the field's attribute docstring
  is the flag's help, so the config and `--help` cannot disagree (litgpt's way).
- Precedence, for every command that takes `--config` (`settle`):

      flags typed on the command line  >  keys in the --config YAML  >  the dataclass defaults

  Such flags default to `argparse.SUPPRESS`, so the parsed namespace holds only what was typed.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import textwrap
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import parse_targets
from ..sampling import Sampling

__all__ = ["HelpFormatter", "InferenceSettings", "add_config_flags", "add_flag", "add_inference_flags",
           "field_docs", "parse_targets", "read_config", "settle", "settle_inference"]


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, *aliases: str, **kwargs) -> None:
    """Add `--some-flag` with its ms-swift spelling `--some_flag` (and any `aliases`) as one option."""
    names = [flag]
    if "-" in flag[2:]:
        names.append("--" + flag[2:].replace("-", "_"))
    for alias in aliases:
        if alias not in names:
            names.append(alias)
    parser.add_argument(*names, **kwargs)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option on one line with all its spellings and its value named once:
    `--lora-rank, --lora_rank, --rank, -r N`, then its help."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        value = self._format_args(action, self._get_default_metavar_for_optional(action))
        return ", ".join(action.option_strings) + " " + value


# --- flags from a dataclass -------------------------------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass's fields (the string under each field), by name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docs win
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError, IndexError):
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _kind(hint: Any) -> tuple[type, bool]:
    """(element type, is a list) of a field's type hint: `int | None` -> (int, False), `list[str]` -> (str, True)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is not list else [hint]
    args = args or [hint]
    is_list = any(typing.get_origin(a) is list for a in args)
    base = next((a for a in args if isinstance(a, type)), str)
    return (str if is_list else base), is_list


METAVARS = {"dataset": "FILE", "eval_dataset": "FILE", "output_dir": "DIR", "adapter": "DIR", "system": "TEXT",
            "target_modules": "NAME", "config": "YAML", "prompt": "TEXT", "prompts": "FILE", "output": "FILE"}


def _metavar(name: str) -> str:
    return METAVARS.get(name, name.split("_")[-1].upper())


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def defaults_of(cls: type, names: Iterable[str] | None = None) -> dict[str, Any]:
    """{field: default} of a dataclass (only `names`, in that order, when given)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return {name: (fields[name].default if fields[name].default is not dataclasses.MISSING
                   else fields[name].default_factory()) for name in (names or fields)}


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                     names: Iterable[str] | None = None, aliases: dict[str, list[str]] | None = None,
                     choices: dict[str, Iterable[str]] | None = None,
                     types: dict[str, Callable[[str], Any]] | None = None) -> dict[str, Any]:
    """One option per field of dataclass `cls` (or only `names`); returns {field: default}.

    Each option is `--field-name`, `--field_name` and `aliases[field]`; its help is the field's
    docstring, then its choices and default. Booleans take an optional true/false; list fields
    take one or more values (`--dataset a.jsonl b.jsonl`) and can be repeated. `types[field]`
    converts the typed text (e.g. other tools' spellings of a value).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    defaults = defaults_of(cls, names)
    for name, default in defaults.items():
        base, is_list = _kind(hints[name])
        allowed = list((choices or {}).get(name, ()))
        text = docs.get(name, name.replace("_", " ")).rstrip(".") + "."
        if allowed:
            text += f" One of: {', '.join(allowed)}."
        if default not in ([], "", None):
            text += f" Default: {_default_text(default)}."
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        convert = (types or {}).get(name)
        if base is bool:
            kwargs.update(nargs="?", const=True, type=convert or _parse_bool, metavar="BOOL")
        elif is_list:
            kwargs.update(action="extend", nargs="+", type=convert or str, metavar=_metavar(name))
        else:
            kwargs.update(type=convert or base, metavar=_metavar(name))
        add_flag(parser, "--" + name.replace("_", "-"), *(aliases or {}).get(name, []), **kwargs)
    return defaults


# --- the one precedence rule ------------------------------------------------------------------------
def read_config(path: str | Path) -> dict[str, Any]:
    """The mapping in a --config YAML file; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: file not found")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML ({e})") from e
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(loaded).__name__}")
    return loaded


def _options(parser: argparse.ArgumentParser, names: Iterable[str]) -> dict[str, argparse.Action]:
    """Every spelling of every option whose dest is in `names` (without dashes): {'lora_rank': action, ...}."""
    wanted = set(names)
    return {opt.lstrip("-"): action for action in parser._actions if action.dest in wanted
            for opt in action.option_strings}


def _yaml_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A YAML value read as the flag reads typed text: strings go through the flag's converter."""
    convert = action.type if callable(action.type) and action.type not in (str,) else None
    try:
        if isinstance(value, str) and convert is not None:
            return convert(value)
        if isinstance(value, list) and convert is not None:
            return [convert(v) if isinstance(v, str) else v for v in value]
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    return value


def settle(args: argparse.Namespace, defaults: dict[str, Any],
           translate: Callable[[dict[str, Any], Path], dict[str, Any]] | None = None) -> dict[str, Any]:
    """A command's settings: flags typed on the command line > keys in --config YAML > `defaults`.

    YAML keys are any spelling of a flag (`lora_rank`, `lora-rank`, `rank`), and string values go
    through the flag's own converter; `translate` first turns a command's own YAML forms into flag
    keys (the inference `lora_config:` block).
    """
    values = dict(defaults)
    if getattr(args, "config", None):
        path = Path(args.config)
        loaded = read_config(path)
        loaded.pop("resolved", None)  # the summary block a training run writes into its run.yaml
        if translate is not None:
            loaded = translate(loaded, path)
        options = _options(args._parser, defaults)
        for key, value in loaded.items():
            action = options.get(str(key)) or options.get(str(key).replace("-", "_"))
            if action is None:
                close = difflib.get_close_matches(str(key).replace("-", "_"), list(defaults), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"--config {path}: unknown key {key!r}{hint}; the keys are the flag names of "
                                 f"`{args._parser.prog}`, e.g. {', '.join(list(defaults)[:3])}")
            values[action.dest] = _yaml_value(action, value, f"--config {path}: {key}")
    values.update({k: v for k, v in vars(args).items() if k in defaults})
    return values


# --- generate / chat --------------------------------------------------------------------------------
@dataclass
class InferenceSettings:
    """What `lorakit generate` and `lorakit chat` run: a base model and adapters (plus `Sampling`)."""

    model: str | None = None
    """Base model: the embedded smollm2-135m-instruct, a local Hugging Face folder or a hub id. Unset: the first adapter's base_model_name_or_path (else the embedded model)."""
    adapter: list[str] = field(default_factory=list)
    """Adapter directory, or NAME=DIR; repeat for several (the first is active unless a row picks another)."""
    merge: bool = False
    """Merge the adapters into the weights before running (one forward pass per token, no per-row choice)."""
    system: str | None = None
    """System prompt put before every chat (causal LMs with a chat template)."""
    config: str | None = None
    """YAML file: these flags' names as keys, and/or `lora_config: {enabled, weights_path, merge_and_unload}`."""


SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "seed")
LORA_CONFIG_KEYS = {"enabled", "weights_path", "merge_and_unload"}


def add_inference_flags(p: argparse.ArgumentParser, settings: type = InferenceSettings) -> None:
    """The flags of a command that runs a model (`settings`' fields, then the sampling options)."""
    add_config_flags(p, settings)
    add_config_flags(p, Sampling, names=SAMPLING_FIELDS)
    p.set_defaults(_settings=settings)


def lora_config_block(loaded: dict[str, Any], path: Path) -> dict[str, Any]:
    """An inference YAML's `lora_config: {enabled, weights_path, merge_and_unload}` as flag keys."""
    lora = loaded.pop("lora_config", None)
    if lora is None:
        return loaded
    if not isinstance(lora, dict) or set(lora) - LORA_CONFIG_KEYS:
        raise ValueError(f"--config {path}: lora_config must be a mapping with keys {sorted(LORA_CONFIG_KEYS)}, "
                         f"got {lora!r}")
    if lora.get("enabled", True) and lora.get("weights_path"):
        paths = lora["weights_path"]
        loaded["adapter"] = [paths] if isinstance(paths, str) else list(paths)
        loaded["merge"] = bool(lora.get("merge_and_unload", False))
    return loaded


def settle_inference(args: argparse.Namespace) -> Sampling:
    """`settle` for a command that runs a model: fills `args` in place, returns the sampling options."""
    defaults = {**defaults_of(args._settings), **defaults_of(Sampling, SAMPLING_FIELDS)}
    vars(args).update(settle(args, defaults, translate=lora_config_block))
    return Sampling(**{k: getattr(args, k) for k in SAMPLING_FIELDS})
