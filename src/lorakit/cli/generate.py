"""`lorakit generate`: a base model plus zero or more adapters, merged or not, on one prompt or a file.

Adapters are named by `--adapter DIR` (named after the folder) or `--adapter NAME=DIR`. In a
`--prompts` file each row may say which adapter it wants (`"adapter": NAME`, or null for the
base model); rows with different adapters run in one batch (`lorakit.using`, which also names an
unknown adapter). The task comes from the adapter or the model (`loading.load_base`):

    causal LM    the prompt through the chat template, the reply printed
    seq2seq      the prompt as the encoder input (T5, BART), the output printed
    classifier   the text scored: the label name (config.id2label) and every class's probability
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters import using
from ..generation import generate
from ..io import write_text
from ..tasks import SEQ_CLS, task_of_model
from ..training.datasets import load_rows
from .flags import InferenceSettings, add_inference_flags, settle_inference
from .loading import load_for_inference, parse_adapters


@dataclass
class GenerateSettings(InferenceSettings):
    """`lorakit generate`'s settings: what to run on, and where the results go."""

    prompt: str | None = None
    """One prompt (a causal LM gets it through its chat template); for a classifier, one text to label."""
    prompts: str | None = None
    """A JSONL/JSON/CSV/Parquet file of rows with 'prompt' or 'messages' (a classifier: 'text' or 'prompt'), and optionally 'adapter' (a name, or null for the base model)."""
    output: str | None = None
    """Write the results as JSONL here; unset: print them (a classifier's --prompts rows print as JSONL)."""
    batch_size: int = 16
    """Rows run together."""


def _rows(args: argparse.Namespace, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    if args.prompt is not None:
        return [{keys[0]: args.prompt}]
    rows = load_rows(args.prompts)
    for i, row in enumerate(rows):
        if not any(k in row for k in keys):
            raise ValueError(f"{args.prompts} line {i + 1}: a row needs {' or '.join(map(repr, keys))}, "
                             f"has {sorted(row)}")
    return rows


def messages_of(row: dict[str, Any], system: str | None) -> list[dict]:
    msgs = list(row.get("messages") or [{"role": "user", "content": row["prompt"]}])
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


@torch.no_grad()
def classify(model: torch.nn.Module, tokenizer: Any, texts: list[str],
             rows: list[str | None] | None = None) -> torch.Tensor:
    """Class probabilities (len(texts), num_labels) of a sequence classifier, row i with adapter rows[i]."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
    device = next(model.parameters()).device
    with using(model, rows):
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits   # (n, num_labels)
    return logits.float().softmax(-1).cpu()


def _predict(model, tokenizer, rows, wanted, args) -> list[dict[str, Any]]:
    names = model.config.id2label
    out = []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start:start + args.batch_size]
        texts = [str(r["text"] if "text" in r else r["prompt"]) for r in chunk]
        probs = classify(model, tokenizer, texts, None if args.merge else wanted[start:start + args.batch_size])
        out += [{"prediction": names[int(p.argmax())], "probabilities": {names[i]: round(float(q), 6)
                 for i, q in enumerate(p)}} for p in probs]
    return out


def _complete(model, tokenizer, rows, wanted, args, sampling) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for start in range(0, len(rows), args.batch_size):
        prompts = [messages_of(r, args.system) for r in rows[start:start + args.batch_size]]
        names = None if args.merge else wanted[start:start + args.batch_size]
        out += [{"completion": text} for text in generate(model, tokenizer, prompts, sampling, rows=names)]
    return out


def run(args: argparse.Namespace) -> int:
    sampling = settle_inference(args)
    if args.prompt is None and not args.prompts:
        raise ValueError("give --prompt TEXT or --prompts FILE.jsonl")
    adapters = parse_adapters(args.adapter)
    model, tokenizer = load_for_inference(args.model, adapters, merge=args.merge)
    classifier = task_of_model(model) == SEQ_CLS
    rows = _rows(args, ("text", "prompt") if classifier else ("prompt", "messages"))
    wanted = [row.get("adapter", next(iter(adapters), None)) if adapters else None for row in rows]
    if args.merge and any("adapter" in row for row in rows):
        raise ValueError(f"rows of {args.prompts} pick adapters, but --merge folds every adapter into one model; "
                         f"drop --merge")
    results = (_predict(model, tokenizer, rows, wanted, args) if classifier
               else _complete(model, tokenizer, rows, wanted, args, sampling))
    lines = [json.dumps({**row, "adapter": w, **res}) for row, w, res in zip(rows, wanted, results)]
    if args.output:
        write_text(args.output, "\n".join(lines) + "\n")
        print(f"wrote {len(results)} {'predictions' if classifier else 'completions'} to {args.output}")
    elif classifier and args.prompts:
        print("\n".join(lines))
    else:
        for res in results:
            print(res["completion"] if "completion" in res else
                  f"{res['prediction']}  ({', '.join(f'{k} {v:.4f}' for k, v in res['probabilities'].items())})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="run a base model and adapters: generate text, or classify",
                       description=__doc__ + "\nexamples:\n  lorakit generate --adapter runs/demo --prompt "
                                   "'Two small teas at 9am'\n  lorakit generate --config infer.yaml --prompts rows.jsonl"
                                   " --output out.jsonl",
                       usage="%(prog)s (--prompt TEXT | --prompts FILE) [flags]")
    add_inference_flags(g, GenerateSettings)
    g.set_defaults(func=run)
