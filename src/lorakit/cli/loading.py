"""Base model plus adapters, as the commands that use adapters load them (generate, chat, merge, serve).

`--adapter DIR` names an adapter after its folder; `--adapter NAME=DIR` names it. The task
(causal LM, seq2seq, classifier) comes from the adapter's task_type, else the model's config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import adapters as ad
from ..io import WEIGHTS_NAME, load_adapter, read_adapter_config, read_safetensors, resolve_adapter_dir
from ..merge import merge_and_unload
from ..models import load_model_and_tokenizer
from ..tasks import SEQ_CLS, resolve_task


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """['a=dir1', 'dir2'] -> {'a': 'dir1', 'dir2': 'dir2'}; names must be unique."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name or "default", spec
        name = name.replace(".", "_")
        if name in out:
            raise ValueError(f"--adapter: two adapters are named {name!r}; name them with --adapter NAME=DIR")
        out[name] = path
    return out


def load_base(model_name: str | None, adapters: dict[str, str], tokenizer_optional: bool = False):
    """(model, tokenizer) for the adapters' base: `model_name`, else the first adapter's base model.

    A classification adapter's head size decides num_labels.
    """
    first_cfg = None
    if adapters:
        name, path = next(iter(adapters.items()))
        first_cfg = read_adapter_config(resolve_adapter_dir(path, name))
    base = model_name or (first_cfg.base_model_name_or_path if first_cfg else None)
    task = resolve_task(first_cfg.task_type if first_cfg else None)
    num_labels = _head_size(next(iter(adapters.values()))) if task == SEQ_CLS else None
    return load_model_and_tokenizer(base, task=task, num_labels=num_labels, tokenizer_optional=tokenizer_optional)


def _head_size(adapter_dir: str) -> int | None:
    tensors = read_safetensors(Path(adapter_dir) / WEIGHTS_NAME)
    head = next((t for k, t in tensors.items()
                 if k.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight"))), None)
    return head.shape[0] if head is not None else None


def load_for_inference(model_name: str | None, adapters: dict[str, str], merge: bool = False) -> tuple[nn.Module, object]:
    """Model + tokenizer with the adapters loaded (all active, or merged when merge=True), in eval mode."""
    model, tokenizer = load_base(model_name, adapters)
    for name, path in adapters.items():
        load_adapter(model, path, name=name)
    if adapters:
        ad.set_adapter(model, list(adapters) if merge or len(adapters) == 1 else [next(iter(adapters))])
        if merge:
            model = merge_and_unload(model, safe=True)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval(), tokenizer
