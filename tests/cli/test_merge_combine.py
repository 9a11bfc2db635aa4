"""lorakit merge / combine / generate from the command line, on a tiny local model folder."""

import json

import pytest
import torch
from tiny import byte_tokenizer, make_adapter, tiny_llama  # noqa: F401
from transformers import AutoModelForCausalLM

import lorakit
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


def test_generate_batch_file_routes_rows_to_their_adapters(base_dir, tmp_path):
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
    from lorakit.generation import Sampling, generate
    from lorakit.models import load_tokenizer

    tok = load_tokenizer(str(base_dir))
    for row, g in zip(rows, got):
        model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
        if row["adapter"]:
            lorakit.load_adapter(model, tmp_path / row["adapter"])
        want = generate(model, tok, [[{"role": "user", "content": row["prompt"]}]], Sampling(max_new_tokens=5))[0]
        assert g["completion"] == want


def test_generate_accepts_an_inference_yaml(base_dir, tmp_path, capsys):
    make_adapter(base_dir, tmp_path / "a", seed=1)
    cfg = tmp_path / "infer.yaml"
    cfg.write_text(f"model: {base_dir}\nmax_new_tokens: 4\n"
                   f"lora_config:\n  enabled: true\n  weights_path: {tmp_path / 'a'}\n  merge_and_unload: true\n")
    assert main(["generate", "--config", str(cfg), "--prompt", "hi"]) == 0
    merged_out = capsys.readouterr().out.strip()
    assert main(["generate", "--model", str(base_dir), "--adapter", str(tmp_path / "a"), "--prompt", "hi",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == merged_out


def test_chat_switches_adapters_and_streams(base_dir, tmp_path, capsys):
    import argparse
    import io

    from lorakit.cli import build_parser
    from lorakit.cli.chat import run as run_chat

    make_adapter(base_dir, tmp_path / "a", seed=1)
    args = build_parser().parse_args(["chat", "--model", str(base_dir), "--adapter", f"a={tmp_path / 'a'}",
                                      "--max-new-tokens", "3"])
    script = io.StringIO("hi\n/adapter nope\n/base\nhi\n/exit\n")
    assert run_chat(args, stdin=script) == 0
    out = capsys.readouterr().out
    assert "[a] you>" in out and "[base] you>" in out and "unknown adapter 'nope'" in out
    assert out.count("assistant>") == 2
    assert isinstance(args, argparse.Namespace)
