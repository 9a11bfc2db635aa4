"""`lorakit generate`: a base model plus zero or more adapters, merged or not, on one prompt or a file.

Adapters are named by `--adapter DIR` (named after the folder) or `--adapter NAME=DIR`. In a
`--prompts` batch file each row may say which adapter it wants (`"adapter": NAME`, or null for
the base model); rows with different adapters run in one batch through `lorakit.per_row`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..io import write_text
from ..training.datasets import load_rows
from ..generation import Sampling, generate
from .flags import add_flag, add_inference_flags, settle_inference
from .loading import load_for_inference, parse_adapters


def _rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.prompt is not None:
        return [{"prompt": args.prompt}]
    if args.prompts:
        rows = load_rows(args.prompts)
        for i, row in enumerate(rows):
            if "prompt" not in row and "messages" not in row:
                raise ValueError(f"{args.prompts} line {i + 1}: a row needs 'prompt' or 'messages', has {sorted(row)}")
        return rows
    raise ValueError("give --prompt TEXT or --prompts FILE.jsonl")


def messages_of(row: dict[str, Any], system: str | None) -> list[dict]:
    msgs = list(row.get("messages") or [{"role": "user", "content": row["prompt"]}])
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def run(args: argparse.Namespace) -> int:
    settle_inference(args)
    adapters = parse_adapters(args.adapter or [])
    model, tokenizer = load_for_inference(args.model, adapters, merge=args.merge)
    rows = _rows(args)
    wanted = [row.get("adapter", next(iter(adapters), None)) if adapters else None for row in rows]
    if args.merge and any(w is not None and w not in adapters for w in wanted):
        raise ValueError("rows name adapters, but --merge folded the adapters into the model")
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed)
    outputs: list[str] = []
    for start in range(0, len(rows), args.batch_size):
        prompts = [messages_of(r, args.system) for r in rows[start:start + args.batch_size]]
        names = None if args.merge else wanted[start:start + args.batch_size]
        outputs += generate(model, tokenizer, prompts, sampling, rows=names)
    if args.output:
        lines = [json.dumps({**row, "adapter": w, "completion": out}) for row, w, out in zip(rows, wanted, outputs)]
        write_text(args.output, "\n".join(lines) + "\n")
        print(f"wrote {len(outputs)} completions to {args.output}")
    else:
        for out in outputs:
            print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text with a base model and adapters",
                       description="Generate with a base model plus zero or more adapters. Example:\n"
                                   "  lorakit generate --adapter runs/demo --prompt 'Two small teas at 9am'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_flags(g)
    add_flag(g, "--prompt", default=None, help="one prompt (chat template applied)")
    add_flag(g, "--prompts", default=None, help="JSONL with 'prompt' or 'messages' per row, optional 'adapter'")
    add_flag(g, "--output", default=None, help="write completions as JSONL here (default: print)")
    add_flag(g, "--batch-size", type=int, default=None, help="rows generated together (default 16)")
    g.set_defaults(func=run)
