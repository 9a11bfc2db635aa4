"""The HTTP routes of `lorakit serve` (FastAPI) over a `Server`; see `server.py` for the picture."""

from __future__ import annotations

import asyncio
import base64
import hmac
import importlib.resources
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import (APIError, ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest, chunk,
                       new_id, response, sse, usage, usage_chunk, validation_message)
from .registry import check_name
from .scheduler import Event, Ticket
from .server import Server
from . import __doc__ as SERVER_DOC

OPEN_PATHS = {"/health"}


class ClientGone(Exception):
    """The client closed the connection while its request was waiting."""


def create_app(server: Server, api_key: str | None = None) -> FastAPI:
    """The application: OpenAI/vLLM endpoints, the playground, health and metrics."""
    app = FastAPI(title="lorakit serve", description=SERVER_DOC)
    if api_key:
        app.add_middleware(KeyCheck, key=api_key)
    _errors(app)

    @app.get("/health")
    def health() -> JSONResponse:
        alive = server.scheduler.alive
        return JSONResponse({"status": "ok" if alive else "scheduler stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse)
    def playground() -> HTMLResponse:
        return HTMLResponse(importlib.resources.files(__package__).joinpath("playground.html").read_text("utf-8"))

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": server.model_cards()}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await _answer(server, "text", req, request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Response:
        return await _answer(server, "chat", req, request)

    @app.post("/v1/load_lora_adapter")
    async def load(req: LoadAdapterRequest) -> PlainTextResponse:
        name = check_name(req.lora_name)
        path = server.registry.resolve(req.lora_path)
        await asyncio.wrap_future(server.scheduler.call(lambda: server.registry.add(name, path)))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(req: UnloadAdapterRequest) -> PlainTextResponse:
        await asyncio.wrap_future(server.scheduler.call(lambda: server.registry.remove(req.lora_name)))
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    return app


async def _answer(server: Server, kind: str, req: ChatRequest | CompletionRequest, request: Request) -> Response:
    """Queue the request's row; answer once it ends, or stream it from its first text on."""
    row = server.row_for(req)
    ticket = Ticket(row, asyncio.get_running_loop())
    server.scheduler.submit(ticket)
    rid, used = new_id(kind), lambda e: usage(len(row.prompt), e.tokens)
    try:
        first = await _next(ticket, request)                          # errors still get their status code
        if first.error is not None:
            raise first.error
        if not req.stream:
            text, event = first.delta, first
            while event.finish is None:
                event = await _next(ticket, request)
                text += event.delta
            if event.error is not None:
                raise event.error
            return JSONResponse(response(kind, rid, req.model, text, event.finish, used(event)))
    except ClientGone:
        row.cancelled = True
        return Response(status_code=499)
    except BaseException:
        row.cancelled = True
        raise
    return StreamingResponse(_stream(kind, rid, req, ticket, first, used), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream(kind: str, rid: str, req: ChatRequest | CompletionRequest, ticket: Ticket, event: Event,
                  used: Any) -> AsyncIterator[str]:
    """OpenAI's server-sent events: (a role chunk,) text chunks, a finish chunk, (usage,) [DONE]."""
    with_usage = req.include_usage
    try:
        if kind == "chat":
            yield sse(chunk(kind, rid, req.model, None, first=True, with_usage=with_usage))
        while True:
            if event.error is not None:
                yield sse(event.error.body())
                break
            if event.delta:
                yield sse(chunk(kind, rid, req.model, event.delta, with_usage=with_usage))
            if event.finish is not None:
                yield sse(chunk(kind, rid, req.model, None, finish=event.finish, with_usage=with_usage))
                if with_usage:
                    yield sse(usage_chunk(kind, rid, req.model, used(event)))
                break
            event = await ticket.events.get()
        yield sse("[DONE]")
    finally:  # the client went away (or the stream ended): drop the row at the next step
        ticket.row.cancelled = True


async def _next(ticket: Ticket, request: Request) -> Event:
    """The ticket's next event; ClientGone if the client disconnects while waiting."""
    while True:
        try:
            return await asyncio.wait_for(ticket.events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone from None


def _errors(app: FastAPI) -> None:
    """Every error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(e.errors()))
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)


class KeyCheck:
    """ASGI middleware: every path but /health needs the key, as `Authorization: Bearer KEY` (API
    clients) or HTTP Basic with the key as password (a browser opening the playground asks for it)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._ok(scope):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization")
        message = ("wrong API key" if given else "missing API key") + ": send the header 'Authorization: Bearer KEY' " \
                  "(the key given to lorakit serve with --api-key or LORAKIT_API_KEY)"
        headers = {"WWW-Authenticate": 'Basic realm="lorakit serve"'} if scope["path"] == "/" else None
        body = APIError(401, message, code="invalid_api_key").body()
        await JSONResponse(body, status_code=401, headers=headers)(scope, receive, send)

    def _ok(self, scope: dict) -> bool:
        value = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = value.partition(b" ")
        if scheme.lower() == b"basic":
            try:
                given = base64.b64decode(given.strip(), validate=True).partition(b":")[2]
            except ValueError:
                return False
        elif scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(given.strip(), self.key)
