"""ModulesToSave: a module trained in full (e.g. a classifier head), one copy per adapter.

The original stays untouched as ``original_module``; ``modules_to_save[name]`` is adapter
`name`'s trainable copy, saved with the adapter under PEFT's key names. A forward runs the copy
of the active adapter (the original when none has one, or inside `disabled`); under `per_row`,
row j runs the copy of adapter names[j].
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from .state import LoraState


class ModulesToSave(nn.Module):
    """A trainable full copy of a module per adapter (e.g. a classifier head); the original stays."""

    def __init__(self, original_module: nn.Module, state: LoraState) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        object.__setattr__(self, "state", state)

    def add_adapter(self, name: str) -> None:
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
        routing = st.routing
        if routing is None or st.disabled:
            return self._active_copy()(x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs)
        routing.check_batch(x.shape[0])
        for name, rows in routing.groups(x.device):
            if name in self.modules_to_save:
                own = self.modules_to_save[name](routing.take(x, rows), *args, **kwargs)
                out = routing.replace(out, rows, own.to(out.dtype))
        return out
