"""The same library on a CUDA GPU: each check compares CUDA results with an oracle (PEFT on the GPU,
the plain path, the model alone), and the commands run on the GPU as a user runs them.

Skipped where torch sees no GPU (CI has none); run on a GPU machine with `pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from tiny import fresh, ids, randomize_adapters, randomize_lora, single_runs, tiny_llama, two_adapter_model

import lorakit
from lorakit.io import read_safetensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")
CUDA = torch.device("cuda")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 on the GPU means float32: TF32 matmuls would loosen every comparison to ~1e-3."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def peft_name(name: str) -> str:
    """lorakit's parameter name of an adapter factor -> PEFT's (adapter 'default')."""
    for factor in ("lora_A", "lora_B"):
        name = name.replace(f"adapters.default.{factor}.", f"{factor}.default.")
    return "base_model.model." + name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_lora_gradients_match_peft_on_cuda(dtype, tmp_path):
    from peft import PeftModel

    base = tiny_llama(seed=0, hidden=64)
    ours = fresh(base)
    lorakit.inject(ours, lorakit.LoraConfig(r=8, alpha=16, target_modules=TARGETS))
    randomize_lora(ours, std=0.2)
    lorakit.save_adapter(ours, tmp_path / "a")
    theirs = PeftModel.from_pretrained(fresh(base), tmp_path / "a", is_trainable=True)
    ours, theirs = ours.to(CUDA, dtype).train(), theirs.to(CUDA, dtype).train()
    x = ids(3, 11, seed=1).to(CUDA)
    out_ours, out_theirs = ours(x).logits, theirs(x).logits
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out_ours, out_theirs, **tol)
    out_ours.float().square().mean().backward()
    out_theirs.float().square().mean().backward()
    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    ours_grads = {peft_name(n): p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert ours_grads.keys() == peft_grads.keys() and len(ours_grads) == 2 * 7 * 2
    for name, grad in ours_grads.items():
        assert grad.device.type == "cuda"
        want = peft_grads[name].float()
        error = (grad.float() - want).norm() / want.norm()        # bf16 rounds each op: compare as a whole
        assert error.item() <= (1e-4 if dtype == torch.float32 else 5e-2), (name, error.item())


def test_per_row_mixed_batch_matches_each_adapter_alone_and_peft_on_cuda(tmp_path):
    from peft import PeftModel

    base = tiny_llama(seed=0, hidden=32)
    model = fresh(base)
    for i in range(3):
        lorakit.inject(model, lorakit.LoraConfig(r=2 + i, alpha=4, target_modules=TARGETS), name=f"a{i}")
    randomize_adapters(model, std=0.3)
    for i in range(3):
        lorakit.save_adapter(model, tmp_path / f"a{i}", name=f"a{i}")
    model = model.to(CUDA).eval()
    rows = ["a2", None, "a0", "a1", "a2", None]
    x = ids(len(rows), 7, seed=2).to(CUDA)
    with torch.no_grad(), lorakit.per_row(model, rows):
        mixed = model(x).logits
    with torch.no_grad():
        alone = single_runs(model, x, rows, lambda xi: model(xi).logits, reset="a0")
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-5)
    peft = PeftModel.from_pretrained(fresh(base), tmp_path / "a0", adapter_name="a0")
    for i in (1, 2):
        peft.load_adapter(tmp_path / f"a{i}", adapter_name=f"a{i}")
    peft = peft.to(CUDA).eval()
    with torch.no_grad():
        theirs = peft(x, adapter_names=[r or "__base__" for r in rows]).logits
    torch.testing.assert_close(mixed, theirs, atol=1e-5, rtol=1e-5)


def test_merge_and_unmerge_on_cuda():
    model = tiny_llama(seed=0, hidden=32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    randomize_lora(model, std=0.3)
    model = model.to(CUDA).eval()
    x = ids(2, 9, seed=3).to(CUDA)
    with torch.no_grad():
        unmerged = model(x).logits
        lorakit.merge(model)
        merged = model(x).logits
        lorakit.unmerge(model)
        again = model(x).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=1e-5)
    plain = lorakit.merge_and_unload(model)
    assert not any(".adapters." in n for n, _ in plain.named_parameters())
    assert all(p.device.type == "cuda" for p in plain.parameters())
    changed = [n for n, p in plain.named_parameters() if not torch.equal(p.cpu(), before[n])]
    assert len(changed) == 2 * 7                                           # every targeted weight, nothing else


def test_fused_head_loss_and_grads_equal_the_plain_path_on_cuda():
    import torch.nn.functional as F

    from lorakit.training.loss import fused_head, loss_sum

    model = tiny_llama(seed=0, hidden=32, vocab=96).train()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model, std=0.2)
    model = model.to(CUDA)
    assert fused_head(model) is not None
    x = ids(3, 9, seed=4, vocab=96).to(CUDA)
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    labels = torch.full_like(x, -100)
    labels[:, 5:] = x[:, 5:]
    labels[mask == 0] = -100
    batch = {"input_ids": x, "attention_mask": mask, "labels": labels}

    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused, g_fused = grads(lambda: loss_sum(model, "causal_lm", batch))
    plain, g_plain = grads(lambda: F.cross_entropy(model(input_ids=x, attention_mask=mask).logits[:, :-1].flatten(0, 1),
                                                   labels[:, 1:].flatten(), reduction="sum"))
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-5)
    assert g_fused.keys() == g_plain.keys()
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], atol=1e-5, rtol=1e-4)


def test_engine_greedy_rows_equal_model_generate_alone_on_cuda():
    from lorakit.engine import Engine, Row
    from lorakit.sampling import Sampling

    model, tok = two_adapter_model()
    model = model.to(CUDA)
    prompts, adapters, lengths = ["hello there", "yo", "a much longer prompt", "x"], ["a", None, "b", "b"], [9, 5, 12, 7]
    engine = Engine(model, tok, max_batch_size=4)
    rows = [Row(tok(p, add_special_tokens=False)["input_ids"], adapter=a, sampling=Sampling(max_new_tokens=n))
            for p, a, n in zip(prompts, adapters, lengths)]
    engine.add(rows[0])
    engine.step()
    for row in rows[1:]:
        engine.add(row)
    while engine.running or engine.waiting:
        engine.step()
    for row, prompt, adapter, n in zip(rows, prompts, adapters, lengths):
        x = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], device=CUDA)
        with lorakit.using(model, [adapter]), torch.no_grad():
            want = model.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id)[0, x.shape[1]:].tolist()
        assert row.tokens == want, (prompt, adapter)


# ------------------------------------------------------------------------ the commands on the GPU
def run(args: list[str], cwd, env_extra: dict | None = None, launcher: list[str] | None = None) -> str:
    cmd = (launcher or [sys.executable, "-m", "lorakit"]) + args
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


SFT = ["--max-steps", "8", "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--learning-rate", "5e-3",
       "--logging-steps", "1", "--max-length", "64", "--seed", "1", "--batch-size", "4"]


def test_sft_on_cuda_auto_precision_is_bf16_trains_and_loads_in_peft(base_dir, tmp_path):
    from peft import PeftModel
    from tiny import write_chat
    from transformers import AutoModelForCausalLM

    data = write_chat(tmp_path / "chat.jsonl", n=32)
    out = tmp_path / "auto"
    run(["sft", "--model", str(base_dir), "--dataset", data, "--output-dir", str(out), "--precision", "auto", *SFT],
        tmp_path)
    resolved = yaml.safe_load((out / "run.yaml").read_text())["resolved"]
    assert resolved["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    curve = losses(out)
    assert len(curve) == 8 and sum(curve[-3:]) / 3 < sum(curve[:3]) / 3           # it learns
    for name, tensor in read_safetensors(out / "adapter_model.safetensors").items():
        assert tensor.dtype == torch.float32 and tensor.numel() > 0, name             # LoRA kept in float32
    ours = AutoModelForCausalLM.from_pretrained(base_dir)
    lorakit.load_adapter(ours, str(out))
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out))
    x = ids(2, 10, seed=5, vocab=200).to(CUDA)
    with torch.no_grad():
        torch.testing.assert_close(ours.to(CUDA).eval()(x).logits, theirs.to(CUDA).eval()(x).logits,
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_with_nccl_trains_as_one_process(base_dir, tmp_path, mode):
    """One GPU holds one NCCL rank: torchrun with 1 process on NCCL must equal the plain run."""
    from tiny import write_chat

    data = write_chat(tmp_path / "chat.jsonl", n=16)
    common = ["sft", "--model", str(base_dir), "--dataset", data, "--precision", "fp32", *SFT]
    run([*common, "--output-dir", str(tmp_path / "one")], tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone", "-m", "lorakit"]
    run([*common, "--output-dir", str(tmp_path / mode), "--distributed", mode, "--dist-backend", "nccl"], tmp_path,
        launcher=launcher)
    resolved = yaml.safe_load((tmp_path / mode / "run.yaml").read_text())["resolved"]
    assert resolved["distributed"] == mode
    a, b = losses(tmp_path / "one"), losses(tmp_path / mode)
    assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4
    one, dist = (read_safetensors(tmp_path / d / "adapter_model.safetensors") for d in ("one", mode))
    assert one.keys() == dist.keys()
    assert max((one[k] - dist[k]).abs().max().item() for k in one) <= 1e-4
