"""LoRA layers: a wrapper around an untouched base module plus named low-rank adapters.

    x ──► base_layer ─────────────────────────────┐
    │                                             (+) ──► h = W0 x + s · B(A(dropout(x)))
    └──► dropout ──► A (r × k) ──► B (d × r) ──► ·s

Every layer kind keeps the base module as ``base_layer`` and one ``Adapter`` per name in
``adapters``; an adapter's tensors carry PEFT's names (``lora_A``, ``lora_B``,
``lora_embedding_A``, ``lora_magnitude_vector``) so the file format is a fixed key table.

Layer kinds (which one wraps a base module is `inject`'s choice, by `bases.kind`): `LoraLinear`
(linear.py: nn.Linear, Conv1D, quantized linears, with the fast paths of kernels.py),
`LoraEmbedding` and `LoraConv` (here), `adalora.SVDLinear`. Adapter kinds, chosen once when an
adapter is added: `Adapter` (LoRA), `dora.DoraAdapter`, `adalora.SVDAdapter`; each says what it
adds to the output (`add_to`) and to the base weight when merged (`merged_weight`).

``forward`` is pure math: it reads the shared ``LoraState`` (active adapters, ``per_row``
routing, ``shared_dropout`` draws) and writes nothing there; what changes behaviour are the
named calls (merge, unmerge, set_adapter, per_row, disabled, shared_dropout), which edit it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import qlora
from .bases import is_4bit

if TYPE_CHECKING:
    from .config import LoraConfig
    from .routing import Routing
    from .state import LoraState


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
    """One named LoRA adapter of one layer: its factors, scale and dropout probability."""

    additive: ClassVar[bool] = True
    """Its update is W0 + s·B·A, linear in x: kernels' fast paths, the in-place merge and the batched
    per-row path compute exactly that. False for kinds with other math (DoRA)."""

    def __init__(self, r: int, alpha: float, scaling: float, dropout: float) -> None:
        super().__init__()
        # plain numbers: straight into __dict__ (Module.__setattr__ checks cost more than the numbers)
        self.__dict__.update(r=r, alpha=alpha, scaling=scaling, dropout=dropout)

    def initialise(self, layer: LoraLayer, name: str, init: str) -> None:
        """Set the factors by `init` once the adapter sits in layer.adapters (not inside `uninitialised()`)."""
        if _INIT_WEIGHTS.get():
            layer.reset_adapter(name, init)

    def add_to(self, layer: LoraLayer, name: str, x: Tensor, base_out: Tensor, added: Tensor | int) -> Tensor:
        """`added` (what the adapters before this one add to base_out) plus this one's s·B(A(dropout(x)))."""
        return added + layer.branch(self, layer.lora_input(self, x))

    def merged_weight(self, layer: LoraLayer, name: str, weight: Tensor) -> Tensor:
        """The float32 base weight (stored layout) with this adapter folded in: W + s·B·A."""
        return weight + layer.delta_weight(name)

    def unmerged_weight(self, layer: LoraLayer, name: str, weight: Tensor) -> Tensor:
        """Undo `merged_weight`."""
        return weight - layer.delta_weight(name)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}"


class LoraLayer(nn.Module):
    """Common machinery: named adapters, the forward formula, merge bookkeeping."""

    def __init__(self, base_layer: nn.Module, state: LoraState, name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []
        object.__setattr__(self, "state", state)        # shared, not a submodule
        object.__setattr__(self, "_lorakit_name", name)  # the module's name in the model, for messages

    # --- what a layer kind defines ---
    def _make_adapter(self, kind: type[Adapter], r: int, alpha: float, scaling: float, dropout: float) -> Adapter:
        raise NotImplementedError

    def delta_weight(self, name: str) -> Tensor:
        """scaling * B @ A in the base weight's layout, in float32."""
        raise NotImplementedError

    def reset_adapter(self, name: str, init: str = "default") -> None:
        """PEFT's init: A kaiming-uniform (or normal / r for "gaussian"), B zero, so the update starts at 0."""
        a, b = self.adapters[name].lora_A.weight, self.adapters[name].lora_B.weight
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, std=1 / self.adapters[name].r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def lora_input(self, ad: Adapter, x: Tensor) -> Tensor:
        """x as adapter `ad`'s branch reads it: in the adapter's dtype, dropped out in training."""
        x = x.to(ad.lora_A.weight.dtype)
        return F.dropout(x, ad.dropout, True) if self.training and ad.dropout > 0 else x

    def branch(self, ad: Adapter, xd: Tensor) -> Tensor:
        """s · B(A(xd)) for an input already through `lora_input`."""
        return ad.lora_B(ad.lora_A(xd)) * ad.scaling

    def fast_forward(self, x: Tensor, adapters: list[Adapter], routing: Routing | None) -> Tensor | None:
        """The same output as the formula by a faster path, or None (LoraLinear: `kernels.lora_linear`)."""
        return None

    # --- the forward ---
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """h = base(x) + Σ_i s_i · B_i(A_i(dropout(x))) over the adapters in use, each adding its own
        term (`Adapter.add_to`; DoRA's in dora.py). Under `per_row`, row j uses adapter names[j]."""
        st = self.state
        if st.disabled or not self.adapters:
            return self.base_layer(x, *args, **kwargs)
        routing = st.routing
        names = self.active_unmerged() if routing is None else []
        if routing is None and not names:
            return self.base_layer(x, *args, **kwargs)
        fast = self.fast_forward(x, [self.adapters[n] for n in names], routing)  # the same math, faster
        if fast is not None:
            return fast
        out = self.base_layer(x, *args, **kwargs)
        if routing is not None:
            return self._add_per_row(out, x, routing)
        return (out + self.update(x, names, out)).to(out.dtype)

    def update(self, x: Tensor, names: list[str], base_out: Tensor) -> Tensor:
        """What adapters `names` add to base_out, applied in order (a DoRA term scales the running output)."""
        added: Tensor | int = 0
        for name in names:
            added = self.adapters[name].add_to(self, name, x, base_out, added)
        return added

    def _add_per_row(self, out: Tensor, x: Tensor, routing: Routing) -> Tensor:
        """Row j of out gets adapter routing.names[j]'s term: one pass per adapter present."""
        routing.check_batch(x.shape[0])
        out = out if out.is_contiguous() else out.contiguous()
        for name, rows in routing.groups(x.device):
            if name in self.adapters:
                term = self.update(routing.take(x, rows), [name], routing.take(out, rows))
                routing.add(out, rows, term.to(out.dtype))
        return out

    # --- adapters ---
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def add_adapter(self, name: str, r: int, alpha: float, config: LoraConfig,
                    kind: type[Adapter] = Adapter) -> Adapter:
        """Add adapter `name` of `kind` (inject's choice: Adapter, or DoraAdapter), initialised by config.init."""
        adapter = self._make_adapter(kind, r, alpha, config.scaling(r, alpha), config.dropout)
        device, dtype = self.adapter_device_dtype()
        first = next(adapter.parameters())
        if first.device != device or first.dtype != dtype:  # kinds that build their factors elsewhere
            adapter.to(device=device, dtype=dtype)
        self.adapters[name] = adapter
        adapter.initialise(self, name, config.init)
        return adapter

    def adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where adapter tensors live: the base weight's device; float32 for half/quantized bases."""
        ref = self.base_layer.weight
        dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
        return ref.device, torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def active_unmerged(self) -> list[str]:
        st = self.state
        return [n for n in st.active if n in self.adapters and n not in self.merged]

    # --- merging ---
    def merge(self, names: list[str], safe: bool = False) -> None:
        for name in names:
            if name not in self.adapters or name in self.merged:
                continue
            if not safe and self._add_delta_inplace(name, 1.0):
                self.merged.append(name)
                continue
            merged = self.adapters[name].merged_weight(self, name, self.base_weight())
            if safe and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or Infs detected in the merged weights of {self._debug_name()}: "
                                 f"the adapter {name!r} seems to be broken; nothing was merged into this layer")
            self.set_base_weight(merged)
            self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            name = self.merged.pop()
            if not self._add_delta_inplace(name, -1.0):
                self.set_base_weight(self.adapters[name].unmerged_weight(self, name, self.base_weight()))

    def _add_delta_inplace(self, name: str, sign: float) -> bool:
        """W += sign · ΔW in place where a layer kind can (one pass over W); False: use the general path."""
        return False

    def base_weight(self) -> Tensor:
        """The base weight as float32 in its stored layout (dequantized when the base is 4-bit)."""
        if is_4bit(self.base_layer):
            return qlora.dequantized_weight(self.base_layer)
        w = self.base_layer.weight
        if not w.dtype.is_floating_point:
            raise TypeError(f"{self._debug_name()} is a {type(self.base_layer).__name__} with {w.dtype} weights; "
                            f"merging and DoRA need a float or a 4-bit (bitsandbytes Linear4bit) base")
        return w.detach().float()

    def set_base_weight(self, w: Tensor) -> None:
        """Write a float weight back into the base (re-quantizing a 4-bit base)."""
        if is_4bit(self.base_layer):
            qlora.replace_weight(self.base_layer, w)
        else:
            self.base_layer.weight.data.copy_(w.to(self.base_layer.weight.dtype))

    def _debug_name(self) -> str:
        return self._lorakit_name or type(self.base_layer).__name__

    def extra_repr(self) -> str:
        return f"merged={self.merged}" if self.merged else ""


class LoraEmbedding(LoraLayer):
    """LoRA around nn.Embedding: h = E[x] + s · (A.T[x]) Bᵀ. No dropout, as in PEFT."""

    def _make_adapter(self, kind, r, alpha, scaling, dropout) -> Adapter:
        base = self.base_layer
        ad = kind(r, alpha, scaling, 0.0)
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

    def lora_input(self, ad: Adapter, x: Tensor) -> Tensor:
        return x                                                                 # token ids: no dropout

    def branch(self, ad: Adapter, xd: Tensor) -> Tensor:
        base = self.base_layer
        after_a = F.embedding(xd, ad.lora_embedding_A.t(), base.padding_idx, base.max_norm,
                              base.norm_type, base.scale_grad_by_freq, base.sparse)  # (..., r)
        return (after_a @ ad.lora_embedding_B.t()) * ad.scaling                  # (..., dim)


class LoraConv(LoraLayer):
    """LoRA around nn.Conv1d/2d/3d: A is a conv with the base kernel, B a 1×1 conv."""

    def __init__(self, base_layer: nn.Module, state: LoraState, name: str = "") -> None:
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on a grouped convolution (groups={base_layer.groups}) is not supported; "
                             f"exclude this module with exclude_modules")
        super().__init__(base_layer, state, name)

    def _make_adapter(self, kind, r, alpha, scaling, dropout) -> Adapter:
        base = self.base_layer
        conv = type(base)
        ad = kind(r, alpha, scaling, dropout)
        ad.lora_A = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False)
        ad.lora_B = conv(r, base.out_channels, (1,) * len(base.kernel_size), bias=False)
        return ad

    def delta_weight(self, name: str) -> Tensor:
        ad = self.adapters[name]
        a, b = ad.lora_A.weight.float(), ad.lora_B.weight.float()   # (r, in, *k), (out, r, 1...)
        delta = (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])  # (out, in, *k)
        return delta * ad.scaling
