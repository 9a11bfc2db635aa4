"""`lorakit serve`: the HTTP server over one base model and many adapters."""

from __future__ import annotations

import argparse

from ..serving.server import Engine, create_app
from ..serving.server import __doc__ as SERVER_DOC
from .flags import add_flag
from .loading import load_for_inference, parse_adapters


def run(args: argparse.Namespace) -> int:
    import uvicorn

    model, tokenizer = load_for_inference(args.model, parse_adapters(args.adapter or []))
    engine = Engine(model, tokenizer, max_batch=args.max_batch, wait_ms=args.batch_wait_ms)
    print(f"serving {args.model or 'smollm2-135m-instruct'} with adapters {engine.adapters()} "
          f"on http://{args.host}:{args.port}")
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="info")
    engine.stop()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="HTTP server: many adapters over one base model",
                       description=SERVER_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(s, "--model", default=None, help="base model (default: the embedded smollm2-135m-instruct)")
    add_flag(s, "--adapter", action="append", help="adapter directory or NAME=DIR; repeatable")
    add_flag(s, "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add_flag(s, "--port", type=int, default=8000, help="port (default 8000)")
    add_flag(s, "--max-batch", type=int, default=16, help="requests generated together at most (default 16)")
    add_flag(s, "--batch-wait-ms", type=float, default=10.0, help="how long to gather a batch (default 10 ms)")
    s.set_defaults(func=run)
