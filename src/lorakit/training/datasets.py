"""Datasets: read rows from local files, recognise their shape, tokenise them with labels, batch them.

    .jsonl .json .csv .parquet --load_rows--> rows --detect_shape--> shape
        chat shapes --to_messages--> messages --encode_chat--> Encoded (labels on assistant tokens)
        text | classification | seq2seq --encode_*--> Encoded
    build_dataset   all of that for a list of files; rows left with nothing to train are dropped, counted
    (batching.py    which rows train together, and padding them)

Labels follow the Hugging Face convention: -100 marks a token the loss ignores, and causal models
shift labels inside ``forward``, so position 0 is never predicted and never counts as trained.
Chat rows are normalised and masked in ``lorakit.chat``.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from jinja2 import TemplateError

from ..tasks import CAUSAL_LM, SEQ2SEQ, SEQ_CLS, TASKS
from .chat_template import text_field, to_messages, tokenize_chat

IGNORE_INDEX = -100
SHAPES = ("messages", "conversations", "alpaca", "prompt_completion", "text", "classification", "seq2seq")

# Detection order: the first shape whose keys a row has wins ("text" + "label" is classification).
_SHAPE_KEYS = {
    "messages": ("messages",),
    "conversations": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "seq2seq": ("source", "target"),
    "text": ("text",),
}
_SHAPE_EXAMPLES = {
    "messages": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "conversations": '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}',
    "alpaca": '{"instruction": "...", "input": "... (optional)", "output": "..."}',
    "prompt_completion": '{"prompt": "...", "completion": "..."}',
    "text": '{"text": "..."}',
    "classification": '{"text": "...", "label": "..."}',
    "seq2seq": '{"source": "...", "target": "..."}',
}
_TASK_SHAPES = {  # the first task listing a shape is the one `task_of_shape` picks for it
    CAUSAL_LM: ("messages", "conversations", "alpaca", "prompt_completion", "text"),
    SEQ_CLS: ("classification",),
    SEQ2SEQ: ("seq2seq", "prompt_completion"),
}


# ------------------------------------------------------------------------------------------ reading
def load_rows(path: str | Path) -> list[dict]:
    """Rows of a local .jsonl, .json (a list, or ``{"data": [...]}``), .csv or .parquet file."""
    return [row for _, row in _read_rows(path)]


def _read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """``(where, row)`` pairs, where ``where`` ("data.jsonl line 17") names the row in errors."""
    name, p = str(path), Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset file {name!r} {'is a directory' if p.is_dir() else 'does not exist'}")
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
               ".parquet": _read_parquet}
    if p.suffix.lower() not in readers:
        raise ValueError(f"{name}: unsupported dataset format {p.suffix!r}; use .jsonl, .json, .csv or .parquet")
    try:
        rows = readers[p.suffix.lower()](p, name)
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with named fields, got {type(row).__name__}")
    return rows


def _read_jsonl(p: Path, name: str) -> list[tuple[str, Any]]:
    rows = []
    with open(p, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{name} line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{name} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
    return rows


def _read_json(p: Path, name: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line: JSON Lines saved as .json
            return _read_jsonl(p, name)
        raise ValueError(f"{name} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        got = f"an object with keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(f'{name}: expected a list of rows or {{"data": [...]}}, got {got}')
    return [(f"{name} row {i}", row) for i, row in enumerate(data, 1)]


def _read_csv(p: Path, name: str) -> list[tuple[str, Any]]:
    rows = []
    with open(p, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            where = f"{name} line {reader.line_num}"
            if None in row:  # DictReader files surplus fields under the key None
                raise ValueError(f"{where}: more fields than the header's {len(reader.fieldnames or [])}")
            rows.append((where, row))
    return rows


def _read_parquet(p: Path, name: str) -> list[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(p)
    except (pyarrow.ArrowException, OSError) as e:
        raise ValueError(f"{name}: not a readable Parquet file ({e})") from None
    return [(f"{name} row {i}", row) for i, row in enumerate(table.to_pylist(), 1)]


def detect_shape(row: dict, where: str) -> str:
    """The shape of ``row``, one of ``SHAPES``; ``where`` names the row in the error when none fits."""
    if isinstance(row, dict):
        for shape, keys in _SHAPE_KEYS.items():
            if all(k in row for k in keys):
                return shape
    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
    accepted = "\n".join(f"  {s}: {_SHAPE_EXAMPLES[s]}" for s in SHAPES)
    raise ValueError(f"{where}: the row fits none of the accepted shapes; it has keys {keys}. "
                     f"Accepted shapes:\n{accepted}")


def task_of_shape(shape: str) -> str:
    """The task rows of this shape train: classification -> seq_cls, seq2seq -> seq2seq, else causal_lm."""
    return next(task for task, shapes in _TASK_SHAPES.items() if shape in shapes)


# ------------------------------------------------------------------------------------------ encoding
@dataclass
class Encoded:
    """One tokenised row."""

    input_ids: list[int]
    labels: list[int] | int
    """Causal: ``input_ids`` with -100 on untrained tokens. seq2seq: the target ids. seq_cls: the class id."""
    truncated: bool = False
    """Cut at ``max_length``."""
    answer_lost: bool = False
    """No trained token left (answer cut by truncation, empty, or absent): such rows are dropped."""
    answer_start: int | None = None
    """Position of the first trained token before truncation; None when there was nothing to train."""
    task: str = "causal_lm"

    @property
    def length(self) -> int:
        return max(len(self.input_ids), len(self.labels) if self.task == "seq2seq" else 0)

    @property
    def n_trained(self) -> int:
        """Labels the loss sees."""
        if self.task == "seq_cls":
            return 1
        labels = self.labels if self.task == "seq2seq" else self.labels[1:]  # causal: position 0 is never predicted
        return sum(label != IGNORE_INDEX for label in labels)


def _causal(ids: list[int], trained: list[bool], max_length: int) -> Encoded:
    answer_start = next((i for i, t in enumerate(trained) if t), None)
    truncated = len(ids) > max_length
    ids, trained = ids[:max_length], trained[:max_length]
    labels = [token if t else IGNORE_INDEX for token, t in zip(ids, trained)]
    return Encoded(ids, labels, truncated, answer_lost=not any(trained[1:]), answer_start=answer_start)


def _ids(tokenizer: Any, text: str, special: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def encode_chat(messages: list[dict], tokenizer: Any, max_length: int) -> Encoded:
    """A chat through the tokenizer's template; labels on every assistant turn and its end-of-turn token."""
    ids, trained = tokenize_chat(messages, tokenizer)
    return _causal(ids, trained, max_length)


def encode_text(text: str, tokenizer: Any, max_length: int) -> Encoded:
    """Plain text (continued pretraining): every token trained, EOS appended."""
    ids = _with_eos(_ids(tokenizer, text), tokenizer)
    return _causal(ids, [True] * len(ids), max_length)


def encode_prompt_completion(prompt: str, completion: str, tokenizer: Any, max_length: int) -> Encoded:
    """Prompt then completion with no chat template (base models); labels on the completion and EOS."""
    head, tail = _ids(tokenizer, prompt), _with_eos(_ids(tokenizer, completion, special=False), tokenizer)
    return _causal(head + tail, [False] * len(head) + [True] * len(tail), max_length)


def encode_classification(text: str, label: Any, tokenizer: Any, max_length: int,
                          label2id: dict[str, int] | None) -> Encoded:
    """Text and one class id; ``label2id`` maps labels, as text (``"1"`` for 1), to ids."""
    ids = _ids(tokenizer, text)
    if label2id is None:
        if not isinstance(label, int) or isinstance(label, bool):
            raise ValueError(f"label {label!r} is not a class id; pass label2id to map labels to ids")
        label_id = label
    elif _label_key(label) in label2id:
        label_id = label2id[_label_key(label)]
    else:
        raise ValueError(f"label {label!r} is not one of the known labels {sorted(label2id)}")
    return Encoded(ids[:max_length], label_id, len(ids) > max_length, answer_lost=not ids, answer_start=0,
                   task="seq_cls")


def encode_seq2seq(source: str, target: str, tokenizer: Any, max_length: int) -> Encoded:
    """Encoder-decoder row: ``input_ids`` over the source, ``labels`` the target ids and EOS."""
    src, tgt = _ids(tokenizer, source), _with_eos(_ids(tokenizer, target), tokenizer)
    return Encoded(src[:max_length], tgt[:max_length], len(src) > max_length or len(tgt) > max_length,
                   answer_lost=not tgt, answer_start=0, task="seq2seq")


def _label_key(label: Any) -> str:
    return label if isinstance(label, str) else str(label)


def _make_label2id(labels: list[Any]) -> dict[str, int]:
    """Integer labels 0..n-1 keep their value; any other labels are numbered in sorted order."""
    keys = set(map(_label_key, labels))
    if all(k.isdigit() for k in keys):
        ordered = sorted(keys, key=int)
        return {k: int(k) if int(ordered[-1]) == len(ordered) - 1 else i for i, k in enumerate(ordered)}
    return {k: i for i, k in enumerate(sorted(keys))}


# ------------------------------------------------------------------------------------------- dataset
@dataclass
class EncodedDataset:
    """Encoded rows ready for batching, with the numbers a run should report."""

    rows: list[Encoded]
    task: str
    max_length: int
    sources: list[str]
    n_rows: int = 0
    """Rows read from the files."""
    n_truncated: int = 0
    """Kept rows cut at ``max_length`` (the end of their answer is lost)."""
    n_answer_lost: int = 0
    """Rows dropped because no trained token was left."""
    n_trained_tokens: int = 0
    """Labels the loss sees over all kept rows (seq_cls: one per row)."""
    shapes: dict[str, int] = field(default_factory=dict)
    """Rows read, per shape."""
    label2id: dict[str, int] | None = None
    warnings: list[str] = field(default_factory=list)
    """Lines for the trainer to print: dropped and truncated rows."""

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Encoded:
        return self.rows[i]

    @property
    def lengths(self) -> list[int]:
        return [row.length for row in self.rows]

    def summary(self) -> str:
        shapes = ", ".join(f"{n} {s}" for s, n in self.shapes.items())
        return (f"{len(self)} rows from {', '.join(self.sources)} ({shapes}); "
                f"{self.n_trained_tokens:,} trained tokens; {self.n_truncated} truncated at {self.max_length}; "
                f"{self.n_answer_lost} dropped (no trained token)")


def build_dataset(paths: list[str] | str, tokenizer: Any, task: str = "causal_lm", max_length: int = 1024,
                  label2id: dict[str, int] | None = None, system: str | None = None) -> EncodedDataset:
    """Read, check and encode every row of ``paths`` for ``task`` (causal_lm | seq_cls | seq2seq).

    ``system``: a system prompt put first in every chat row that has none.

    Rows left with no trained token are dropped and counted, with a line in ``warnings``; when that
    is every row, ``ValueError`` says why, before any training starts.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"--max-length must be an integer of at least 2, got {max_length!r}")
    sources = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    records = [(where, row, _shape_for(task, row, where)) for path in sources for where, row in _read_rows(path)]
    if not records:
        raise ValueError(f"no rows in {', '.join(sources)}")
    if task == "seq_cls" and label2id is None:
        label2id = _make_label2id([row["label"] for _, row, _ in records])

    kept, dropped = [], []
    for where, row, shape in records:
        encoded = _encode_row(row, shape, tokenizer, task, max_length, label2id, where, system)
        (dropped if encoded.answer_lost else kept).append(encoded)
    if not kept:
        raise ValueError(f"all {len(records)} rows of {', '.join(sources)} have no trained token: "
                         + _drop_reasons(dropped, max_length, counts=False))
    dataset = EncodedDataset(
        kept, task, max_length, sources, n_rows=len(records), n_truncated=sum(e.truncated for e in kept),
        n_answer_lost=len(dropped), n_trained_tokens=sum(e.n_trained for e in kept),
        shapes=dict(Counter(shape for _, _, shape in records)), label2id=label2id,
    )
    if dropped:
        dataset.warnings.append(f"{len(dropped)} of {len(records)} rows have no trained token and were dropped: "
                                + _drop_reasons(dropped, max_length, counts=True))
    if dataset.n_truncated:
        dataset.warnings.append(f"{dataset.n_truncated} of {len(records)} rows were cut at --max-length "
                                f"{max_length}; the end of their answer is not trained")
    return dataset


def _shape_for(task: str, row: dict, where: str) -> str:
    shape = detect_shape(row, where)
    if shape not in _TASK_SHAPES[task]:
        fits = task_of_shape(shape)
        raise ValueError(f"{where}: a {shape} row cannot train task {task!r}, which takes "
                         f"{', '.join(_TASK_SHAPES[task])} rows; for {shape} rows use task {fits!r}")
    return shape


def _encode_row(row: dict, shape: str, tokenizer: Any, task: str, max_length: int,
                label2id: dict[str, int] | None, where: str, system: str | None = None) -> Encoded:
    def text(key: str) -> str:
        return text_field(row[key], key, where)

    try:
        if task == "seq_cls":
            return encode_classification(text("text"), row["label"], tokenizer, max_length, label2id)
        if task == "seq2seq":
            source, target = ("source", "target") if shape == "seq2seq" else ("prompt", "completion")
            return encode_seq2seq(text(source), text(target), tokenizer, max_length)
        if shape == "text":
            return encode_text(text("text"), tokenizer, max_length)
        if shape == "prompt_completion" and tokenizer.chat_template is None and isinstance(row["prompt"], str):
            return encode_prompt_completion(text("prompt"), text("completion"), tokenizer, max_length)
        messages = to_messages(row, shape, where)
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages
        return encode_chat(messages, tokenizer, max_length)
    except (ValueError, TemplateError) as e:
        if str(e).startswith(f"{where}:"):
            raise
        raise ValueError(f"{where}: {e}") from e


def _drop_reasons(dropped: list[Encoded], max_length: int, counts: bool) -> str:
    """Why rows have no trained token, by cause."""
    cut = [e.answer_start for e in dropped if e.answer_start is not None and e.answer_start >= max_length]
    empty = sum(e.answer_start is None for e in dropped)
    short = len(dropped) - len(cut) - empty
    reasons = []  # (rows, why)
    if cut:
        reasons.append((len(cut), f"the answer starts after --max-length {max_length} (median prompt length "
                                  f"{int(statistics.median(cut))} tokens); raise --max-length"))
    if empty:
        reasons.append((empty, "there is nothing to train on (an empty answer, text or target, "
                               "or no assistant turn)"))
    if short:
        reasons.append((short, "the row is a single token, which leaves nothing to predict"))
    return "; ".join(f"{n} rows: {why}" if counts else why for n, why in reasons)


# ------------------------------------------------------------------------------------------- preview
_GREEN, _RESET = "\x1b[1;32m", "\x1b[0m"


def preview(dataset_or_rows: EncodedDataset | Sequence[Encoded], tokenizer: Any, n: int = 3,
            color: bool = True) -> str:
    """A few rows as text with the trained tokens highlighted: green, or ``[[...]]`` when ``color=False``."""
    is_dataset = isinstance(dataset_or_rows, EncodedDataset)
    rows = list(dataset_or_rows.rows if is_dataset else dataset_or_rows)[:n]
    mark = (lambda s: f"{_GREEN}{s}{_RESET}") if color else (lambda s: f"[[{s}]]")
    lines = [dataset_or_rows.summary()] if is_dataset else []
    lines.append("trained tokens are " + ("green" if color else "inside [[ ]]"))
    id2label = {v: k for k, v in ((dataset_or_rows.label2id if is_dataset else None) or {}).items()}
    for k, row in enumerate(rows, 1):
        lines.append(f"--- row {k}: {len(row.input_ids)} tokens, {row.n_trained} trained"
                     + (", truncated" if row.truncated else ""))
        if row.task == "causal_lm":
            lines.append(_marked_runs(row.input_ids, [t != IGNORE_INDEX for t in row.labels], tokenizer, mark))
            continue
        lines.append(tokenizer.decode(row.input_ids, skip_special_tokens=False))
        if row.task == "seq_cls":
            lines.append(f"=> {mark(id2label.get(row.labels, row.labels))}")
        else:
            lines.append(f"=> {mark(tokenizer.decode(row.labels, skip_special_tokens=False))}")
    return "\n".join(lines)


def _marked_runs(ids: list[int], trained: list[bool], tokenizer: Any, mark: Callable[[str], str]) -> str:
    """Decode runs of equally-trained tokens, marking the trained ones."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            text = tokenizer.decode(ids[start:i], skip_special_tokens=False)
            out.append(mark(text) if trained[start] else text)
            start = i
    return "".join(out)
