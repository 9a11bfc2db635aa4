"""Base model plus adapters, as the commands that use adapters load them (generate, chat, merge, serve).

`--adapter DIR` names an adapter after its folder; `--adapter NAME=DIR` names it. The task
(causal LM, seq2seq, classifier) comes from the adapter's task_type, else the model's config.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from .. import adapters as ad
from ..io import WEIGHTS_NAME, load_adapter, read_adapter_config, read_safetensors, resolve_adapter_dir
from ..merge import merge_and_unload
from ..models import load_model_and_tokenizer, model_task
from ..tasks import SEQ_CLS


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

    The model class follows the task: the adapters' PEFT task_type, else the model's config.json
    (`models.model_task`; a model of no task lorakit runs gets one sentence saying so). A
    classifier's head size comes from the adapter, its class names from the run.yaml beside it.
    """
    configs = {name: read_adapter_config(resolve_adapter_dir(path, name)) for name, path in adapters.items()}
    tasks = {name: cfg.task_type for name, cfg in configs.items()}
    if len(set(tasks.values())) > 1:
        raise ValueError(f"the adapters are for different tasks ({tasks}); load them in separate commands")
    first = next(iter(configs.values()), None)
    base = model_name or (first.base_model_name_or_path if first else None)
    task = model_task(base, first.task_type if first else None)
    labels: dict = {}
    if task == SEQ_CLS and adapters:
        name, path = next(iter(adapters.items()))
        labels = class_names(resolve_adapter_dir(path, name))
    return load_model_and_tokenizer(base, task=task, tokenizer_optional=tokenizer_optional, **labels)


def class_names(adapter_dir: Path) -> dict:
    """num_labels (the adapter's head size) and id2label (from the training run's run.yaml, if beside it)."""
    tensors = read_safetensors(Path(adapter_dir) / WEIGHTS_NAME)
    head = next((t for k, t in tensors.items()
                 if k.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight"))), None)
    out: dict = {"num_labels": head.shape[0]} if head is not None else {}
    run_yaml = Path(adapter_dir) / "run.yaml"
    if run_yaml.is_file():
        id2label = ((yaml.safe_load(run_yaml.read_text()) or {}).get("resolved") or {}).get("id2label")
        if isinstance(id2label, dict) and id2label:
            out["id2label"] = {int(k): str(v) for k, v in id2label.items()}
    return out


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
