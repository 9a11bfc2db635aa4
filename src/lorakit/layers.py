"""LoRA layers: a wrapper around an untouched base module plus named low-rank adapters.

    x ──► base_layer ─────────────────────────────┐
    │                                             (+) ──► h = W0 x + s · B(A(dropout(x)))
    └──► dropout ──► A (r × k) ──► B (d × r) ──► ·s

Every layer kind keeps the base module as ``base_layer`` and one ``Adapter`` per name in
``adapters``; an adapter's tensors carry PEFT's names (``lora_A``, ``lora_B``,
``lora_embedding_A``, ``lora_magnitude_vector``) so the file format is a fixed key table.
``forward`` is pure math; what changes behaviour are the named calls (merge, unmerge,
set_adapter, per_row, disabled), which edit the shared ``LoraState``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dora, qlora
from .kernels import (LoraDeltaFunction, LoraLinearFunction, add_lora_branches, compute_dtype, fold_pays,
                      folded_linear, shared_dropout)

if TYPE_CHECKING:
    from .config import LoraConfig
    from .routing import Routing
    from .state import LoraState

try:  # GPT-2 style Conv1D: weight stored (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment]


_INIT_WEIGHTS: ContextVar[bool] = ContextVar("lorakit_init_weights", default=True)


@contextmanager
def uninitialised() -> Iterator[None]:
    """Inside, new adapters skip their init (A, B left as allocated): for loaders that overwrite them."""
    token = _INIT_WEIGHTS.set(False)
    try:
        yield
    finally:
        _INIT_WEIGHTS.reset(token)


class Adapter(nn.Module):
    """One named adapter of one layer: its factors, scale and dropout probability."""

    def __init__(self, r: int, alpha: float, scaling: float, dropout: float) -> None:
        super().__init__()
        # plain numbers: straight into __dict__ (Module.__setattr__ checks cost more than the numbers)
        self.__dict__.update(r=r, alpha=alpha, scaling=scaling, dropout=dropout)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(A, B) as matrices: A (r, k), B (d, r)."""
        if hasattr(self, "lora_embedding_A"):
            return self.lora_embedding_A, self.lora_embedding_B
        a, b = self.lora_A.weight, self.lora_B.weight
        return a.flatten(1), b.flatten(1)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}"


class LoraLayer(nn.Module):
    """Common machinery: named adapters, merge bookkeeping, and which adapters a forward uses."""

    def __init__(self, base_layer: nn.Module, state: LoraState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []
        object.__setattr__(self, "state", state)  # shared, not a submodule

    # --- subclass hooks ---
    def _make_adapter(self, r: int, alpha: float, scaling: float, dropout: float) -> Adapter:
        raise NotImplementedError

    def delta_weight(self, name: str) -> Tensor:
        """scaling * B @ A in the base weight's layout, in float32."""
        raise NotImplementedError

    def _lora_forward(self, x: Tensor, names: list[str]) -> Tensor:
        raise NotImplementedError

    # --- adapters ---
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def add_adapter(self, name: str, r: int, alpha: float, config: LoraConfig) -> Adapter:
        """Add adapter `name`, initialised by config.init (not at all inside `uninitialised()`)."""
        scaling = config.scaling(r, alpha)
        adapter = self._make_adapter(r, alpha, scaling, config.dropout)
        device, dtype = self.adapter_device_dtype()
        first = next(adapter.parameters())
        if first.device != device or first.dtype != dtype:  # kinds that build their factors elsewhere
            adapter.to(device=device, dtype=dtype)
        self.adapters[name] = adapter
        if _INIT_WEIGHTS.get() or config.use_dora:  # DoRA's magnitude is computed from A and B
            self.reset_adapter(name, config.init)
        if config.use_dora:
            dora.add_magnitude(self, name)
        return adapter

    def adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where adapter tensors live: the base weight's device; float32 for half/quantized bases."""
        ref = self.base_layer.weight
        dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
        return ref.device, torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def reset_adapter(self, name: str, init: str = "default") -> None:
        a, b = self.adapters[name].lora_A.weight, self.adapters[name].lora_B.weight
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, std=1 / self.adapters[name].r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def active_unmerged(self) -> list[str]:
        st = self.state
        return [n for n in st.active if n in self.adapters and n not in self.merged]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        st = self.state
        if st.disabled or not self.adapters:
            return self.base_layer(x, *args, **kwargs)
        if st.routing is not None:
            return self._routed_forward(x, st.routing, *args, **kwargs)
        names = self.active_unmerged()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self._lora_forward(x, names, *args, **kwargs)

    def _routed_forward(self, x: Tensor, routing: Routing, *args, **kwargs) -> Tensor:
        """Mixed batch: row i uses routing.names[i]. Generic path: one pass per adapter present."""
        out = self.base_layer(x, *args, **kwargs)
        for name, rows in routing.groups(x.shape[0], x.device):
            if name in self.adapters:
                delta = self._lora_forward(x[rows], [name], _delta_only=True)
                out.index_add_(0, rows, delta.to(out.dtype))
        return out

    # --- merging ---
    def merge(self, names: list[str], safe: bool = False) -> None:
        for name in names:
            if name not in self.adapters or name in self.merged:
                continue
            if not safe and self._add_delta_inplace(name, 1.0):
                self.merged.append(name)
                continue
            w = self.base_weight()
            merged = (dora.merged_weight(self, name, w) if dora.is_dora(self.adapters[name])
                      else w + self.delta_weight(name))
            if safe and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or Infs detected in the merged weights of {self._debug_name()}: "
                                 f"the adapter {name!r} seems to be broken; nothing was merged into this layer")
            self.set_base_weight(merged)
            self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            name = self.merged.pop()
            if self._add_delta_inplace(name, -1.0):
                continue
            w = self.base_weight()
            self.set_base_weight(dora.unmerged_weight(self, name, w) if dora.is_dora(self.adapters[name])
                                 else w - self.delta_weight(name))

    def _add_delta_inplace(self, name: str, sign: float) -> bool:
        """W += sign · ΔW in place where a layer kind can (one pass over W); False: use the general path."""
        return False

    def base_weight(self) -> Tensor:
        """The base weight as float32 in its stored layout (dequantized when the base is 4-bit)."""
        if qlora.is_4bit(self.base_layer):
            return qlora.dequantized_weight(self.base_layer)
        w = self.base_layer.weight
        if not w.dtype.is_floating_point:
            raise TypeError(f"{self._debug_name()} is a {type(self.base_layer).__name__} with {w.dtype} weights; "
                            f"merging and DoRA need a float or a 4-bit (bitsandbytes Linear4bit) base")
        return w.detach().float()

    def set_base_weight(self, w: Tensor) -> None:
        """Write a float weight back into the base (re-quantizing a 4-bit base)."""
        if qlora.is_4bit(self.base_layer):
            qlora.replace_weight(self.base_layer, w)
        else:
            self.base_layer.weight.data.copy_(w.to(self.base_layer.weight.dtype))

    def _debug_name(self) -> str:
        return getattr(self, "_lorakit_name", type(self.base_layer).__name__)

    def extra_repr(self) -> str:
        return f"merged={self.merged}" if self.merged else ""


class LoraLinear(LoraLayer):
    """LoRA around nn.Linear, transformers' Conv1D (weight (in, out)) or a quantized linear."""

    def __init__(self, base_layer: nn.Module, state: LoraState) -> None:
        super().__init__(base_layer, state)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D) if Conv1D else False
        if qlora.is_4bit(base_layer):
            qlora.keep_standard_layout(base_layer)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def _make_adapter(self, r, alpha, scaling, dropout) -> Adapter:
        device, dtype = self.adapter_device_dtype()
        ad = Adapter(r, alpha, scaling, dropout)
        ad.lora_A = _linear(torch.empty(r, self.in_features, device=device, dtype=dtype))   # (r, k)
        ad.lora_B = _linear(torch.zeros(self.out_features, r, device=device, dtype=dtype))  # (d, r)
        return ad

    def delta_weight(self, name: str) -> Tensor:
        ad = self.adapters[name]
        delta = (ad.lora_B.weight.float() @ ad.lora_A.weight.float()) * ad.scaling  # (d, k)
        return delta.t() if self.fan_in_fan_out else delta

    def _add_delta_inplace(self, name: str, sign: float) -> bool:
        """Plain LoRA on a float32 weight: W.addmm_(B, A, alpha=±s), no (d, k) temporary."""
        w, ad = getattr(self.base_layer, "weight", None), self.adapters[name]
        if (w is None or w.dtype != torch.float32 or dora.is_dora(ad) or qlora.is_4bit(self.base_layer)
                or ad.lora_A.weight.dtype != torch.float32):
            return False
        a, b = ad.lora_A.weight.detach(), ad.lora_B.weight.detach()     # (r, k), (d, r)
        with torch.no_grad():
            if self.fan_in_fan_out:
                w.addmm_(a.t(), b.t(), alpha=sign * ad.scaling)          # W stored (k, d)
            else:
                w.addmm_(b, a, alpha=sign * ad.scaling)
        return True

    def _plain_base(self) -> bool:
        """An exact nn.Linear / Conv1D (not a subclass or a quantized linear): its math is known."""
        base = self.base_layer
        return type(base) is nn.Linear or bool(Conv1D) and type(base) is Conv1D

    def _fusable(self) -> bool:
        return self._plain_base() and not self.base_layer.weight.requires_grad

    def _lora_forward(self, x: Tensor, names: list[str], *args, _delta_only: bool = False, **kwargs) -> Tensor:
        if any(dora.is_dora(self.adapters[n]) for n in names):
            return dora.forward(self, x, names, delta_only=_delta_only)
        ads = [self.adapters[n] for n in names]
        p = max(ad.dropout for ad in ads) if self.training else 0.0
        if p > 0 and not _delta_only and len({ad.dropout for ad in ads}) > 1:
            # adapters with different dropout p: each gets its own mask, as in PEFT
            out = self._lora_forward(x, names[:1], *args, **kwargs)
            for n in names[1:]:
                out = out + self._lora_forward(x, [n], _delta_only=True).to(out.dtype)
            return out
        scales = tuple(ad.scaling for ad in ads)
        factors = [t for ad in ads for t in (ad.lora_A.weight, ad.lora_B.weight)]
        if _delta_only:
            return _lora_delta(x, factors, scales, p, compute_dtype(x))
        drop = None
        if p > 0:  # one mask for every branch that reads this same x (q/k/v, gate/up): kernels.SharedDropout
            drop = shared_dropout(x, p, self)
            scales = tuple(s / (1.0 - drop.rate) for s in scales)       # inverted dropout's 1/(1-p), folded in
        base = self.base_layer
        bias = getattr(base, "bias", None)
        grad = torch.is_grad_enabled() and (x.requires_grad or any(f.requires_grad for f in factors)
                                            or (bias is not None and bias.requires_grad))
        if grad and self._fusable():
            return LoraLinearFunction.apply(x, base.weight, bias, self.fan_in_fan_out, drop, scales, *factors)
        if not grad and drop is None and self._plain_base() and fold_pays(x, base.weight, self.out_features):
            return folded_linear(x, base.weight, bias, self.fan_in_fan_out, scales, factors)
        out = base(x)
        if grad:
            return LoraDeltaFunction.apply(out, x, drop, scales, *factors)
        # inference: the same math without autograd bookkeeping, added into the base output in place
        out = out if out.is_contiguous() else out.contiguous()
        flat = out.view(-1, out.shape[-1])                                # (N, d)
        xf = x.reshape(-1, x.shape[-1]).to(flat.dtype)                    # (N, k)
        add_lora_branches(flat, drop.masked(xf) if drop is not None else xf, scales, factors, flat.dtype)
        return out

    def _routed_forward(self, x: Tensor, routing: Routing, *args, **kwargs) -> Tensor:
        """Mixed batch in two batched matmuls: row i's A and s·B are gathered once per routing.

            out (b, L, d) += bmm(bmm(x (b, L, k), A_rowsᵀ), (s·B)_rowsᵀ)     A_rows (b, r, k), B_rows (b, d, r)

        A generate() pays for the gathering once, then runs two ops per layer per step (a loop
        over adapters would run two per adapter, each with its own threading overhead). Rows
        with None or an adapter this layer lacks gather zeros. DoRA adapters, inputs that need
        gradients and dropout in training mode take the generic per-adapter path.
        """
        cache = routing.layer_cache(self)
        plan = cache.get("plan")
        if plan is None:  # what this layer holds of the routing's adapters: once per routing, not per step
            present = [self.adapters[a] for a in routing.adapters if a in self.adapters]
            plan = cache["plan"] = (bool(present), any(dora.is_dora(ad) for ad in present),
                                    any(ad.dropout > 0 for ad in present))
        has_any, has_dora, has_dropout = plan
        if (x.dim() < 2 or has_dora or self.training and has_dropout
                or torch.is_grad_enabled() and x.requires_grad):
            return super()._routed_forward(x, routing, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        if not has_any:
            return out
        out = out if out.is_contiguous() else out.contiguous()
        b = x.shape[0]
        a_rows, b_rows = routing.row_factors(self, b, out.device, out.dtype)  # (b, r, k), (b, d, r)
        x3 = x.reshape(b, -1, x.shape[-1]).to(out.dtype)                    # (b, L, k)
        xa = torch.bmm(x3, a_rows.transpose(1, 2))                          # (b, L, r)
        out.view(b, -1, out.shape[-1]).baddbmm_(xa, b_rows.transpose(1, 2))
        return out


def _linear(weight: Tensor) -> nn.Linear:
    """An nn.Linear (no bias) around `weight` (out, in), without nn.Linear's own kaiming init:
    the adapter's init (or a loader) fills it, so initialising twice would only cost time.
    Built the way nn.Linear.__init__ leaves it, minus reset_parameters (inject makes 420 of these)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.__dict__.update(in_features=weight.shape[1], out_features=weight.shape[0])
    lin._parameters["weight"] = nn.Parameter(weight)
    lin._parameters["bias"] = None
    return lin


def _lora_delta(x: Tensor, factors: list[Tensor], scales: tuple[float, ...], p: float,
                dtype: torch.dtype) -> Tensor:
    """Σ s_i B_i A_i dropout(x) as a new tensor (..., d); plain autograd."""
    xd = F.dropout(x, p, True) if p > 0 else x
    xd = xd.to(dtype)
    out = None
    for i, s in enumerate(scales):
        a, b = factors[2 * i].to(dtype), factors[2 * i + 1].to(dtype)
        term = F.linear(F.linear(xd, a), b) * s
        out = term if out is None else out + term
    return out


class LoraEmbedding(LoraLayer):
    """LoRA around nn.Embedding: h = E[x] + s · (A.T[x]) Bᵀ. No dropout, as in PEFT."""

    def _make_adapter(self, r, alpha, scaling, dropout) -> Adapter:
        base = self.base_layer
        ad = Adapter(r, alpha, scaling, 0.0)
        ad.lora_embedding_A = nn.Parameter(torch.empty(r, base.num_embeddings))  # (r, vocab)
        ad.lora_embedding_B = nn.Parameter(torch.empty(base.embedding_dim, r))   # (dim, r)
        return ad

    def reset_adapter(self, name: str, init: str = "default") -> None:
        ad = self.adapters[name]
        with torch.no_grad():  # PEFT/loralib: A zero, B normal, so the update starts at zero
            nn.init.zeros_(ad.lora_embedding_A)
            nn.init.normal_(ad.lora_embedding_B)

    def delta_weight(self, name: str) -> Tensor:
        ad = self.adapters[name]
        return (ad.lora_embedding_B.float() @ ad.lora_embedding_A.float()).t() * ad.scaling  # (vocab, dim)

    def _lora_forward(self, x: Tensor, names: list[str], *args, _delta_only: bool = False, **kwargs) -> Tensor:
        if any(dora.is_dora(self.adapters[n]) for n in names):
            return dora.forward(self, x, names, delta_only=_delta_only)
        base = self.base_layer
        out = None if _delta_only else base(x)
        for name in names:
            ad = self.adapters[name]
            after_a = F.embedding(x, ad.lora_embedding_A.t(), base.padding_idx, base.max_norm,
                                  base.norm_type, base.scale_grad_by_freq, base.sparse)  # (..., r)
            term = (after_a @ ad.lora_embedding_B.t()) * ad.scaling
            out = term if out is None else out + term.to(out.dtype)
        return out


class LoraConv(LoraLayer):
    """LoRA around nn.Conv1d/2d/3d: A is a conv with the base kernel, B a 1×1 conv."""

    def __init__(self, base_layer: nn.Module, state: LoraState) -> None:
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on a grouped convolution (groups={base_layer.groups}) is not supported; "
                             f"exclude this module with exclude_modules")
        super().__init__(base_layer, state)

    def _make_adapter(self, r, alpha, scaling, dropout) -> Adapter:
        base = self.base_layer
        conv = type(base)
        ad = Adapter(r, alpha, scaling, dropout)
        ad.lora_A = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
        ad.lora_B = conv(r, base.out_channels, (1,) * len(base.kernel_size), bias=False)
        return ad

    def delta_weight(self, name: str) -> Tensor:
        ad = self.adapters[name]
        a, b = ad.lora_A.weight.float(), ad.lora_B.weight.float()   # (r, in, *k), (out, r, 1...)
        delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])  # (out, in, *k)
        return delta * ad.scaling

    def _lora_forward(self, x: Tensor, names: list[str], *args, _delta_only: bool = False, **kwargs) -> Tensor:
        if any(dora.is_dora(self.adapters[n]) for n in names):
            return dora.forward(self, x, names, delta_only=_delta_only)
        out = None if _delta_only else self.base_layer(x)
        for name in names:
            ad = self.adapters[name]
            xd = F.dropout(x, ad.dropout, True) if self.training and ad.dropout > 0 else x
            term = ad.lora_B(ad.lora_A(xd.to(ad.lora_A.weight.dtype))) * ad.scaling
            out = term if out is None else out + term.to(out.dtype)
        return out


class ModulesToSave(nn.Module):
    """A trainable full copy of a module per adapter (e.g. a classifier head); the original stays."""

    def __init__(self, original_module: nn.Module, state: LoraState) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        object.__setattr__(self, "state", state)

    def add_adapter(self, name: str) -> None:
        import copy

        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def _active_copy(self) -> nn.Module:
        st = self.state
        names = [n for n in st.active if n in self.modules_to_save]
        if st.disabled or not names:
            return self.original_module
        if len(names) > 1:
            raise ValueError(f"adapters {names} each have their own copy of this module (modules_to_save); "
                             f"activate only one of them")
        return self.modules_to_save[names[0]]

    def forward(self, x: Tensor, *args, **kwargs):
        st = self.state
        if st.routing is None or st.disabled:
            return self._active_copy()(x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs)
        for name, rows in st.routing.groups(x.shape[0], x.device):
            if name in self.modules_to_save:
                out = out.index_copy(0, rows, self.modules_to_save[name](x[rows], *args, **kwargs).to(out.dtype))
        return out


def make_lora_layer(module: nn.Module, state: LoraState, name: str) -> LoraLayer:
    """Wrap one base module in the right LoRA layer, or say why it cannot be adapted."""
    if isinstance(module, nn.Embedding):
        layer = LoraEmbedding(module, state)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        layer = LoraConv(module, state)
    elif isinstance(module, nn.Linear) or (Conv1D and isinstance(module, Conv1D)) or _is_quantized_linear(module):
        layer = LoraLinear(module, state)
    else:
        raise TypeError(f"module {name!r} is a {type(module).__name__}; LoRA supports nn.Linear, nn.Embedding, "
                        f"nn.Conv1d/2d/3d, transformers' Conv1D and bitsandbytes Linear4bit. "
                        f"Narrow target_modules so it matches only supported layers")
    object.__setattr__(layer, "_lorakit_name", name)
    return layer


def _is_quantized_linear(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and hasattr(module, "in_features")
