"""`lorakit generate` as a user runs it: causal LMs, T5 adapters trained by `lorakit sft`, the
inference YAML, classifiers, and the one-sentence refusal of a model it cannot run.

PEFT (or the plain transformers model) is the oracle for every output."""

import json

import pytest
import torch
from cli.oracles import peft_probs, peft_t5, t5_generate
from tiny import make_adapter, minilm_dir
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import lorakit
from lorakit.cli import main


def test_batch_file_routes_rows_to_their_adapters(base_dir, tmp_path):
    make_adapter(base_dir, tmp_path / "a", seed=1)
    make_adapter(base_dir, tmp_path / "b", seed=2)
    prompts = tmp_path / "p.jsonl"
    rows = [{"prompt": "hi", "adapter": "a"}, {"prompt": "hello", "adapter": "b"},
            {"prompt": "hey", "adapter": None}, {"prompt": "yo", "adapter": "a"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(base_dir), "--adapter", f"a={tmp_path / 'a'}", "--adapter",
                 f"b={tmp_path / 'b'}", "--prompts", str(prompts), "--output", str(out),
                 "--max-new-tokens", "5"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["adapter"] for g in got] == ["a", "b", None, "a"]

    # oracle: each row alone, with only its adapter (or none)
    from lorakit.generation import generate
    from lorakit.sampling import Sampling
    from lorakit.models import load_tokenizer

    tok = load_tokenizer(str(base_dir))
    for row, g in zip(rows, got):
        model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        if row["adapter"]:
            lorakit.load_adapter(model, tmp_path / row["adapter"])
        want = generate(model, tok, [[{"role": "user", "content": row["prompt"]}]], Sampling(max_new_tokens=5))[0]
        assert g["completion"] == want


def test_rows_naming_an_unknown_adapter_or_fighting_merge_are_refused(base_dir, tmp_path, capsys):
    make_adapter(base_dir, tmp_path / "a", seed=1)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi", "adapter": "zz"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    args = ["generate", "--model", str(base_dir), "--adapter", f"a={tmp_path / 'a'}", "--prompts", str(prompts)]
    assert main(args) == 2
    assert "unknown adapter name(s) ['zz']; this model has ['a']" in capsys.readouterr().err  # the core's check
    assert main(args + ["--merge"]) == 2
    assert "pick adapters, but --merge folds every adapter into one model" in capsys.readouterr().err


def test_missing_prompts_and_bad_rows_are_named(base_dir, cls_run, tmp_path, capsys):
    assert main(["generate", "--model", str(base_dir)]) == 2
    assert "give --prompt TEXT or --prompts FILE.jsonl" in capsys.readouterr().err
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    assert main(["generate", "--model", str(base_dir), "--prompts", str(rows)]) == 2
    assert "rows.jsonl line 2: a row needs 'prompt' or 'messages', has ['question']" in capsys.readouterr().err
    assert main(["generate", "--adapter", str(cls_run), "--prompts", str(rows)]) == 2
    assert "rows.jsonl line 2: a row needs 'text' or 'prompt', has ['question']" in capsys.readouterr().err


def test_inference_yaml_merged_equals_unmerged(base_dir, tmp_path, capsys):
    make_adapter(base_dir, tmp_path / "a", seed=1)
    cfg = tmp_path / "infer.yaml"
    cfg.write_text(f"model: {base_dir}\nmax_new_tokens: 4\n"
                   f"lora_config:\n  enabled: true\n  weights_path: {tmp_path / 'a'}\n  merge_and_unload: true\n")
    assert main(["generate", "--config", str(cfg), "--prompt", "hi"]) == 0
    merged_out = capsys.readouterr().out.strip()
    assert main(["generate", "--model", str(base_dir), "--adapter", str(tmp_path / "a"), "--prompt", "hi",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == merged_out


# --- T5 -------------------------------------------------------------------------------------------
def test_t5_adapter_from_sft_generates_as_peft(t5_dir, t5_run, capsys):
    cfg = json.loads((t5_run / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM" and {t.rsplit(".", 1)[-1] for t in cfg["target_modules"]} == {"q", "v"}
    capsys.readouterr()
    assert main(["generate", "--adapter", str(t5_run), "--prompt", "hello", "--max-new-tokens", "6"]) == 0
    got = capsys.readouterr().out.strip()
    assert got == t5_generate(peft_t5(t5_dir, t5_run), t5_dir, "hello")
    base = t5_generate(AutoModelForSeq2SeqLM.from_pretrained(t5_dir).eval(), t5_dir, "hello")
    assert got != base  # the adapter is really on
    assert main(["generate", "--model", str(t5_dir), "--prompt", "hello", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == base  # a T5 base alone is detected from its config.json


@pytest.mark.parametrize("merge", ["false", "true"])
def test_t5_inference_yaml_exactly_as_users_write_it(t5_dir, t5_run, tmp_path, capsys, merge):
    cfg = tmp_path / "infer.yaml"
    cfg.write_text(f"model: {t5_dir}\n"
                   f"lora_config:\n"
                   f"  enabled: true\n"
                   f"  weights_path: {t5_run}\n"
                   f"  merge_and_unload: {merge}\n")
    assert main(["generate", "--config", str(cfg), "--prompt", "lora", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == t5_generate(peft_t5(t5_dir, t5_run), t5_dir, "lora")


def test_inference_yaml_disabled_lora_runs_the_base(t5_dir, t5_run, tmp_path, capsys):
    cfg = tmp_path / "infer.yaml"
    cfg.write_text(f"model: {t5_dir}\nlora_config: {{enabled: false, weights_path: {t5_run}}}\n")
    assert main(["generate", "--config", str(cfg), "--prompt", "kit", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == t5_generate(AutoModelForSeq2SeqLM.from_pretrained(t5_dir).eval(),
                                                          t5_dir, "kit")
    cfg.write_text(f"model: {t5_dir}\nlora_config: {{weights: {t5_run}}}\n")
    assert main(["generate", "--config", str(cfg), "--prompt", "kit"]) == 2
    assert "lora_config must be a mapping with keys ['enabled', 'merge_and_unload', 'weights_path']" in \
        capsys.readouterr().err


# --- classifiers ----------------------------------------------------------------------------------
def test_classifier_prints_label_names_and_probabilities(cls_run, capsys):
    capsys.readouterr()
    assert main(["generate", "--adapter", str(cls_run), "--prompt", "lovely movie, really lovely"]) == 0
    line = capsys.readouterr().out.strip()
    want = peft_probs(cls_run, ["lovely movie, really lovely"])[0]
    assert want.argmax() == 1  # learned: pos (labels are numbered in sorted order: neg 0, pos 1)
    assert line == f"pos  (neg {want[0]:.4f}, pos {want[1]:.4f})"


def test_classifier_prompts_file_writes_jsonl(cls_run, tmp_path, capsys):
    texts = ["awful movie, really awful", "great movie, really great", "boring movie, really boring"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    capsys.readouterr()
    assert main(["generate", "--adapter", str(cls_run), "--prompts", str(rows)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    out = tmp_path / "pred.jsonl"
    assert main(["generate", "--adapter", str(cls_run), "--prompts", str(rows), "--output", str(out),
                 "--batch-size", "2"]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    want = peft_probs(cls_run, texts)
    for got in (printed, written):
        assert [g["text"] for g in got] == texts
        assert [g["prediction"] for g in got] == ["neg", "pos", "neg"]
        probs = torch.tensor([[g["probabilities"]["neg"], g["probabilities"]["pos"]] for g in got])
        torch.testing.assert_close(probs, want, atol=2e-6, rtol=0)


# --- models a command cannot run --------------------------------------------------------------------
def test_a_bare_encoder_gets_one_sentence(capsys):
    assert main(["generate", "--model", str(minilm_dir()), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a bert model (BertModel), which lorakit cannot run" in err and "seq2seq LMs (T5, BART)" in err
    assert len(err.splitlines()) == 1 and len(err) < 400 and "GPT2Config" not in err


def test_an_adapter_for_another_kind_of_model_gets_one_sentence(base_dir, t5_dir, tmp_path, capsys):
    make_adapter(base_dir, tmp_path / "a", seed=1)  # a causal LM adapter, given a T5 base
    capsys.readouterr()
    assert main(["generate", "--model", str(t5_dir), "--adapter", str(tmp_path / "a"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a t5 model (T5ForConditionalGeneration) cannot load as a causal LM" in err
    assert len(err.splitlines()) == 1 and "Model type should be one of" not in err
