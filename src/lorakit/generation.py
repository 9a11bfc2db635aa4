"""Text generation with adapters: the one helper every command uses (generate, chat, the trainer's
exact-match evaluation, the server), and the sampling options they share.

    prompts ──chat template──► text ──tokenize──► ids ──engine (rows routed per adapter)──► new text

`Sampling` (sampling.py) holds the options a user sets (max new tokens, temperature, top-p, seed,
stop strings); `generate` runs a list of prompts, each row with its own adapter: a causal LM on the
continuous-batching engine (`lorakit.engine`), other models through `model.generate` and
`adapters.using`. Encoder-decoder models (T5) take the prompt as the encoder input, without a
chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .adapters import using
from .engine import Engine, Row, supports
from .sampling import Sampling, cut_at_stop

Prompt = str | list[dict[str, Any]]  # raw text, or OpenAI-style chat messages


def prompt_text(tokenizer: Any, prompt: Prompt, chat: bool = True) -> str:
    """The text a model sees for `prompt`: chat messages through the tokenizer's template."""
    if isinstance(prompt, str):
        if not chat or getattr(tokenizer, "chat_template", None) is None:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], sampling: Sampling = Sampling(),
             rows: Sequence[str | None] | str | None = None, streamer: Any = None, *,
             max_batch_size: int | None = None, progress: bool = False) -> list[str]:
    """Generate for a batch of prompts; returns only the new text of each row (special tokens dropped).

    A causal LM runs on the continuous-batching engine (`lorakit.engine`): each row stops at its
    own EOS or stop string and leaves the batch, and a waiting row takes its place. Other models
    (encoder-decoders such as T5) run `model.generate` in chunks of `max_batch_size`.

    Args:
        prompts: raw texts or chat message lists; a causal LM gets them through its chat template.
        rows: which adapters to use (`adapters.using`): None for whatever is active, one name for
            every row, or one name per row (None in the list: the base model for that row).
        streamer: a transformers streamer (one-row batches only), e.g. for a terminal chat.
        max_batch_size: rows generated together at most (default: all of them).
        progress: show a progress bar over the rows.
    With `sampling.seed`, row i draws from its own generator seeded `seed + i`, so a row's text does
    not depend on the other rows in the batch.
    """
    if not prompts:
        return []
    names = [rows] * len(prompts) if isinstance(rows, str) else rows
    if names is not None and len(names) != len(prompts):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(names)} adapter names in rows=")
    if streamer is not None and len(prompts) != 1:
        raise ValueError(f"generate: a streamer takes one prompt at a time, got {len(prompts)}")
    size = max_batch_size or len(prompts)
    if not supports(model):
        out: list[str] = []
        for start in _bar(range(0, len(prompts), size), progress, "batches"):
            chunk = None if names is None else names[start:start + size]
            out += _generate_hf(model, tokenizer, prompts[start:start + size], sampling, chunk, streamer)
        return out
    return _generate_engine(model, tokenizer, prompts, sampling, names, size, streamer, progress)


def _generate_engine(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], sampling: Sampling,
                     names: Sequence[str | None] | None, size: int, streamer: Any, progress: bool) -> list[str]:
    """`generate` for a causal LM: every prompt a row of one continuous batch of at most `size` rows."""
    ids = tokenizer([prompt_text(tokenizer, p) for p in prompts], add_special_tokens=False)["input_ids"]
    batch = [Row(row_ids, adapter=None if names is None else names[i],
                 sampling=sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + i))
             for i, row_ids in enumerate(ids)]
    bar = _bar(None, progress, "rows", total=len(batch))
    if streamer is not None:
        streamer.put(torch.tensor([batch[0].prompt]))               # as model.generate: the prompt first
    streamed = 0

    def on_step(changed: list) -> None:
        nonlocal streamed
        if streamer is not None:
            for token in batch[0].tokens[streamed:]:                 # a step may add two (prefill + decode)
                streamer.put(torch.tensor([[token]]))
            streamed = len(batch[0].tokens)
        if bar is not None:
            bar.update(sum(row.done for row in changed))

    was_training = model.training
    model.eval()
    try:
        Engine(model, tokenizer, max_batch_size=size, routed=names is not None).run(batch, on_step=on_step)
    finally:
        model.train(was_training)
        if streamer is not None:
            streamer.end()
        if bar is not None:
            bar.close()
    return [row.text.strip() for row in batch]


def _bar(items: Any, progress: bool, unit: str, total: int | None = None) -> Any:
    """A tqdm bar over `items` (or a manual one of `total` when items is None), if `progress`."""
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc="generating", unit=unit, leave=False)


def _generate_hf(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], sampling: Sampling,
                 rows: Sequence[str | None] | None, streamer: Any) -> list[str]:
    """One batch through `model.generate` (models the engine does not run, e.g. T5)."""
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    texts = [_source(p) if encoder_decoder else prompt_text(tokenizer, p) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "right" if encoder_decoder else "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=encoder_decoder)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    with using(model, rows):
        out = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                             **sampling.generate_kwargs())
    new = out if encoder_decoder else out[:, enc["input_ids"].shape[1]:]
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    return [cut_at_stop(t, sampling.stop)[0] for t in texts]


def _source(prompt: Prompt) -> str:
    """An encoder-decoder's input: the text, or the last user message of a chat."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
