"""The `lorakit` command. Each subcommand lives in its own module and registers itself here.

A command module provides ``register(subparsers)``, which adds its parser and sets
``func=run`` (``run(args) -> int | None``). Flags are kebab-case; ms-swift's snake_case
spellings are accepted as aliases (see ``add_flag``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that registers it
COMMANDS = {
    "sft": "lorakit.train_cli",
    "data": "lorakit.train_cli",
    "generate": "lorakit.generate",
    "chat": "lorakit.generate",
    "merge": "lorakit.export",
    "combine": "lorakit.export",
    "analyze": "lorakit.analyze",
    "inspect": "lorakit.inspector",
    "compress": "lorakit.inspector",
    "serve": "lorakit.serve",
}


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, **kwargs) -> None:
    """Add `--some-flag` and its ms-swift spelling `--some_flag` as one option."""
    names = [flag]
    if "-" in flag[2:]:
        names.append("--" + flag[2:].replace("-", "_"))
    parser.add_argument(*names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning, small and fast. Run `lorakit COMMAND --help` for a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen = set()
    for module_name in dict.fromkeys(COMMANDS.values()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # not written yet
                continue
            raise
        if module_name not in seen:
            module.register(sub)
            seen.add(module_name)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
