"""Continuous batching over one causal LM and many adapters: rows join and leave between steps.

    waiting rows ──prefill: left-padded, a fresh KV cache, adapters routed per row──┐
                                                                                    ▼ merge (pad on the sequence axis,
    running rows ◄──────────────────────────────────────────────────────────────────┘   concatenate on the batch axis)
        │ each step: ONE decode forward over every running row, whatever its adapter (`adapters.using`)
        ▼
    a token per row (greedy, or sampled with the row's own generator) ──► EOS / stop string / length:
        the row leaves the batch (its cache rows are dropped, all-padding columns trimmed)

A row never waits for another row to finish: a new one is prefilled at the next step and joins
the running batch, and a finished one leaves at once. `Engine.step` does at most one prefill
(capped by `max_prefill_tokens`, so running streams never stall behind a long prompt) and one
decode. While the running rows stay the same, their adapter routing (`adapters.using`) stays
entered from step to step, and when rows join or leave it is re-grouped in the same block
(`adapters.reroute`: index tensors, no copy of factors); `release()` leaves it (the engine does
so when idle). The engine is single-threaded: one owner
calls `add`, `step` and `release`; another thread may only set `Row.cancelled`. `lorakit.generation.generate` (and so `lorakit
generate` and the trainer's exact-match evaluation) and `lorakit serve` both run on it.

Supported: causal LMs whose KV cache is transformers' `DynamicCache` of plain full-attention
layers (Llama, Mistral, Qwen2, GPT-2, ...); `supports(model)` says so. Others (sliding-window or
linear-attention caches, encoder-decoders) use `model.generate`.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import reroute, using
from .prefixes import PrefixCache, shared_heads
from .sampling import Sampling, cut_at_stop, pick_tokens

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"  # Row.finish_reason values


@dataclass(eq=False)
class Row:
    """One sequence to generate: its prompt, adapter and sampling options, then its tokens and text."""

    prompt: list[int]
    """Prompt token ids (already templated and tokenized)."""
    adapter: str | None = None
    """The adapter this row uses; None: the base model."""
    sampling: Sampling = field(default_factory=Sampling)
    stream: bool = False
    """Keep `text` current after every token (for streaming); otherwise it is decoded once at the end."""
    tokens: list[int] = field(default_factory=list)
    """Generated ids, the final EOS included when the row stopped on one."""
    text: str = ""
    """Generated text (special tokens dropped), cut before a stop string."""
    finish_reason: str | None = None
    """None while running; then "stop" (EOS or a stop string), "length", "cancelled" or "error"."""
    error: str | None = None
    cancelled: bool = False
    """Set from any thread to drop the row at the next step."""
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def visible_text(self) -> str:
        """The text that is safe to show now: while running, a tail that may still become a stop
        string, or half of a multi-byte character, is held back."""
        text = self.text
        if self.done:
            return text
        text = text.rstrip("\ufffd")
        hold = max((k for s in self.sampling.stop for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])), default=0)
        return text[: len(text) - hold]


def supports(model: nn.Module) -> bool:
    """Whether the engine can run `model`: a causal LM with a plain full-attention DynamicCache."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=config)
    except Exception:  # an old transformers, or a config it cannot read
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Token ids that end a row: the generation config's EOS ids and the tokenizer's EOS."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
            break
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class Engine:
    """Continuous batching over `model`: `add` rows, call `step` until `idle`.

    Args:
        max_batch_size: rows decoded together at most; more wait for a free place.
        max_prefill_tokens: padded prompt tokens prefilled in one step at most (one row always fits).
        max_model_len: prompt + generated tokens per row at most (default: the model's positions).
        routed: route each row to its adapter; False runs every row with the adapters active now.
        prefix_cache_tokens: prompt tokens whose keys and values are kept for reuse (least recently
            used dropped first; 0: none; `prefixes.PrefixCache`). A new row whose prompt starts with
            at least `MIN_PREFIX` tokens of a kept prompt of the same adapter (a chat template's system prompt, an earlier
            turn) prefills only the rest. Call `forget` when an adapter's weights change.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_batch_size: int = 16, max_prefill_tokens: int = 4096,
                 max_model_len: int | None = None, routed: bool = True, prefix_cache_tokens: int = 4096) -> None:
        if not supports(model):
            raise ValueError(f"{type(model).__name__} is not a causal LM with a plain DynamicCache; the engine "
                             f"cannot batch it (use model.generate)")
        if max_batch_size < 1 or max_prefill_tokens < 1:
            raise ValueError(f"max_batch_size and max_prefill_tokens must be >= 1, got {max_batch_size}, "
                             f"{max_prefill_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_prefill_tokens, self.routed = max_batch_size, max_prefill_tokens, routed
        self.max_model_len = max_model_len or getattr(model.config, "max_position_embeddings", None) or 2**31
        self.eos = eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []
        self._admitted: list[Row] = []  # rows taken from `waiting` for this step's prefill, until merged
        self._cache: Any = None       # DynamicCache of the running rows, (rows, heads, width, head_dim) per layer
        self._mask: Tensor | None = None  # (rows, width): 1 where the cache holds a real token, padding on the left
        self._routing: tuple[tuple | None, Any, bool] | None = None  # (adapter names, the open `using`, per_row?)
        self.steps = 0
        self.prefixes = PrefixCache(prefix_cache_tokens)
        self.reused_tokens = 0        # prompt tokens taken from the prefix cache instead of computed

    # --- the queue ------------------------------------------------------------------------------------
    def add(self, row: Row) -> Row:
        """Queue a row; it joins the running batch at a coming step."""
        if not row.prompt:
            raise ValueError("a row needs at least one prompt token")
        if len(row.prompt) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(row.prompt)} tokens; this engine takes at most "
                             f"{self.max_model_len - 1} (max_model_len {self.max_model_len})")
        if row.sampling.seed is not None and row.generator is None:
            row.generator = torch.Generator(device=self.device).manual_seed(row.sampling.seed)
        self.waiting.append(row)
        return row

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def run(self, rows: Iterable[Row], on_step: Callable[[list[Row]], None] | None = None) -> list[Row]:
        """Add `rows` and step until every row is done; `on_step(changed rows)` after each step."""
        rows = [self.add(row) for row in rows]
        try:
            while not all(row.done for row in rows):
                changed = self.step()
                if on_step is not None:
                    on_step(changed)
        finally:
            self.release()
        return rows

    def abort(self, message: str) -> list[Row]:
        """Finish every row with an error (after a failed step) and start afresh."""
        self.release()
        rows = list(dict.fromkeys([*self._admitted, *self.running, *self.waiting]))
        for row in rows:
            self._finish(row, ERROR)
            row.error = message
        self.running, self.waiting, self._admitted, self._cache, self._mask = [], deque(), [], None, None
        return rows

    # --- one step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Row]:
        """At most one prefill of waiting rows, then one decode over all running rows.

        Returns the rows that changed: a new token, or finished (cancelled rows included).
        """
        changed = self._drop_cancelled()
        new = self._admitted = self._admit()
        try:
            if new:
                changed += self._prefill(new)
            self._admitted = []
            if self.running:
                changed += self._decode()
        finally:
            if not self.running:
                self.release()
        self.steps += 1
        return list(dict.fromkeys(changed))

    def _drop_cancelled(self) -> list[Row]:
        gone = [row for row in (*self.waiting, *self.running) if row.cancelled and not row.done]
        for row in gone:
            self._finish(row, CANCELLED)
        if gone:
            self.waiting = deque(row for row in self.waiting if not row.done)
            self._evict()
        return gone

    def _admit(self) -> list[Row]:
        """Waiting rows for this step's prefill: while places are free and the padded size fits."""
        new: list[Row] = []
        longest = 0
        while self.waiting and len(self.running) + len(new) < self.max_batch_size:
            width = max(longest, len(self.waiting[0].prompt))
            if new and width * (len(new) + 1) > self.max_prefill_tokens:
                break
            new.append(self.waiting.popleft())
            longest = width
        return new

    def _prefill(self, rows: list[Row]) -> list[Row]:
        """Run the new rows' prompts into a fresh cache, pick their first tokens, merge the survivors.

        A row with a cached prefix starts from its keys and values; each row's cache is laid out
        [padding, cached prefix, padding, rest of the prompt] (the mask says which is which).
        """
        from transformers import DynamicCache

        hits = [self.prefixes.lookup(row.adapter, row.prompt) for row in rows]  # (reused length, keys/values)
        heads = shared_heads([(row.adapter, row.prompt) for row, (n, _) in zip(rows, hits) if not n]) \
            if self.prefixes.limit else []
        if heads:                                                        # run them once, then reuse them
            self._prefill_heads(heads)
            hits = [hit if hit[0] else self.prefixes.lookup(row.adapter, row.prompt) for row, hit in zip(rows, hits)]
        prefix = max(n for n, _ in hits)
        ids, rest_mask = self._left_padded([row.prompt[n:] for row, (n, _) in zip(rows, hits)])  # (rows, width)
        width = ids.shape[1]
        kept = torch.tensor([[j >= prefix - n for j in range(prefix)] for n, _ in hits], dtype=torch.long)
        mask = torch.cat([kept.view(len(rows), prefix).to(self.device), rest_mask], dim=1)  # (rows, prefix + width)
        starts = torch.tensor([[n] for n, _ in hits], device=self.device)
        positions = (starts + rest_mask.cumsum(1) - 1).clamp(min=0)   # (rows, width): padding sits low
        cache = DynamicCache(config=self.model.config)
        if prefix:
            like = next(kv for n, kv in hits if n)                       # a row without a hit gets zeros
            for index in range(len(cache.layers)):
                keys, values = ([_left_pad(kv[index][j] if n else like[index][j][:, :, :0], prefix) for n, kv in hits]
                                for j in (0, 1))
                cache.update(torch.cat(keys), torch.cat(values), index)  # (rows, heads, prefix, hd)
            self.reused_tokens += sum(n for n, _ in hits)
        logits = self._forward(rows, ids, mask, positions, cache)
        self._remember(rows, hits, cache, prefix, width)
        self._advance(rows, logits)
        keep = [i for i, row in enumerate(rows) if not row.done]
        if keep:
            if len(keep) < len(rows):
                cache.batch_select_indices(torch.tensor(keep, device=self.device))
            self._merge([rows[i] for i in keep], cache, mask[keep])
        return rows

    def _prefill_heads(self, heads: list[tuple[str | None, list[int]]]) -> None:
        """Run prompt heads that new rows share (`prefixes.shared_heads`) and keep their keys/values."""
        from transformers import DynamicCache

        rows = [Row(tokens, adapter=adapter) for adapter, tokens in heads]
        ids, mask = self._left_padded([row.prompt for row in rows])
        width = ids.shape[1]
        cache = DynamicCache(config=self.model.config)
        self._forward(rows, ids, mask, (mask.cumsum(1) - 1).clamp(min=0), cache)
        for i, row in enumerate(rows):
            kv = [tuple(t[i: i + 1, :, width - len(row.prompt):].clone() for t in (layer.keys, layer.values))
                  for layer in cache.layers]
            self.prefixes.remember(row.adapter, row.prompt, kv)

    def _remember(self, rows: list[Row], hits: list, cache: Any, prefix: int, width: int) -> None:
        """Keep each new prompt's keys and values, cut out of the prefill cache (see _prefill's layout)."""
        for i, (row, (n, _)) in enumerate(zip(rows, hits)):
            if self.prefixes.wants(row.adapter, row.prompt):
                rest = len(row.prompt) - n
                kv = [tuple(torch.cat([t[i: i + 1, :, prefix - n: prefix], t[i: i + 1, :, prefix + width - rest:]],
                                      dim=2) for t in (layer.keys, layer.values)) for layer in cache.layers]
                self.prefixes.remember(row.adapter, row.prompt, kv)

    def forget(self, adapters: Iterable[str | None] | None = None) -> None:
        """Drop kept prefixes (of `adapters`; None: all) and leave the routing: call it when adapters
        load, unload or change weights between steps."""
        self.release()
        self.prefixes.forget(adapters)

    def _decode(self) -> list[Row]:
        rows = self.running
        ids = torch.tensor([[row.tokens[-1]] for row in rows], dtype=torch.long, device=self.device)  # (rows, 1)
        positions = self._mask.sum(1, keepdim=True)                    # (rows, 1): real tokens before this one
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        logits = self._forward(rows, ids, self._mask, positions, self._cache)
        self._advance(rows, logits)
        self._evict()
        return rows

    def _forward(self, rows: list[Row], ids: Tensor, mask: Tensor, positions: Tensor, cache: Any) -> Tensor:
        self._route(rows)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_kw: cache}, **self._keep_kw)
        return out.logits[:, -1].float()                               # (rows, vocab)

    def _route(self, rows: list[Row]) -> None:
        """Enter `adapters.using` for these rows, or stay in it: while the running rows do not change,
        the routing (and the per-row adapter factors it gathered) serves step after step."""
        names = tuple(row.adapter for row in rows) if self.routed else None
        if self._routing is not None and self._routing[0] == names:
            return
        if self._routing is not None and self._routing[2] and names is not None:
            reroute(self.model, names)                                 # the same per_row block, new rows
            self._routing = (names, *self._routing[1:])
            return
        self.release()
        context = using(self.model, names)
        context.__enter__()
        self._routing = (names, context, _mixed(names))

    def release(self) -> None:
        """Leave the adapter routing held between steps. The engine does it when it goes idle; its
        owner must do it before loading, deleting or switching adapters on the model between steps."""
        if self._routing is not None:
            context = self._routing[1]
            self._routing = None
            context.__exit__(None, None, None)

    # --- tokens ---------------------------------------------------------------------------------------
    def _advance(self, rows: list[Row], logits: Tensor) -> None:
        """Append each row's next token and finish the rows that are done."""
        for row, token in zip(rows, pick_tokens(logits, rows)):
            row.tokens.append(token)
            if token in self.eos:
                self._finish(row, STOP)
                continue
            if row.stream or row.sampling.stop:
                text, hit = cut_at_stop(self._decode_text(row), row.sampling.stop)
                row.text = text
                if hit:
                    row.finish_reason = STOP
                    continue
            if len(row.tokens) >= row.sampling.max_new_tokens or len(row.prompt) + len(row.tokens) >= self.max_model_len:
                self._finish(row, LENGTH)

    def _finish(self, row: Row, reason: str) -> None:
        """End a row; a row that ran to EOS or its length gets its final text."""
        if row.done:
            return
        if reason in (STOP, LENGTH):
            row.text = cut_at_stop(self._decode_text(row), row.sampling.stop)[0]
        row.finish_reason = reason

    def _decode_text(self, row: Row) -> str:
        return self.tokenizer.decode(row.tokens, skip_special_tokens=True)

    # --- the running batch's cache --------------------------------------------------------------------
    def _merge(self, rows: list[Row], cache: Any, mask: Tensor) -> None:
        """Join freshly prefilled rows to the running batch: left-pad the narrower cache, concatenate rows."""
        self.running += rows
        if self._cache is None:
            self._cache, self._mask = cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, add in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(add.keys, width)])      # (rows, heads, width, hd)
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(add.values, width)])
        self._mask = torch.cat([F.pad(self._mask, (width - self._mask.shape[1], 0)),
                                F.pad(mask, (width - mask.shape[1], 0))])

    def _evict(self) -> None:
        """Drop finished rows from the batch and the cache; trim columns that are padding in every row."""
        keep = [i for i, row in enumerate(self.running) if not row.done]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        first = int(self._mask.any(0).nonzero()[0])                    # columns before it hold only padding
        if first:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def _left_padded(self, seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Token lists as left-padded ids and their mask, (len(seqs), longest) each, on the device."""
        width = max(len(seq) for seq in seqs)
        ids = torch.full((len(seqs), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, width - len(seq):] = torch.tensor(seq)
            mask[i, width - len(seq):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return pad if pad is not None else (min(self.eos) if self.eos else 0)


def _mixed(names: tuple | None) -> bool:
    """Whether `using` routes these rows per row (`per_row`): they name more than one adapter (or None)."""
    return names is not None and len(set(names)) > 1


def _left_pad(x: Tensor, width: int) -> Tensor:
    """(rows, heads, w, hd) -> (rows, heads, width, hd) with zeros on the left of the sequence axis."""
    return F.pad(x, (0, 0, width - x.shape[-2], 0)) if x.shape[-2] < width else x
