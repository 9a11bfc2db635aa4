"""LoraConfig: every knob of a LoRA adapter, flat and validated.

The field names are lorakit's (``alpha``, ``dropout``, ``init``); ``to_peft_dict``/``from_peft_dict``
translate to and from the keys PEFT writes in ``adapter_config.json`` (``lora_alpha``,
``lora_dropout``, ``init_lora_weights``), so an adapter directory is interchangeable with PEFT's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

Targets = list[str] | str | None

_BIAS = ("none", "lora_only", "all")
_INIT = ("default", "gaussian", "pissa", "olora")
# init_lora_weights values PEFT writes, mapped to ours.
_PEFT_INIT = {True: "default", False: "default", "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


def _check_targets(name: str, value: Targets) -> Targets:
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"{name}={value!r} is not a valid regular expression ({e}); "
                                 f"pass a list of module-name suffixes instead") from e
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not all(isinstance(v, str) and v for v in items):
            raise ValueError(f"{name} must hold non-empty module names, got {value!r}")
        return items
    raise ValueError(f"{name} must be a list of module-name suffixes, a regex string or None, got {value!r}")


def parse_targets(values: list[str] | str) -> list[str] | str:
    """target_modules as typed on a command line or in YAML, read the same way by every command.

    "all-linear" stays a string; text with regex characters is one regex (full match); anything
    else is module-name suffixes split on commas and spaces: "q_proj,v_proj", "q_proj v_proj" and
    ["q_proj", "v_proj"] are the same list.
    """
    text = ",".join([values] if isinstance(values, str) else [str(v) for v in values])
    if text.strip().lower() == "all-linear":
        return "all-linear"
    if any(c in text for c in "*[]()|^$\\?+{}"):
        return text.strip()
    return [t.strip() for t in text.replace(" ", ",").split(",") if t.strip()]


@dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how. Frozen: a config you were given is never mutated."""

    r: int = 8
    """Rank of the update B @ A."""
    alpha: float = 8
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input during training, in [0, 1). Skipped entirely at 0."""
    target_modules: Targets = None
    """Module-name suffixes (["q_proj", "v_proj"]), one regex (full match), or "all-linear"."""
    exclude_modules: Targets = None
    """Modules never adapted, in the same forms as target_modules."""
    layers_to_transform: list[int] | None = None
    """Only adapt blocks with these indices (the number after layers./h./block./layer.)."""
    layers_pattern: list[str] | str | None = None
    """Name of the block list (e.g. "layers") used to read the block index; None: any."""
    modules_to_save: list[str] | None = None
    """Modules trained in full (e.g. a classifier head) and saved with the adapter."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: {regex matched against the module-name tail: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, same matching as rank_pattern."""
    bias: str = "none"
    """Which base biases train: "none", "lora_only" (of adapted modules) or "all"."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA: a learned magnitude per output feature."""
    init: str = "default"
    """"default" (kaiming-uniform A, zero B), "gaussian" (normal A / r, zero B), "pissa", "olora"."""
    fan_in_fan_out: bool = False
    """Base weight stored (in, out), as GPT-2's Conv1D; set automatically when such a layer is adapted."""
    task_type: str | None = None
    """PEFT task type written to adapter_config.json (CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, ...)."""
    base_model_name_or_path: str | None = None
    """Where the base model came from; written to adapter_config.json."""

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer (the LoRA rank), got r={self.r!r}; try r=8 or r=16")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0 or not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a positive number, got alpha={self.alpha!r}; a common choice is alpha=2*r")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout!r}; use 0.0 to disable it")
        if self.bias not in _BIAS:
            raise ValueError(f"bias must be one of {_BIAS}, got bias={self.bias!r}")
        if self.init not in _INIT:
            raise ValueError(f"init must be one of {_INIT}, got init={self.init!r}")
        object.__setattr__(self, "target_modules", _check_targets("target_modules", self.target_modules))
        object.__setattr__(self, "exclude_modules", _check_targets("exclude_modules", self.exclude_modules))
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None \
                and self.target_modules.lower() != "all-linear":
            raise ValueError("layers_to_transform cannot be combined with a regex target_modules; "
                             "put the layer indices in the regex or pass a list of suffixes")
        if self.layers_to_transform is not None:
            ltt = self.layers_to_transform
            ltt = [ltt] if isinstance(ltt, int) else list(ltt)
            if not all(isinstance(i, int) and i >= 0 for i in ltt):
                raise ValueError(f"layers_to_transform must be non-negative block indices, got {self.layers_to_transform!r}")
            object.__setattr__(self, "layers_to_transform", ltt)
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", list(self.modules_to_save))
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        for key, value in self.alpha_pattern.items():
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"alpha_pattern[{key!r}] must be a positive number, got {value!r}")
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))

    def replace(self, **changes: Any) -> LoraConfig:
        """A copy with some fields changed (the original is untouched)."""
        return dataclasses.replace(self, **changes)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """r and alpha for one module, after rank_pattern / alpha_pattern (PEFT's matching rule)."""
        return (_pattern_value(self.rank_pattern, module_name, self.r),
                _pattern_value(self.alpha_pattern, module_name, self.alpha))

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # --- PEFT's adapter_config.json ---------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The dict PEFT 0.21 writes as adapter_config.json for this config."""
        init = {"default": True}.get(self.init, self.init)
        return {
            "alora_invocation_tokens": None,
            "alpha_pattern": dict(self.alpha_pattern),
            "arrow_config": None,
            "auto_mapping": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": self.bias,
            "corda_config": None,
            "ensure_weight_tying": False,
            "eva_config": None,
            "exclude_modules": self.exclude_modules,
            "fan_in_fan_out": self.fan_in_fan_out,
            "inference_mode": True,
            "init_lora_weights": init,
            "kasa_config": None,
            "layer_replication": None,
            "layers_pattern": self.layers_pattern,
            "layers_to_transform": self.layers_to_transform,
            "loftq_config": {},
            "lora_alpha": self.alpha,
            "lora_bias": False,
            "lora_dropout": self.dropout,
            "lora_ga_config": None,
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "modules_to_save": self.modules_to_save,
            "monteclora_config": None,
            "peft_type": "LORA",
            "peft_version": "0.21.2",
            "qalora_group_size": 16,
            "r": self.r,
            "rank_pattern": dict(self.rank_pattern),
            "revision": None,
            "target_modules": self.target_modules,
            "target_parameters": None,
            "task_type": self.task_type,
            "trainable_token_indices": None,
            "use_bdlora": None,
            "use_dora": self.use_dora,
            "use_qalora": False,
            "use_rslora": self.use_rslora,
            "velora_config": None,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Build a config from PEFT's adapter_config.json contents, refusing what lorakit cannot load."""
        peft_type = d.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"{source}: peft_type={peft_type!r} is not supported; lorakit loads LoRA adapters "
                             f"(peft_type 'LORA', including rsLoRA and DoRA)")
        unsupported = {k: d[k] for k in ("lora_bias", "layer_replication", "target_parameters",
                                         "trainable_token_indices", "use_qalora", "use_bdlora", "alora_invocation_tokens")
                       if d.get(k)}
        if unsupported:
            raise ValueError(f"{source}: these PEFT options are not supported by lorakit: {unsupported}")
        init = d.get("init_lora_weights", True)
        targets = d.get("target_modules")
        return cls(
            r=int(d.get("r", 8)),
            alpha=d.get("lora_alpha", 8),
            dropout=float(d.get("lora_dropout", 0.0) or 0.0),
            target_modules=targets,
            exclude_modules=d.get("exclude_modules"),
            layers_to_transform=d.get("layers_to_transform"),
            layers_pattern=d.get("layers_pattern"),
            modules_to_save=d.get("modules_to_save"),
            rank_pattern=d.get("rank_pattern") or {},
            alpha_pattern=d.get("alpha_pattern") or {},
            bias=d.get("bias", "none"),
            use_rslora=bool(d.get("use_rslora", False)),
            use_dora=bool(d.get("use_dora", False)),
            init=_PEFT_INIT.get(init, "default") if isinstance(init, (bool, str)) else "default",
            fan_in_fan_out=bool(d.get("fan_in_fan_out", False)),
            task_type=d.get("task_type"),
            base_model_name_or_path=d.get("base_model_name_or_path"),
        )


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", name) wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default
