"""Padding-free batches: a batch's rows concatenated into one sequence, attention kept per row.

    rows        [a0 a1 a2] [b0 b1] [c0 c1 c2 c3]
    input_ids   [a0 a1 a2 b0 b1 c0 c1 c2 c3]              (1, T), T = Σ row lengths: no padding
    position_ids [0  1  2  0  1  0  1  2  3]              restarting per row
    labels      [-100 .. .. -100 .. -100 .. .. ..]         each row's first label is -100, so no row
                                                           is trained to predict the next row's start

transformers (>= 4.53) reads a batch with ``position_ids`` and no ``attention_mask`` as packed:
its causal mask becomes block-diagonal (`masking_utils.find_packed_sequence_indices`), so a
token attends only to earlier tokens of its own row, and the rotary positions restart with
each row. The loss equals the padded batch's. Whether it pays depends on the data: it saves
the padding's compute, but the attention of the one long sequence is (Σ lengths)² masked
instead of Σ length², which costs more once the rows are many or long; see benchmarks/README.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .datasets import IGNORE_INDEX, Encoded

# Architectures whose attention builds its mask with transformers' `create_causal_mask`, which
# understands packed position_ids (sdpa and eager attention; flash-attention reads them directly).
PACKED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2"})


def packing_supported(model: nn.Module, task: str) -> str | None:
    """None when `model` trains correctly on packed batches, else the reason it does not."""
    if task != "causal_lm":
        return f"packing is for causal_lm training, not {task}"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in PACKED_MODEL_TYPES:
        return (f"packing needs a model whose attention keeps packed rows apart ({', '.join(sorted(PACKED_MODEL_TYPES))}); "
                f"this one is {model_type or type(model).__name__}")
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        import transformers

        return f"packing needs transformers >= 4.53 (installed: {transformers.__version__})"
    return None


def collate_packed(rows: list[Encoded]) -> dict[str, torch.Tensor]:
    """One (1, Σ lengths) sequence of causal rows: ``input_ids``, ``position_ids``, ``labels``."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for row in rows:
        if row.task != "causal_lm":
            raise ValueError(f"packing takes causal_lm rows, got a {row.task} row")
        ids += row.input_ids
        labels += [IGNORE_INDEX] + list(row.labels[1:])  # the first token is never predicted
        positions += range(len(row.input_ids))

    def as_tensor(values: list[int]) -> Any:
        return torch.tensor(values, dtype=torch.long).unsqueeze(0)  # (1, T)

    return {"input_ids": as_tensor(ids), "position_ids": as_tensor(positions), "labels": as_tensor(labels)}
