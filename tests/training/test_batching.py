"""lorakit.training.batching: which rows train together (length-grouped or not), and padding them."""

import random
import statistics

import pytest
import torch

from lorakit.training.batching import LengthGroupedSampler, batches, collate
from lorakit.training.datasets import Encoded


# --------------------------------------------------------------------------------------- collate
def test_collate_pads_to_longest_right_and_left():
    rows = [Encoded([5, 6, 7], [-100, 6, 7]), Encoded([8], [8])]
    right = collate(rows, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = collate(rows, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert all(t.dtype == torch.long for t in right.values())
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'top'"):
        collate(rows, 0, "top")


def test_collate_classification_and_seq2seq():
    cls = collate([Encoded([1, 2], 1, task="seq_cls"), Encoded([3], 0, task="seq_cls")], pad_id=9)
    assert cls["labels"].tolist() == [1, 0] and cls["labels"].shape == (2,)
    s2s = collate([Encoded([1], [4, 5, 6], task="seq2seq"), Encoded([2, 3], [7], task="seq2seq")], pad_id=9, padding_side="left")
    assert s2s["input_ids"].tolist() == [[9, 1], [2, 3]]
    assert s2s["labels"].tolist() == [[4, 5, 6], [7, -100, -100]]  # targets pad on their own, on the right


# -------------------------------------------------------------------------------------- batching
def lengths_dataset(lengths):
    return [Encoded([0] * n, [0] * n) for n in lengths]


def test_batches_cover_every_row_once_and_are_deterministic():
    rows = lengths_dataset([(i * 37) % 200 + 1 for i in range(1000)])
    first = batches(rows, 8, shuffle=True, seed=3, epoch=1)
    assert sorted(i for b in first for i in b) == list(range(1000))
    assert first == batches(rows, 8, shuffle=True, seed=3, epoch=1)
    assert first != batches(rows, 8, shuffle=True, seed=3, epoch=2)
    assert first != batches(rows, 8, shuffle=True, seed=4, epoch=1)
    assert max(len(rows[i].input_ids) for i in first[0]) == 200  # the longest batch comes first
    assert batches(rows, 8, shuffle=False) == batches(rows, 8, shuffle=False, seed=9, epoch=5)


def test_batches_group_similar_lengths():
    rows = lengths_dataset([(i * 7919) % 1000 + 1 for i in range(2000)])
    spread = [max(len(rows[i].input_ids) for i in b) - min(len(rows[i].input_ids) for i in b)
              for b in batches(rows, 4, shuffle=True, seed=0, epoch=0)]
    # a mega-chunk of 200 rows spans lengths 1..1000, so neighbours in sorted order differ by ~5
    assert statistics.mean(spread) < 25
    real = sum(len(r.input_ids) for r in rows)
    grouped_pad = sum(len(b) * max(len(rows[i].input_ids) for i in b) for b in batches(rows, 4, True, 0, 0)) - real
    random_pad = sum(4 * max(len(rows[i].input_ids) for i in range(s, s + 4)) for s in range(0, 2000, 4)) - real
    assert grouped_pad < 0.05 * random_pad


def test_batches_drop_last_and_sampler():
    rows = lengths_dataset(range(1, 12))
    assert sorted(map(len, batches(rows, 4, shuffle=True, drop_last=True))) == [4, 4]
    sampler = LengthGroupedSampler([len(r.input_ids) for r in rows], 4, seed=5)
    sampler.set_epoch(2)
    assert list(sampler) == batches(rows, 4, shuffle=True, seed=5, epoch=2) and len(sampler) == 3
    loader = torch.utils.data.DataLoader(rows, batch_sampler=sampler, collate_fn=lambda b: collate(b, 0))
    assert sum(batch["input_ids"].shape[0] for batch in loader) == 11
    with pytest.raises(ValueError, match="--batch-size must be at least 1, got 0"):
        batches(rows, 0)




def test_batches_without_length_grouping_are_the_shuffled_rows_in_order():
    rows = [Encoded(list(range(1 + (i % 5) * 10)), [1] * (1 + (i % 5) * 10)) for i in range(20)]
    plain = batches(rows, 4, shuffle=True, seed=3, epoch=1, group_by_length=False)
    assert sorted(i for b in plain for i in b) == list(range(20)) and all(len(b) == 4 for b in plain)
    order = list(range(20))
    random.Random("lorakit:3:1").shuffle(order)                       # the same shuffle, no sorting after it
    assert [i for b in plain for i in b] == order
    assert plain != batches(rows, 4, shuffle=True, seed=3, epoch=1)   # grouping does change the batches
