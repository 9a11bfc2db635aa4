"""`lorakit combine`: a weighted mix of saved adapters (PEFT's add_weighted_adapter), saved as a new adapter."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..io import atomic_dir, check_dir_free, load_adapter, read_adapter_config, resolve_adapter_dir, save_adapter
from ..merge import combine
from ..models import load_model, model_task
from .flags import add_flag
from .loading import parse_adapters


def combine_adapters(model_name: str | None, adapter_dirs: list[str], weights: list[float], output_dir: str | Path,
                     method: str = "linear", rank: int | None = None, force: bool = False) -> Path:
    """Weighted combination of saved adapters written as a new adapter directory."""
    out = Path(output_dir)
    check_dir_free(out, replace=force)
    adapters = parse_adapters(adapter_dirs)
    if len(adapters) < 2:
        raise ValueError("combine needs at least two --adapter directories")
    cfgs = {n: read_adapter_config(resolve_adapter_dir(p, n)) for n, p in adapters.items()}
    bases = {c.base_model_name_or_path for c in cfgs.values() if c.base_model_name_or_path}
    if len(bases) > 1 and model_name is None:
        raise ValueError(f"the adapters were made for different base models {sorted(bases)}; "
                         f"they cannot be combined (pass --model to override if the bases are the same weights)")
    base = model_name or next(iter(bases), None)
    model = load_model(base, task=model_task(base, next(iter(cfgs.values())).task_type))
    for name, path in adapters.items():
        load_adapter(model, path, name=name)
    combine(model, list(adapters), weights, name="combined", method=method, rank=rank)
    return atomic_dir(out, lambda tmp: save_adapter(model, tmp, name="combined"), replace=force)


def run(args: argparse.Namespace) -> int:
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError as e:
        raise ValueError(f"--weights must be comma-separated numbers like 0.7,0.3, got {args.weights!r}") from e
    out = combine_adapters(args.model, args.adapter or [], weights, args.output_dir, args.method, args.rank, args.force)
    print(f"combined adapter written to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("combine", help="combine adapters with weights (linear, cat or svd)",
                       description="PEFT's add_weighted_adapter as a command. Example:\n  lorakit combine --adapter "
                                   "a/ --adapter b/ --weights 0.7,0.3 --method cat --output-dir ab/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(c, "--model", default=None, help="base model (default: the adapters' base_model_name_or_path)")
    add_flag(c, "--adapter", action="append", help="adapter directory (or NAME=DIR); give two or more")
    add_flag(c, "--weights", required=True, help="one weight per adapter, comma-separated, e.g. 0.7,0.3")
    add_flag(c, "--method", default="linear", choices=["linear", "cat", "svd"], help="how to combine (default linear)")
    add_flag(c, "--rank", type=int, default=None, help="svd: rank of the result (default: the largest input rank)")
    add_flag(c, "--output-dir", required=True, help="folder for the combined adapter")
    add_flag(c, "--force", action="store_true", help="replace a non-empty --output-dir")
    c.set_defaults(func=run)
