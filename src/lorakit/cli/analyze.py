"""`lorakit analyze`: what a LoRA config costs on a model (parameters, FLOPs, memory), before training.

The LoRA flags are `lorakit sft`'s own (same names, help and defaults), so `analyze` with the
flags of a planned `sft` run describes that run.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..analysis import DTYPE_BYTES, analyze, plot
from ..analysis import __doc__ as ANALYSIS_DOC
from ..training.config import CHOICES, TrainConfig, lora_config_of
from .flags import add_config_flags, add_flag, defaults_of, settle
from .sft import ALIASES, CONVERTERS, LORA_FLAGS

COUNTED = ("lora", "dora")  # train types whose adapter analyze counts exactly


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "analyze", help="parameter, FLOP and memory cost of a LoRA config on a model (no weights loaded)",
        description=ANALYSIS_DOC,
        epilog="examples:\n  lorakit analyze --lora-rank 16 --target-modules all-linear\n  lorakit analyze "
               "--model path/to/config.json --lora-rank 8 --target-modules q_proj v_proj --plot r.png")
    add_flag(p, "--model", metavar="M", default="smollm2-135m-instruct",
             help="model name, local Hugging Face directory or config.json (default: %(default)s)")
    add_config_flags(p.add_argument_group("LoRA (the same flags as lorakit sft)"), TrainConfig, LORA_FLAGS, ALIASES,
                     CHOICES, CONVERTERS)
    add_flag(p, "--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="training dtype (default: %(default)s)")
    add_flag(p, "--batch-size", metavar="N", type=int, default=4,
             help="batch size for the activation estimate (default: %(default)s)")
    add_flag(p, "--max-length", metavar="N", type=int, default=512,
             help="tokens per row for the activation estimate (default: %(default)s)")
    add_flag(p, "--plot", metavar="PNG", help="also draw parameters and memory against r = 4…256 to this PNG file")
    add_flag(p, "--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    lora = {**defaults_of(TrainConfig), **settle(args, defaults_of(TrainConfig, LORA_FLAGS))}
    if lora["train_type"] not in COUNTED:
        raise ValueError(f"analyze counts {' and '.join(COUNTED)} adapters, not --train-type {lora['train_type']}: "
                         f"a qlora adapter is a lora adapter over a 4-bit base (pass lora), and adalora's ranks "
                         f"change while it trains")
    rep = analyze(args.model, lora_config_of(lora), dtype=args.dtype, batch_size=args.batch_size,
                  max_length=args.max_length)
    if args.plot:
        plot(rep, args.plot)
    print(json.dumps(rep.to_dict(), indent=2) if args.json else str(rep))
    if args.plot and not args.json:
        print(f"\nplot written to {args.plot}", file=sys.stderr)
    return 0
