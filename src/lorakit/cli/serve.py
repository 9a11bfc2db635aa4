"""`lorakit serve`: the HTTP server over one base model and many adapters (see lorakit.serving.server)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..models import DEFAULT_MODEL
from .. import serving  # the package alone (its doc): the server's imports wait for `lorakit serve`
from .flags import add_flag
from .loading import load_base, parse_adapters


def lora_modules(specs: list[str]) -> dict[str, str]:
    """--lora-modules / --adapter values: `name=path`, a bare folder, or vLLM's JSON
    `{"name": ..., "path": ...}`, into {name: folder}."""
    plain: list[str] = []
    for spec in specs:
        if spec.lstrip().startswith("{"):
            try:
                obj = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ValueError(f"--lora-modules {spec!r}: not valid JSON ({e}); use name=path or "
                                 f'{{"name": "sql", "path": "/adapters/sql"}}') from e
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(obj.get("path"), str):
                raise ValueError(f"--lora-modules {spec!r}: the JSON form needs string fields 'name' and 'path'")
            plain.append(f"{obj['name']}={obj['path']}")
        else:
            plain.append(spec)
    return parse_adapters(plain)


def base_id(model: str | None, first_adapter_base: str | None) -> str:
    """The base model's id in the API: the --model given (a local folder by its name, not its path)."""
    name = model or first_adapter_base or DEFAULT_MODEL
    return Path(name).name if os.path.isdir(name) else name


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..io import read_adapter_config, resolve_adapter_dir
    from ..serving.app import create_app
    from ..serving.server import Server

    for flag, value, least in (("--max-loras", args.max_loras, 1), ("--max-batch-size", args.max_batch_size, 1),
                               ("--max-model-len", args.max_model_len, 2),
                               ("--prefix-cache-tokens", args.prefix_cache_tokens, 0)):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    adapters = lora_modules([*(args.lora_modules or []), *(args.adapter or [])])
    first = None
    if adapters and not args.model:
        name, path = next(iter(adapters.items()))
        first = read_adapter_config(resolve_adapter_dir(path, name)).base_model_name_or_path
    model, tokenizer = load_base(args.model, adapters)
    if not hasattr(model, "generate") or getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"lorakit serve runs causal language models; {type(model).__name__} is not one")
    server = Server(model, tokenizer, base_id(args.model, first), adapters, adapter_root=args.adapter_root,
                    max_loras=args.max_loras, max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                    prefix_cache_tokens=args.prefix_cache_tokens)
    key = args.api_key or os.environ.get("LORAKIT_API_KEY") or None
    print(f"serving {server.base_id} with adapters {server.registry.names()} on http://{args.host}:{args.port}"
          f"{' (API key required)' if key else ''}", flush=True)
    try:
        uvicorn.run(create_app(server, api_key=key), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        server.stop()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="HTTP server: many adapters over one base model (OpenAI/vLLM API)",
                       description=serving.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(s, "--model", default=None, help="base model (default: the first adapter's base, else the embedded "
                                             "smollm2-135m-instruct)")
    add_flag(s, "--lora-modules", nargs="+", action="extend", metavar="NAME=PATH",
             help="adapters to serve: name=path or vLLM's JSON {\"name\": ..., \"path\": ...}; repeatable")
    add_flag(s, "--adapter", action="append", help="the same as --lora-modules (NAME=DIR, or DIR named after "
                                                  "the folder); repeatable")
    add_flag(s, "--adapter-root", default=None, help="a folder whose every subfolder is servable by its name, "
                                                    "loaded on first use (and where load_lora_adapter may load from)")
    add_flag(s, "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    add_flag(s, "--port", type=int, default=8000, help="port (default 8000)")
    add_flag(s, "--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                                               "(default: $LORAKIT_API_KEY, else no key)")
    add_flag(s, "--max-loras", type=int, default=None, help="adapters kept in memory; the least recently used is "
                                                           "evicted (default 8, or the number given at start)")
    add_flag(s, "--max-batch-size", "--max-batch", type=int, default=16, help="rows decoded together (default 16)")
    add_flag(s, "--max-model-len", type=int, default=None, help="prompt + answer tokens per request at most "
                                                               "(default: the model's limit)")
    add_flag(s, "--prefix-cache-tokens", type=int, default=4096,
             help="prompt tokens whose keys/values are kept per adapter, so a prompt that starts like an earlier "
                  "one (the chat template's system prompt, earlier turns) prefills only the rest; 0 turns it off "
                  "(default 4096)")
    add_flag(s, "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
             help="uvicorn's log level (default info)")
    s.set_defaults(func=run)
