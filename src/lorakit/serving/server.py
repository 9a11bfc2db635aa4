"""The server's core: requests in, the engine's scheduler thread, answers out (see the package doc)."""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from ..engine import Engine, Row
from ..generation import prompt_text
from ..sampling import Sampling
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest
from .registry import Registry
from .scheduler import Scheduler


class Server:
    """What one `lorakit serve` holds: the model's scheduler thread, its adapters, its metrics.

    Args:
        base_id: the base model's name in the API (`model` of a request, the first card of /v1/models).
        adapters: {name: folder} loaded at start (their folders become allowed roots).
        adapter_root: every subfolder is servable by its name, loaded on first use.
        max_loras: adapters in memory at most (default 8, or as many as `adapters`).
        max_batch_size: rows decoded together at most.
        max_model_len: prompt + completion tokens per request at most (default and ceiling: the
            model's position limit).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, base_id: str, adapters: dict[str, str] | None = None,
                 adapter_root: str | None = None, max_loras: int | None = None, max_batch_size: int = 16,
                 max_model_len: int | None = None, max_prefill_tokens: int = 4096,
                 prefix_cache_tokens: int = 4096) -> None:
        self.model, self.tokenizer, self.base_id = model.eval(), tokenizer, base_id
        positions = getattr(model.config, "max_position_embeddings", None) or 2**31
        if max_model_len is not None and max_model_len < 2:
            raise ValueError(f"--max-model-len must be at least 2, got {max_model_len}")
        self.max_model_len = min(max_model_len or positions, positions)
        self.registry = Registry(model, base_id, adapters, adapter_root,
                                 max_loras=max_loras or max(8, len(adapters or {})))
        self.metrics = Metrics()
        engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens,
                        max_model_len=self.max_model_len, prefix_cache_tokens=prefix_cache_tokens)
        self.scheduler = Scheduler(engine, self.registry, self.metrics)
        self.started = int(time.time())

    def stop(self) -> None:
        self.scheduler.stop()

    # --- requests into rows -------------------------------------------------------------------------
    def adapter_of(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base model); 404 naming the known ones."""
        if model == self.base_id:
            return None
        if self.registry.path_of(model) is None:
            known = [self.base_id, *self.registry.names()]
            raise APIError(404, f"The model {model!r} does not exist. Known models: {known}", param="model",
                           code="model_not_found")
        return model

    def row_for(self, req: ChatRequest | CompletionRequest) -> Row:
        """Validate, template and tokenize a request; 400 for anything the engine cannot take."""
        problem = req.unsupported()
        if problem:
            raise APIError(400, problem, param=problem.split(":")[0])
        adapter = self.adapter_of(req.model)
        if isinstance(req, ChatRequest):
            ids, param = self._chat_ids(req), "messages"
            wanted, default = req.max_completion_tokens or req.max_tokens, None
        else:
            ids, param = self._prompt_ids(req), "prompt"
            wanted, default = req.max_tokens, 16                           # OpenAI's default for completions
        room = self.max_model_len - len(ids)
        if room < 1:
            raise APIError(400, f"{param}: the prompt has {len(ids)} tokens; this server takes at most "
                                f"{self.max_model_len - 1} (--max-model-len {self.max_model_len}, one token left to "
                                f"answer); shorten it", param=param, code="context_length_exceeded")
        if wanted is not None and wanted > room:
            raise APIError(400, f"max_tokens: {wanted} is more than the {room} tokens left for the answer "
                                f"(--max-model-len {self.max_model_len} - {len(ids)} prompt tokens)",
                           param="max_tokens")
        sampling = Sampling(max_new_tokens=wanted or min(default or room, room),
                            temperature=1.0 if req.temperature is None else req.temperature,
                            top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=req.stops())
        return Row(ids, adapter=adapter, sampling=sampling, stream=req.stream)

    def _chat_ids(self, req: ChatRequest) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError(400, "this model has no chat template; use /v1/completions with a plain prompt",
                           param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = prompt_text(self.tokenizer, messages)
        except Exception as e:  # the template refused the conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template cannot render them: {e}", param="messages") from e
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prompt_ids(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            vocab = len(self.tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt: token ids must be in [0, {vocab}), got {bad[:5]}", param="prompt")
            return list(prompt)
        text = prompt[0] if isinstance(prompt, list) and prompt else prompt
        ids = self.tokenizer(text or "", add_special_tokens=True)["input_ids"] if text else []
        if not ids:
            raise APIError(400, "prompt: the prompt is empty; send some text", param="prompt")
        return ids

    # --- cards ------------------------------------------------------------------------------------------
    def model_cards(self) -> list[dict[str, Any]]:
        """GET /v1/models: the base, then every adapter (`parent` = the base; no server path)."""
        card = {"object": "model", "created": self.started, "owned_by": "lorakit"}
        base = {"id": self.base_id, **card, "root": self.base_id, "parent": None, "max_model_len": self.max_model_len}
        return [base] + [{"id": name, **card, "root": name, "parent": self.base_id,
                          "max_model_len": self.max_model_len} for name in self.registry.names()]
