"""`lorakit merge` (a plain merged checkpoint) and `lorakit combine` (a weighted mix of adapters)."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .cli import add_flag

_TASKS = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "seq_cls", "SEQ_2_SEQ_LM": "seq2seq"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_output_dir(path: Path, force: bool) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not force:
        raise FileExistsError(f"--output-dir {path} is not empty; pick a new folder or pass --force to replace it")


def write_dir_atomically(path: Path, write) -> None:
    """write(tmp_dir) fills a temp folder next to `path`, which then replaces `path` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def merge_to_checkpoint(model_name: str | None, adapter_dirs: list[str], output_dir: str | Path,
                        dtype: str = "float32", force: bool = False, max_shard_size: str = "2GB") -> Path:
    """Load base + adapters, merge (checked for NaN/Inf), and save a plain transformers checkpoint."""
    from .generate import parse_adapters
    from .io import read_adapter_config, resolve_adapter_dir
    from .models import load_model_and_tokenizer

    out = Path(output_dir)
    check_output_dir(out, force)
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    adapters = parse_adapters(adapter_dirs)
    if not adapters:
        raise ValueError("--adapter is required: the adapter directory to merge")
    first = read_adapter_config(resolve_adapter_dir(next(iter(adapters.values())), next(iter(adapters))))
    task = _TASKS.get(first.task_type or "CAUSAL_LM", "causal_lm")
    model, tokenizer = load_model_and_tokenizer(model_name or first.base_model_name_or_path, task=task) \
        if task != "seq_cls" else _load_cls(model_name or first.base_model_name_or_path, adapters)
    from . import adapters as ad
    from .io import load_adapter
    from .merge import merge_and_unload

    for name, path in adapters.items():
        load_adapter(model, path, name=name)
    ad.set_adapter(model, list(adapters))
    plain = merge_and_unload(model, safe=True).to(_DTYPES[dtype])

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)

    write_dir_atomically(out, write)
    return out


def _load_cls(model_name: str, adapters: dict[str, str]):
    from .io import WEIGHTS_NAME, read_safetensors
    from .models import load_model_and_tokenizer

    tensors = read_safetensors(Path(next(iter(adapters.values()))) / WEIGHTS_NAME)
    head = next((t for k, t in tensors.items() if k.endswith(("classifier.weight", "score.weight",
                                                              "classifier.out_proj.weight"))), None)
    return load_model_and_tokenizer(model_name, task="seq_cls", num_labels=head.shape[0] if head is not None else None)


def run_merge(args: argparse.Namespace) -> int:
    out = merge_to_checkpoint(args.model, args.adapter or [], args.output_dir, args.dtype, args.force)
    print(f"merged checkpoint written to {out} (loads with transformers alone)")
    return 0


def combine_adapters(model_name: str | None, adapter_dirs: list[str], weights: list[float], output_dir: str | Path,
                     method: str = "linear", rank: int | None = None, force: bool = False) -> Path:
    """Weighted combination of saved adapters (PEFT's add_weighted_adapter) written as a new adapter."""
    from .generate import parse_adapters
    from .io import load_adapter, read_adapter_config, resolve_adapter_dir, save_adapter
    from .merge import combine
    from .models import load_model

    out = Path(output_dir)
    check_output_dir(out, force)
    adapters = parse_adapters(adapter_dirs)
    if len(adapters) < 2:
        raise ValueError("combine needs at least two --adapter directories")
    cfgs = {n: read_adapter_config(resolve_adapter_dir(p, n)) for n, p in adapters.items()}
    bases = {c.base_model_name_or_path for c in cfgs.values() if c.base_model_name_or_path}
    if len(bases) > 1 and model_name is None:
        raise ValueError(f"the adapters were made for different base models {sorted(bases)}; "
                         f"they cannot be combined (pass --model to override if the bases are the same weights)")
    model = load_model(model_name or next(iter(bases), None), task=_TASKS.get(
        next(iter(cfgs.values())).task_type or "CAUSAL_LM", "causal_lm"))
    for name, path in adapters.items():
        load_adapter(model, path, name=name)
    combine(model, list(adapters), weights, name="combined", method=method, rank=rank)

    write_dir_atomically(out, lambda tmp: save_adapter(model, tmp, name="combined"))
    return out


def run_combine(args: argparse.Namespace) -> int:
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError as e:
        raise ValueError(f"--weights must be comma-separated numbers like 0.7,0.3, got {args.weights!r}") from e
    out = combine_adapters(args.model, args.adapter or [], weights, args.output_dir, args.method, args.rank, args.force)
    print(f"combined adapter written to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="merge adapters into the base and save a plain checkpoint",
                       description="Write base + adapter(s) as one ordinary transformers checkpoint (safetensors, "
                                   "sharded when large, tokenizer included). Example:\n  lorakit merge --adapter "
                                   "runs/demo --output-dir merged/", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(m, "--model", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    add_flag(m, "--adapter", action="append", help="adapter directory; repeat to merge several")
    add_flag(m, "--output-dir", required=True, help="folder for the merged checkpoint")
    add_flag(m, "--dtype", default="float32", choices=list(_DTYPES), help="weight dtype to save (default float32)")
    add_flag(m, "--force", action="store_true", help="replace a non-empty --output-dir")
    m.set_defaults(func=run_merge)
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
    c.set_defaults(func=run_combine)
