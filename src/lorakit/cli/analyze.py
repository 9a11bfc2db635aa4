"""`lorakit analyze`: what a LoRA config costs on a model (parameters, FLOPs, memory), before training."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..analysis import DTYPE_BYTES, analyze, plot
from ..analysis import __doc__ as ANALYSIS_DOC
from ..config import LoraConfig
from .flags import add_flag, parse_targets


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "analyze", help="parameter, FLOP and memory cost of a LoRA config on a model (no weights loaded)",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=ANALYSIS_DOC,
        epilog="examples:\n  lorakit analyze --lora-rank 16 --target-modules all-linear\n  lorakit analyze "
               "--model path/to/config.json --lora-rank 8 --target-modules q_proj,v_proj --plot r.png")
    add_flag(p, "--model", metavar="M", default="smollm2-135m-instruct",
             help="model name, local Hugging Face directory or config.json (default: %(default)s)")
    add_flag(p, "--lora-rank", metavar="R", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    add_flag(p, "--lora-alpha", metavar="ALPHA", type=float, help="LoRA alpha (default: 2 × rank; no effect on counts)")
    add_flag(p, "--target-modules", metavar="NAMES", nargs="+", default=["all-linear"],
             help="module-name suffixes (q_proj,v_proj or q_proj v_proj), one regex, or all-linear (default)")
    add_flag(p, "--use-dora", action="store_true", help="count DoRA's magnitude vectors too")
    add_flag(p, "--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES), help="training dtype (default: %(default)s)")
    add_flag(p, "--batch-size", metavar="N", type=int, default=4,
             help="batch size for the activation estimate (default: %(default)s)")
    add_flag(p, "--max-length", metavar="N", type=int, default=512,
             help="tokens per row for the activation estimate (default: %(default)s)")
    add_flag(p, "--plot", metavar="PNG", help="also draw parameters and memory against r = 4…256 to this PNG file")
    add_flag(p, "--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = LoraConfig(r=args.lora_rank, alpha=args.lora_alpha or 2 * args.lora_rank,
                     target_modules=parse_targets(args.target_modules), use_dora=args.use_dora)
    rep = analyze(args.model, cfg, dtype=args.dtype, batch_size=args.batch_size, max_length=args.max_length)
    if args.plot:
        plot(rep, args.plot)
    print(json.dumps(rep.to_dict(), indent=2) if args.json else str(rep))
    if args.plot and not args.json:
        print(f"\nplot written to {args.plot}", file=sys.stderr)
    return 0
