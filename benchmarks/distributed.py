"""1 process vs 2 (DDP, FSDP2) through `lorakit sft`: the losses of every step, and tokens/s.

    python benchmarks/distributed.py            # SmolLM2-135M's shape (30 layers), 8 steps
    python benchmarks/distributed.py --quick    # 4 layers, 4 steps

The model is SmolLM2-135M's architecture with random weights and its tokenizer (the embedded
one), saved to a temp folder; the data are synthetic chat rows. Each run is the command a user
types: `lorakit sft --batch-size 4` in one process, `lorakit sft --nproc 2 --batch-size 2` (gloo)
in two, with --grad-accum 2 and dropout 0 in all, so the losses must agree to float32 noise.
All runs use every CPU: one process with all the threads, two with half each. tokens/s is the
median over the steps after the first of input tokens per step (all processes) / step time;
"wall" is the whole command, start-up included.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

WORDS = "the a red blue green cat dog sun moon tea cup small big quick slow at 9am two three".split()


def write_data(path: Path, n: int = 64, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": q.upper()}]}) + "\n")


def run(tmp: Path, name: str, argv: list[str], threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(C.ROOT / "src"))
    out_dir = tmp / name
    cmd = [sys.executable, "-m", "lorakit", "sft", *argv, "--output-dir", str(out_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {"cmd": "lorakit sft " + " ".join(argv), "wall": wall, "loss": [r["loss"] for r in steps],
            "tokens_per_s": C.med([r["tokens_per_s"] for r in steps[1:]] or [steps[0]["tokens_per_s"]]),
            "adapter": out_dir / "adapter_model.safetensors"}


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 8, --quick 4)")
    args = p.parse_args()
    if args.device != "cpu":
        raise SystemExit("--device: this benchmark compares CPU processes (gloo); run it on CPU")
    from safetensors.torch import load_file

    from lorakit.models import load_tokenizer

    steps = args.steps or (4 if args.quick else 8)
    cores = args.threads or os.cpu_count() or 2
    tmp = Path(tempfile.mkdtemp(prefix="lorakit-dist-"))
    try:
        model_dir, data = tmp / "model", tmp / "chat.jsonl"
        C.build_model(args.quick).save_pretrained(model_dir)
        load_tokenizer("smollm2-135m-instruct").save_pretrained(model_dir)
        write_data(data)
        common = ["--model", str(model_dir), "--dataset", str(data), "--max-steps", str(steps), "--grad-accum", "2",
                  "--lora-rank", "16", "--lora-dropout", "0", "--max-length", "128", "--logging-steps", "1",
                  "--precision", "fp32", "--seed", "0"]
        runs = {"1 process x batch 4": run(tmp, "one", [*common, "--batch-size", "4"], cores),
                "2 x batch 2, ddp": run(tmp, "ddp", [*common, "--batch-size", "2", "--nproc", "2"], max(1, cores // 2)),
                "2 x batch 2, fsdp": run(tmp, "fsdp", [*common, "--batch-size", "2", "--nproc", "2", "--distributed",
                                                        "fsdp"], max(1, cores // 2))}
        ref = runs["1 process x batch 4"]
        print(C.header("lorakit sft: 1 process vs 2 (gloo)", args))
        rows = []
        for i in range(steps):
            losses = [r["loss"][i] for r in runs.values()]
            rows.append([i + 1, *(f"{x:.6f}" for x in losses), f"{max(abs(x - losses[0]) for x in losses):.1e}"])
        print(C.table(["step", *runs, "max abs diff"], rows) + "\n")
        want = load_file(ref["adapter"])
        rows = []
        for name, r in runs.items():
            got = load_file(r["adapter"])
            diff = max((got[k] - want[k]).abs().max().item() for k in want)
            rows.append([name, f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x",
                         f"{r['wall']:.1f} s", f"{diff:.1e}"])
        print(C.table(["run", "tokens/s", "vs 1 process", "wall", "adapter max abs diff"], rows) + "\n")
        print("\n".join(f"- `{r['cmd']}`" for r in runs.values()).replace(str(tmp), "$TMP"))
        C.dump(args.json, {k: {**v, "adapter": str(v["adapter"])} for k, v in runs.items()})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
