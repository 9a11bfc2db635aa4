"""The OpenAI wire format: request bodies (validated strictly), responses, stream chunks, errors.

Field names, defaults and shapes follow OpenAI's API (as vLLM serves it), so the `openai` client
works unchanged: `max_tokens` defaults to 16 for completions and to the room left in the context
for chat, `temperature` to 1. Fields lorakit cannot honour (`n` > 1, `logprobs`, penalties, tools,
...) get a 400 naming the field, never a silent wrong answer; unknown fields are ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               500: "server_error", 503: "server_error"}


class APIError(ValueError):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

    A ValueError, so the command line reports one raised at start-up (a damaged adapter) by its message.
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# --- requests -----------------------------------------------------------------------------------------
class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """What both endpoints take."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = Field(None, max_length=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    user: str | None = None
    # accepted only at their neutral values (a 400 names the field otherwise)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        """The first field set to something lorakit does not do, with what it takes instead."""
        if self.n != 1:
            return "n: lorakit returns one choice per request; send n=1 (or several requests)"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return f"{name}: penalties are not supported; leave {name} out or send 0"
        if self.logprobs not in (None, False, 0) or self.top_logprobs:
            return "logprobs: log-probabilities are not returned; leave logprobs out"
        if self.logit_bias:
            return "logit_bias: not supported; leave it out"
        return None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo: not supported; leave it out"
        if self.best_of not in (None, 1):
            return "best_of: not supported; leave it out"
        if self.suffix:
            return "suffix: not supported; leave it out"
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            return "prompt: one prompt per request (a list of several strings is a batch; send several requests)"
        return super().unsupported()


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None

    def unsupported(self) -> str | None:
        if self.tools:
            return "tools: tool calling is not supported; leave tools out"
        return super().unsupported()


class LoadAdapterRequest(Strict):
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(Strict):
    lora_name: str
    lora_int_id: int | None = None


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for pydantic's first error: names the field and what was wrong."""
    err = errors[0]
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    if err.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})", None
    param = ".".join(loc) or None
    got = err.get("input")
    shown = "" if err.get("type") == "missing" else f" (got {json.dumps(got)[:80] if _jsonable(got) else repr(got)[:80]})"
    return (f"{param}: {err.get('msg')}{shown}" if param else f"the request body: {err.get('msg')}{shown}"), param


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# --- responses ----------------------------------------------------------------------------------------
def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(kind: str, rid: str, model: str, text: str, finish: str, used: dict[str, int]) -> dict[str, Any]:
    """A whole (non-streamed) completion or chat completion."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": used}


def chunk(kind: str, rid: str, model: str, text: str | None, finish: str | None = None,
          first: bool = False, with_usage: bool = False) -> dict[str, Any]:
    """One streamed chunk; a chat stream's first chunk carries the role, its last an empty delta."""
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    out = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
           "created": int(time.time()), "model": model, "choices": [choice]}
    if with_usage:
        out["usage"] = None
    return out


def usage_chunk(kind: str, rid: str, model: str, used: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": used}


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event: `data: {...}` and a blank line."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"
