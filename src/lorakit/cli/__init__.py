"""The command-line tier: `lorakit COMMAND ...`, one module per command (see `main.COMMANDS`)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
