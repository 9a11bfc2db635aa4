"""Which adapters the server knows, where they live on disk, and which are in memory.

    known   = the adapters given at start (--lora-modules / --adapter)
            + those loaded through POST /v1/load_lora_adapter
            + every subfolder of --adapter-root holding an adapter (served by its folder name)
    loaded  = at most --max-loras of them on the model, least recently used first out; an adapter
              a queued or running row uses is pinned and never evicted (unloading one that is in
              use forgets its name now and frees its memory when its last row ends)

Paths come only from inside the allowed roots: --adapter-root and the folders given at start.
A path is resolved with realpath (so `..` and symlinks are followed to where they really point)
and must lie under a root by commonpath; the config and weights files are checked the same way,
so a symlinked file cannot reach out either. Loading and eviction happen on the scheduler thread,
between engine steps; the listing may be read from any thread.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..adapters import adapter_names, delete_adapter
from ..io import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from .protocol import APIError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")


def check_name(name: str, param: str = "lora_name") -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise APIError(400, f"{param}: adapter names are 1-64 letters, digits, '_' or '-' (starting with a letter "
                            f"or digit), got {name!r}", param=param)
    return name


class Registry:
    """The adapters of one served base model (see the module docstring)."""

    def __init__(self, model: nn.Module, base_id: str, adapters: dict[str, str] | None = None,
                 adapter_root: str | None = None, max_loras: int | None = None) -> None:
        self.model, self.base_id = model, base_id
        self.on_change: Callable[[str], None] = lambda name: None
        """Called with an adapter's name just before it loads or is deleted (the scheduler: the
        engine leaves its routing and forgets that adapter's cached prefixes)."""
        adapters = dict(adapters or {})
        for name in adapters:
            check_name(name, "--lora-modules")
        self.root = Path(os.path.realpath(adapter_root)) if adapter_root else None
        if self.root is not None and not self.root.is_dir():
            raise FileNotFoundError(f"--adapter-root {adapter_root} is not a folder")
        self.max_loras = max(max_loras or 8, 1)
        self.explicit: dict[str, Path] = {n: Path(os.path.realpath(p)) for n, p in adapters.items()}
        self.roots = [r for r in [self.root, *self.explicit.values()] if r is not None]
        self.loaded: OrderedDict[str, None] = OrderedDict((n, None) for n in adapter_names(model))
        self.pins: Counter[str] = Counter()
        self.doomed: set[str] = set()  # unloaded while in use: deleted when the last row lets go
        self.loads = self.evictions = 0
        self.lock = threading.Lock()
        for name in [n for n in self.explicit if n not in self.loaded][: self.max_loras - len(self.loaded)]:
            self._load(name, self.explicit[name])

    # --- what is known (any thread) ---------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every adapter a request may name: explicit ones first, then --adapter-root's subfolders."""
        with self.lock:
            names = [n for n in self.explicit if n not in self.doomed]
        return names + [n for n in self._root_names() if n not in names]

    def _root_names(self) -> list[str]:
        if self.root is None:
            return []
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError:
            return []
        return [e.name for e in entries if NAME.fullmatch(e.name) and e.name != self.base_id
                and self._inside(Path(os.path.realpath(e.path))) and (Path(e.path) / CONFIG_NAME).is_file()]

    def path_of(self, name: str) -> Path | None:
        """Where adapter `name` lives, or None if no adapter has that name."""
        with self.lock:
            if name in self.explicit and name not in self.doomed:
                return self.explicit[name]
        if self.root is not None and NAME.fullmatch(name) and name in self._root_names():
            return self.resolve(name, param="model")
        return None

    def resolve(self, path: str, param: str = "lora_path") -> Path:
        """The real folder `path` names (relative paths: under --adapter-root), if inside a root."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise APIError(400, f"{param}: give an adapter folder, got {path!r}", param=param)
        try:
            return self._resolve(path, param)
        except OSError as e:  # e.g. a name too long: the client's problem, not the server's
            raise APIError(400, f"{param}: {path[:200]!r} cannot be used: {e.strerror}", param=param) from e

    def _resolve(self, path: str, param: str) -> Path:
        base = self.root or Path.cwd()
        real = Path(os.path.realpath(base / path))                    # an absolute path replaces base
        if not self._inside(real):
            where = " and ".join(w for w, on in (("inside --adapter-root", self.root),
                                                 ("the folders given at start", self.explicit)) if on)
            where = (f"only from {where}" if where else "from no folder (start it with --adapter-root DIR to "
                                                         "allow one)")
            raise APIError(400, f"{param}: {path!r} is outside the allowed adapter folders; this server loads "
                                f"adapters {where} (symlinks and '..' are followed before checking)", param=param)
        if not real.is_dir():
            raise APIError(400, f"{param}: {path!r} is not an adapter folder (it holds {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME})", param=param)
        for file in (CONFIG_NAME, WEIGHTS_NAME):
            if (real / file).exists() and not self._inside(Path(os.path.realpath(real / file))):
                raise APIError(400, f"{param}: {path!r}: {file} links outside the allowed adapter folders",
                               param=param)
        return real

    def _inside(self, real: Path) -> bool:
        return any(os.path.commonpath([real, root]) == str(root) for root in self.roots)

    def loaded_names(self) -> list[str]:
        with self.lock:
            return list(self.loaded)

    # --- memory (the scheduler thread only) ----------------------------------------------------------
    def acquire(self, name: str | None) -> bool:
        """Pin `name` for a row, loading it first if needed; False if every slot is pinned (try later).

        Raises APIError(404) if the name is gone, APIError(400) if its folder does not load.
        """
        if name is None:
            return True
        if name not in self.loaded:
            path = self.path_of(name)
            if path is None:
                raise APIError(404, f"the model {name!r} does not exist (any more)", param="model",
                               code="model_not_found")
            if len(self.loaded) >= self.max_loras and not self._evict_one():
                return False
            self._load(name, path)
        with self.lock:
            self.loaded.move_to_end(name)
            self.pins[name] += 1
        return True

    def release(self, name: str | None) -> None:
        if name is None:
            return
        with self.lock:
            self.pins[name] -= 1
            last = self.pins[name] <= 0
            if last:
                del self.pins[name]
        if last and name in self.doomed:
            self._delete(name)

    def add(self, name: str, path: Path) -> None:
        """POST /v1/load_lora_adapter: remember `name` and load it now (evicting if needed)."""
        if name == self.base_id or name in self.names() or name in self.loaded:
            raise APIError(400, f"lora_name: an adapter named {name!r} is already loaded; unload it first or "
                                f"pick another name", param="lora_name")
        if len(self.loaded) >= self.max_loras and not self._evict_one():
            raise APIError(400, f"all {self.max_loras} adapter slots (--max-loras) are in use by running requests; "
                                f"try again shortly")
        self._load(name, path)
        with self.lock:
            self.explicit[name] = path

    def remove(self, name: str) -> None:
        """POST /v1/unload_lora_adapter: forget `name`; its memory goes now, or when no row uses it."""
        with self.lock:
            known = name in self.explicit or name in self.loaded
            self.explicit.pop(name, None)
            busy = self.pins[name] > 0
            if busy:
                self.doomed.add(name)
        if not known:
            raise APIError(404, f"lora_name: the adapter {name!r} cannot be found; loaded: {self.loaded_names()}",
                           param="lora_name", code="model_not_found")
        if not busy and name in self.loaded:
            self._delete(name)

    def _evict_one(self) -> bool:
        victim = next((n for n in self.loaded if not self.pins[n]), None)
        if victim is None:
            return False
        self._delete(victim)
        self.evictions += 1
        return True

    def _load(self, name: str, path: Path) -> None:
        self.on_change(name)
        try:
            load_adapter(self.model, path, name=name)
        except Exception as e:  # a damaged folder: say what is wrong, keep serving
            raise APIError(400, f"adapter {name!r} could not be loaded: {e}", param="model") from e
        self.model.eval()
        self.loads += 1
        with self.lock:
            self.loaded[name] = None

    def _delete(self, name: str) -> None:
        self.on_change(name)
        if name in adapter_names(self.model):
            delete_adapter(self.model, name)
        with self.lock:
            self.loaded.pop(name, None)
            self.doomed.discard(name)
