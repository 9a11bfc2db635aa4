"""`lorakit chat`: an interactive terminal chat over a base model and adapters, streaming tokens.

Commands while chatting: /adapter NAME switches, /base uses no adapter, /reset clears, /exit quits.
"""

from __future__ import annotations

import argparse
import sys

from ..adapters import using
from ..generation import generate
from ..tasks import SEQ_CLS, task_of_model
from .flags import add_inference_flags, settle_inference
from .loading import load_for_inference, parse_adapters


def run(args: argparse.Namespace, stdin=None) -> int:
    """An interactive chat; `/adapter NAME` switches, `/base` uses no adapter, `/reset` clears, `/exit` quits."""
    from transformers import TextStreamer

    sampling = settle_inference(args)
    stdin = stdin or sys.stdin
    adapters = parse_adapters(args.adapter)
    model, tokenizer = load_for_inference(args.model, adapters, merge=args.merge)
    if task_of_model(model) == SEQ_CLS:
        raise ValueError(f"{type(model).__name__} is a sequence classifier; lorakit chat runs causal and seq2seq "
                         f"LMs. Label text with `lorakit generate --prompt TEXT` instead")
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
            else:
                try:
                    with using(model, name):  # the core names an unknown adapter and lists the loaded ones
                        current = name
                except ValueError as e:
                    print(e)
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
        print("assistant> ", end="", flush=True)
        rows = None if args.merge else [current]
        reply = generate(model, tokenizer, [history], sampling, rows=rows, streamer=streamer)[0]
        history.append({"role": "assistant", "content": reply})


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("chat", help="interactive chat; /adapter NAME switches adapters",
                       description="Interactive terminal chat that streams tokens. Commands: /adapter NAME, "
                                   "/base, /reset, /exit.")
    add_inference_flags(c)
    c.usage = "%(prog)s [--adapter DIR ...] [flags]"
    c.set_defaults(func=run)
