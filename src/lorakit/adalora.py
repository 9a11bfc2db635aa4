"""AdaLoRA (Zhang et al. 2023, arXiv:2303.10512): an SVD-form update whose ranks move to where they matter.

    x ──► base_layer ──────────────────────────────────────────────┐
    │                                                              (+) ──► h = W0 x + α/ranknum · P(Λ ⊙ Q x)
    └──► dropout ──► Q = lora_A (r × k) ──► ⊙ Λ = lora_E (r × 1) ──► P = lora_B (d × r) ──► · α/(ranknum + 1e-5)

Training starts every adapted matrix at rank `init_r` and removes triplets (P[:, i], λ_i, Q[i]) until the
average rank is `target_r`. `RankAllocator.step` runs after each optimizer step:

- importance of every entry:  I = |w · ∂L/∂w|, smoothed  Ī ← β1 Ī + (1-β1) I,  Ū ← β2 Ū + (1-β2) |I - Ī|;
  score s = Ī · Ū; a triplet's score is s(λ_i) + mean_j s(Q[i, j]) + mean_j s(P[j, i]);
- budget (total rank over all matrices): init_r·n for `tinit` steps, then cubic down to target_r·n at
  step total_step - tfinal;  b(t) = target + (init - target)·(1 - (t - tinit)/(total - tfinal - tinit))³;
- every `deltaT` steps the triplets scoring at or below the (init - b)-th smallest have λ set to 0; the
  result is the config's `rank_pattern` ({"<module>.lora_E": [kept?, ...]}), and after the final step
  it is re-applied each step.

The loss gets `regularizer(model)`: orth_reg_weight · mean over A and B of ‖QQᵀ - I‖_F, ‖PᵀP - I‖_F.

Everything is PEFT 0.21.2's AdaLoRA, checked against it in tests/test_adalora.py: the same forward,
gradients, budget per step and masks, and the same files: tensors `…lora_A` (r, k), `…lora_B` (d, r),
`…lora_E` (r, 1) (no ".weight"; `ranknum` is not saved), cut to the kept ranks when the config has a
rank_pattern, and `peft_type: "ADALORA"`. A config with a rank_pattern builds each layer at its kept
rank, which is how PEFT loads such a file. `ranknum` stays `init_r`, so the scale never changes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bases import is_conv1d, linear_shape
from .config import LoraConfig
from .layers import Adapter, LoraLayer
from .state import LoraState, get_state, lora_layers, require_state

PEFT_TYPE = "ADALORA"
_ADALORA_FIELDS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                   "total_step")


@dataclass(frozen=True)
class AdaLoraConfig(LoraConfig):
    """An AdaLoRA adapter: LoraConfig's targeting fields plus the rank schedule. Frozen, as LoraConfig.

    `r`, `rank_pattern`'s LoRA meaning, `alpha_pattern`, `use_rslora`, `use_dora` and the other inits do not
    apply (PEFT ignores `r` and refuses DoRA); the rank is `init_r`.
    """

    init_r: int = 12
    """Rank every adapted matrix starts with."""
    target_r: int = 8
    """Average rank per matrix once the budget has shrunk."""
    tinit: int = 0
    """Steps of warm-up at full budget before ranks are removed."""
    tfinal: int = 0
    """Steps at the end with the final ranks fixed."""
    deltaT: int = 1  # noqa: N815 (PEFT's name, so adapter_config.json round-trips)
    """Re-allocate ranks every deltaT steps while the budget shrinks."""
    beta1: float = 0.85
    """EMA coefficient of the importance (sensitivity) scores."""
    beta2: float = 0.85
    """EMA coefficient of their uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality penalty on A and B added to the loss."""
    total_step: int | None = None
    """Training steps in all (required: the budget schedule ends at total_step - tfinal)."""
    rank_pattern: dict[str, list[bool]] | None = None
    """Allocation result, as PEFT writes it: {"<module>.lora_E": [kept, ...] (init_r entries)}; None before."""

    def __post_init__(self) -> None:
        allocation = self.rank_pattern
        object.__setattr__(self, "rank_pattern", {})  # LoraConfig checks LoRA's {regex: r}; ours is a mask
        super().__post_init__()
        object.__setattr__(self, "rank_pattern", _check_allocation(allocation))
        for name in ("init_r", "target_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
        if not isinstance(self.total_step, int) or self.total_step <= 0:
            raise ValueError(f"total_step must be the number of training steps (> 0), got total_step={self.total_step!r}; "
                             f"the rank budget schedule needs it")
        if not 0 <= self.tinit < self.total_step - self.tfinal or self.tfinal < 0:
            raise ValueError(f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leave no steps to "
                             f"shrink the budget: need 0 <= tinit < total_step - tfinal")
        if not isinstance(self.deltaT, int) or self.deltaT <= 0:
            raise ValueError(f"deltaT must be a positive number of steps, got deltaT={self.deltaT!r}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {name}={getattr(self, name)!r}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got orth_reg_weight={self.orth_reg_weight!r}")
        refused = {"use_dora": self.use_dora, "use_rslora": self.use_rslora, "alpha_pattern": self.alpha_pattern,
                   "init": self.init if self.init != "default" else None}
        if bad := {k: v for k, v in refused.items() if v}:
            raise ValueError(f"AdaLoRA does not support {bad}: its update is scaled by alpha / init_r and starts "
                             f"from PEFT's init (lora_E = 0, A and B ~ N(0, 0.02²)); drop these settings")

    # --- what inject asks a config ---
    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """init_r, or the number of kept ranks when rank_pattern has this module."""
        keep = (self.rank_pattern or {}).get(f"{module_name}.lora_E")
        return (self.init_r if keep is None else sum(keep)), self.alpha

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / (self.init_r + 1e-5)

    # --- PEFT's adapter_config.json ---
    def to_peft_dict(self) -> dict[str, Any]:
        d = LoraConfig.to_peft_dict(self.replace(rank_pattern={}))
        d.update({k: getattr(self, k) for k in _ADALORA_FIELDS})
        d.update(peft_type=PEFT_TYPE, rank_pattern=self.rank_pattern)
        return d

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], source: str = "adapter_config.json") -> AdaLoraConfig:
        if d.get("peft_type") != PEFT_TYPE:
            raise ValueError(f"{source}: peft_type={d.get('peft_type')!r} is not {PEFT_TYPE!r}")
        # PEFT's AdaLoRA ignores alpha_pattern and rank-style rank_pattern; the LoRA fields read as LoRA's
        base = LoraConfig.from_peft_dict({**d, "peft_type": "LORA", "rank_pattern": {}, "alpha_pattern": {}}, source)
        shared = {f.name: getattr(base, f.name) for f in dataclasses.fields(LoraConfig) if f.name != "rank_pattern"}
        own = {k: d[k] for k in _ADALORA_FIELDS if k in d}
        return cls(**shared, **own, rank_pattern=d.get("rank_pattern"))


def _check_allocation(pattern: Any) -> dict[str, list[bool]] | None:
    if pattern is None:
        return None
    if not isinstance(pattern, dict) or not all(isinstance(v, list) and all(isinstance(b, bool) for b in v)
                                                for v in pattern.values()):
        raise ValueError("AdaLoRA's rank_pattern is the allocation PEFT writes, {'<module>.lora_E': [true, false, ...]}, "
                         f"got {pattern!r}; leave it None before training")
    return {k: list(v) for k, v in pattern.items()}


def training_config(lora: LoraConfig, total_step: int) -> AdaLoraConfig:
    """The trainer's AdaLoRA for `--train-type adalora`: rank lora_rank → lora_rank // 2 on average.

    Full budget for the first 10% of steps, shrinking until 80%, fixed for the last 20%.
    """
    shared = {f.name: getattr(lora, f.name) for f in dataclasses.fields(LoraConfig) if f.name != "rank_pattern"}
    return AdaLoraConfig(**shared, init_r=lora.r, target_r=max(1, lora.r // 2), total_step=total_step,
                         tinit=total_step // 10, tfinal=total_step // 5)


# --- the layer ---------------------------------------------------------------------------------------
class SVDAdapter(Adapter):
    """One AdaLoRA adapter of one layer: P Λ Q as three parameters named as in PEFT's files."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, init_r: int, dropout: float) -> None:
        super().__init__(r, alpha, alpha, dropout)                      # scaling: PEFT's lora_alpha, / ranknum
        self.lora_A = nn.Parameter(torch.empty(r, in_features))         # Q: right singular vectors (r, k)
        self.lora_E = nn.Parameter(torch.empty(r, 1))                   # Λ: singular values (r, 1)
        self.lora_B = nn.Parameter(torch.empty(out_features, r))        # P: left singular vectors (d, r)
        self.register_buffer("ranknum", torch.tensor([float(init_r)]), persistent=False)  # not in files, as PEFT

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, ranknum={self.ranknum.item():g}, dropout={self.dropout}"


class SVDLinear(LoraLayer):
    """AdaLoRA around nn.Linear or transformers' Conv1D (weight (in, out))."""

    def __init__(self, base_layer: nn.Module, state: LoraState, name: str = "") -> None:
        if type(base_layer) is not nn.Linear and not is_conv1d(base_layer):
            raise TypeError(f"module {name!r} is a {type(base_layer).__name__}; AdaLoRA supports nn.Linear and "
                            f"transformers' Conv1D. Narrow target_modules so it matches only those")
        super().__init__(base_layer, state, name)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)

    def add_adapter(self, name: str, r: int, alpha: float, config: LoraConfig,
                    kind: type[Adapter] = SVDAdapter) -> SVDAdapter:
        """Add AdaLoRA adapter `name`: always an SVDAdapter (`kind`, LoRA's choice, does not apply)."""
        if not isinstance(config, AdaLoraConfig):
            raise ValueError(f"{self._debug_name()} holds AdaLoRA adapters; a LoRA adapter cannot share its layer. "
                             f"Delete them or exclude the module with exclude_modules")
        adapter = SVDAdapter(self.in_features, self.out_features, r, alpha, config.init_r, config.dropout)
        ref = self.base_layer.weight
        half = ref.dtype in (torch.float16, torch.bfloat16)
        adapter.to(device=ref.device, dtype=torch.float32 if half or not ref.dtype.is_floating_point else ref.dtype)
        self.adapters[name] = adapter
        self.reset_adapter(name)
        return adapter

    def reset_adapter(self, name: str, init: str = "default") -> None:
        ad = self.adapters[name]
        with torch.no_grad():  # PEFT: Λ = 0 so the update starts at zero, P and Q small
            nn.init.zeros_(ad.lora_E)
            nn.init.normal_(ad.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(ad.lora_B, mean=0.0, std=0.02)

    def delta_weight(self, name: str) -> Tensor:
        ad = self.adapters[name]
        delta = ad.lora_B.float() @ (ad.lora_A.float() * ad.lora_E.float())          # (d, k)
        delta = delta.t() if self.fan_in_fan_out else delta
        return delta * ad.scaling / (ad.ranknum.float() + 1e-5)

    def lora_input(self, ad: SVDAdapter, x: Tensor) -> Tensor:
        x = x.to(ad.lora_A.dtype)
        return F.dropout(x, ad.dropout, True) if self.training and ad.dropout > 0 else x

    def branch(self, ad: SVDAdapter, xd: Tensor) -> Tensor:
        return (xd @ (ad.lora_A * ad.lora_E).T @ ad.lora_B.T) * ad.scaling / (ad.ranknum + 1e-5)  # (..., d)


def wrap_svd_layer(module: nn.Module, state: LoraState, name: str) -> SVDLinear:
    """The SVDLinear that holds AdaLoRA adapters on `module` (`module` itself when it is one)."""
    if isinstance(module, SVDLinear):
        return module
    if isinstance(module, LoraLayer):
        raise ValueError(f"module {name!r} already holds LoRA adapters; an AdaLoRA adapter cannot share its layer. "
                         f"Delete those adapters or exclude the module with exclude_modules")
    return SVDLinear(module, state, name)


def svd_adapters(model: nn.Module, name: str = "default") -> list[tuple[str, SVDAdapter]]:
    """(module name, adapter) for every layer holding AdaLoRA adapter `name`, in model order."""
    return [(n, layer.adapters[name]) for n, layer in lora_layers(model)
            if isinstance(layer, SVDLinear) and name in layer.adapters]


# --- training: the penalty and the allocator ---------------------------------------------------------
def regularizer(model: nn.Module, name: str = "default") -> Tensor:
    """orth_reg_weight · mean of ‖QQᵀ - I‖_F and ‖PᵀP - I‖_F over the adapter's matrices (PEFT's sum order)."""
    cfg = require_state(model).configs[name]
    total: Tensor | float = 0.0
    count = 0
    for _, ad in svd_adapters(model, name):
        for cov in (ad.lora_A @ ad.lora_A.T, ad.lora_B.T @ ad.lora_B):  # (r, r) each
            total = total + torch.norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device), p="fro")
            count += 1
    if not count:
        raise ValueError(f"adapter {name!r} has no AdaLoRA layers; regularizer() is for AdaLoRA adapters")
    return cfg.orth_reg_weight * (total / count)


class RankAllocator:
    """Importance scores, the budget schedule and the masks of one AdaLoRA adapter (PEFT's RankAllocator).

    Call `step(global_step)` after `optimizer.step()` and before `zero_grad()`: the scores read the gradients.
    """

    def __init__(self, model: nn.Module, name: str = "default") -> None:
        self.model, self.name = model, name
        cfg = self.config
        if not isinstance(cfg, AdaLoraConfig):
            raise ValueError(f"adapter {name!r} is a {type(cfg).__name__} adapter; RankAllocator needs an AdaLoRA one")
        if cfg.target_r > cfg.init_r:
            raise ValueError(f"target_r={cfg.target_r} is above init_r={cfg.init_r}: the budget would grow; "
                             f"set target_r <= init_r")
        self.adapters = svd_adapters(model, name)
        self.init_bgt = sum(ad.lora_A.shape[0] for _, ad in self.adapters)   # total rank now
        self.target_bgt = cfg.target_r * len(self.adapters)                  # total rank at the end
        self.reset_ipt()

    @property
    def config(self) -> AdaLoraConfig:
        return require_state(self.model).configs[self.name]

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, str], Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at `step`, whether to re-mask at this step)."""
        cfg = self.config
        if step <= cfg.tinit:
            return self.init_bgt, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % cfg.deltaT == 0

    def step(self, global_step: int) -> int:
        """Update scores, and mask to the budget when the schedule says so; returns the budget."""
        cfg = self.config
        end = cfg.total_step - cfg.tfinal
        if global_step < end:
            self.update_ipt()
            budget, mask = self.budget_schedule(global_step)
            if mask:
                self._set_rank_pattern(self.mask_to_budget(budget))
            return budget
        if global_step == end:                                           # the final allocation
            budget, _ = self.budget_schedule(global_step)
            self._set_rank_pattern(self.mask_to_budget(budget))
            self.reset_ipt()
            return budget
        self.mask_using_rank_pattern()                                   # keep the removed ranks at zero
        return self.target_bgt

    def update_ipt(self) -> None:
        cfg = self.config
        with torch.no_grad():
            for mod, ad in self.adapters:
                for key in ("lora_A", "lora_B", "lora_E"):
                    p = getattr(ad, key)
                    if p.grad is None:
                        raise ValueError(f"{mod}.{key} has no gradient: call RankAllocator.step after "
                                         f"loss.backward() and optimizer.step(), before optimizer.zero_grad()")
                    ipt = (p * p.grad).abs()                                  # sensitivity
                    avg = self.exp_avg_ipt.get((mod, key), torch.zeros_like(p))
                    unc = self.exp_avg_unc.get((mod, key), torch.zeros_like(p))
                    avg = cfg.beta1 * avg + (1 - cfg.beta1) * ipt
                    self.exp_avg_ipt[(mod, key)] = avg
                    self.exp_avg_unc[(mod, key)] = cfg.beta2 * unc + (1 - cfg.beta2) * (ipt - avg).abs()

    def _score(self, mod: str, key: str) -> Tensor:
        return self.exp_avg_ipt[(mod, key)] * self.exp_avg_unc[(mod, key)]

    def triplet_scores(self) -> dict[str, Tensor]:
        """{module: (r,) score of each (P column, λ, Q row) triplet}."""
        out = {}
        for mod, _ in self.adapters:
            a = torch.mean(self._score(mod, "lora_A"), dim=1, keepdim=True)              # (r, 1)
            b = torch.mean(self._score(mod, "lora_B"), dim=0, keepdim=False).view(-1, 1)  # (r, 1)
            out[mod] = self._score(mod, "lora_E").view(-1) + torch.cat([a, b], dim=1).sum(dim=1).view(-1)
        return out

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero λ of every triplet scoring at or below the (init - budget)-th smallest score."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item() if k > 0 else float("-inf")
        pattern = {}
        with torch.no_grad():
            for mod, ad in self.adapters:
                drop = scores[mod] <= threshold                                   # (r,)
                ad.lora_E.masked_fill_(drop.view(-1, 1), 0.0)
                pattern[f"{mod}.lora_E"] = (~drop).tolist()
        return pattern

    def mask_using_rank_pattern(self) -> None:
        pattern = self.config.rank_pattern or {}
        with torch.no_grad():
            for mod, ad in self.adapters:
                keep = pattern.get(f"{mod}.lora_E")
                if keep is not None and len(keep) == ad.lora_E.shape[0]:
                    ad.lora_E.masked_fill_(~torch.tensor(keep, device=ad.lora_E.device).view(-1, 1), 0.0)

    def _set_rank_pattern(self, pattern: dict[str, list[bool]]) -> None:
        state = require_state(self.model)
        state.configs[self.name] = state.configs[self.name].replace(rank_pattern=pattern)

    def regularizer(self) -> Tensor:
        return regularizer(self.model, self.name)


def allocator_for(model: nn.Module, name: str = "default") -> RankAllocator | None:
    """The trainer's hook: a RankAllocator when adapter `name` is an AdaLoRA adapter, else None."""
    state = get_state(model)
    cfg = state.configs.get(name) if state else None
    return RankAllocator(model, name) if isinstance(cfg, AdaLoraConfig) else None


# --- files -------------------------------------------------------------------------------------------
def file_tensors(tensors: dict[str, Tensor], cfg: AdaLoraConfig, prefix: str = "base_model.model.") -> dict[str, Tensor]:
    """Cut full-rank tensors to the kept ranks of cfg.rank_pattern, as PEFT saves them."""
    out = dict(tensors)
    for key, keep in (cfg.rank_pattern or {}).items():
        module = prefix + key.removesuffix(".lora_E")
        mask = torch.tensor(keep, dtype=torch.bool)
        for tail, dim in (("lora_E", 0), ("lora_A", 0), ("lora_B", 1)):
            t = out.get(f"{module}.{tail}")
            if t is not None and t.shape[dim] == mask.numel() != int(mask.sum()):
                out[f"{module}.{tail}"] = t[mask] if dim == 0 else t[:, mask]
    return out
