"""Where one training step of the demo goes: torch.profiler's top operators.

Builds the demo's Trainer (the embedded model, `lorakit demo`'s settings), runs `--warmup`
steps, then profiles one optimizer step and prints the operators by self CPU time.

    python benchmarks/profile_step.py [--warmup 2] [--top 15] [--precision auto] [--packing]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from common import ROOT, load_avg

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from lorakit.cli.demo import SETTINGS  # noqa: E402
from lorakit.training import TrainConfig, Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--warmup", type=int, default=2, help="steps before the profiled one")
    p.add_argument("--top", type=int, default=15, help="operators to print")
    p.add_argument("--precision", default="auto")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(dataset=[str(ROOT / "data" / "demo" / "train.jsonl")], output_dir=out,
                          precision=args.precision, packing=args.packing, **SETTINGS)
        trainer = Trainer(cfg)
        trainer.model.train()
        for _ in range(args.warmup):
            trainer.train_step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("train_step"):
                rec = trainer.train_step()
    print(f"## One demo training step under torch.profiler\n\ntorch {torch.__version__} "
          f"({torch.get_num_threads()} threads), precision {trainer.precision.name}, packing {trainer.packing}, "
          f"batch {cfg.batch_size}, loss {rec['loss']:.4f}, load average {load_avg()}\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
