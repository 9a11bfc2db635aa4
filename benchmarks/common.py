"""Shared pieces of the benchmarks: the SmolLM2-135M shape, alternating timers, tables, peak RSS.

Every benchmark times lorakit and its rival *alternately in one process* (round-robin, after a
warm-up of each), so a noisy neighbour slows both sides alike, and reports medians and ratios.
Peak memory comes from paired child processes (one per side, run alternately): a process's
peak RSS is the only honest number, and it cannot be reset inside one process.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # run from a clone without installing

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEVICE = torch.device("cpu")  # set by setup() from --device / --dtype
DTYPE = torch.float32


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 layers, short sequences, 2 repetitions")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions of each side (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw timings here")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: on cuda, times are synchronised and "
                                                   "peak memory is torch.cuda.max_memory_allocated")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the base model's dtype (bfloat16 on a GPU)")
    return p


def setup(args: argparse.Namespace) -> None:
    global DEVICE, DTYPE
    if args.threads:
        torch.set_num_threads(args.threads)
    DEVICE, DTYPE = torch.device(args.device), getattr(torch, args.dtype)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")


def sync() -> None:
    """Wait for queued GPU work, so a wall-clock time covers it (nothing to do on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def smollm2_config(quick: bool = False):
    """SmolLM2-135M's architecture (random weights are fine for timing); --quick keeps 4 layers."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=4 if quick else 30, num_attention_heads=9, num_key_value_heads=3,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                       attn_implementation="sdpa")


def build_model(quick: bool = False, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(smollm2_config(quick))
    model.generation_config.pad_token_id = 2
    return model.to(DEVICE, DTYPE)


def clone(model):
    return copy.deepcopy(model)


def alternate(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
              settle: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each fn, timed round-robin: warm-up rounds first, then `reps` rounds.

    A fn that returns a float has timed itself (its set-up stays out of the number). `settle`
    untimed calls of the same fn run right before each timed one: a training step's speed
    depends on the heap the previous step left (pages freed back to the OS must be faulted in
    again), so without them each side would be timed on its predecessor's heap.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + reps):
        for key, fn in fns.items():
            gc.collect()
            for _ in range(settle if i >= warmup else 0):
                fn()
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            dt = out if isinstance(out, float) else time.perf_counter() - t0
            if i >= warmup:
                times[key].append(dt)
    return times


def timed(fn: Callable[[], object]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios num[i] / den[i]: the two were timed next to each other, so a
    slow spell of the machine cancels out of each ratio (a ratio of medians would keep it)."""
    return statistics.median(a / b for a, b in zip(num, den))


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def header(title: str, args: argparse.Namespace) -> str:
    import transformers

    try:
        import peft

        peft_v = peft.__version__
    except ImportError:  # pragma: no cover
        peft_v = "missing"
    where = (f"{torch.cuda.get_device_name(DEVICE)}, " if DEVICE.type == "cuda" else "") + f"{DTYPE}".replace("torch.", "")
    return (f"## {title}\n\ntorch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
            f"{transformers.__version__}, peft {peft_v}, {os.cpu_count()} CPUs, load average {load_avg()}; "
            f"{where}{' (--quick)' if args.quick else ''}\n")


def peak_memory_mb() -> float:
    """Peak memory of this process so far, in MB: GPU memory allocated by torch on cuda, else RSS."""
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated(DEVICE) / 2**20
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB.

    Linux's VmHWM, not getrusage's ru_maxrss: a child started by fork+exec inherits its parent's
    ru_maxrss, so a big parent would hide the child's own peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def child(script: Path, argv: list[str]) -> dict:
    """Run `script --child ...argv` in a fresh interpreter and return the JSON it prints last."""
    out = subprocess.run([sys.executable, str(script), "--child", *argv], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} --child {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dump(path: Path | None, obj: object) -> None:
    if path is not None:
        path.write_text(json.dumps(obj, indent=2) + "\n")
