r"""Chat rows: OpenAI messages from the chat-like row shapes, and which tokens are the assistant's.

Few chat templates carry a ``{% generation %}`` block, so the assistant spans are found from the
template's own output, by rendering the conversation incrementally and comparing texts::

    render(messages[:i], add_generation_prompt=True)  ...Hi<|im_end|>\n<|im_start|>assistant\n
    render(messages[:i + 1])                          ...Hi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n
                                                                                              └─ turn i ─────┘
Both must be prefixes of the rendering of the whole conversation (a template renders the start of a
conversation as the start of its text). The characters between their ends are assistant turn ``i``:
its content and its end-of-turn token, less the whitespace the template writes after that token.
The whole text is then tokenised once, and a token is trained when its characters overlap a span,
so a token that straddles an edge (``"\n\n"`` made of the header's newline and the answer's) still
counts. Tokenizers without character offsets get the edges by tokenising the text up to each edge,
which must give a token prefix of the whole.

Some templates render a turn differently when it is the last one: they close the conversation with
EOS, or keep the reasoning only there. Then the turn ends where the two texts part (plus the
end-of-turn token if they part within the content), or, when they part at its very start, at the
first end-of-turn token after it. A turn whose start is not found (an assistant message first) is
located by its content in the final text, plus the special token right after it. A turn found in
none of these ways raises ``ValueError``.
"""

from __future__ import annotations

import os
from typing import Any

Message = dict[str, Any]
Span = tuple[int, int]  # [start, end) character offsets into the rendered text

CHAT_SHAPES = ("messages", "conversations", "alpaca", "prompt_completion")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def to_messages(row: dict, shape: str, where: str = "row") -> list[Message]:
    """Normalise a chat-like row to OpenAI messages: ``[{"role": ..., "content": ...}, ...]``.

    Args:
        row: one dataset row of a shape in ``CHAT_SHAPES``.
        shape: its shape, from ``lorakit.data.detect_shape``.
        where: names the row in errors ("train.jsonl line 17").
    """
    if shape not in CHAT_SHAPES:
        raise ValueError(f"{where}: shape {shape!r} is not a chat shape; chat shapes are {CHAT_SHAPES}")
    if shape == "prompt_completion" and isinstance(row["prompt"], list):  # conversational: two message lists
        return to_messages({"messages": row["prompt"] + _turns(row, "completion", where)}, "messages", where)
    pairs = _PAIRS[shape](row, where)  # [(role, content)]
    for role, content in pairs:
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; use one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: a {role} message's content must be a string, got {type(content).__name__}")
    return [{"role": role, "content": content} for role, content in pairs]


def _openai_pairs(row: dict, where: str) -> list[tuple[Any, Any]]:
    return [(_field(m, "role", where), _field(m, "content", where)) for m in _turns(row, "messages", where)]


def _sharegpt_pairs(row: dict, where: str) -> list[tuple[Any, Any]]:
    pairs = []
    for m in _turns(row, "conversations", where):
        speaker = _field(m, "from" if "from" in m else "role", where)
        if speaker not in SHAREGPT_ROLES:
            raise ValueError(f"{where}: unknown speaker {speaker!r} in 'conversations'; "
                             f"use one of {sorted(SHAREGPT_ROLES)}")
        pairs.append((SHAREGPT_ROLES[speaker], _field(m, "value" if "value" in m else "content", where)))
    return pairs


def _alpaca_pairs(row: dict, where: str) -> list[tuple[Any, Any]]:
    instruction = text_field(row["instruction"], "instruction", where)
    extra, system = text_field(row.get("input"), "input", where), text_field(row.get("system"), "system", where)
    pairs = [("system", system)] if system else []
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return pairs + [("user", prompt), ("assistant", text_field(row["output"], "output", where))]


def _prompt_completion_pairs(row: dict, where: str) -> list[tuple[Any, Any]]:
    return [("user", text_field(row["prompt"], "prompt", where)),
            ("assistant", text_field(row["completion"], "completion", where))]


_PAIRS = {"messages": _openai_pairs, "conversations": _sharegpt_pairs, "alpaca": _alpaca_pairs,
          "prompt_completion": _prompt_completion_pairs}


def _turns(row: dict, key: str, where: str) -> list[dict]:
    turns = row[key]
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError(f"{where}: {key!r} must be a list of objects, got {type(turns).__name__}")
    return turns


def _field(turn: dict, key: str, where: str) -> Any:
    if key not in turn:
        raise ValueError(f"{where}: a turn has no {key!r} (it has keys {sorted(turn)})")
    return turn[key]


def text_field(value: Any, key: str, where: str) -> str:
    """A text field; missing is empty and numbers become text (``"output": 42``)."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def render(messages: list[Message], tokenizer: Any, add_generation_prompt: bool = False) -> str:
    """The chat template's text for ``messages``."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, so chat rows "
            "(messages, conversations, instruction/output, prompt/completion) cannot be rendered; "
            "use a chat (instruct) model, set tokenizer.chat_template, or train on plain 'text' rows"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(messages: list[Message], tokenizer: Any) -> tuple[str, list[Span]]:
    """Render ``messages`` and find the character span of every assistant turn.

    Returns:
        The rendered text and one ``(start, end)`` span per assistant message, in order.
    """
    text = render(messages, tokenizer)
    added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)  # special tokens, longest first
    spans: list[Span] = []
    cursor = 0  # spans come in order and never overlap
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = _incremental_span(messages, i, text, tokenizer, added)
        if span is None or span[0] < cursor:
            span = _content_span(text, message["content"], cursor, added)
        if span is None:
            raise ValueError(
                f"cannot locate assistant message {i} in the chat template's output: the template "
                "renders it differently once later turns follow, and its content does not appear "
                f"verbatim in the text (content starts {message['content'][:40]!r})"
            )
        spans.append(span)
        cursor = span[1]
    return text, spans


def _incremental_span(
    messages: list[Message], i: int, text: str, tokenizer: Any, added: list[str]
) -> Span | None:
    """Span of assistant turn ``i`` from two partial renderings; None if its start is not found."""
    if i == 0:  # a template cannot render an empty conversation
        return None
    before = render(messages[:i], tokenizer, add_generation_prompt=True)
    if not text.startswith(before):
        return None
    start, upto = len(before), render(messages[: i + 1], tokenizer)
    common = _common_prefix(upto, text, added)
    if common == len(upto):  # the usual case: the turn renders the same as a past turn
        return start, max(start, len(upto.rstrip()))  # less the newline after the end-of-turn token
    if common > start:  # the texts part within or after the turn, e.g. EOS closes a final turn only
        end = max(start, len(text[:common].rstrip()))
        if not any(text.endswith(t, 0, end) for t in added):  # parted within the content
            end += len(next((t for t in added if text.startswith(t, end)), ""))  # + its end-of-turn token
        return start, end
    # The turn renders differently as a past turn (e.g. without its reasoning): it ends at the first
    # end-of-turn token after its start, the special token that ends it as the last turn.
    marker = next((t for t in added if upto.rstrip().endswith(t)), None)
    end = text.find(marker, start) if marker else -1
    return (start, end + len(marker)) if end >= 0 else None


def _common_prefix(a: str, b: str, added: list[str]) -> int:
    """Length of the common prefix of ``a`` and ``b``, never ending inside a special token."""
    common = len(os.path.commonprefix([a, b]))
    while True:  # "<|im_end|>" and "<|im_start|>" share "<|": back off to the token's start
        cut = [q for s in (a, b) for t in added
               if 0 <= (q := s.find(t, max(0, common - len(t) + 1), common + len(t))) < common < q + len(t)]
        if not cut:
            return common
        common = min(cut)


def _content_span(text: str, content: str, cursor: int, added: list[str]) -> Span | None:
    """Span of ``content`` found verbatim after ``cursor``, plus the special token that follows it."""
    if not content.strip():
        return (cursor, cursor)  # nothing to train on; the row will be counted as answer-less
    for needle in (content, content.strip()):  # many templates trim the content
        start = text.find(needle, cursor)
        if start >= 0:
            end = start + len(needle)
            follower = next((t for t in added if text.startswith(t, end)), "")
            return start, end + len(follower)
    return None


def tokenize_chat(messages: list[Message], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered chat and, per token, whether it belongs to an assistant turn.

    The ids are those of ``tokenizer.apply_chat_template(messages)``: the rendered text tokenised
    with ``add_special_tokens=False`` (the template writes its own BOS).
    """
    text, spans = assistant_spans(messages, tokenizer)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask = [any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
        return list(enc["input_ids"]), mask
    return _mask_by_prefix(text, spans, tokenizer)


def _mask_by_prefix(text: str, spans: list[Span], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token edges of each span by tokenising ``text[:edge]``; for tokenizers without offsets."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    mask = [False] * len(ids)
    for a, b in spans:
        start, end = _token_edge(text, a, ids, tokenizer), _token_edge(text, b, ids, tokenizer)
        mask[start:end] = [True] * (end - start)
    return list(ids), mask


def _token_edge(text: str, char: int, ids: list[int], tokenizer: Any) -> int:
    head = tokenizer(text[:char], add_special_tokens=False)["input_ids"]
    if ids[: len(head)] != head:
        raise ValueError(
            f"the tokenizer merges tokens across an assistant-turn edge (at {text[max(0, char - 20):char + 20]!r})"
            " and gives no character offsets to resolve it; use a fast tokenizer (use_fast=True)"
        )
    return len(head)
