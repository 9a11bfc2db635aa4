"""Fixtures for the server tests: a tiny base with adapters on disk, an in-process app, a real
`lorakit serve` subprocess, and the single-request oracle."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from tiny import make_adapter
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.engine import eos_ids
from lorakit.models import load_tokenizer

ROOT_ADAPTERS = [f"r{i}" for i in range(6)]  # subfolders of --adapter-root


@pytest.fixture(scope="module")
def disk(base_dir, tmp_path_factory):
    """{"base", "a", "b" (given at start), "root" (holding r0..r5), "elsewhere" (a valid adapter outside)}."""
    tmp = tmp_path_factory.mktemp("adapters")
    make_adapter(base_dir, tmp / "given" / "a", seed=1)
    make_adapter(base_dir, tmp / "given" / "b", seed=2, r=2, targets=("q_proj", "k_proj", "o_proj", "up_proj"))
    for i, name in enumerate(ROOT_ADAPTERS):
        make_adapter(base_dir, tmp / "root" / name, seed=10 + i)
    make_adapter(base_dir, tmp / "elsewhere", seed=99)
    return {"base": base_dir, "a": tmp / "given" / "a", "b": tmp / "given" / "b", "root": tmp / "root",
            "elsewhere": tmp / "elsewhere", "tmp": tmp}


class Oracle:
    """Greedy text of one request alone, with its adapter, through plain `model.generate`."""

    def __init__(self, disk) -> None:
        self.disk = disk
        self.tok = load_tokenizer(str(disk["base"]))
        self.model = AutoModelForCausalLM.from_pretrained(disk["base"]).eval()
        self.cache: dict = {}

    def path(self, adapter: str) -> Path:
        return self.disk[adapter] if adapter in ("a", "b") else self.disk["root"] / adapter

    def ids(self, adapter: str | None, prompt: str | list[dict], n: int) -> list[int]:
        key = (adapter, str(prompt), n)
        if key not in self.cache:
            text = prompt if isinstance(prompt, str) else self.tok.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True)
            x = torch.tensor([self.tok(text, add_special_tokens=isinstance(prompt, str))["input_ids"]])
            if adapter is not None and adapter not in lorakit.adapter_names(self.model):
                lorakit.load_adapter(self.model, self.path(adapter), name=adapter)
            with lorakit.using(self.model, [adapter]), torch.no_grad():
                out = self.model.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=self.tok.pad_token_id,
                                          eos_token_id=sorted(eos_ids(self.model, self.tok)))
            self.cache[key] = out[0, x.shape[1]:].tolist()
        return self.cache[key]

    def text(self, adapter: str | None, prompt: str | list[dict], n: int) -> str:
        return self.tok.decode(self.ids(adapter, prompt, n), skip_special_tokens=True)


@pytest.fixture(scope="module")
def oracle(disk):
    return Oracle(disk)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def lorakit_serve(args: list[str], env: dict | None = None, timeout: float = 120.0):
    """`python -m lorakit serve ARGS --port P` in a subprocess; yields its base URL once /health answers."""
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"lorakit-serve-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", *args, "--port", str(port),
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"lorakit serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("lorakit serve did not answer /health in time")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        tail = log.read()
        log.close()
        if "Traceback" in tail:
            print(f"lorakit serve log:\n{tail[-5000:]}")


@contextmanager
def serve_in_thread(app):
    """The app on uvicorn in a thread of this process (no start-up import cost); yields its base URL."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
