"""The engine's prefix cache: prompt keys and values kept per adapter, so a prompt that starts like
an earlier one prefills only the rest.

Chat requests share the template's head (a system prompt, the role markers) and a conversation's
next turn repeats the earlier ones; vLLM and SGLang reuse those keys/values rather than compute
them again, and so does `Engine`:

    kept: (adapter, prompt tokens) ──► per layer (keys, values) (1, heads, len, head_dim), least recently used first
    new row (adapter, prompt) ──lookup──► the kept prompt of that adapter sharing the longest head
        ≥ MIN_PREFIX tokens: its first n keys/values (n ≤ len(prompt) - 1: the last token is computed,
        its logits give the first new token); fewer: nothing
    new rows that share a head with each other, and nothing kept (`shared_heads`): the heads run
        first, once per adapter, and are kept; then the rows reuse them like any kept prompt

Keys/values depend on the adapter (its LoRA on the projections of every layer), so they are kept
per adapter name; whoever changes an adapter's weights calls `forget` (the serving registry does,
before every load and unload). Bounded by `limit` tokens in all.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from torch import Tensor

MIN_PREFIX = 8  # prompt tokens a kept prefix must cover to be reused (fewer: not worth the copies)
MIN_SHARED = 64  # prompt tokens that heads shared inside one prefill must save to be run first on their own

KV = list[tuple[Tensor, Tensor]]  # per layer (keys, values), each (1, heads, length, head_dim)


class PrefixCache:
    """Kept prompt keys/values, `limit` tokens at most (0: keep nothing)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self.tokens = 0
        """Prompt tokens kept now."""
        self._kept: OrderedDict[tuple[str | None, tuple[int, ...]], KV] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def lookup(self, adapter: str | None, prompt: Sequence[int]) -> tuple[int, KV]:
        """(n, the first n keys/values) of the kept prompt of `adapter` that shares the longest head
        with `prompt`, n at most len(prompt) - 1; (0, []) when none shares MIN_PREFIX tokens."""
        best, found = 0, None
        for key in self._kept:
            if key[0] == adapter:
                n = common_length(key[1], prompt)
                if n > best:
                    best, found = n, key
        best = min(best, len(prompt) - 1)
        if found is None or best < MIN_PREFIX:
            return 0, []
        self._kept.move_to_end(found)
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self._kept[found]]

    def wants(self, adapter: str | None, prompt: Sequence[int]) -> bool:
        """Whether `remember` would keep this prompt (not kept yet, long enough, fits the limit)."""
        return MIN_PREFIX <= len(prompt) <= self.limit and (adapter, tuple(prompt)) not in self._kept

    def remember(self, adapter: str | None, prompt: Sequence[int], kv: KV) -> None:
        """Keep the prompt's keys/values (their own tensors: not views of a batch's cache), then drop the
        least recently used prompts until the limit holds."""
        if not self.wants(adapter, prompt):
            return
        self._kept[adapter, tuple(prompt)] = kv
        self.tokens += len(prompt)
        while self.tokens > self.limit:
            (_, tokens), _ = self._kept.popitem(last=False)
            self.tokens -= len(tokens)

    def forget(self, adapters: Iterable[str | None] | None = None) -> None:
        """Drop the prompts kept for `adapters` (None: all)."""
        drop = set(adapters) if adapters is not None else None
        for key in [k for k in self._kept if drop is None or k[0] in drop]:
            self.tokens -= len(key[1])
            del self._kept[key]


def shared_heads(prompts: list[tuple[str | None, Sequence[int]]]) -> list[tuple[str | None, list[int]]]:
    """Heads that new prompts of one adapter share with each other (nothing kept covers them yet):
    (adapter, head) per group of prompts that start with the same MIN_PREFIX tokens, the head as
    long as all of them share (all but each one's last token at most). [] unless running the heads
    first saves MIN_SHARED prompt tokens: that costs a forward of its own."""
    groups: dict[tuple, list[Sequence[int]]] = {}
    for adapter, prompt in prompts:
        if len(prompt) > MIN_PREFIX:
            groups.setdefault((adapter, tuple(prompt[:MIN_PREFIX])), []).append(prompt)
    heads, saved = [], 0
    for (adapter, _), members in groups.items():
        if len(members) > 1:
            n = min(min(common_length(members[0], m) for m in members[1:]), min(len(m) for m in members) - 1)
            if n >= MIN_PREFIX:
                heads.append((adapter, list(members[0][:n])))
                saved += (len(members) - 1) * n
    return heads if saved >= MIN_SHARED else []


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
