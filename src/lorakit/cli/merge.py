"""`lorakit merge`: base + adapter(s) written as one plain transformers checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import adapters as ad
from ..io import atomic_dir, check_dir_free, load_adapter
from ..merge import merge_and_unload
from .flags import add_flag
from .loading import load_base, parse_adapters

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge_to_checkpoint(model_name: str | None, adapter_dirs: list[str], output_dir: str | Path,
                        dtype: str = "float32", force: bool = False, max_shard_size: str = "2GB") -> Path:
    """Load base + adapters, merge (checked for NaN/Inf), and save a plain transformers checkpoint.

    The tokenizer is copied when the base model has one; merging does not need it.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    adapters = parse_adapters(adapter_dirs)
    if not adapters:
        raise ValueError("--adapter is required: the adapter directory to merge")
    out = Path(output_dir)
    check_dir_free(out, replace=force)
    model, tokenizer = load_base(model_name, adapters, tokenizer_optional=True)
    for name, path in adapters.items():
        load_adapter(model, path, name=name)
    ad.set_adapter(model, list(adapters))
    plain = merge_and_unload(model, safe=True).to(DTYPES[dtype])

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    atomic_dir(out, write, replace=force)
    if tokenizer is None:
        print(f"note: the base model has no tokenizer files, so {out} holds the merged model only; "
              f"copy a tokenizer in to use it for generation")
    return out


def run(args: argparse.Namespace) -> int:
    out = merge_to_checkpoint(args.model, args.adapter or [], args.output_dir, args.dtype, args.force)
    print(f"merged checkpoint written to {out} (loads with transformers alone)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="merge adapters into the base and save a plain checkpoint",
                       description="Write base + adapter(s) as one ordinary transformers checkpoint (safetensors, "
                                   "sharded when large, tokenizer included when the base has one). Example:\n"
                                   "  lorakit merge --adapter runs/demo --output-dir merged/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(m, "--model", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    add_flag(m, "--adapter", action="append", help="adapter directory; repeat to merge several")
    add_flag(m, "--output-dir", required=True, help="folder for the merged checkpoint")
    add_flag(m, "--dtype", default="float32", choices=list(DTYPES), help="weight dtype to save (default float32)")
    add_flag(m, "--force", action="store_true", help="replace a non-empty --output-dir")
    m.set_defaults(func=run)
