"""`lorakit chat` as a user runs it (stdin is the keyboard): switching adapters, streaming, T5, and
the one sentence for a classifier. The replies are checked against PEFT."""

import io
import sys

import pytest
from cli.oracles import peft_t5, t5_generate
from peft import PeftModel
from tiny import make_adapter
from transformers import AutoModelForCausalLM

from lorakit.cli import main
from lorakit.generation import generate
from lorakit.sampling import Sampling
from lorakit.models import load_tokenizer


def chat(monkeypatch, capsys, args, typed) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    capsys.readouterr()
    assert main(["chat", *args]) == 0
    return capsys.readouterr().out


def test_chat_switches_adapters_and_streams(base_dir, tmp_path, monkeypatch, capsys):
    make_adapter(base_dir, tmp_path / "a", seed=1)
    out = chat(monkeypatch, capsys, ["--model", str(base_dir), "--adapter", f"a={tmp_path / 'a'}", "--max-new-tokens",
                                     "3"], "hi\n/adapter nope\n/base\nhi\n/exit\n")
    assert "[a] you>" in out and "[base] you>" in out
    assert "unknown adapter name(s) ['nope']; this model has ['a']" in out  # the core's check, printed
    tok, three = load_tokenizer(str(base_dir)), Sampling(max_new_tokens=3)
    with_a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "a")).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    first = generate(with_a, tok, [[{"role": "user", "content": "hi"}]], three)[0]
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "hi"}]  # the chat keeps the conversation
    replies = [line.split("assistant> ", 1)[1] for line in out.splitlines() if "assistant> " in line]
    assert replies == [first, generate(base, tok, [history], three)[0]]


def test_chat_with_a_t5_adapter_from_sft(t5_dir, t5_run, monkeypatch, capsys):
    out = chat(monkeypatch, capsys, ["--adapter", str(t5_run), "--max-new-tokens", "6"], "hello\nlora\n/exit\n")
    replies = [line.split("assistant> ", 1)[1].strip() for line in out.splitlines() if "assistant> " in line]
    peft = peft_t5(t5_dir, t5_run)
    assert replies == [t5_generate(peft, t5_dir, "hello"), t5_generate(peft, t5_dir, "lora")]


def test_chat_refuses_a_classifier_in_one_sentence(cls_run, capsys):
    capsys.readouterr()
    assert main(["chat", "--adapter", str(cls_run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("lorakit chat: error: BertForSequenceClassification is a sequence classifier; lorakit chat runs "
                   "causal and seq2seq LMs. Label text with `lorakit generate --prompt TEXT` instead")


@pytest.mark.parametrize("flag", ["--prompt", "--output"])
def test_chat_has_no_generate_only_flags(flag, capsys):
    with pytest.raises(SystemExit):
        main(["chat", flag, "x"])
    assert capsys.readouterr().err.startswith("usage: lorakit chat")
