"""Batches: which rows train together, and padding them into tensors.

    batches   row indices per batch, in an order fixed by (seed, epoch); optionally length-grouped
    collate   pad a batch to its longest row: input_ids, attention_mask, labels (-100 on padding)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from .datasets import IGNORE_INDEX, Encoded, EncodedDataset

MEGA_BATCHES = 50  # batches per length-sorted chunk: enough to group lengths, few enough to stay random


def _grouped_batches(lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int, epoch: int,
                     drop_last: bool = False, group_by_length: bool = True) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    rng = random.Random(f"lorakit:{seed}:{epoch}")  # a str seed is stable across processes and Python runs
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if not group_by_length:  # the shuffled rows, batch_size at a time
        groups = [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
        return [g for g in groups if len(g) == batch_size] if drop_last else groups
    chunk = batch_size * MEGA_BATCHES
    groups = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: -lengths[i])  # stable: ties stay shuffled
        groups += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    if drop_last:
        groups = [g for g in groups if len(g) == batch_size]
    if shuffle and groups:
        rng.shuffle(groups)
        longest = max(range(len(groups)), key=lambda g: max(lengths[i] for i in groups[g]))
        groups.insert(0, groups.pop(longest))  # the longest batch first: running out of memory shows at step 1
    return groups


def batches(dataset: EncodedDataset | Sequence[Encoded], batch_size: int, shuffle: bool = True, seed: int = 0,
            epoch: int = 0, drop_last: bool = False, group_by_length: bool = True) -> list[list[int]]:
    """Row indices per batch, in an order fixed by ``(seed, epoch)``.

    With ``group_by_length``, rows of similar length go together (sorted within chunks of
    ``MEGA_BATCHES`` batches, batch order shuffled): little padding, but when length follows content
    (one kind of task is always short) each batch holds one kind. Without it, batches are the
    shuffled rows in order, as Hugging Face's Trainer makes them.
    """
    lengths = dataset.lengths if isinstance(dataset, EncodedDataset) else [row.length for row in dataset]
    return _grouped_batches(lengths, batch_size, shuffle, seed, epoch, drop_last, group_by_length)


class LengthGroupedSampler:
    """``batches`` as a ``batch_sampler`` for ``torch.utils.data.DataLoader``; call ``set_epoch`` each epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False):
        self.lengths = lengths
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        args = (self.batch_size, self.shuffle, self.seed, self.epoch, self.drop_last)
        return iter(_grouped_batches(self.lengths, *args))

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (rest > 0 and not self.drop_last)


def collate(rows: list[Encoded], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row: ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding)."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if pad_id is None:
        raise ValueError("pad_id is None: the tokenizer has no pad token; pass tokenizer.eos_token_id")
    task = rows[0].task
    batch = {
        "input_ids": _pad([r.input_ids for r in rows], pad_id, padding_side),  # (batch, longest)
        "attention_mask": _pad([[1] * len(r.input_ids) for r in rows], 0, padding_side),
    }
    if task == "seq_cls":
        batch["labels"] = torch.tensor([r.labels for r in rows], dtype=torch.long)  # (batch,)
    else:  # seq2seq targets are padded on their own, always on the right: (batch, longest target)
        side = "right" if task == "seq2seq" else padding_side
        batch["labels"] = _pad([r.labels for r in rows], IGNORE_INDEX, side)
    return batch


def _pad(seqs: list[list[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        start = width - len(s) if side == "left" else 0
        out[i, start:start + len(s)] = torch.tensor(s, dtype=torch.long)
    return out
