"""A prompt prefix shared by every row of a batch runs once, not once per row.

In chat SFT every row starts with the same tokens: the chat template's system turn and the
opening of the user turn (24 tokens of SmolLM2's template, ~40% of a short row). A causal
model's hidden states at those positions do not depend on what follows, so the batch's
backbone runs in two parts, the second reading the first's keys and values from a KV cache:

    rows (b, t) = [ prefix (P) | suffix_i (t - P) ]
    prefix (1, P)      ─► backbone ─► KV cache (1 row) ─► repeated to b rows (autograd sums
    suffix (b, t - P)  ─► backbone, attending to the cache ─► hidden (b, t - P, H)      their gradients)

Same math as one pass (tested to float32 noise), (b - 1)·P fewer tokens through every layer.
Used when the prefix holds no label, P >= MIN_PREFIX, and activation checkpointing is off
(it drops the cache) and no `per_row` routing is on, and only on the CPU (`SHARE_ON`). The
saving is arithmetic, and a CPU step is bound by arithmetic; a GPU step of a model this size is
bound by kernel launches instead, and two backbone calls launch about twice the kernels (a
SmolLM2-135M step with batch 8: ~23,700 dispatched ops shared vs ~11,800 in one pass; on an H200,
`lorakit sft` took 0.35 s a step to TRL + PEFT's 0.18 s while it shared). With LoRA dropout, the prefix's positions get one dropout draw for the
whole batch instead of one per row: each row still sees dropout with probability p there.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..state import get_state

MIN_PREFIX = 8  # shorter shared prefixes are not worth a second backbone call
SHARE_ON = frozenset({"cpu"})  # device types whose steps are bound by arithmetic (see the module docstring)
IGNORE_INDEX = -100


def shared_prefix(batch: dict[str, Tensor]) -> int:
    """Tokens every row starts with, carrying no label, leaving each row a suffix; 0 when < MIN_PREFIX.

    Needs a right-padded batch (``attention_mask`` ones over the prefix) of at least two rows.
    """
    ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
    if mask is None or ids.shape[0] < 2 or "position_ids" in batch:
        return 0
    shortest = int(mask.sum(1).min())
    same = (ids[:, : shortest - 1] == ids[:1, : shortest - 1]).all(0)        # (shortest - 1,)
    p = int(same.long().cumprod(0).sum())                                       # length of the common run
    if p < MIN_PREFIX or not bool(mask[:, :p].all()):
        return 0
    unlabelled = (labels[:, 1 : p + 1] == IGNORE_INDEX).all(0).long().cumprod(0)  # token j+1 is predicted at j
    return int(unlabelled.sum()) if int(unlabelled.sum()) >= MIN_PREFIX else 0


def can_share(model: nn.Module) -> bool:
    """Only on a device in SHARE_ON; not with activation checkpointing (it turns the KV cache off),
    nor while `per_row` gives each row its own adapter (the prefix would run with row 0's)."""
    param = next(model.parameters(), None)
    if param is None or param.device.type not in SHARE_ON:
        return False
    state = get_state(model)
    if state is not None and state.routing is not None:
        return False
    return not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def prefix_forward(backbone: nn.Module, inputs: dict[str, Tensor], p: int) -> Tensor:
    """Last hidden states of positions p.. of every row (b, t - p, H), the first p tokens run once."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    b, t = ids.shape
    key = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    head = backbone(input_ids=ids[:1, :p], use_cache=True)                     # (1, p, H)
    cache = head.cache if key == "cache" else head.past_key_values
    cache.batch_repeat_interleave(b)                                            # (b, heads, p, d) per layer
    positions = torch.arange(p, t, device=ids.device).expand(b, -1)            # (b, t - p)
    out = backbone(input_ids=ids[:, p:], attention_mask=mask, position_ids=positions, use_cache=True,
                   **{key: cache})
    return out.last_hidden_state
