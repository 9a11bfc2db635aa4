"""training/packing.py: padding-free batches give the padded batch's loss and gradients."""

import pytest
import torch
import yaml
from tiny import byte_tokenizer, make, randomize_lora, tiny_gpt2, write_chat

from lorakit.cli import main
from lorakit.training.datasets import Encoded
from lorakit.training.packing import collate_packed, packing_supported


@pytest.fixture
def tok():
    return byte_tokenizer()


def test_packed_layout_by_hand():
    rows = [Encoded([5, 6, 7], [-100, 6, 7]), Encoded([8, 9], [8, 9]), Encoded([4, 3, 2, 1], [-100, -100, 2, 1])]
    batch = collate_packed(rows)
    assert batch.keys() == {"input_ids", "position_ids", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 3, 2, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # a row's first label never counts: 8 would otherwise be "predicted" from row 1's last token
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, 2, 1]]


def test_packing_refuses_other_rows():
    with pytest.raises(ValueError, match="packing takes causal_lm rows, got a seq_cls row"):
        collate_packed([Encoded([1, 2], 1, task="seq_cls")])


@pytest.mark.parametrize("fused", [True, False])
def test_packed_step_equals_the_padded_step(tmp_path, tok, fused, monkeypatch):
    if not fused:  # the plain full-logits path must agree too
        monkeypatch.setattr("lorakit.training.loss.fused_head", lambda model: None)
    padded = make(tmp_path / "a", tok)
    packed = make(tmp_path / "b", tok, packing=True)
    assert packed.packing and not padded.packing
    randomize_lora(padded.model, std=0.2)
    packed.model.load_state_dict(padded.model.state_dict())
    rows = [0, 5, 9, 13]
    lengths = {len(padded.train_data[i].input_ids) for i in rows}
    assert len(lengths) > 1  # rows of different lengths: the padded batch has padding
    loss_a, n_a = padded.accumulate([rows])
    loss_b, n_b = packed.accumulate([rows])
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-5) and n_a == n_b
    grads = {n: p.grad for n, p in padded.model.named_parameters() if p.grad is not None}
    assert grads
    for n, p in packed.model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-5)


def test_unsupported_model_trains_padded_with_a_warning(tmp_path, tok):
    from lorakit.training import TrainConfig, Trainer

    data = write_chat(tmp_path / "train.jsonl")
    cfg = TrainConfig(dataset=[data], output_dir=str(tmp_path / "run"), lora_rank=4, max_steps=1, batch_size=4,
                      max_length=64, packing=True, target_modules="c_attn")
    t = Trainer(cfg, model=tiny_gpt2(vocab=len(tok)), tokenizer=tok)
    assert not t.packing
    assert any("--packing: packing needs a model whose attention keeps packed rows apart" in w and "gpt2" in w
               for w in t.train_data.warnings)
    assert "packing is for causal_lm training, not seq_cls" == packing_supported(t.model, "seq_cls")


def test_sft_packing_flag_through_the_cli(tmp_path, base_dir):
    data = write_chat(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "run"
    assert main(["sft", "--model", str(base_dir), "--dataset", data, "--max-steps", "2", "--batch-size", "4",
                 "--lora-rank", "4", "--max-length", "64", "--packing", "--precision", "fp32",
                 "--output-dir", str(out)]) == 0
    resolved = yaml.safe_load((out / "run.yaml").read_text())["resolved"]
    assert resolved["packing"] is True and resolved["precision"] == "fp32"
    assert (out / "adapter_model.safetensors").is_file()
