"""Training beyond causal LM, and the run-level features: classification, seq2seq, continuing an
adapter, Ctrl-C, bf16, gradient checkpointing (the `lorakit sft` command line: tests/cli/test_sft.py)."""

import json

import pytest
import torch
from tiny import byte_tokenizer, make, tiny_model
from tiny import minilm_dir, tiny_t5

import lorakit
from lorakit.training.trainer import TrainConfig, Trainer


@pytest.fixture
def tok():
    return byte_tokenizer()


def test_classification_trains_the_head_and_lora(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [{"text": f"{w} movie, really {w}", "label": lab} for w, lab in
            [("great", "pos"), ("awful", "neg"), ("lovely", "pos"), ("boring", "neg")] * 6]
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=2)
    cfg = TrainConfig(dataset=[str(data)], eval_dataset=[str(data)], output_dir=str(tmp_path / "run"), lora_rank=4,
                      target_modules="query,value", max_steps=12, learning_rate=5e-3, batch_size=8,
                      lora_dropout=0.0, save_steps=0)
    t = Trainer(cfg, model=model, tokenizer=tok)
    assert t.task == "seq_cls"
    head_before = model.classifier.original_module.weight.clone()
    result = t.train()
    assert result["eval_accuracy"] == 1.0
    torch.testing.assert_close(model.classifier.original_module.weight, head_before)  # base head untouched
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"] and saved["task_type"] == "SEQ_CLS"


def test_seq2seq_loss_goes_down(tmp_path, tok):
    rows = [{"source": w, "target": w[::-1]} for w in ["abc", "hello", "lora", "kit", "tiny", "model"] * 4]
    data = tmp_path / "s2s.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_t5(vocab=len(tok), d_model=32)
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    cfg = TrainConfig(dataset=[str(data)], output_dir=str(tmp_path / "run"), lora_rank=8, target_modules="all-linear",
                      max_steps=40, learning_rate=1e-2, batch_size=8, lora_dropout=0.0, lr_scheduler="constant")
    t = Trainer(cfg, model=model, tokenizer=tok)
    assert t.task == "seq2seq"
    first = t.train_step()["loss"]
    for _ in range(39):
        last = t.train_step()["loss"]
    assert last < 0.5 * first


def test_continue_training_an_existing_adapter(tmp_path, tok):
    first = make(tmp_path / "one", tok, max_steps=3)
    first.train()
    model = tiny_model(tok)
    model.load_state_dict(tiny_model(tok).state_dict())
    t = Trainer(TrainConfig(dataset=first.cfg.dataset, output_dir=str(tmp_path / "two"), max_steps=2, max_length=64,
                            adapter=str(tmp_path / "one" / "run"), learning_rate=1e-3), model=model, tokenizer=tok)
    saved = lorakit.adapter_state_dict(first.model)
    loaded = lorakit.adapter_state_dict(t.model)
    for k in saved:
        torch.testing.assert_close(loaded[k], saved[k])  # starts from the saved weights...
    assert all(p.requires_grad for n, p in t.model.named_parameters() if ".adapters." in n)  # ...trainable
    t.train_step()
    after = lorakit.adapter_state_dict(t.model)
    assert any(not torch.equal(after[k], saved[k]) for k in saved)


def test_ctrl_c_saves_a_checkpoint_to_resume_from(tmp_path, tok):
    t = make(tmp_path, tok, max_steps=6)
    real, calls = t.accumulate, {"n": 0}

    def interrupted(micro):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(micro)

    t.accumulate = interrupted
    with pytest.raises(KeyboardInterrupt):
        t.train()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-2"]
    r = make(tmp_path, tok, max_steps=6, resume=True)
    r.train()
    assert r.step == 6


def test_bf16_autocast_and_gradient_checkpointing_agree_with_fp32(tmp_path, tok):
    ref = make(tmp_path / "a", tok)
    rows = [0, 3, 7]
    ref.accumulate([rows])
    want = {n: p.grad.clone() for n, p in ref.model.named_parameters() if p.grad is not None}

    ckpt = make(tmp_path / "b", tok, gradient_checkpointing=True)
    ckpt.model.load_state_dict(ref.model.state_dict())
    ckpt.accumulate([rows])
    for n, p in ckpt.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, want[n], atol=1e-5, rtol=1e-4)

    bf16 = make(tmp_path / "c", tok, precision="bf16")
    bf16.model.load_state_dict(ref.model.state_dict())
    loss, _ = bf16.accumulate([rows])
    got = torch.cat([p.grad.flatten() for n, p in bf16.model.named_parameters() if p.grad is not None])
    ref_flat = torch.cat([want[n].flatten() for n, p in bf16.model.named_parameters() if p.grad is not None])
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got, ref_flat, dim=0) > 0.98
