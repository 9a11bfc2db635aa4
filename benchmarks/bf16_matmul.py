"""bf16 vs fp32 matmul on this CPU: is `--precision auto`'s bf16 worth it here?

Times a (1024, 576) @ (576, 1536) matmul (a batch of 1024 tokens through SmolLM2-135M's
gate/up projection) in float32 and in bfloat16, alternately, and prints the CPU's bf16 flags
(avx512_bf16, amx_bf16: `lorakit.training.precision.bf16_native`). Without them the CPU
emulates bf16 and the ratio is below 1.

    python benchmarks/bf16_matmul.py [--reps 50] [--threads N] [--m 1024 --k 576 --n 1536]
"""

from __future__ import annotations

import argparse
import sys

from common import alternate, load_avg, med, ratio, table

import torch  # noqa: E402  (common sets up the path first)

from lorakit.training.precision import CPU_BF16_FLAGS, bf16_native, cpu_flags


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--reps", type=int, default=50, help="timed repetitions of each dtype")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--m", type=int, default=1024)
    p.add_argument("--k", type=int, default=576)
    p.add_argument("--n", type=int, default=1536)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    a32, b32 = torch.randn(args.m, args.k), torch.randn(args.k, args.n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    times = alternate({"fp32": lambda: torch.mm(a32, b32), "bf16": lambda: torch.mm(a16, b16)},
                      reps=args.reps, warmup=3)
    flops = 2 * args.m * args.k * args.n
    flags = [f for f in CPU_BF16_FLAGS if f in cpu_flags()] or ["none"]
    print(f"## bf16 vs fp32 matmul ({args.m}x{args.k} @ {args.k}x{args.n})\n\ntorch {torch.__version__} "
          f"({torch.get_num_threads()} threads), CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"bf16 flags: {', '.join(flags)}; native bf16: {bf16_native(torch.device('cpu'))}; "
          f"load average {load_avg()}\n")
    rows = [[k, f"{med(v) * 1e3:.2f} ms", f"{flops / med(v) / 1e9:.0f} GFLOP/s"] for k, v in times.items()]
    print(table(["dtype", "median", "throughput"], rows))
    print(f"\nbf16 speed-up over fp32: {ratio(times['fp32'], times['bf16']):.2f}x (median of per-round ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
