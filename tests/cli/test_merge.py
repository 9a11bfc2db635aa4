"""`lorakit merge` from the command line: a plain checkpoint that loads with transformers alone and
gives the adapted model's outputs (causal LM, T5, classifier), with or without a tokenizer."""

import shutil

import torch
from cli.oracles import peft_probs, peft_t5
from tiny import make_adapter, minilm_dir
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

from lorakit.cli import main

IDS = torch.tensor([[5, 17, 42, 99, 3, 250]])

def test_merge_writes_a_plain_checkpoint_with_the_same_outputs(base_dir, tmp_path):
    adapted = make_adapter(base_dir, tmp_path / "a", seed=1).eval()
    with torch.no_grad():
        want = adapted(IDS).logits
    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "a"),
                 "--output-dir", str(tmp_path / "merged")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k or "adapters" in k for k in plain.state_dict())
    with torch.no_grad():
        got = plain(IDS).logits
    assert (got - want).abs().max() < 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert list((tmp_path / "merged").glob("*.safetensors"))


def test_merge_refuses_a_non_empty_folder_without_force(base_dir, tmp_path, capsys):
    make_adapter(base_dir, tmp_path / "a", seed=1)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    args = ["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "a"), "--output-dir", str(tmp_path / "busy")]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    assert main(args + ["--force", "--dtype", "bfloat16"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "busy")
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert not (tmp_path / "busy" / "keep.txt").exists()


def test_merge_a_model_folder_without_tokenizer(base_dir, tmp_path, capsys):
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for f in base_dir.iterdir():
        if f.name.startswith(("config", "generation_config", "model")):
            shutil.copy(f, weights_only / f.name)
    adapted = make_adapter(weights_only, tmp_path / "a", seed=1).eval()
    with torch.no_grad():
        want = adapted(IDS).logits
    capsys.readouterr()
    assert main(["merge", "--model", str(weights_only), "--adapter", str(tmp_path / "a"),
                 "--output-dir", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "the base model has no tokenizer files" in out and "merged model only" in out
    assert not list((tmp_path / "merged").glob("tokenizer*"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, want, atol=1e-4, rtol=1e-4)


def test_merge_a_t5_adapter_from_sft(t5_dir, t5_run, tmp_path):
    assert main(["merge", "--adapter", str(t5_run), "--output-dir", str(tmp_path / "merged")]) == 0
    plain = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    ids, dec = torch.tensor([[5, 9, 40, 7]]), torch.tensor([[0, 12, 33]])
    with torch.no_grad():
        want = peft_t5(t5_dir, t5_run)(input_ids=ids, decoder_input_ids=dec).logits
        torch.testing.assert_close(plain(input_ids=ids, decoder_input_ids=dec).logits, want, atol=1e-4, rtol=1e-4)


def test_merge_a_classifier_keeps_its_class_names(cls_run, tmp_path):
    assert main(["merge", "--adapter", str(cls_run), "--output-dir", str(tmp_path / "merged")]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert plain.config.id2label == {0: "neg", 1: "pos"}
    texts = ["great movie, really great", "awful movie, really awful"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.vocab == AutoTokenizer.from_pretrained(str(minilm_dir())).vocab
    with torch.no_grad():
        got = plain(**tok(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
    torch.testing.assert_close(got, peft_probs(cls_run, texts), atol=1e-5, rtol=1e-4)

