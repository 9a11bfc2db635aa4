"""Fixtures for the command tests: tiny model folders and data files, built once per module."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import byte_tokenizer, minilm_dir, tiny_t5, write_chat

from lorakit.cli import main

WORDS = ["abc", "hello", "lora", "kit", "tiny", "model"]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory):
    """A tiny T5 saved with the byte tokenizer: a stand-in for flan-t5 (LoRA targets q and v)."""
    d = tmp_path_factory.mktemp("t5")
    tok = byte_tokenizer(chat_template=None)
    model = tiny_t5(vocab=len(tok), d_model=32)
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    for config in (model.config, model.generation_config):  # pad starts the decoder, as in T5; eos ends it
        config.pad_token_id = config.decoder_start_token_id = tok.pad_token_id
        config.eos_token_id = tok.eos_token_id
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Data files: chat rows, source/target rows (reverse the word), text/label rows (sentiment)."""
    d = tmp_path_factory.mktemp("data")
    cls = [{"text": f"{w} movie, really {w}", "label": lab} for w, lab in
           [("great", "pos"), ("awful", "neg"), ("lovely", "pos"), ("boring", "neg")] * 6]
    return {"chat": write_chat(d / "chat.jsonl"),
            "s2s": write_jsonl(d / "s2s.jsonl", [{"source": w, "target": w[::-1]} for w in WORDS * 4]),
            "cls": write_jsonl(d / "cls.jsonl", cls)}


@pytest.fixture(scope="session")
def t5_run(t5_dir, data, tmp_path_factory):
    """A T5 LoRA adapter on q and v (flan-t5's usual targets), trained by `lorakit sft` on source/target rows."""
    out = tmp_path_factory.mktemp("t5run") / "run"
    assert main(["sft", "--model", str(t5_dir), "--dataset", data["s2s"], "--target-modules", "q", "v",
                 "--lora-rank", "8", "--max-steps", "30", "--learning-rate", "1e-2", "--batch-size", "8",
                 "--lora-dropout", "0", "--output-dir", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def cls_run(data, tmp_path_factory):
    """A BERT (all-MiniLM-L6-v2) sentiment classifier trained by `lorakit sft` on text/label rows."""
    out = tmp_path_factory.mktemp("clsrun") / "run"
    assert main(["sft", "--model", str(minilm_dir()), "--dataset", data["cls"], "--target-modules", "query,value",
                 "--lora-rank", "4", "--max-steps", "12", "--learning-rate", "5e-3", "--batch-size", "8",
                 "--lora-dropout", "0", "--output-dir", str(out)]) == 0
    return out
