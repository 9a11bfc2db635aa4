"""The fast paths of a LoRA linear (lorakit/kernels.py) against the plain formula and against PEFT.

- `kernels.lora_linear` takes each path of its table exactly under the condition the table gives;
- the fused autograd linear (LoraLinearFunction / LoraDeltaFunction): outputs and gradients equal
  ``base(x) + s·B(A(dropout(x)))`` and PEFT's, with dropout 0, to 1e-5; nothing mask-sized is kept;
- inference without autograd, merged and unmerged (branches or a folded W'), and the in-place merge;
- bf16 autocast stays sane. Dropout draws: test_dropout.py; the batched per-row path: test_routing.py.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig, kernels
from lorakit.state import lora_layers
from tiny import ids, randomize_adapters, tiny_llama, wrap

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def plain(x, w, bias, adapters, fan_in_fan_out=False):
    """The formula with ordinary autograd: x Wᵀ + b + Σ s B A x."""
    y = x @ (w if fan_in_fan_out else w.t())
    if bias is not None:
        y = y + bias
    for a, b, s in adapters:
        y = y + (x @ a.t() @ b.t()) * s
    return y


# --- which path, when: the table in kernels.py -------------------------------------------------------------
def paths_taken(model: nn.Module, x: torch.Tensor, monkeypatch) -> tuple[str, list[str]]:
    """(the output's grad_fn, the kernels functions and formula that ran) for one forward."""
    seen: list[str] = []
    for name in ("folded_linear", "add_lora_branches", "per_row_linear"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: seen.append(_n) or _f(*a, **k))
    update = lorakit.LoraLinear.update
    monkeypatch.setattr(lorakit.LoraLinear, "update", lambda self, *a, **k: seen.append("formula") or update(self, *a, **k))
    y = model(x)
    monkeypatch.undo()
    return type(y.grad_fn).__name__ if y.grad_fn is not None else "", seen


def one_linear(**cfg) -> nn.Module:
    model = wrap(lin=nn.Linear(8, 6))
    lorakit.inject(model, LoraConfig(r=2, target_modules=["lin"], **cfg))
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("case, want", [
    ("train", ("LoraLinearFunctionBackward", ["add_lora_branches"])),         # fused
    ("trainable base", ("LoraDeltaFunctionBackward", ["add_lora_branches"])),  # delta into the base output
    ("long input", ("", ["folded_linear"])),                                  # no autograd, fold pays
    ("short input", ("", ["add_lora_branches"])),                             # no autograd, in place
    ("per_row", ("", ["per_row_linear"])),                                    # two bmm's
    ("dora", ("AddBackward0", ["formula"])),                                  # DoRA: the formula
    ("different dropout", ("AddBackward0", ["formula"])),                     # each adapter its own mask
    ("per_row dora", ("", ["per_row_linear", "formula"])),                   # per adapter, its formula
])
def test_each_path_is_taken_under_its_documented_condition(case, want, monkeypatch):
    model = one_linear(use_dora=case.endswith("dora"), dropout=0.1 if case == "different dropout" else 0.0)
    x = torch.randn(4, 8, requires_grad=case in ("train", "trainable base", "dora", "different dropout"))
    model.train()
    if case == "trainable base":
        model.lin.base_layer.weight.requires_grad_(True)
    if case == "different dropout":
        lorakit.inject(model, LoraConfig(r=2, dropout=0.0, target_modules=["lin"]), name="other")
        lorakit.set_adapter(model, ["default", "other"])
    if case in ("long input", "short input"):
        monkeypatch.setattr(kernels, "FOLD_RATIO", 0.0 if case == "long input" else float("inf"))
    if case in ("long input", "short input", "per_row", "per_row dora"):
        model.eval()
        with torch.no_grad(), lorakit.per_row(model, ["default", None, "default", None]) if "per_row" in case \
                else torch.no_grad():
            assert paths_taken(model, x, monkeypatch) == want
        return
    assert paths_taken(model, x, monkeypatch) == want


# --- the fused linear vs the plain formula ---------------------------------------------------------------
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("trainable_bias", [False, True])
def test_fused_linear_matches_plain_formula(fan_in_fan_out, trainable_bias):
    k, d, n = 12, 10, 7
    w = torch.randn(k, d) if fan_in_fan_out else torch.randn(d, k)
    bias = torch.randn(d, requires_grad=trainable_bias)
    a1, b1 = torch.randn(4, k, requires_grad=True), torch.randn(d, 4, requires_grad=True)
    a2, b2 = torch.randn(2, k, requires_grad=True), torch.randn(d, 2, requires_grad=True)
    x = torch.randn(3, n, k, requires_grad=True)
    y = kernels.LoraLinearFunction.apply(x, w, bias, fan_in_fan_out, None, (0.5, 2.0), a1, b1, a2, b2)
    ref = plain(x, w, bias, [(a1, b1, 0.5), (a2, b2, 2.0)], fan_in_fan_out)
    assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    leaves = [x, a1, b1, a2, b2] + ([bias] if trainable_bias else [])
    got = torch.autograd.grad(y, leaves, g)
    want = torch.autograd.grad(ref, leaves, g)
    for ours, theirs in zip(got, want):
        assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_delta_function_matches_plain_formula_for_a_trainable_base():
    """A base the fused path cannot take (its weight trains) gets the branches added in place."""
    model = wrap(lin=nn.Linear(9, 5))
    lorakit.inject(model, LoraConfig(r=3, alpha=6, target_modules=["lin"]))
    randomize_adapters(model)
    model.lin.base_layer.weight.requires_grad_(True)
    model.train()
    x = torch.randn(4, 9, requires_grad=True)
    y = model(x)
    ad = model.lin.adapters["default"]
    base = model.lin.base_layer
    ref = plain(x, base.weight, base.bias, [(ad.lora_A.weight, ad.lora_B.weight, ad.scaling)])
    assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    leaves = [x, base.weight, ad.lora_A.weight, ad.lora_B.weight]
    for ours, theirs in zip(torch.autograd.grad(y, leaves, g, retain_graph=True), torch.autograd.grad(ref, leaves, g)):
        assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_training_step_matches_peft_on_all_seven_projections():
    """tiny Llama, r=8 on every projection, dropout 0: same loss, same gradient for every factor."""
    base = tiny_llama(seed=0, hidden=32)
    theirs = get_peft_model(tiny_llama(seed=0, hidden=32), PeftLoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                          target_modules=LLAMA_TARGETS))
    ours = lorakit.inject(base, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=LLAMA_TARGETS))
    randomize_adapters(ours)
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            ad = layer.adapters["default"]
            peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(ad.lora_A.weight)
            peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(ad.lora_B.weight)
    ours.train(), theirs.train()
    x = ids(2, 12, seed=1)
    loss_ours = ours(input_ids=x, labels=x).loss
    loss_theirs = theirs(input_ids=x, labels=x).loss
    assert_close(loss_ours, loss_theirs, atol=1e-5, rtol=1e-5)
    loss_ours.backward(), loss_theirs.backward()
    for name, layer in lora_layers(ours):
        ad = layer.adapters["default"]
        for t in ("A", "B"):
            want = peft_params[f"base_model.model.{name}.lora_{t}.default.weight"].grad
            assert_close(getattr(ad, f"lora_{t}").weight.grad, want, atol=1e-5, rtol=1e-4)


# --- memory -----------------------------------------------------------------------------------------------


def test_no_mask_sized_tensor_is_saved_for_backward():
    model = wrap(lin=nn.Linear(64, 64))
    lorakit.inject(model, LoraConfig(r=4, dropout=0.1, target_modules=["lin"]))
    model.train()
    x = torch.randn(256, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x)
    assert not any(t.dtype == torch.bool for t in saved)
    assert sum(t.numel() for t in saved if t.shape == x.shape) <= x.numel()  # x itself, once


# --- inference and merging ------------------------------------------------------------------------------
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
def test_inference_merged_and_unmerged_match_formula(conv1d, fold, monkeypatch):
    """Unmerged inference has two paths: branches added into y, or (long inputs) a folded W'."""
    monkeypatch.setattr(kernels, "FOLD_RATIO", 0.0 if fold else float("inf"))
    lin = Conv1D(6, 9) if conv1d else nn.Linear(9, 6)
    model = wrap(lin=lin)
    lorakit.inject(model, LoraConfig(r=3, alpha=6, target_modules=["lin"]))
    randomize_adapters(model)
    model.eval()
    x = torch.randn(2, 5, 9)
    ad, base = model.lin.adapters["default"], model.lin.base_layer
    want = plain(x, base.weight, base.bias, [(ad.lora_A.weight, ad.lora_B.weight, ad.scaling)], conv1d)
    w_before = base.weight.clone()
    with torch.no_grad():
        assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        assert torch.equal(base.weight, w_before)                 # folding leaves the base as it was
        w0 = base.weight.clone()
        lorakit.merge(model)
        delta = ad.scaling * ad.lora_B.weight @ ad.lora_A.weight
        assert_close(base.weight, w0 + (delta.t() if conv1d else delta), atol=1e-6, rtol=1e-6)
        assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        lorakit.unmerge(model)
        assert_close(base.weight, w0, atol=1e-6, rtol=1e-6)


ROWS = ["a3", None, "a0", "a4", "a1", "a3", "a2", None]


# --- bf16 autocast ----------------------------------------------------------------------------------------
def test_bf16_autocast_training_is_sane():
    model = wrap(lin=nn.Linear(32, 16))
    lorakit.inject(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["lin"]))
    randomize_adapters(model)
    model.train()
    x = torch.randn(8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    ad = model.lin.adapters["default"]
    assert ad.lora_A.weight.grad.dtype == torch.float32 and torch.isfinite(ad.lora_A.weight.grad).all()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    model.eval()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
        full = model(x)
    assert_close(low, full, atol=0.1, rtol=0.05)
