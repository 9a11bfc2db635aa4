"""`make demo`: LoRA-tune the embedded SmolLM2-135M-Instruct to turn free-text orders into JSON.

    "hey could you send two regular veggie burgers over around 7 PM thanks"
        -> {"item": "veggie burger", "size": "medium", "qty": 2, "time": "7:00pm"}

The base model has never seen this JSON shape, so it scores near zero on exact match; a few
minutes of LoRA on 2 CPU cores teach it. The demo measures both on the held-out split and
writes report.md and loss.png next to the adapter.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .. import adapters as ad
from ..training.evaluate import exact_match
from ..io import write_text
from ..training import TrainConfig, Trainer
from .flags import add_flag

DATA = Path(__file__).resolve().parents[3] / "data" / "demo"
SETTINGS = dict(lora_rank=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", batch_size=8,
                grad_accum=1, max_steps=16, learning_rate=3e-3, warmup_ratio=0.1, lr_scheduler="cosine",
                max_length=128, logging_steps=5, seed=0)


def add_demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=str(DATA), help="folder with train.jsonl and test.jsonl")
    add_flag(p, "--output-dir", default="runs/demo", help="where the adapter and report go")
    p.add_argument("--model", default="smollm2-135m-instruct")
    add_flag(p, "--eval-rows", type=int, default=200, help="held-out rows scored by exact match (>= 200)")
    add_flag(p, "--max-steps", type=int, default=SETTINGS["max_steps"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="training precision (see `lorakit sft --help`); compare bf16 with fp32 here")


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="the demo: LoRA-tune the embedded model on the bundled orders dataset",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_flags(d)
    d.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lorakit.cli.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_flags(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = Path(args.data)
    train_file, test_file = data / "train.jsonl", data / "test.jsonl"
    for f in (train_file, test_file):
        if not f.is_file():
            raise SystemExit(f"demo data not found: {f} (run from the repository root, or pass --data)")
    t_start = time.perf_counter()
    cfg = TrainConfig(dataset=[str(train_file)], output_dir=args.output_dir, model=args.model,
                      eval_dataset=[str(test_file)], eval_steps=8, eval_max_rows=32, precision=args.precision,
                      **{**SETTINGS, "max_steps": args.max_steps})
    print(f"lorakit demo: LoRA r={cfg.lora_rank} on all linear layers of {cfg.model}, {cfg.max_steps} steps "
          f"of {cfg.batch_size} rows, then exact match on {args.eval_rows} held-out rows")
    trainer = Trainer(cfg)
    model, tok = trainer.model, trainer.tokenizer
    max_new = 40

    t0 = time.perf_counter()
    with ad.disabled(model):
        base = exact_match(model, tok, str(test_file), max_new_tokens=max_new, limit=args.eval_rows,
                           batch_size=args.eval_rows, progress=True)
    t_base = time.perf_counter() - t0
    print(f"base model exact match: {base['exact_match']:.1%} ({t_base:.0f} s)")

    t0 = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    tuned = exact_match(model, tok, str(test_file), max_new_tokens=max_new, limit=args.eval_rows,
                        batch_size=args.eval_rows, progress=True)  # one batch: no short last wave
    t_tuned = time.perf_counter() - t0
    total = time.perf_counter() - t_start

    table = _table(base, tuned, args.eval_rows)
    print("\n" + table)
    examples = _examples(base, tuned, 3)
    print(examples)
    report = Path(args.output_dir) / "report.md"
    body = report.read_text() if report.is_file() else ""
    write_text(report, body + "\n## Before / after (held-out exact match)\n\n" + table + "\n\n" + examples
               + f"\n\nTimes: base eval {t_base:.0f} s, training {t_train:.0f} s, adapter eval {t_tuned:.0f} s, "
                 f"total {total:.0f} s on {torch.get_num_threads()} CPU threads.\n")
    print(f"\nwrote {args.output_dir}/report.md, loss.png and the adapter; total {total:.0f} s")
    return 0


def _table(base: dict, tuned: dict, n: int) -> str:
    return ("| model | exact match | correct |\n|---|---|---|\n"
            f"| base SmolLM2-135M-Instruct | {base['exact_match']:.1%} | {round(base['exact_match'] * n)}/{n} |\n"
            f"| + LoRA adapter | {tuned['exact_match']:.1%} | {round(tuned['exact_match'] * n)}/{n} |")


def _examples(base: dict, tuned: dict, k: int) -> str:
    lines = ["Examples (reference / base / adapter):"]
    for ref, b, t in list(zip(base["references"], base["predictions"], tuned["predictions"]))[:k]:
        lines += [f"  want:    {ref}", f"  base:    {b[:100]!r}", f"  adapter: {t}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
