"""A prompt prefix shared by every row of a batch runs once, and no row is padded.

In chat SFT every row starts with the same tokens: the chat template's system turn and the
opening of the user turn (24 tokens of SmolLM2's template, ~40% of a short row). A causal
model's hidden states at those positions do not depend on what follows, so the batch runs as
one sequence holding the prefix once and then each row's own tokens, without padding:

    rows (b, t) = [ prefix (P) | suffix_i (len_i - P) | padding ]
    sequence (1, N) = [ prefix | suffix_0 | suffix_1 | ... ]      N = P + Σ (len_i - P)
    position_ids    = [ 0 .. P-1 | P .. len_0 - 1 | P .. len_1 - 1 | ... ]

Every linear layer (the arithmetic of a step) sees N tokens instead of b·t. Only attention
needs the rows apart: `rows_attention`, registered with transformers' `AttentionInterface`,
runs the prefix's queries causally over the prefix, and each row's queries over the prefix's
keys and values plus its own (the rows gathered to (b, L) for one batched SDPA call, L the
longest suffix). Same math as one padded pass (tested to float32 noise: loss and every LoRA
gradient), with (b - 1)·P fewer tokens and no padding through every layer: on sft_e2e's
chat rows (batch 8), a forward + backward takes 0.78x the time of this module's first design,
which ran the prefix as a separate 1-row pass and the padded suffixes reading its KV cache.

Used for architectures whose attention transformers (>= 4.53) dispatches by name (`ROW_MODEL_TYPES`),
when the prefix holds no label, P >= MIN_PREFIX, no sliding window is shorter than the batch,
activation checkpointing is off (it would re-run attention outside this layout) and no
`per_row` routing is on, and only on the CPU (`SHARE_ON`: a CPU step is bound by arithmetic;
on a GPU this size of model is bound by kernel launches, not yet measured with this layout).
With LoRA dropout, the prefix's positions get one dropout draw for the whole batch instead of
one per row: each row still sees dropout with probability p there.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..state import get_state

MIN_PREFIX = 8  # shorter shared prefixes are not worth it
SHARE_ON = frozenset({"cpu"})  # device types whose steps are bound by arithmetic (see the module docstring)
IGNORE_INDEX = -100
ATTENTION = "lorakit_rows"  # the name `rows_attention` is registered under
# Decoder-only architectures whose attention layers call transformers' attention interface with
# (module, query, key, value, mask, dropout=, scaling=) and whose positions come from position_ids.
ROW_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "phi3", "gpt2"})


def shared_prefix(batch: dict[str, Tensor]) -> int:
    """Tokens every row starts with, carrying no label, leaving each row a suffix; 0 when < MIN_PREFIX.

    Needs a right-padded batch (``attention_mask`` ones, then zeros) of at least two rows.
    """
    ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    if mask is None or ids.shape[0] < 2 or "position_ids" in batch:
        return 0
    lengths = mask.sum(1)
    if not bool((mask == (torch.arange(ids.shape[1], device=ids.device) < lengths[:, None])).all()):
        return 0                                                                # not right-padded
    shortest = int(lengths.min())
    same = (ids[:, : shortest - 1] == ids[:1, : shortest - 1]).all(0)        # (shortest - 1,)
    p = int(same.long().cumprod(0).sum())                                       # length of the common run
    if p < MIN_PREFIX:
        return 0
    unlabelled = (labels[:, 1 : p + 1] == IGNORE_INDEX).all(0).long().cumprod(0)  # token j+1 is predicted at j
    return int(unlabelled.sum()) if int(unlabelled.sum()) >= MIN_PREFIX else 0


def can_share(model: nn.Module, length: int = 0) -> bool:
    """Only on a device in SHARE_ON, for a `ROW_MODEL_TYPES` model without a sliding window shorter
    than `length`; not with activation checkpointing, nor while `per_row` gives each row its own
    adapter (the prefix would run with row 0's)."""
    param = next(model.parameters(), None)
    if param is None or param.device.type not in SHARE_ON:
        return False
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ROW_MODEL_TYPES or getattr(config, "is_encoder_decoder", False):
        return False
    if not _dispatches_by_name():
        return False
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window < length:
        return False
    state = get_state(model)
    if state is not None and state.routing is not None:
        return False
    return not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@dataclass
class Layout:
    """Where each row's tokens sit in the (1, N) sequence, for `rows_attention`."""

    p: int              # prefix length
    rows: int           # b
    width: int          # L: the longest suffix
    query: Tensor       # (b·L,) sequence index of row i's j-th suffix token (a repeat of its first when j >= its length)
    key: Tensor         # (b·(P + L),) the prefix, then `query`'s row
    mask: Tensor        # (b, 1, L, P + L) bool: the prefix, and the row's own suffix causally
    valid: Tensor       # (b, L) bool: j < the row's suffix length
    calls: int = 0      # attention layers that ran in this layout


_current = threading.local()


def rows_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                   dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """Attention over a `Layout`'s sequence: query (1, H, N, D), key/value (1, Hkv, N, D) -> (1, N, H, D)."""
    lay: Layout | None = getattr(_current, "layout", None)
    if lay is None:
        raise RuntimeError(f"attention implementation {ATTENTION!r} runs only inside lorakit's prefix_forward")
    lay.calls += 1
    p, b, width = lay.p, lay.rows, lay.width
    heads, dim, kv_heads = query.shape[1], query.shape[-1], key.shape[1]
    gqa = kv_heads != heads
    head = F.scaled_dot_product_attention(query[:, :, :p], key[:, :, :p], value[:, :, :p], dropout_p=dropout,
                                          is_causal=True, scale=scaling, enable_gqa=gqa)       # (1, H, P, D)
    q = query[0].index_select(1, lay.query).view(heads, b, width, dim).transpose(0, 1)     # (b, H, L, D)
    k = key[0].index_select(1, lay.key).view(kv_heads, b, p + width, dim).transpose(0, 1)  # (b, Hkv, P + L, D)
    v = value[0].index_select(1, lay.key).view(kv_heads, b, p + width, dim).transpose(0, 1)
    rows = F.scaled_dot_product_attention(q, k, v, attn_mask=lay.mask, dropout_p=dropout, scale=scaling,
                                          enable_gqa=gqa)                                    # (b, H, L, D)
    out = torch.cat([head[0].transpose(0, 1), rows.transpose(1, 2)[lay.valid]])             # (N, H, D)
    return out.unsqueeze(0), None


@functools.cache
def _dispatches_by_name() -> bool:
    """transformers >= 4.53: attention picked by name (`AttentionInterface`) and masks built by
    `masking_utils`, which builds none for an attention function it does not know."""
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import create_causal_mask  # noqa: F401
    except ImportError:
        return False
    return True


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, rows_attention)


def prefix_forward(backbone: nn.Module, batch: dict[str, Tensor], p: int) -> tuple[Tensor, Tensor]:
    """Every row's tokens after the shared prefix p, as one sequence: (hidden (n, H), targets (n,)),
    the last hidden state of each suffix token and the token it predicts (-100: none), rows in order."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    dev = ids.device
    b, t = ids.shape
    suffix = mask.sum(1) - p                                                    # (b,) each row's own tokens
    width = int(suffix.max())
    j = torch.arange(width, device=dev)
    valid = j < suffix[:, None]                                                 # (b, L)
    start = p + suffix.cumsum(0) - suffix                                       # where each row's suffix starts
    query = torch.where(valid, start[:, None] + j, start[:, None])             # (b, L)
    key = torch.cat([torch.arange(p, device=dev).expand(b, p), query], 1)      # (b, P + L)
    attend = torch.ones(b, 1, width, p + width, dtype=torch.bool, device=dev)
    attend[:, 0, :, p:] = (j[None, :] <= j[:, None]) & valid[:, None, :]
    seq = torch.cat([ids[0, :p], ids[:, p:p + width][valid]])[None]           # (1, N)
    positions = torch.cat([torch.arange(p, device=dev), (p + j).expand(b, width)[valid]])[None]
    targets = torch.full((b, width), IGNORE_INDEX, dtype=labels.dtype, device=dev)
    nxt = labels[:, p + 1:p + 1 + width]                                        # the token each position predicts
    targets[:, :nxt.shape[1]] = nxt
    lay = Layout(p, b, width, query.reshape(-1), key.reshape(-1), attend, valid)
    config = backbone.config
    before, previous = config._attn_implementation, getattr(_current, "layout", None)
    if ATTENTION not in _registered:
        _register()
        _registered.add(ATTENTION)
    config._attn_implementation, _current.layout = ATTENTION, lay
    try:
        hidden = backbone(input_ids=seq, position_ids=positions, use_cache=False).last_hidden_state  # (1, N, H)
    finally:
        config._attn_implementation, _current.layout = before, previous
    layers = getattr(config, "num_hidden_layers", None)
    if lay.calls == 0 or (layers is not None and lay.calls != layers):
        raise RuntimeError(f"{type(backbone).__name__}: {lay.calls} of {layers} attention layers ran through "
                           f"{ATTENTION!r}; this transformers version or model does not dispatch attention by "
                           "name, so a shared prefix cannot be used (remove its model_type from ROW_MODEL_TYPES)")
    return hidden[0, p:], targets[valid]


_registered: set[str] = set()
