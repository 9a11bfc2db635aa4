"""The `lorakit` command: one subcommand per module of this package, registered in `COMMANDS`.

A command module provides ``register(subparsers)``, which adds its parser and sets
``func=run`` (``run(args) -> int | None``). Flags are kebab-case; ms-swift's snake_case
spellings are accepted as aliases (`flags.add_flag`).
"""

from __future__ import annotations

import argparse
import difflib
import sys

from .. import __version__
from . import analyze, chat, combine, compress, data, demo, generate, inspect, merge, serve, sft
from .flags import HelpFormatter

COMMANDS = (sft, data, generate, chat, merge, combine, analyze, inspect, compress, serve, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning, small and fast. Run `lorakit COMMAND --help` for a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    for command_parser in sub.choices.values():
        command_parser.formatter_class = HelpFormatter
        command_parser.set_defaults(_parser=command_parser)
    return parser


def _unknown(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """Exit with the command's own usage (not the top-level one) and the closest real flags."""
    flags = [s for action in parser._actions for s in action.option_strings]
    hints = [f"{x} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(x.split("=")[0], flags, n=1))
             else x for x in extra]
    parser.error(f"unrecognized arguments: {' '.join(hints)}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unknown(getattr(args, "_parser", parser), extra)
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
