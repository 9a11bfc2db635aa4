"""How much of a batch is padding, and does packing (`--packing`) pay?

1. The padding fraction of lorakit's length-grouped batches (`training.datasets.batches`) and of
   random batches (what a plain DataLoader gives), on the demo data, on sft_e2e's data and on a
   mixed-length set (row lengths log-uniform between 16 and 1024 tokens).
2. A training step (forward + backward, LoRA r=16) on a padded batch vs the same rows packed,
   timed alternately, on SmolLM2-135M's shape (random weights; `--quick`: 4 layers), for a
   batch of similar lengths (what grouping makes) and a batch of mixed lengths.

    python benchmarks/padding.py [--quick] [--reps 5] [--batch-size 8]
"""

from __future__ import annotations

import math
import random
import sys
import tempfile
from pathlib import Path

from common import ROOT, alternate, build_model, header, med, parser, ratio, setup, table

import torch  # noqa: E402

import lorakit  # noqa: E402
from lorakit.training import datasets as datalib  # noqa: E402
from lorakit.training.loss import loss_sum  # noqa: E402
from lorakit.training import batching  # noqa: E402
from lorakit.training.batching import collate  # noqa: E402
from lorakit.training.packing import collate_packed  # noqa: E402


def padding_fraction(lengths: list[int], groups: list[list[int]]) -> float:
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    return 1 - sum(lengths[i] for g in groups for i in g) / padded


def random_batches(n: int, batch_size: int, seed: int = 0) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def datasets_lengths() -> dict[str, list[int]]:
    from lorakit.models import load_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sft_data

    tok = load_tokenizer("smollm2-135m-instruct")
    out = {"demo (data/demo/train.jsonl)": datalib.build_dataset([str(ROOT / "data/demo/train.jsonl")], tok).lengths}
    with tempfile.TemporaryDirectory() as d:
        train, _ = sft_data.write(Path(d), 3000, 10)
        out["sft_e2e data (benchmarks/sft_data.py)"] = datalib.build_dataset([str(train)], tok).lengths
    rng = random.Random(0)
    out["mixed lengths (log-uniform 16-1024)"] = [int(math.exp(rng.uniform(math.log(16), math.log(1024))))
                                                  for _ in range(3000)]
    return out


def rows_of(lengths: list[int], vocab: int, answer: int = 12) -> list[datalib.Encoded]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        rows.append(datalib.Encoded(ids, [-100] * (n - answer) + ids[n - answer:]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    setup(args)
    reps = args.reps or (2 if args.quick else 5)
    print(header("Padding and packing", args))
    lines = []
    for name, lengths in datasets_lengths().items():
        grouped = batching._grouped_batches(lengths, args.batch_size, True, 0, 0)
        lines.append([name, f"{sum(lengths) / len(lengths):.0f}", f"{padding_fraction(lengths, grouped):.1%}",
                      f"{padding_fraction(lengths, random_batches(len(lengths), args.batch_size)):.1%}"])
    print(table(["data", "mean tokens a row", "padding, length-grouped", "padding, random batches"], lines))

    model = build_model(args.quick).train()
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    vocab = model.config.vocab_size
    cases = {"similar lengths (grouped: 52-60)": [60, 59, 57, 56, 55, 54, 53, 52],
             "mixed lengths (40-400)": [400, 300, 220, 160, 110, 80, 55, 40]}
    lines = []
    for name, lengths in cases.items():
        rows = rows_of(lengths[: args.batch_size], vocab)
        padded, packed = collate(rows, 2), collate_packed(rows)
        with torch.no_grad():
            diff = abs(loss_sum(model, "causal_lm", padded).item() - loss_sum(model, "causal_lm", packed).item())
        times = alternate({"padded": lambda: loss_sum(model, "causal_lm", padded).backward(),
                           "packed": lambda: loss_sum(model, "causal_lm", packed).backward()}, reps=reps)
        model.zero_grad(set_to_none=True)
        pad = padding_fraction(lengths, [list(range(len(lengths)))])
        lines.append([name, f"{pad:.0%}", f"{med(times['padded']):.2f} s", f"{med(times['packed']):.2f} s",
                      f"{ratio(times['packed'], times['padded']):.2f}x", f"{diff:.1e}"])
    print("\n" + table(["batch", "padding", "padded step", "packed step", "packed / padded", "|loss diff|"], lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
