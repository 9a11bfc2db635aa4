"""`lorakit inspect`: what a trained adapter changed, module by module."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..inspection import format_stats, heatmap, inspect_adapter
from ..io import read_adapter_config, resolve_adapter_dir
from .flags import add_flag

INSPECT_DESCRIPTION = """\
Show what a trained adapter changed, module by module: the size of each update
ΔW = scale·B·A (Frobenius norm), its size relative to the base weight (with --model), its
singular values and effective rank (how many directions hold 90 % / 99 % of ||ΔW||²), and the
modules that changed most. The adapter is only read. --json prints every module."""


def register(subparsers: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("inspect", help="what a trained adapter changed, module by module",
                              formatter_class=fmt, description=INSPECT_DESCRIPTION,
                              epilog="example:\n  lorakit inspect out/ --model smollm2-135m-instruct --plot heat.png")
    p.add_argument("adapter", metavar="DIR", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    add_flag(p, "--model", metavar="M", help="base model (name or directory): adds ||ΔW|| / ||W0|| per module")
    add_flag(p, "--top", metavar="N", type=int, default=10,
             help="how many of the most-changed modules to list (default: %(default)s)")
    add_flag(p, "--plot", metavar="PNG", help="draw a heat map (layer × module) to this PNG file")
    add_flag(p, "--json", action="store_true", help="print every module's statistics as JSON")
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    stats = inspect_adapter(args.adapter, model=args.model)
    if args.plot:
        heatmap(stats, args.plot)
    if args.json:
        print(json.dumps([s.to_dict() for s in stats], indent=2))
    else:
        cfg = read_adapter_config(resolve_adapter_dir(args.adapter, "default"))
        targets = cfg.target_modules
        if isinstance(targets, list) and len(targets) > 8:  # resolved names: show the module types
            targets = sorted({t.rsplit(".", 1)[-1] for t in targets})
        print(f"adapter: {args.adapter}  (r={cfg.r}, alpha={cfg.alpha}, rslora={cfg.use_rslora}, "
              f"target_modules={targets!r})")
        print(format_stats(stats, args.top) + (f"\n\nheat map written to {args.plot}" if args.plot else ""))
    return 0
