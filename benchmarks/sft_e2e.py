"""End to end: `lorakit sft` against TRL's SFTTrainer + PEFT, same data, same settings.

What a user feels is the time from the command to a good adapter. Each run is a fresh child
process (`python -m lorakit sft ...`, the CLI; or this script's `--child-trl`), timed whole
(start-up, model load, tokenising, training, saving), its peak RSS read from the kernel
(`os.wait4`). The two tools run alternately, `--rounds` times each. Every saved adapter is then
scored by ONE evaluator (lorakit's greedy exact match on held-out rows, the same code for both).

Settings (both tools): the embedded SmolLM2-135M-Instruct, LoRA r=16, alpha=32, dropout 0.05 on
all linear layers, AdamW lr 1e-3, 10 warmup steps then linear decay, batch 8, 120 steps, max
length 256, loss on the answer only, seed 0 (`--seeds 0 1 2`: several, exact match averaged; one
seed's adapters differ by a few points of exact match from another's), gradient checkpointing off. Data: `sft_data.py`
(3,000 short instructions with short answers, ~55 tokens a row, ~12 of them the answer).
TRL reads the same rows as conversational prompt/completion pairs (its completion-only loss).

Rows: both tools at float32, and each at its best setting for this hardware: lorakit
`--precision bf16` (frozen base in bf16, LoRA and AdamW in float32), TRL `bf16=True`, where the
CPU (avx512_bf16 / amx_bf16) or GPU computes bf16 natively. Without native bf16 the best setting
is float32 and those rows are not run twice. (lorakit's `--precision auto` picks bf16 on a GPU,
and on such a CPU once `training.precision.AUTO_CPU_BF16` is on: these rows are its evidence.)

    python benchmarks/sft_e2e.py                       # the full run (~25-40 min on 2 cores)
    python benchmarks/sft_e2e.py --steps 4 --rows 64 --test-rows 16 --eval-rows 8 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, load_avg, med, ratio, table

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
LORA = dict(r=16, alpha=32, dropout=0.05)
WARMUP_STEPS = 10
TAIL = 10  # "final loss" = mean training loss of the last TAIL steps (one step's loss is noisy)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rows", type=int, default=3000, help="training rows to generate")
    p.add_argument("--test-rows", type=int, default=300, help="held-out rows to generate")
    p.add_argument("--eval-rows", type=int, default=200, help="held-out rows scored by exact match")
    p.add_argument("--rounds", type=int, default=2, help="runs of each tool and setting, alternating")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="training seeds (init, data order, dropout) of both tools; exact match is averaged over them")
    p.add_argument("--only", choices=["fp32", "best"], default=None, help="run only these rows")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS of both tools' processes (default: torch's own, all cores)")
    p.add_argument("--work-dir", type=Path, default=None, help="data and adapters go here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="also write every run's numbers here")
    p.add_argument("--child-trl", action="store_true", help=argparse.SUPPRESS)  # internal: one TRL run
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)  # the rest: --child-trl's own
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------- the runs
def lorakit_cmd(args: argparse.Namespace, data: Path, out: Path, precision: str, seed: int = 0) -> list[str]:
    return [sys.executable, "-m", "lorakit", "sft", "--model", args.model, "--dataset", str(data / "train.jsonl"),
            "--output-dir", str(out), "--lora-rank", str(LORA["r"]), "--lora-alpha", str(LORA["alpha"]),
            "--lora-dropout", str(LORA["dropout"]), "--target-modules", "all-linear",
            "--learning-rate", str(args.lr), "--lr-scheduler", "linear",
            "--warmup-steps", str(min(WARMUP_STEPS, args.steps - 1)),
            "--batch-size", str(args.batch_size), "--max-steps", str(args.steps), "--max-length", str(args.max_length),
            "--seed", str(seed), "--logging-steps", "1", "--gradient-checkpointing", "false", "--precision", precision]


def trl_cmd(args: argparse.Namespace, data: Path, out: Path, bf16: bool, seed: int = 0) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-trl", "--data", str(data), "--out", str(out),
           "--seeds", str(seed),
           "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--lr", str(args.lr)]
    return cmd + (["--bf16"] if bf16 else [])


def run_child(cmd: list[str], log: Path, threads: int | None = None) -> tuple[float, float]:
    """Run cmd to completion; (wall seconds, the child's own peak RSS in MB from wait4)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); last lines of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-30:]))
    return wall, usage.ru_maxrss / 1024  # Linux: kilobytes


def lorakit_result(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    found = re.search(r"wall time (\d+) s", (out / "report.md").read_text())
    return {"train_s": float(found.group(1)) if found else float("nan"), "losses": losses}


def trl_child(args: argparse.Namespace) -> int:
    """One TRL SFTTrainer + PEFT run in this process; prints its numbers as JSON."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lorakit.models import resolve_model

    path = resolve_model(args.model)
    rows = [json.loads(line) for line in (args.data / "train.jsonl").read_text().splitlines()]
    pairs = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = SFTConfig(
        output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="linear",
        warmup_steps=min(WARMUP_STEPS, args.steps - 1), weight_decay=0.0, max_grad_norm=1.0, max_length=args.max_length,
        completion_only_loss=True, packing=False, gradient_checkpointing=False, bf16=args.bf16, fp16=False,
        use_cpu=not torch.cuda.is_available(), seed=args.seeds[0], data_seed=args.seeds[0], logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
    )
    peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=pairs, processing_class=tok, peft_config=peft_cfg)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    trainer.save_model(str(args.out))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(json.dumps({"train_s": train_s, "losses": losses}))
    return 0


# --------------------------------------------------------------------------------------- scoring
def score(model_name: str, adapter: Path, test: Path, limit: int) -> tuple[float, float]:
    """The common evaluator: base model + the saved adapter on held-out rows; (greedy exact match,
    mean loss per answer token). The same code scores both tools' adapters."""
    import lorakit
    from lorakit.models import load_model, load_tokenizer
    from lorakit.training import datasets as datalib
    from lorakit.training.batching import collate
    from lorakit.training.evaluate import exact_match
    from lorakit.training.loss import loss_sum

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # float32 either way
    model, tok = load_model(model_name), load_tokenizer(model_name)
    lorakit.load_adapter(model, str(adapter))
    model.to(device)
    em = exact_match(model, tok, str(test), max_new_tokens=32, limit=limit)["exact_match"]
    rows = datalib.build_dataset([str(test)], tok).rows[:limit]
    with torch.no_grad():
        total = sum(loss_sum(model, "causal_lm", {k: v.to(device) for k, v in
                                                  collate(rows[i:i + 16], tok.pad_token_id).items()}).item()
                    for i in range(0, len(rows), 16))
    return em, total / sum(r.n_trained for r in rows)


def tokens_per_row(model_name: str, train: Path, max_length: int) -> float:
    from lorakit.models import load_tokenizer
    from lorakit.training.datasets import build_dataset

    data = build_dataset([str(train)], load_tokenizer(model_name), "causal_lm", max_length)
    return statistics.mean(data.lengths)


# --------------------------------------------------------------------------------------- main
def settings(only: str | None) -> list[tuple[str, str, str]]:
    """(row label, tool, precision) to run; the best rows only where they differ from float32."""
    from lorakit.training.precision import bf16_native

    native = bf16_native(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rows = [("lorakit fp32", "lorakit", "fp32"), ("TRL+PEFT fp32", "trl", "fp32")]
    best = [("lorakit bf16", "lorakit", "bf16"), ("TRL+PEFT bf16=True", "trl", "bf16")] if native else []
    return {"fp32": rows, "best": best, None: rows + best}[only]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child_trl:
        return trl_child(args)
    sys.path.insert(0, str(HERE))
    import sft_data

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sft_e2e-"))
    data = work / "data"
    sft_data.write(data, args.rows, args.test_rows)
    todo = settings(args.only)
    if not todo:
        raise SystemExit("--only best: this hardware has no native bf16, so the best setting is float32")
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in todo}
    for seed in args.seeds:
        for rnd in range(args.rounds):
            for label, tool, precision in todo:
                out = work / f"{label.split()[0].replace('+', '_')}-{precision}-s{seed}-r{rnd}"
                cmd = (lorakit_cmd(args, data, out, precision, seed) if tool == "lorakit"
                       else trl_cmd(args, data, out, precision == "bf16", seed))
                wall, rss = run_child(cmd, work / f"{out.name}.log", args.threads)
                res = (lorakit_result(out) if tool == "lorakit"
                       else json.loads((work / f"{out.name}.log").read_text().strip().splitlines()[-1]))
                runs[label].append({"wall_s": wall, "peak_rss_mb": rss, "out": str(out), "seed": seed, **res})
                print(f"seed {seed} round {rnd + 1}/{args.rounds} {label}: {wall:.1f} s, peak RSS {rss:.0f} MB, "
                      f"train {res['train_s']:.1f} s, load {load_avg()}", flush=True)
    per_row = tokens_per_row(args.model, data / "train.jsonl", args.max_length)
    print(report(args, runs, per_row, data))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=2))
    return 0


def report(args: argparse.Namespace, runs: dict[str, list[dict]], per_row: float, data: Path) -> str:
    tokens = args.steps * args.batch_size * per_row  # input tokens (padding excluded) a run trains on
    rows, em, per_seed = [], {}, []
    for label, rs in runs.items():
        # rounds of one seed train the same adapter: score each seed's last, average over seeds
        last = {r["seed"]: r for r in rs}
        scores = {seed: score(args.model, Path(r["out"]), data / "test.jsonl", args.eval_rows) for seed, r in last.items()}
        em[label] = statistics.mean(e for e, _ in scores.values())
        held_out = statistics.mean(h for _, h in scores.values())
        per_seed.append(f"- {label}, exact match by seed: "
                        + ", ".join(f"{seed}: {e:.1%} (held-out loss {h:.4f})" for seed, (e, h) in scores.items()))
        wall, train = med([r["wall_s"] for r in rs]), med([r["train_s"] for r in rs])
        loss = statistics.mean(statistics.mean(r["losses"][-TAIL:]) for r in last.values())
        rows.append([label, f"{wall:.1f}", f"{train:.1f}", f"{train / args.steps:.2f}", f"{tokens / train:.0f}",
                     f"{med([r['peak_rss_mb'] for r in rs]):.0f}", f"{loss:.4f}", f"{held_out:.4f}", f"{em[label]:.1%}"])
    lines = ["## lorakit sft vs TRL SFTTrainer + PEFT, end to end\n",
             f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, load average "
             f"{load_avg()}; {args.steps} steps of batch {args.batch_size}, {args.rows} rows (~{per_row:.0f} tokens "
             f"a row), {args.rounds} rounds of seeds {', '.join(map(str, args.seeds))}, exact match on {args.eval_rows} "
             f"held-out rows (mean over seeds)\n",
             table(["run", "wall s", "train s", "s/step", "tokens/s", "peak RSS MB", f"train loss (last {TAIL})",
                    "held-out loss", "exact match"], rows), "", *per_seed, ""]
    pairs = [("lorakit fp32", "TRL+PEFT fp32", 0.5), ("lorakit bf16", "TRL+PEFT bf16=True", 0.6)]
    for ours, theirs, target in pairs:
        if ours in runs and theirs in runs:
            a, b = runs[ours], runs[theirs]
            lines.append(f"- {ours} / {theirs}: wall {ratio([r['wall_s'] for r in a], [r['wall_s'] for r in b]):.2f}x "
                         f"(target <= {target}x), peak RSS "
                         f"{ratio([r['peak_rss_mb'] for r in a], [r['peak_rss_mb'] for r in b]):.2f}x (target <= 0.6x), "
                         f"exact match {100 * (em[ours] - em[theirs]):+.1f} points (target within 2)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
