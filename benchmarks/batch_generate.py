"""Batch generation (`lorakit generate --prompts`, the trainer's exact-match eval): `generation.generate`
on the continuous-batching engine vs the same prompts through `model.generate` in fixed batches.

    python benchmarks/batch_generate.py           # embedded SmolLM2-135M-Instruct, 64 chat prompts, batch 16
    python benchmarks/batch_generate.py --quick   # 8 prompts, batch 4, 8 new tokens: a smoke run

Both sides get the same prompts, the same per-row adapters (8 random r=16 adapters, every 9th
row on the base) and greedy decoding with the same max_new_tokens. model.generate runs each batch
of --batch-size rows until its longest row ends; the engine lets a row that ended make room for
the next prompt. Times alternate between the sides (median of --reps runs after a warm-up), and
the answers are compared (greedy: the same text expected).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import torch  # noqa: E402
from serve import ADAPTERS, PROMPTS, embedded_model, make_adapters  # noqa: E402


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--prompts", type=int, default=None, help="prompts (default 64; --quick 8)")
    p.add_argument("--batch-size", type=int, default=None, help="rows generated together (default 16; --quick 4)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128; --quick 8")
    args = p.parse_args()
    C.setup(args)
    q = args.quick
    n, batch = args.prompts or (8 if q else 64), args.batch_size or (4 if q else 16)
    new, reps = args.max_new_tokens or (8 if q else 128), args.reps or (1 if q else 3)
    import lorakit
    from lorakit.generation import _generate_hf, generate
    from lorakit.sampling import Sampling

    model, tokenizer = embedded_model()
    folder = Path(tempfile.mkdtemp(prefix="lorakit-bench-generate-"))
    try:
        make_adapters(model, folder)
        for name in ADAPTERS:
            lorakit.load_adapter(model, folder / name, name=name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    model.eval()
    prompts = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(n)]
    rows = [None if i % 9 == 8 else ADAPTERS[i % 8] for i in range(n)]
    sampling = Sampling(max_new_tokens=new)
    out: dict[str, list[str]] = {}

    def engine() -> None:
        out["engine"] = generate(model, tokenizer, prompts, sampling, rows=rows, max_batch_size=batch)

    def fixed() -> None:
        out["hf"] = [t for s in range(0, n, batch)
                     for t in _generate_hf(model, tokenizer, prompts[s:s + batch], sampling, rows[s:s + batch], None)]

    times = C.alternate({"engine": engine, "model.generate": fixed}, reps)
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in out["engine"])
    print(C.header(f"Batch generation: {n} chat prompts, batch {batch}, up to {new} new tokens", args))
    print(f"SmolLM2-135M-Instruct (embedded), 8 adapters r=16 on all 7 projections routed per row, greedy; "
          f"median of {reps} alternating runs after 1 warm-up\n")
    rows_out = [[side, C.fmt_s(C.med(t)), f"{tokens / C.med(t):.1f}"] for side, t in times.items()]
    rows_out[0].append(f"**{C.ratio(times['model.generate'], times['engine']):.2f}x**")
    rows_out[1].append("1.00x")
    print(C.table(["generate with", "time", "answer tokens/s", "speed-up"], rows_out))
    same = sum(a == b for a, b in zip(out["engine"], out["hf"]))
    print(f"\ncheck: identical answers in {same}/{n} rows; {tokens} answer tokens in all")
    C.dump(args.json, times)


if __name__ == "__main__":
    main()
