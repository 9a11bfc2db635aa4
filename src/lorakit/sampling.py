"""Sampling options: what a user sets about how tokens are picked (the CLI, the server, the engine)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0 is greedy decoding."""

    max_new_tokens: int = 256
    """Tokens to generate at most per row."""
    temperature: float = 0.0
    """0: greedy (the most likely token); > 0: sample with this temperature."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens holding this much probability."""
    seed: int | None = None
    """Seed for sampling, so the same request gives the same text."""
    stop: tuple[str, ...] = ()
    """Cut the text at the first of these strings (not included)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop or ()))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments `model.generate` takes for these options."""
        if self.greedy:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p}


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


MIN_TEMPERATURE = 1e-4  # below it, sampling is greedy (logits / t would overflow to inf)


def pick_tokens(logits: Tensor, rows: Sequence[Any]) -> list[int]:
    """The next token of each row (an engine `Row`: its `.sampling` and `.generator`): argmax for
    greedy rows; else temperature, top-p, and a draw from the row's own generator (seeded
    requests) or torch's global one. logits: (rows, vocab)."""
    tokens = logits.argmax(-1).tolist()                                # (rows,)
    for i, row in enumerate(rows):
        s = row.sampling
        if s.greedy or s.temperature < MIN_TEMPERATURE:
            continue
        probs = torch.softmax(logits[i] / s.temperature, dim=-1)       # (vocab,)
        if s.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > s.top_p             # keep the smallest set holding top_p
            probs = probs.scatter(0, order[drop], 0.0)
        probs = probs.nan_to_num(0.0)                                   # a broken adapter must not stop the batch
        if probs.sum() > 0:
            tokens[i] = int(torch.multinomial(probs, 1, generator=row.generator))
    return tokens
