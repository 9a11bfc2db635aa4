"""`lorakit serve`: one base model, many adapters, OpenAI-style HTTP endpoints.

    client ──► POST /v1/chat/completions {"model": "<adapter or 'base'>", ...}
                  │ queued
                  ▼
    batcher thread: waits up to --batch-wait-ms for up to --max-batch requests with the same
    sampling settings, then runs ONE generate() over all of them; rows that asked for different
    adapters are routed with lorakit.per_row, so many adapters share every forward pass.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
POST /v1/adapters {"name", "path"} (load at runtime), DELETE /v1/adapters/{name}.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, Field


BASE = "base"


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str = BASE
    messages: list[ChatMessage]
    max_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)


class CompletionRequest(BaseModel):
    model: str = BASE
    prompt: str
    max_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)


class AdapterRequest(BaseModel):
    name: str
    path: str


@dataclass
class Job:
    adapter: str | None
    text: str                      # fully rendered prompt
    max_tokens: int
    temperature: float
    top_p: float
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple:
        return (self.temperature, self.top_p)


class Engine:
    """Owns the model; a single worker thread runs batched generation."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, max_batch: int = 16, wait_ms: float = 10.0) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.wait = max_batch, wait_ms / 1000
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.lock = threading.Lock()  # adapter loading vs generation
        self.batches_run = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="lorakit-batcher", daemon=True)
        self.thread.start()

    def adapters(self) -> list[str]:
        from ..adapters import adapter_names

        return adapter_names(self.model)

    def submit(self, job: Job) -> Future:
        if job.adapter is not None and job.adapter not in self.adapters():
            raise KeyError(job.adapter)
        self.jobs.put(job)
        return job.future

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        pending: list[Job] = []
        while not self._stop.is_set():
            try:
                pending.append(self.jobs.get(timeout=0.05))
            except queue.Empty:
                if not pending:
                    continue
            deadline = time.monotonic() + self.wait
            while len(pending) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    pending.append(self.jobs.get(timeout=left))
                except queue.Empty:
                    break
            key = pending[0].key
            batch = [j for j in pending if j.key == key][: self.max_batch]
            pending = [j for j in pending if j not in batch]
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        try:
            with self.lock:
                texts = self._generate(batch)
            self.batches_run += 1
            for job, text in zip(batch, texts):
                job.future.set_result(text)
        except Exception as e:  # the error goes back to every waiting request
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)

    @torch.no_grad()
    def _generate(self, batch: list[Job]) -> list[tuple[str, int, int]]:
        from contextlib import nullcontext

        from .. import adapters as ad

        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok([j.text for j in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = side
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        names = [j.adapter for j in batch]
        has_adapters = bool(self.adapters())
        if not has_adapters:
            ctx = nullcontext()
        elif len(set(names)) == 1 and names[0] is not None:
            ad.set_adapter(self.model, names[0])
            ctx = nullcontext()
        elif len(set(names)) == 1:
            ctx = ad.disabled(self.model)
        else:
            ctx = ad.per_row(self.model, names)
        t = batch[0].temperature
        kw = {"do_sample": True, "temperature": t, "top_p": batch[0].top_p} if t > 0 else {"do_sample": False}
        with ctx:
            out = self.model.generate(**enc, max_new_tokens=max(j.max_tokens for j in batch),
                                      pad_token_id=tok.pad_token_id, **kw)
        width = enc["input_ids"].shape[1]
        results = []
        for i, job in enumerate(batch):
            new = out[i, width:width + job.max_tokens]
            if tok.eos_token_id is not None and (new == tok.eos_token_id).any():
                new = new[: int((new == tok.eos_token_id).nonzero()[0]) + 1]
            n_prompt = int(enc["attention_mask"][i].sum())
            results.append((tok.decode(new, skip_special_tokens=True).strip(), n_prompt, len(new)))
        return results


def create_app(engine: Engine):
    """The FastAPI application over an Engine (also used by the tests with TestClient)."""
    from fastapi import FastAPI, HTTPException

    app = FastAPI(title="lorakit serve", description=__doc__)

    def adapter_of(model: str) -> str | None:
        if model in (BASE, "", None):
            return None
        if model not in engine.adapters():
            raise HTTPException(404, f"unknown model {model!r}; available: {[BASE] + engine.adapters()}")
        return model

    def run(job: Job) -> tuple[str, int, int]:
        return engine.submit(job).result(timeout=600)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "adapters": engine.adapters(), "batches_run": engine.batches_run}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "lorakit"}
                                           for m in [BASE] + engine.adapters()]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> dict:
        adapter = adapter_of(req.model)
        msgs = [m.model_dump() for m in req.messages]
        text = engine.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        content, n_in, n_out = run(Job(adapter, text, req.max_tokens, req.temperature, req.top_p))
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}

    @app.post("/v1/completions")
    def complete(req: CompletionRequest) -> dict:
        adapter = adapter_of(req.model)
        content, n_in, n_out = run(Job(adapter, req.prompt, req.max_tokens, req.temperature, req.top_p))
        return {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "choices": [{"index": 0, "text": content, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}

    @app.post("/v1/adapters")
    def load(req: AdapterRequest) -> dict:
        from ..io import load_adapter

        if req.name == BASE or req.name in engine.adapters():
            raise HTTPException(409, f"an adapter named {req.name!r} is already loaded")
        try:
            with engine.lock:
                load_adapter(engine.model, req.path, name=req.name)
                engine.model.eval()
        except (FileNotFoundError, ValueError) as e:
            raise HTTPException(400, str(e)) from e
        return {"loaded": req.name, "adapters": engine.adapters()}

    @app.delete("/v1/adapters/{name}")
    def unload(name: str) -> dict:
        from ..adapters import delete_adapter

        if name not in engine.adapters():
            raise HTTPException(404, f"no adapter named {name!r}")
        with engine.lock:
            delete_adapter(engine.model, name)
        return {"deleted": name, "adapters": engine.adapters()}

    return app
