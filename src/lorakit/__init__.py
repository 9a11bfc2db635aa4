"""lorakit: LoRA fine-tuning, small and fast.

    cfg = lorakit.LoraConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"])
    model = lorakit.inject(model, cfg)          # base frozen, adapter trainable
    ...train...
    lorakit.save_adapter(model, "out/")         # PEFT's on-disk format
"""

from .adapters import (
    active_adapters,
    adapter_names,
    count_parameters,
    delete_adapter,
    disabled,
    per_row,
    print_trainable_parameters,
    set_adapter,
    using,
    shared_dropout,
)
from .adalora import AdaLoraConfig
from .config import LoraConfig
from .inject import find_targets, inject, set_trainable
from .io import adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from .layers import LoraConv, LoraEmbedding, LoraLayer
from .linear import LoraLinear
from .modules_to_save import ModulesToSave
from .merge import combine, merge, merge_and_unload, unmerge

__version__ = "0.1.0"

_TRAINING = ("TrainConfig", "Trainer", "train")


def __getattr__(name: str):
    """`lorakit.train`, `lorakit.Trainer`, `lorakit.TrainConfig`: the training tier, imported on first use
    (so `import lorakit` stays light: no trainer, server or matplotlib)."""
    if name in _TRAINING:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")

__all__ = [
    "LoraConfig", "AdaLoraConfig", "inject", "find_targets", "set_trainable",
    "count_parameters", "print_trainable_parameters",
    "save_adapter", "load_adapter", "read_adapter_config", "adapter_state_dict",
    "set_adapter", "adapter_names", "active_adapters", "delete_adapter", "disabled", "per_row", "using", "shared_dropout",
    "merge", "unmerge", "merge_and_unload", "combine",
    "TrainConfig", "Trainer", "train",
    "LoraLayer", "LoraLinear", "LoraEmbedding", "LoraConv", "ModulesToSave",
]
