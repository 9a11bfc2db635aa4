"""`lorakit generate` and `lorakit chat`: a base model plus zero or more adapters, merged or not.

Adapters are named by `--adapter DIR` (named after the folder) or `--adapter NAME=DIR`. In a
`--prompts` batch file each row may say which adapter it wants (`"adapter": NAME`, or null for
the base model); rows with different adapters run in one batch through `lorakit.per_row`.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml

from .cli import add_flag


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """['a=dir1', 'dir2'] -> {'a': 'dir1', 'dir2': 'dir2'}; names must be unique."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name or "default", spec
        name = name.replace(".", "_")
        if name in out:
            raise ValueError(f"--adapter: two adapters are named {name!r}; name them with --adapter NAME=DIR")
        out[name] = path
    return out


def load_for_inference(model_name: str | None, adapters: dict[str, str], merge: bool = False):
    """Model + tokenizer with the adapters loaded (all active, or merged when merge=True)."""
    from . import adapters as ad
    from .io import load_adapter
    from .merge import merge_and_unload
    from .models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_name)
    for name, path in adapters.items():
        load_adapter(model, path, name=name)
    if adapters:
        ad.set_adapter(model, list(adapters) if merge or len(adapters) == 1 else [next(iter(adapters))])
        if merge:
            model = merge_and_unload(model, safe=True)
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval(), tokenizer


def _apply_config(args: argparse.Namespace) -> None:
    """--config YAML: flag names as keys, plus `lora_config: {enabled, weights_path, merge_and_unload}`."""
    if not getattr(args, "config", None):
        return
    path = Path(args.config)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: file not found")
    cfg = yaml.safe_load(path.read_text()) or {}
    lora = cfg.pop("lora_config", None) or {}
    if lora.get("enabled", True) and lora.get("weights_path"):
        paths = lora["weights_path"]
        args.adapter = (args.adapter or []) + ([paths] if isinstance(paths, str) else list(paths))
        args.merge = args.merge or bool(lora.get("merge_and_unload", False))
    for key, value in cfg.items():
        name = key.replace("-", "_")
        if not hasattr(args, name):
            raise ValueError(f"--config {path}: unknown key {key!r}")
        if getattr(args, name) in (None, False, []):
            setattr(args, name, value)


DEFAULTS = {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "seed": 0, "batch_size": 16}


def _settle(args: argparse.Namespace) -> None:
    """Flags > --config > defaults."""
    _apply_config(args)
    for key, value in DEFAULTS.items():
        if getattr(args, key, value) is None:
            setattr(args, key, value)


def _rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.prompt is not None:
        return [{"prompt": args.prompt}]
    if args.prompts:
        from .data import load_rows

        rows = load_rows(args.prompts)
        for i, row in enumerate(rows):
            if "prompt" not in row and "messages" not in row:
                raise ValueError(f"{args.prompts} line {i + 1}: a row needs 'prompt' or 'messages', has {sorted(row)}")
        return rows
    raise ValueError("give --prompt TEXT or --prompts FILE.jsonl")


def _messages(row: dict[str, Any], system: str | None) -> list[dict]:
    msgs = list(row.get("messages") or [{"role": "user", "content": row["prompt"]}])
    if system and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def run_generate(args: argparse.Namespace) -> int:
    from . import adapters as ad
    from .evaluate import generate_batch

    _settle(args)
    adapters = parse_adapters(args.adapter or [])
    model, tokenizer = load_for_inference(args.model, adapters, merge=args.merge)
    rows = _rows(args)
    torch.manual_seed(args.seed)
    wanted = [row.get("adapter", next(iter(adapters), None)) if adapters else None for row in rows]
    if args.merge and any(w is not None and w not in adapters for w in wanted):
        raise ValueError("rows name adapters, but --merge folded the adapters into the model")
    outputs: list[str] = []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start:start + args.batch_size]
        prompts = [_messages(r, args.system) for r in chunk]
        names = wanted[start:start + args.batch_size]
        if adapters and not args.merge and len(set(names)) > 1:
            with ad.per_row(model, names):
                outputs += generate_batch(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_p)
        else:
            if adapters and not args.merge and names[0] is not None:
                ad.set_adapter(model, names[0])
            ctx = ad.disabled(model) if adapters and not args.merge and names[0] is None else nullcontext()
            with ctx:
                outputs += generate_batch(model, tokenizer, prompts, args.max_new_tokens, args.temperature, args.top_p)
    if args.output:
        from .io import write_text

        lines = [json.dumps({**row, "adapter": w, "completion": out}) for row, w, out in zip(rows, wanted, outputs)]
        write_text(args.output, "\n".join(lines) + "\n")
        print(f"wrote {len(outputs)} completions to {args.output}")
    else:
        for out in outputs:
            print(out)
    return 0


def run_chat(args: argparse.Namespace, stdin=None) -> int:
    """An interactive chat; `/adapter NAME` switches, `/base` uses no adapter, `/reset` clears, `/exit` quits."""
    from transformers import TextStreamer

    from . import adapters as ad

    _settle(args)
    stdin = stdin or sys.stdin
    adapters = parse_adapters(args.adapter or [])
    model, tokenizer = load_for_inference(args.model, adapters, merge=args.merge)
    current = next(iter(adapters), None)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(f"lorakit chat — adapters: {list(adapters) or 'none'}; commands: /adapter NAME, /base, /reset, /exit")
    while True:
        print(f"[{current or 'base'}] you> ", end="", flush=True)
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        text = line.strip()
        if text.startswith("/adapter"):
            name = text.split(maxsplit=1)[1] if " " in text else ""
            if args.merge:
                print("adapters are merged (--merge); switching needs an unmerged model")
            elif name not in adapters:
                print(f"unknown adapter {name!r}; loaded: {list(adapters)}")
            else:
                current = name
                ad.set_adapter(model, name)
            continue
        if text == "/base":
            current = None
            continue
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        ids = {k: v.to(next(model.parameters()).device) for k, v in ids.items()}
        sample = args.temperature > 0
        kw = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if sample else {"do_sample": False}
        print("assistant> ", end="", flush=True)
        ctx = ad.disabled(model) if adapters and current is None and not args.merge else nullcontext()
        with ctx, torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, streamer=streamer,
                                 pad_token_id=tokenizer.pad_token_id, **kw)
        reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply.strip()})


def _common(p: argparse.ArgumentParser) -> None:
    add_flag(p, "--model", default=None, help="base model (default: the embedded smollm2-135m-instruct)")
    add_flag(p, "--adapter", action="append", help="adapter directory, or NAME=DIR; repeatable")
    add_flag(p, "--merge", action="store_true", help="merge the adapters into the weights before generating")
    add_flag(p, "--max-new-tokens", type=int, default=None, help="tokens to generate at most (default 256)")
    add_flag(p, "--temperature", type=float, default=None, help="0 = greedy (default); > 0 samples")
    add_flag(p, "--top-p", type=float, default=None, help="nucleus sampling threshold when sampling (default 1.0)")
    add_flag(p, "--seed", type=int, default=None, help="random seed for sampling (default 0)")
    add_flag(p, "--system", default=None, help="system prompt")
    add_flag(p, "--config", default=None, help="YAML with these flags as keys, and/or "
                                               "lora_config: {enabled, weights_path, merge_and_unload}")


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text with a base model and adapters",
                       description="Generate with a base model plus zero or more adapters. Example:\n"
                                   "  lorakit generate --adapter runs/demo --prompt 'Two small teas at 9am'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(g)
    add_flag(g, "--prompt", default=None, help="one prompt (chat template applied)")
    add_flag(g, "--prompts", default=None, help="JSONL with 'prompt' or 'messages' per row, optional 'adapter'")
    add_flag(g, "--output", default=None, help="write completions as JSONL here (default: print)")
    add_flag(g, "--batch-size", type=int, default=None, help="rows generated together (default 16)")
    g.set_defaults(func=run_generate)
    c = sub.add_parser("chat", help="interactive chat; /adapter NAME switches adapters",
                       description="Interactive terminal chat that streams tokens. Commands: /adapter NAME, "
                                   "/base, /reset, /exit.")
    _common(c)
    c.set_defaults(func=run_chat)
