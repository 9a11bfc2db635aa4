"""training/precision.py: what --precision resolves to, and the bf16 base with float32 LoRA."""

import pytest
import torch
import yaml
from safetensors import safe_open
from tiny import byte_tokenizer, tiny_llama, write_chat

import lorakit
from lorakit.cli import main
from lorakit.training import TrainConfig, Trainer
from lorakit.training import precision as prec

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, want", [(set(), "fp32"), ({"avx2", "avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16")])
def test_auto_on_cpu_follows_the_bf16_flags_once_switched_on(monkeypatch, flags, want):
    monkeypatch.setattr(prec, "cpu_flags", lambda: frozenset(flags))
    assert prec.resolve("auto", CPU).name == "fp32"  # off until the demo shows bf16 quality on such a CPU
    assert prec.bf16_native(CPU) == (want == "bf16")
    monkeypatch.setattr(prec, "AUTO_CPU_BF16", True)
    p = prec.resolve("auto", CPU)
    assert p.name == want
    assert p.autocast_dtype == p.base_dtype == (torch.bfloat16 if want == "bf16" else None)
    assert p.scaler() is None


def test_explicit_choices_and_the_fp16_error():
    assert prec.resolve("fp32", CPU) == prec.Precision("fp32", None, None)
    assert prec.resolve("bf16", CPU) == prec.Precision("bf16", torch.bfloat16, torch.bfloat16)
    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32"):
        prec.resolve("fp16", CPU)
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16, fp16; got 'half'"):
        prec.resolve("half", CPU)


def test_cpu_flags_reads_proc_cpuinfo():
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo here")
    line = next(line for line in text.splitlines() if line.startswith("flags"))
    assert prec.cpu_flags() == frozenset(line.split(":", 1)[1].split())


def test_cast_frozen_keeps_lora_float32_and_casts_a_tied_weight_once():
    model = tiny_llama(hidden=32)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert prec.cast_frozen(model, torch.bfloat16) == len(frozen)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers keep their precision


def test_bf16_run_keeps_the_base_bf16_and_lora_grads_and_adam_state_float32(tmp_path, base_dir):
    data = write_chat(tmp_path / "d.jsonl", n=12)
    cfg = TrainConfig(dataset=[data], model=str(base_dir), output_dir=str(tmp_path / "run"), lora_rank=4,
                      max_steps=2, batch_size=4, max_length=64, precision="bf16", learning_rate=1e-2)
    t = Trainer(cfg)
    assert t.precision.name == "bf16"
    assert {p.dtype for p in t.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    lora = [p for p in t.model.parameters() if p.requires_grad]
    assert lora and {p.dtype for p in lora} == {torch.float32}
    t.accumulate(t._next_micro_batches())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in lora)
    t.optimizer.step()
    states = [s for p in lora for s in t.optimizer.state[p].values() if torch.is_tensor(s) and s.ndim > 0]
    assert states and {s.dtype for s in states} == {torch.float32}


def test_a_model_passed_in_is_not_cast(tmp_path):
    tok = byte_tokenizer()
    data = write_chat(tmp_path / "d.jsonl", n=8)
    cfg = TrainConfig(dataset=[data], output_dir=str(tmp_path / "run"), lora_rank=4, max_steps=1, batch_size=4,
                      max_length=64, precision="bf16")
    t = Trainer(cfg, model=tiny_llama(vocab=len(tok), hidden=32), tokenizer=tok)
    assert t.autocast_dtype == torch.bfloat16
    assert {p.dtype for p in t.model.parameters()} == {torch.float32}  # the caller's model keeps its dtype


def test_sft_bf16_through_the_cli_writes_a_float32_adapter(tmp_path, base_dir):
    data = write_chat(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "run"
    assert main(["sft", "--model", str(base_dir), "--dataset", data, "--max-steps", "2", "--batch-size", "4",
                 "--lora-rank", "4", "--max-length", "64", "--precision", "bf16", "--output-dir", str(out)]) == 0
    assert yaml.safe_load((out / "run.yaml").read_text())["resolved"]["precision"] == "bf16"
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.float32}


def test_demo_takes_precision_for_the_quality_check(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--precision {auto,fp32,bf16,fp16}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--precision", "half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err
