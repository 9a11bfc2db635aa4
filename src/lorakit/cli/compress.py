"""`lorakit compress`: truncate an adapter to a lower rank by SVD (a PEFT-format adapter again)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..inspection import compress_adapter
from .flags import add_flag


def register(subparsers: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    c = subparsers.add_parser("compress", help="truncate an adapter to a lower rank by SVD",
                              formatter_class=fmt,
                              description="Keep the top K singular directions of every module's update s·B·A and "
                                          "write a PEFT-format adapter with r = lora_alpha = K.\nPrints the relative "
                                          "error ||ΔW - ΔW_K|| / ||ΔW|| per module and in total.",
                              epilog="example:\n  lorakit compress out/ --rank 4 --output-dir out-r4/")
    c.add_argument("adapter", metavar="DIR", help="adapter directory to compress (left untouched)")
    add_flag(c, "--rank", metavar="K", type=int, required=True, help="the new rank K")
    add_flag(c, "--output-dir", metavar="OUT", required=True, help="where to write the compressed adapter")
    add_flag(c, "--force", action="store_true", help="overwrite adapter files in a non-empty --output-dir")
    add_flag(c, "--top", metavar="N", type=int, default=10,
             help="how many of the worst modules to list (default: %(default)s)")
    add_flag(c, "--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=run_compress)


def run_compress(args: argparse.Namespace) -> int:
    rep = compress_adapter(args.adapter, args.rank, args.output_dir, force=args.force)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
        return 0
    worst = sorted(rep.modules, key=lambda m: m["error"], reverse=True)[: max(args.top, 0)]
    width = max([len(m["name"]) for m in worst], default=6)
    print(f"compressed {rep.source} -> {rep.output_dir}: {len(rep.modules)} modules to r={rep.rank}")
    print(f"  {'module':<{width}}  {'r':>4}  relative error")
    for m in worst:
        print(f"  {m['name']:<{width}}  {m['r']:>4}  {m['error']:.3e}")
    print(f"total relative error ||ΔW - ΔW_K|| / ||ΔW|| over all modules: {rep.total_error:.3e}")
    return 0
