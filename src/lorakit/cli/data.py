"""`lorakit data`: how rows are tokenised and which tokens are trained (`lorakit sft --dry-run`)."""

from __future__ import annotations

import argparse

from .sft import add_train_flags, run_sft


def run(args: argparse.Namespace) -> int:
    args.dry_run = True
    return run_sft(args)


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("data", help="show how rows are tokenised and which tokens are trained",
                       usage="%(prog)s --dataset FILE [flags]",
                       description="Same flags as `lorakit sft`; prints a few tokenised rows and dataset stats.")
    add_train_flags(d)
    d.set_defaults(func=run)
