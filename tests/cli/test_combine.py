"""`lorakit combine` from the command line: the combined adapter equals lorakit.combine's arithmetic."""

import json

import torch
from tiny import make_adapter
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli import main


def test_combine_cli_equals_python_combine(base_dir, tmp_path):
    make_adapter(base_dir, tmp_path / "a", seed=1)
    make_adapter(base_dir, tmp_path / "b", seed=2)
    assert main(["combine", "--model", str(base_dir), "--adapter", f"a={tmp_path / 'a'}", "--adapter",
                 f"b={tmp_path / 'b'}", "--weights", "0.7,0.3", "--method", "cat",
                 "--output-dir", str(tmp_path / "ab")]) == 0
    cfg = json.loads((tmp_path / "ab" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8

    ref = AutoModelForCausalLM.from_pretrained(base_dir)
    lorakit.load_adapter(ref, tmp_path / "a", name="a")
    lorakit.load_adapter(ref, tmp_path / "b", name="b")
    # cat is exact: the combined update equals 0.7 * dW_a + 0.3 * dW_b
    combined = AutoModelForCausalLM.from_pretrained(base_dir)
    lorakit.load_adapter(combined, tmp_path / "ab")
    q_ref = ref.model.layers[0].self_attn.q_proj
    q_new = combined.model.layers[0].self_attn.q_proj
    want = 0.7 * q_ref.delta_weight("a") + 0.3 * q_ref.delta_weight("b")
    torch.testing.assert_close(q_new.delta_weight("default"), want, atol=1e-5, rtol=1e-5)


def test_combine_refuses_bad_weights(base_dir, tmp_path, capsys):
    make_adapter(base_dir, tmp_path / "a", seed=1)
    make_adapter(base_dir, tmp_path / "b", seed=2)
    assert main(["combine", "--model", str(base_dir), "--adapter", str(tmp_path / "a"), "--adapter",
                 str(tmp_path / "b"), "--weights", "0.7", "--output-dir", str(tmp_path / "x")]) == 2
    assert "2 adapters and 1 weights" in capsys.readouterr().err
