"""QLoRA: LoRA (and DoRA) over a 4-bit NF4 base (bitsandbytes Linear4bit), on the CPU.

A tiny Llama (hidden 64) is saved once and loaded on the CPU with `qlora.quantization_config()`, so
every model here is quantized the same way; PEFT 0.21.2 on the same 4-bit base is the oracle.

Both sides run `qlora.prepare_model` so bitsandbytes never switches to its CPU-only repacked
layout (bf16 absmax, no autograd; see qlora.py): the comparison is then of the LoRA math alone.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

bnb = pytest.importorskip("bitsandbytes")

import lorakit  # noqa: E402
from lorakit import LoraConfig, LoraLinear, qlora  # noqa: E402
from lorakit.bases import is_4bit  # noqa: E402
from lorakit.state import lora_layers  # noqa: E402
from tiny import ids, tiny_llama  # noqa: E402

HIDDEN = 64  # bitsandbytes' CPU kernels want out_features divisible by 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(hidden=HIDDEN).save_pretrained(path)
    return path


def load_4bit(path, prepare: bool = True) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qlora.quantization_config(),
                                                 dtype=torch.float32, device_map={"": "cpu"})
    return qlora.prepare_model(model) if prepare else model


def logits(model, x):
    return model(x).logits


def randomize(model, name="default", seed=1, std=0.03):
    """Non-trivial adapter weights of a trained adapter's size (the delta stays below the base weights)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if f".adapters.{name}." in pname:
                if pname.endswith("lora_magnitude_vector"):
                    p.mul_(1 + 2 * std * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


def pair(checkpoint, use_dora=False, std=0.03):
    """lorakit and PEFT on two identical 4-bit loads, with the same all-linear adapter."""
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=use_dora)
    ours = lorakit.inject(load_4bit(checkpoint), cfg)
    randomize(ours, std=std)
    theirs = get_peft_model(load_4bit(checkpoint), PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                  use_dora=use_dora, init_lora_weights=False))
    assert not set_peft_model_state_dict(theirs, lorakit.adapter_state_dict(ours)).unexpected_keys
    return ours, theirs


def quantized_weights(model) -> dict[str, torch.Tensor]:
    """Dequantized float32 weight of every Linear4bit, by module path without the LoRA wrapping."""
    return {name.replace("base_model.model.", "").replace(".base_layer", ""): qlora.dequantized_weight(m)
            for name, m in model.named_modules() if is_4bit(m)}


# --- set-up --------------------------------------------------------------------------------------------
def test_quantization_config_is_nf4_double_quant():
    cfg = qlora.quantization_config()
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)


def test_inject_wraps_every_linear4bit_and_counts_as_peft(checkpoint, capsys):
    model = lorakit.inject(load_4bit(checkpoint, prepare=False), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    wrapped = dict(lora_layers(model))
    assert len(wrapped) == 7 * 2                                         # q k v o gate up down, 2 blocks
    assert all(isinstance(layer, LoraLinear) and isinstance(layer.base_layer, bnb.nn.Linear4bit)
               for layer in wrapped.values())
    assert not is_4bit(model.lm_head)                              # the head stays float, untargeted
    assert not any(layer.base_layer.support_avx512bf16_for_cpu for layer in wrapped.values())
    theirs = get_peft_model(load_4bit(checkpoint), PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    lorakit.print_trainable_parameters(model)
    theirs.print_trainable_parameters()
    mine, peft_line = capsys.readouterr().out.splitlines()
    assert mine == peft_line                                             # Params4bit count numel * 2


# --- the oracle --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_outputs_and_gradients_match_peft(checkpoint, use_dora):
    ours, theirs = pair(checkpoint, use_dora)
    x = ids()
    with torch.no_grad():
        assert_close(logits(ours.eval(), x), logits(theirs.eval(), x), atol=1e-4, rtol=1e-4)
    ours.train(), theirs.train()
    logits(ours, x).pow(2).mean().backward()
    logits(theirs, x).pow(2).mean().backward()
    theirs_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n.replace(".adapters.default", "").replace("magnitude_vector", "magnitude_vector.weight"): p.grad
                  for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == theirs_grads.keys()
    for key, grad in ours_grads.items():
        assert_close(grad, theirs_grads[key], atol=1e-5, rtol=1e-4, msg=key)


def test_training_updates_only_the_adapter(checkpoint):
    model = lorakit.inject(load_4bit(checkpoint), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(".adapters.default." in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x = ids(batch=4, seq=8)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(x, labels=x).loss
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), frozen[n]), n


def test_evaluating_between_steps_keeps_gradients(checkpoint):
    """An eval pass must not switch Linear4bit to bitsandbytes' CPU layout (no autograd there)."""
    model = lorakit.inject(load_4bit(checkpoint, prepare=False), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize(model)
    x = ids()

    def grads():
        model.train()
        model.zero_grad()
        logits(model, x).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        logits(model, x)                                                 # where bitsandbytes would repack
    after = grads()
    for key, grad in before.items():
        assert_close(after[key], grad, msg=key)


def test_dequantized_weight_reads_the_cpu_repacked_layout():
    layer = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(96, 64) * 0.1, requires_grad=False, quant_type="nf4",
                                     module=layer).to("cpu")
    standard = qlora.dequantized_weight(layer)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))                                        # may repack on AVX512-BF16 CPUs
    repacked = qlora.dequantized_weight(layer)
    assert_close(repacked, standard, atol=1e-3, rtol=0)                  # only absmax rounded to bf16
    qlora.keep_standard_layout(layer)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert_close(qlora.dequantized_weight(layer), standard, atol=2e-3, rtol=0)   # absmax re-quantized


# --- merging -------------------------------------------------------------------------------------------------
def base_quantization_noise(model, x) -> float:
    """How far the 4-bit base's logits are from the float base's: one round of NF4 rounding."""
    with torch.no_grad(), lorakit.disabled(model):
        return (logits(model, x) - logits(tiny_llama(hidden=HIDDEN).eval(), x)).abs().max().item()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_requantizes_like_peft(checkpoint, use_dora):
    """Merge = dequantize, add the float32 delta, quantize again: the same 4-bit codes as PEFT's merge,
    and outputs off by one more round of 4-bit rounding, no more than quantizing the base costs."""
    ours, theirs = pair(checkpoint, use_dora, std=0.01)
    ours.eval(), theirs.eval()
    x = ids()
    noise = base_quantization_noise(ours, x)
    original = quantized_weights(ours)
    with torch.no_grad():
        expected = logits(ours, x)
        lorakit.merge(ours)
        theirs.merge_adapter()
        merged, peft_merged = quantized_weights(ours), quantized_weights(theirs)
        for key in original:
            assert_close(merged[key], peft_merged[key], atol=1e-6, rtol=0, msg=key)
            assert not torch.equal(merged[key], original[key])
        assert (logits(ours, x) - expected).abs().max() < noise
        lorakit.unmerge(ours)
        for key, w in quantized_weights(ours).items():                   # back, up to 4-bit rounding
            assert (w - original[key]).norm() < 0.1 * original[key].norm(), key
        assert (logits(ours, x) - expected).abs().max() < noise


def test_merge_and_unload_keeps_linear4bit_as_peft(checkpoint):
    ours, theirs = pair(checkpoint, std=0.01)
    ours.eval(), theirs.eval()
    x = ids()
    noise = base_quantization_noise(ours, x)
    with torch.no_grad():
        expected = logits(ours, x)
        plain = lorakit.merge_and_unload(ours)
        peft_plain = theirs.merge_and_unload()
        assert not lora_layers(plain)
        assert isinstance(plain.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
        assert type(plain.model.layers[0].mlp.up_proj) is type(peft_plain.model.layers[0].mlp.up_proj)
        assert_close(logits(plain, x), logits(peft_plain, x), atol=1e-5, rtol=1e-5)
        assert (logits(plain, x) - expected).abs().max() < noise


# --- files ---------------------------------------------------------------------------------------------------
def test_adapter_trained_on_4bit_loads_into_a_float_base(checkpoint, tmp_path):
    model = lorakit.inject(load_4bit(checkpoint), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize(model)
    lorakit.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    float_model = lorakit.load_adapter(tiny_llama(hidden=HIDDEN), tmp_path)
    assert lorakit.adapter_state_dict(float_model).keys() == saved.keys()
    for key, tensor in lorakit.adapter_state_dict(float_model).items():
        assert torch.equal(tensor, saved[key]), key
    peft_float = PeftModel.from_pretrained(tiny_llama(hidden=HIDDEN), tmp_path).eval()
    x = ids()
    with torch.no_grad():
        assert_close(logits(float_model.eval(), x), logits(peft_float, x), atol=1e-5, rtol=1e-5)
        # the adapter moves the float model the way it moved the 4-bit one
        moved_float = logits(float_model, x) - logits(tiny_llama(hidden=HIDDEN), x)
        with lorakit.disabled(model.eval()):
            base_4bit = logits(model, x)
        moved_4bit = logits(model, x) - base_4bit
    assert torch.cosine_similarity(moved_float.flatten(), moved_4bit.flatten(), dim=0) > 0.9


def test_merge_refuses_an_integer_base():
    class Linear8bitLt(nn.Module):                                       # stands in for bitsandbytes' 8-bit linear
        def __init__(self) -> None:
            super().__init__()
            self.in_features, self.out_features = 4, 2
            self.weight = nn.Parameter(torch.ones(2, 4, dtype=torch.int8), requires_grad=False)

        def forward(self, x):
            return x @ self.weight.float().t()

    model = nn.Sequential(OrderedDict(lin=Linear8bitLt()))
    lorakit.inject(model, LoraConfig(r=2, target_modules=["lin"]))
    with pytest.raises(TypeError, match=r"lin is a Linear8bitLt with torch.int8 weights; merging and DoRA need a "
                                        r"float or a 4-bit"):
        lorakit.merge(model)
    with pytest.raises(TypeError, match="merging and DoRA need"):
        lorakit.inject(model, LoraConfig(r=2, target_modules=["lin"], use_dora=True), name="dora")
