"""inspector: what a trained adapter did, module by module, and truncating it to a lower rank.

Each adapted module's update is ΔW = s·B·A (B: d × r, A: r × k, s = alpha/r, or alpha/√r with
rsLoRA). Its SVD comes from the small factors, never from the d × k matrix:

    B = Q_B R_B,  Aᵀ = Q_A R_A          thin QR: Q_B (d × r), Q_A (k × r), R_B, R_A (r × r)
    s · R_B R_Aᵀ = U' Σ V'ᵀ              an r × r SVD
    ΔW = (Q_B U') Σ (Q_A V')ᵀ            so σ = diag(Σ) and ||ΔW||_F = √(Σσ²)

The effective rank at 90 % (99 %) is how many singular values hold that share of the energy
Σσ². `compress` keeps the top K: B' = U_K √Σ_K, A' = √Σ_K V_Kᵀ, saved with r = lora_alpha = K
(scale 1), so the kept update is exactly U_K Σ_K V_Kᵀ.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .io import (CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_adapter_config, read_safetensors,
                 resolve_adapter_dir, write_json, write_safetensors)

_A_TAILS = {"lora_A.weight": "lora_B.weight", "lora_embedding_A": "lora_embedding_B"}


@dataclass
class Factors:
    """One module's factors as stored: A (r, k) and B (d, r) after flattening conv kernels."""

    name: str  # module path without PEFT's prefix, e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    A: Tensor  # (r, k)
    B: Tensor  # (d, r)
    scale: float


@dataclass
class ModuleStats:
    """What the adapter does to one module."""

    name: str
    module_type: str  # last name component, e.g. "q_proj"
    layer: int | None  # block index read from the name, None outside the blocks
    shape: tuple[int, int]  # (d, k) of ΔW
    r: int
    scale: float
    norm: float  # ||ΔW||_F
    singular_values: list[float]  # of ΔW, descending, r of them (at most min(d, k))
    rank90: int  # singular values holding 90 % of Σσ²
    rank99: int
    base_norm: float | None = None  # ||W0||_F, when the base model was given

    @property
    def relative(self) -> float | None:
        """||ΔW|| / ||W0||, when the base model was given."""
        return self.norm / self.base_norm if self.base_norm else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "relative": self.relative}


# --- reading and the small-factor SVD -----------------------------------------------------------
def read_factors(path: str | Path) -> tuple[Path, LoraConfig, dict[str, Tensor], list[Factors]]:
    """(directory, config, all tensors, factors per adapted module) of an adapter directory."""
    path = resolve_adapter_dir(path, "default")
    cfg = read_adapter_config(path)
    tensors = read_safetensors(path / WEIGHTS_NAME)
    out = []
    for a_key, a in tensors.items():
        tail = next((t for t in _A_TAILS if a_key.endswith("." + t)), None)
        if tail is None:
            continue
        b_key = a_key[: -len(tail)] + _A_TAILS[tail]
        if b_key not in tensors:
            raise ValueError(f"{path / WEIGHTS_NAME}: {a_key!r} has no matching {b_key!r}; the file is incomplete")
        name = a_key[: -len(tail) - 1].removeprefix(PREFIX)
        r, alpha = cfg.rank_and_alpha(name)
        if a.shape[0] != r:
            raise ValueError(f"{path}: {CONFIG_NAME} gives module {name!r} r={r}, but {WEIGHTS_NAME} holds "
                             f"{a_key!r} with {a.shape[0]} rows; the config and weights disagree")
        out.append(Factors(name, a_key, b_key, a.flatten(1), tensors[b_key].flatten(1), cfg.scaling(r, alpha)))
    if not out:
        raise ValueError(f"{path / WEIGHTS_NAME} holds no LoRA factors (no '*.lora_A.weight' keys)")
    out.sort(key=lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f.name)])  # layer 2 < 10
    return path, cfg, tensors, out


def low_rank_svd(B: Tensor, A: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of scale·B·A from its factors, in float64: U (d, q), S (q,), V (k, q), q ≤ r.

    Costs O((d + k)·r²), where forming the d × k product and its SVD would cost O(d·k·min(d, k)).
    """
    qb, rb = torch.linalg.qr(B.double())  # (d, r'), (r', r)
    qa, ra = torch.linalg.qr(A.double().T)  # (k, r''), (r'', r)
    u, s, vh = torch.linalg.svd(scale * (rb @ ra.T), full_matrices=False)  # (r', q), (q,), (q, r'')
    return qb @ u, s, qa @ vh.T


def effective_rank(singular_values: Tensor, share: float) -> int:
    """Fewest leading singular values whose squares reach `share` of Σσ² (0 for a zero update)."""
    energy = singular_values.double() ** 2
    total = float(energy.sum())
    if total == 0:
        return 0
    below = torch.cumsum(energy, 0) < share * total * (1 - 1e-6)  # float32 factors: exact shares
    return min(int(below.sum()) + 1, len(energy))


def _layer(name: str) -> int | None:
    m = re.search(r"\.(\d+)(\.|$)", name)
    return int(m.group(1)) if m else None


def inspect_adapter(path: str | Path, model: str | nn.Module | None = None) -> list[ModuleStats]:
    """Per-module statistics of the adapter in `path`, in file order.

    Args:
        path: an adapter directory (adapter_config.json + adapter_model.safetensors).
        model: the base model (a module, a model name or a local directory) to read ||W0|| from
            for the relative change; only the adapted modules' weights are read.
    """
    _, _, _, factors = read_factors(path)
    stats = []
    for f in factors:
        _, s, _ = low_rank_svd(f.B, f.A, f.scale)
        stats.append(ModuleStats(f.name, f.name.rsplit(".", 1)[-1], _layer(f.name), (f.B.shape[0], f.A.shape[1]),
                                 f.A.shape[0], f.scale, float(s.norm()), s.tolist(),
                                 effective_rank(s, 0.90), effective_rank(s, 0.99)))
    if model is not None:
        norms = base_weight_norms(model, [s.name for s in stats])
        for st in stats:
            st.base_norm = norms[st.name]
    return stats


# --- base weights -------------------------------------------------------------------------------
def base_weight_norms(model: str | nn.Module, names: list[str]) -> dict[str, float]:
    """||W0||_F of the named modules, from a module or lazily from a checkpoint's safetensors."""
    if isinstance(model, nn.Module):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"the adapter adapts {missing[:3]}, which {type(model).__name__} does not have; "
                             f"was the adapter trained on another model?")
        return {n: float(getattr(modules[n], "base_layer", modules[n]).weight.detach().double().norm()) for n in names}
    from safetensors import SafetensorError, safe_open

    files = _weight_files(model)
    out: dict[str, float] = {}
    for n in names:
        key = next((k for k in (f"{n}.weight", f"{n.removeprefix('model.')}.weight", f"model.{n}.weight")
                    if k in files), None)
        if key is None:
            raise ValueError(f"the base model {model!r} has no weight for adapted module {n!r} "
                             f"(looked for '{n}.weight'); was the adapter trained on another model?")
        try:
            with safe_open(files[key], framework="pt") as fh:
                out[n] = float(fh.get_tensor(key).double().norm())
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{files[key]} is not a readable safetensors file ({e})") from e
    return out


def _weight_files(model: str) -> dict[str, str]:
    """tensor key -> safetensors file of a model directory (single file or sharded) or a file."""
    from safetensors import SafetensorError, safe_open

    folder = Path(model)
    if not folder.exists():
        from .models import resolve_model

        folder = Path(resolve_model(model))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: str(folder / f) for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder if folder.is_file() else folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has no model.safetensors or model.safetensors.index.json; "
                                f"--model needs a Hugging Face model directory with safetensors weights")
    try:
        with safe_open(str(single), framework="pt") as fh:
            return {k: str(single) for k in fh.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{single} is not a readable safetensors file ({e})") from e


# --- compress -----------------------------------------------------------------------------------
@dataclass
class CompressReport:
    """compress_adapter()'s answer: relative Frobenius errors ||ΔW − ΔW_K|| / ||ΔW||."""

    source: str
    output_dir: str
    rank: int
    modules: list[dict[str, Any]]  # {"name", "r", "error"}
    total_error: float  # over all modules: √(Σ dropped σ²) / √(Σ σ²)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def truncate(f: Factors, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """New A (rank, k) and B (d, rank) at scale 1, zero-padded past the update's own rank;
    plus the dropped and the total energy (Σσ² over dropped / all singular values)."""
    U, S, V = low_rank_svd(f.B, f.A, f.scale)
    keep = min(rank, len(S))
    root = S[:keep].sqrt()
    A = torch.zeros(rank, f.A.shape[1], dtype=torch.float64)
    B = torch.zeros(f.B.shape[0], rank, dtype=torch.float64)
    A[:keep] = root[:, None] * V[:, :keep].T
    B[:, :keep] = U[:, :keep] * root
    return A, B, float((S[keep:] ** 2).sum()), float((S**2).sum())


def compress_adapter(path: str | Path, rank: int, output_dir: str | Path, force: bool = False) -> CompressReport:
    """Write the adapter in `path` truncated to rank `rank` to `output_dir` (PEFT format).

    Every module keeps the top `rank` singular directions of s·B·A; the config gets r = lora_alpha
    = rank, no rsLoRA and no rank/alpha patterns, so PEFT and lorakit load it with scale 1.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output-dir {out} is a file; pass a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"output directory {out} exists and is not empty; choose another --output-dir "
                              f"or pass --force to overwrite the adapter files in it")
    src, cfg, tensors, factors = read_factors(path)
    if cfg.use_dora:
        raise ValueError(f"{src / CONFIG_NAME}: compress handles plain LoRA; DoRA's magnitude vector is "
                         f"normalised by the full weight, so a truncated DoRA adapter is not well defined")
    largest = max(f.A.shape[0] for f in factors)
    if rank > largest:
        raise ValueError(f"rank={rank} is above the adapter's largest rank {largest}; compress only lowers the rank")
    new, modules, dropped, total = dict(tensors), [], 0.0, 0.0
    for f in factors:
        A, B, lost, energy = truncate(f, rank)
        a_old, b_old = tensors[f.a_key], tensors[f.b_key]
        new[f.a_key] = A.reshape(rank, *a_old.shape[1:]).to(a_old.dtype)  # conv kernels keep their shape
        new[f.b_key] = B.reshape(b_old.shape[0], rank, *b_old.shape[2:]).to(b_old.dtype)
        modules.append({"name": f.name, "r": f.A.shape[0], "error": math.sqrt(lost / energy) if energy else 0.0})
        dropped, total = dropped + lost, total + energy
    raw = json.loads((src / CONFIG_NAME).read_text(encoding="utf-8"))
    raw.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    write_safetensors(out / WEIGHTS_NAME, new)
    write_json(out / CONFIG_NAME, raw)
    return CompressReport(str(src), str(out), rank, modules, math.sqrt(dropped / total) if total else 0.0)


# --- output -------------------------------------------------------------------------------------
def format_stats(stats: list[ModuleStats], top: int = 10) -> str:
    """A summary per module type, then the `top` modules that changed most."""
    rel = all(s.relative is not None for s in stats)
    total = math.sqrt(sum(s.norm**2 for s in stats))
    out = [f"{len(stats)} modules, ranks {sorted({s.r for s in stats})}, total ||ΔW||_F = {total:.4g}", "",
           "by module type:", f"  {'type':<16}{'n':>5}{'mean ||ΔW||':>13}" + (f"{'mean rel':>11}" if rel else "")
           + f"{'rank90':>8}{'rank99':>8}  (means; effective rank out of r)"]
    for kind in dict.fromkeys(s.module_type for s in stats):
        group = [s for s in stats if s.module_type == kind]
        mean = lambda xs: sum(xs) / len(xs)
        out.append(f"  {kind:<16}{len(group):>5}{mean([s.norm for s in group]):>13.4g}"
                   + (f"{mean([s.relative for s in group]):>11.3%}" if rel else "")
                   + f"{mean([s.rank90 for s in group]):>8.1f}{mean([s.rank99 for s in group]):>8.1f}")
    key = (lambda s: s.relative) if rel else (lambda s: s.norm)
    worst = sorted(stats, key=key, reverse=True)[:top]
    if not worst:
        return "\n".join(out)
    width = max(len(s.name) for s in worst)
    by = "||ΔW|| / ||W0||:" if rel else "||ΔW||_F (pass --model for the relative change):"
    out += ["", f"top {len(worst)} by {by}",
            f"  {'module':<{width}}  {'shape d×k':>11}{'r':>4}{'||ΔW||':>10}" + (f"{'rel':>9}" if rel else "")
            + f"{'σ1':>10}{'rank90':>8}{'rank99':>8}"]
    for s in worst:
        shape = f"{s.shape[0]}×{s.shape[1]}"
        out.append(f"  {s.name:<{width}}  {shape:>11}{s.r:>4}{s.norm:>10.4g}" + (f"{s.relative:>9.3%}" if rel else "")
                   + f"{s.singular_values[0] if s.singular_values else 0.0:>10.4g}{s.rank90:>8}{s.rank99:>8}")
    return "\n".join(out)


def heatmap(stats: list[ModuleStats], path: str | Path) -> Path:
    """PNG heat map: layer index × module, colour = relative change (or ||ΔW|| without a model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from .io import atomic_write

    blocks = [s for s in stats if s.layer is not None]
    if not blocks:
        raise ValueError("no adapted module has a layer index in its name; nothing to draw")
    rel = all(s.relative is not None for s in blocks)
    label = lambda s: re.split(r"\.\d+\.", s.name, maxsplit=1)[-1]  # the name after the block index
    prefixes = {s.name.split(".", 1)[0] for s in blocks}
    if len(prefixes) > 1:  # encoder and decoder: keep them apart
        label = (lambda base: lambda s: f"{s.name.split('.', 1)[0]}:{base(s)}")(label)
    rows = list(dict.fromkeys(label(s) for s in blocks))
    grid = torch.full((len(rows), max(s.layer for s in blocks) + 1), float("nan"))
    for s in blocks:
        grid[rows.index(label(s)), s.layer] = s.relative if rel else s.norm
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * grid.shape[1] + 3), max(2.5, 0.35 * len(rows) + 1.5)))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="layer index", yticks=range(len(rows)), yticklabels=rows,
           title="LoRA update " + ("||ΔW|| / ||W0||" if rel else "||ΔW||_F"))
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)
