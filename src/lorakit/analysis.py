"""analyze: what a LoRA config costs on a model, before you train.

Per module type: the LoRA parameters against the frozen weight, the extra FLOPs of the LoRA
branch, the trainable share of the model, and an estimate of training memory for LoRA and for
full fine-tuning with AdamW (every assumption is printed). Only the model's config is read: the
model is built on PyTorch's meta device, without weights, so even an 8B config takes a second.

For an adapted weight W (d × k) and rank r:

    base weight    d·k parameters          x ──► W ─────────────────────► W x     2dk FLOPs/token
    LoRA factors   r·(d + k) parameters    x ──► A (r × k) ──► B (d × r)  B(Ax)   2r(d + k)
                                           forming BA first would cost   (BA)x   2rdk + 2dk

LoRA saves parameters only while r < dk / (d + k); at or past that rank (marked "!") the factors
hold as many numbers as W itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .bases import SUPPORTED, kind, linear_shape
from .config import LoraConfig
from .inject import find_targets, is_suffix_match

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PLOT_RANKS = (4, 8, 16, 32, 64, 128, 256)
MiB = 1024**2


@dataclass
class ModuleRow:
    """One module type (last name component) with one shape and rank; FLOPs are per token."""

    module: str
    d: int  # output features: W is (d, k)
    k: int  # input features
    r: int
    count: int
    base_params: int  # count · d · k
    lora_params: int  # count · r (d + k), + count · d with DoRA's magnitude vector
    flops_lora: int  # count · 2r(d + k): B(Ax)
    flops_product: int  # count · (2rdk + 2dk): form BA, then (BA)x
    flops_base: int  # count · 2dk: the frozen W x

    @property
    def full_rank(self) -> bool:
        """r ≥ dk/(d+k): the factors hold at least as many numbers as the matrix itself."""
        return self.r * (self.d + self.k) >= self.d * self.k


@dataclass
class Memory:
    """Training-memory estimate in bytes, LoRA against full fine-tuning."""

    dtype: str
    batch_size: int
    max_length: int
    lora: dict[str, int]
    full: dict[str, int]
    assumptions: list[str]


@dataclass
class Report:
    """analyze()'s answer; str(report) is the human table, to_dict() the machine one."""

    model: str
    lora: dict[str, Any]
    rows: list[ModuleRow]
    base_params: int  # de-duplicated (tied weights counted once)
    added_params: int  # new parameters: LoRA factors, DoRA magnitudes, modules_to_save copies
    trainable_params: int  # added_params + base biases made trainable
    extra_trainable: dict[str, int]
    memory: Memory
    sweep: list[dict[str, int]] = field(default_factory=list)  # per rank in PLOT_RANKS

    @property
    def total_params(self) -> int:
        return self.base_params + self.added_params

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable_params / self.total_params

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["modules"] = sum(r.count for r in self.rows)
        out["total_params"], out["trainable_percent"] = self.total_params, self.trainable_percent
        for row, d in zip(self.rows, out["rows"]):
            d["full_rank"] = row.full_rank
        return out

    def __str__(self) -> str:
        return format_report(self)


class _Target(NamedTuple):
    name: str
    d: int  # W is (d, k)
    k: int
    kind: str  # "linear" | "embedding" | "conv"


@dataclass
class _Plan:
    """What the rank does not change: the model's shape and the modules the config adapts."""

    model: str
    base_params: int
    targets: list[_Target]
    arch: dict[str, int]
    extra_trainable: dict[str, int]


# --- building the model on the meta device -------------------------------------------------------
def meta_model(config: Any) -> nn.Module:
    """The model a transformers config describes, built on the meta device (no weights, no RAM)."""
    import transformers

    classes = [getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)]
    order = ("AutoModelForSeq2SeqLM", "AutoModelForCausalLM") if config.is_encoder_decoder \
        else ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM")
    classes += [getattr(transformers, a) for a in (*order, "AutoModel")]
    errors = []
    for cls in classes:
        try:
            with torch.device("meta"):
                return cls.from_config(config) if cls.__name__.startswith("Auto") else cls._from_config(config)
        except (ValueError, KeyError) as e:  # this Auto class does not know the config
            errors.append(f"{cls.__name__}: {e}")
    raise ValueError(f"cannot build a model for config model_type={config.model_type!r}: " + "; ".join(errors))


def load_config(name_or_path: str) -> Any:
    """AutoConfig for a local directory / config.json, or a model name (via lorakit.models)."""
    from transformers import AutoConfig

    path = Path(name_or_path)
    if not path.exists():
        if name_or_path.startswith((".", "/", "~")) or path.suffix == ".json" or len(path.parts) > 2:
            raise FileNotFoundError(f"--model {name_or_path}: no such file or directory; pass a model name, "
                                    f"a Hugging Face model directory or its config.json")
        from .models import resolve_model

        name_or_path = resolve_model(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except OSError as e:
        raise ValueError(f"cannot read a model config for --model {name_or_path!r}: {e}") from e


def _shape(name: str, module: nn.Module) -> _Target:
    """(d, k) of the weight a LoRA on `module` would update."""
    found = kind(module)
    if found == "embedding":
        return _Target(name, module.embedding_dim, module.num_embeddings, "embedding")
    if found == "conv":
        return _Target(name, module.weight.shape[0], math.prod(module.weight.shape[1:]), "conv")
    if found == "linear":
        k, d, _ = linear_shape(module)
        return _Target(name, d, k, "linear")
    raise ValueError(f"target module {name!r} is a {type(module).__name__}; LoRA adapts {SUPPORTED}: "
                     f"narrow target_modules")


def _arch(model: nn.Module) -> dict[str, int]:
    """Sizes the activation estimate needs, read from the (text) config."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config

    def first(*names: str, default: int = 0) -> int:
        return next((int(v) for n in names if isinstance(v := getattr(cfg, n, None), int)), default)

    hidden = first("hidden_size", "d_model", "n_embd", "dim")
    heads = first("num_attention_heads", "num_heads", "n_head", default=1)
    head_dim = first("head_dim", "d_kv", default=hidden // max(heads, 1))
    inter = first("intermediate_size", "d_ff", "n_inner", "ffn_dim", default=4 * hidden)
    layers = first("num_hidden_layers", "num_layers", "n_layer")
    if getattr(cfg, "is_encoder_decoder", False):
        layers += first("num_decoder_layers", default=layers)
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    gated = linears.count((hidden, inter)) >= 2 * max(layers, 1) or (hidden, 2 * inter) in linears  # gate+up, fused
    return {"hidden": hidden, "heads": heads, "kv_heads": first("num_key_value_heads", default=heads),
            "head_dim": head_dim, "intermediate": inter, "layers": layers,
            "vocab": first("vocab_size"), "gated": int(gated)}


def plan(model_or_config: Any, lora_config: LoraConfig) -> _Plan:
    """Build (or take) the model, find its targets with lorakit.inject's matching, count params."""
    if isinstance(model_or_config, str):
        model_or_config = load_config(model_or_config)
    model = model_or_config if isinstance(model_or_config, nn.Module) else meta_model(model_or_config)
    path = getattr(getattr(model, "config", None), "name_or_path", "")
    label = f"{path} ({type(model).__name__})" if path else type(model).__name__
    targets = [_shape(n, m) for n, m in find_targets(model, lora_config)]
    names = {t.name for t in targets}
    saved = {n: m for n, m in model.named_modules() if n and is_suffix_match(n, lora_config.modules_to_save or [])}
    extra = {"modules_to_save": sum(p.numel() for m in saved.values() for p in m.parameters()), "bias": 0}
    if lora_config.bias != "none":  # a saved module's own bias trains in its copy, counted above
        extra["bias"] = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias")
                            and not any(n.startswith(m + ".") for m in saved)
                            and (lora_config.bias == "all" or n.rsplit(".", 1)[0] in names))
    base = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    return _Plan(label, base, targets, _arch(model), extra)


# --- the numbers ---------------------------------------------------------------------------------
def module_rows(targets: list[_Target], cfg: LoraConfig) -> list[ModuleRow]:
    """Group targets by (last name component, d, k, r) in model order and count everything."""
    rows: dict[tuple, ModuleRow] = {}
    for t in targets:
        r = cfg.rank_and_alpha(t.name)[0]
        key = (t.name.rsplit(".", 1)[-1], t.d, t.k, r)
        row = rows.setdefault(key, ModuleRow(key[0], t.d, t.k, r, 0, 0, 0, 0, 0, 0))
        row.count += 1
        row.base_params += t.d * t.k
        row.lora_params += r * (t.d + t.k) + (t.d if cfg.use_dora else 0)
        base = 0 if t.kind == "embedding" else 2 * t.d * t.k  # an embedding is a lookup
        row.flops_lora += 2 * r * t.d if t.kind == "embedding" else 2 * r * (t.d + t.k)
        row.flops_product += 2 * r * t.d * t.k + base
        row.flops_base += base
    return list(rows.values())


def activation_bytes(arch: dict[str, int], tokens: int, nbytes: int) -> int:
    """Activations kept for the backward pass, per token and layer (no recomputation):
    4h (2 residual inputs, 2 norm outputs) + 2·h_q (q, attention output) + 2·h_kv (k, v)
    + 3i (gate, up, act; 2i without a gate) elements, plus the logits (V in dtype + V float32)."""
    h, i = arch["hidden"], arch["intermediate"]
    q, kv = arch["heads"] * arch["head_dim"], arch["kv_heads"] * arch["head_dim"]
    per_layer = 4 * h + 2 * q + 2 * kv + (3 if arch["gated"] else 2) * i
    return tokens * (arch["layers"] * per_layer * nbytes + arch["vocab"] * (nbytes + 4))


def memory(p: _Plan, cfg: LoraConfig, added: int, trainable: int, dtype: str, batch: int, length: int) -> Memory:
    """Bytes for weights, gradients, AdamW states and activations; see Memory.assumptions."""
    e, tokens = DTYPE_BYTES[dtype], batch * length
    acts = activation_bytes(p.arch, tokens, e)
    lora_acts = sum(cfg.rank_and_alpha(t.name)[0] + (t.k if cfg.dropout > 0 else 0) for t in p.targets) * tokens * e
    lora = {"weights": p.base_params * e + added * 4, "gradients": trainable * 4,
            "optimizer": trainable * 8, "activations": acts + lora_acts}
    master = p.base_params * 4 if e < 4 else 0
    full = {"weights": p.base_params * e + master, "gradients": p.base_params * e,
            "optimizer": p.base_params * 8, "activations": acts}
    lora["total"], full["total"] = sum(lora.values()), sum(full.values())
    a = p.arch
    notes = [
        f"weights in {dtype} ({e} B/param); LoRA factors kept in float32 (4 B), as lorakit does",
        "AdamW: 2 float32 states per trainable parameter (8 B); gradients in the trainable weights' dtype",
        "full fine-tuning in half precision keeps float32 master weights (+4 B/param: 16 B/param in all)"
        if e < 4 else "full fine-tuning in float32: weights 4 + gradients 4 + AdamW 8 = 16 B/param",
        f"activations: batch {batch} × {length} tokens, {a['layers']} layers, hidden h={a['hidden']}, "
        f"intermediate i={a['intermediate']}, {a['heads']} heads ({a['kv_heads']} kv) × {a['head_dim']}, "
        f"vocab V={a['vocab']}, {'gated' if a['gated'] else 'plain'} MLP",
        f"per token and layer: 4h + 2·heads·head_dim + 2·kv_heads·head_dim + {3 if a['gated'] else 2}i "
        f"elements; logits V·({e}+4) B; LoRA adds r per target (Ax)"
        + (" and k (its dropped-out input)" if cfg.dropout > 0 else ""),
        "fused attention (SDPA/flash: no seq×seq matrix), no gradient checkpointing, "
        "no framework overhead or fragmentation; encoder-decoder cross-attention not counted",
    ]
    return Memory(dtype, batch, length, lora, full, notes)


def _numbers(p: _Plan, cfg: LoraConfig, dtype: str, batch: int, length: int):
    rows = module_rows(p.targets, cfg)
    added = sum(r.lora_params for r in rows) + p.extra_trainable["modules_to_save"]
    trainable = added + p.extra_trainable["bias"]
    return rows, added, trainable, memory(p, cfg, added, trainable, dtype, batch, length)


def analyze(model_or_config: Any, lora_config: LoraConfig, dtype: str = "bfloat16",
            batch_size: int = 4, max_length: int = 512) -> Report:
    """Parameters, FLOPs and training memory of `lora_config` on a model.

    Args:
        model_or_config: an nn.Module (not modified), a transformers config, or a model name /
            local directory / config.json path (only the config is read).
        lora_config: the adapter to analyse; target matching is lorakit.inject's.
        dtype: "bfloat16", "float16" or "float32": the base weights' training dtype.
        batch_size, max_length: the batch (batch_size × max_length tokens) for activations.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPE_BYTES)}")
    for flag, value in (("batch_size", batch_size), ("max_length", max_length)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{flag} must be a positive integer, got {value!r}")
    p = plan(model_or_config, lora_config)
    rows, added, trainable, mem = _numbers(p, lora_config, dtype, batch_size, max_length)
    sweep = []
    for r in PLOT_RANKS:
        _, _, t, m = _numbers(p, lora_config.replace(r=r), dtype, batch_size, max_length)
        sweep.append({"r": r, "trainable": t, "memory_lora": m.lora["total"], "memory_full": m.full["total"]})
    info = {"r": lora_config.r, "alpha": lora_config.alpha, "target_modules": lora_config.target_modules,
            "rank_pattern": lora_config.rank_pattern, "use_dora": lora_config.use_dora}
    return Report(p.model, info, rows, p.base_params, added, trainable, p.extra_trainable, mem, sweep)


# --- output --------------------------------------------------------------------------------------
def human_bytes(n: float) -> str:
    if n < MiB:
        return f"{n / 1024:,.1f} KiB"
    return f"{n / MiB:,.1f} MiB" if n < 1024 * MiB else f"{n / MiB / 1024:,.2f} GiB"


def human_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def format_report(rep: Report) -> str:
    """The human-readable tables."""
    head = ("module", "shape d×k", "n", "r", "base params", "LoRA params", "LoRA/base",
            "LoRA FLOPs/tok", "(BA)x FLOPs", "B(Ax) cheaper")
    lines = [tuple(_row_cells(r)) for r in rep.rows]
    sums = ("count", "base_params", "lora_params", "flops_lora", "flops_product", "flops_base")
    cells = _row_cells(ModuleRow("total", 0, 0, 0, *(sum(getattr(r, f) for r in rep.rows) for f in sums)))
    cells[1] = cells[3] = ""
    widths = [max(len(str(x[i])) for x in [head, *lines, cells]) for i in range(len(head))]
    fmt = lambda xs: "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(xs, widths)))
    out = [f"model: {rep.model}", f"LoRA: r={rep.lora['r']}, alpha={rep.lora['alpha']}, "
           f"target_modules={rep.lora['target_modules']!r}", "", fmt(head), fmt(["-" * w for w in widths])]
    out += [fmt(x) for x in lines] + [fmt(["-" * w for w in widths]), fmt(cells)]
    if any(r.full_rank for r in rep.rows):
        out.append("! r >= d·k/(d+k): this LoRA has as many parameters as the matrix itself; lower r")
    out.append("FLOPs per token (multiply-add = 2): LoRA branch B(Ax) = 2r(d+k) vs forming BA first "
               "(BA)x = 2rdk + 2dk;\nfor a linear layer LoRA/base is also the LoRA branch's extra FLOPs "
               "over the frozen W x (2dk)")
    if rep.lora["use_dora"]:
        out.append("LoRA params include DoRA's magnitude vector (d per module)")
    out += ["", f"parameters: base {rep.base_params:,} (tied weights once) | trainable {rep.trainable_params:,} "
            f"({rep.trainable_percent:.4f}%) | all {rep.total_params:,}"]
    out += [f"  + {k}: {v:,}" for k, v in rep.extra_trainable.items() if v]
    return "\n".join(out + ["", *format_memory(rep.memory)])


def _row_cells(r: ModuleRow) -> list[str]:
    ratio = f"{100 * r.lora_params / r.base_params:.2f}%" if r.base_params else "-"
    return [r.module + (" !" if r.r and r.full_rank else ""), f"{r.d}×{r.k}", f"{r.count}", f"{r.r}",
            f"{r.base_params:,}", f"{r.lora_params:,}", ratio, human_count(r.flops_lora),
            human_count(r.flops_product), f"{r.flops_product / r.flops_lora:,.0f}×" if r.flops_lora else "-"]


def format_memory(m: Memory) -> list[str]:
    out = [f"training memory estimate ({m.dtype}, batch {m.batch_size} × {m.max_length} tokens)",
           f"  {'':<13}{'LoRA':>12}  {'full fine-tuning':>16}"]
    for key in ("weights", "gradients", "optimizer", "activations", "total"):
        label = "AdamW states" if key == "optimizer" else key
        out.append(f"  {label:<13}{human_bytes(m.lora[key]):>12}  {human_bytes(m.full[key]):>16}")
    return out + ["assumptions:"] + [f"  - {a}" for a in m.assumptions]


def plot(rep: Report, path: str | Path) -> Path:
    """Trainable parameters and estimated memory against r (log-x), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_write

    rs = [s["r"] for s in rep.sweep]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(rs, [s["trainable"] / 1e6 for s in rep.sweep], "o-")
    ax1.set(xscale="log", xlabel="LoRA rank r", ylabel="trainable parameters (millions)", title="Trainable parameters")
    ax2.plot(rs, [s["memory_lora"] / MiB / 1024 for s in rep.sweep], "o-", label="LoRA")
    ax2.plot(rs, [s["memory_full"] / MiB / 1024 for s in rep.sweep], "--", label="full fine-tuning")
    ax2.set(xscale="log", xlabel="LoRA rank r", ylabel="GiB",
            title=f"Training memory ({rep.memory.dtype}, {rep.memory.batch_size}×{rep.memory.max_length} tokens)")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(rs, [str(r) for r in rs])
        ax.grid(alpha=0.3)
        ax.axvline(rep.lora["r"], color="gray", linestyle=":")  # the rank asked about
    fig.suptitle(rep.model, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)
