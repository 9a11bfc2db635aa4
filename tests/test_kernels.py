"""The fast paths against the plain formula and against PEFT.

- the fused autograd linear (kernels.LoraLinearFunction / LoraDeltaFunction): outputs and
  gradients equal ``base(x) + s·B(A(dropout(x)))`` and PEFT's, with dropout 0, to 1e-5;
- dropout: inverted, probability p, one mask per input shared by the branches that read it,
  drawn again in backward (nothing mask-sized is kept), replayed by checkpointing;
- inference without autograd, merged and unmerged, and the in-place merge;
- per-row routing through batched matmuls: prefill and KV-cache decoding equal per-adapter runs;
- bf16 autocast stays sane; adapter creation skips the double init.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig, kernels
from lorakit.state import lora_layers
from tiny import ids, single_runs, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def wrap(**modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(modules))


def randomize(model: nn.Module, std: float = 0.2, seed: int = 3) -> None:
    """Give every adapter non-zero B (and fresh A), so the branches do something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for ad in layer.adapters.values():
                for t in (ad.lora_A.weight, ad.lora_B.weight):
                    t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * std)


def plain(x, w, bias, adapters, fan_in_fan_out=False):
    """The formula with ordinary autograd: x Wᵀ + b + Σ s B A x."""
    y = x @ (w if fan_in_fan_out else w.t())
    if bias is not None:
        y = y + bias
    for a, b, s in adapters:
        y = y + (x @ a.t() @ b.t()) * s
    return y


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
    randomize(model)
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
    randomize(ours)
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


# --- dropout ----------------------------------------------------------------------------------------------
def identity_branch(p: float, k: int = 16, name: str = "lin") -> nn.Module:
    """Base weight 0, A = B = I, s = 1: the output *is* the dropped-out input."""
    model = wrap(**{name: nn.Linear(k, k, bias=False)})
    with torch.no_grad():
        getattr(model, name).weight.zero_()
    lorakit.inject(model, LoraConfig(r=k, alpha=k, dropout=p, target_modules=[name]))
    with torch.no_grad():
        ad = getattr(model, name).adapters["default"]
        ad.lora_A.weight.copy_(torch.eye(k))
        ad.lora_B.weight.copy_(torch.eye(k))
    return model.train()


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_is_inverted_with_probability_p(p):
    model = identity_branch(p)
    x = torch.ones(4096, 16, requires_grad=True)
    y = model(x)
    kept = y.detach() != 0
    assert_close(y.detach()[kept], torch.full((int(kept.sum()),), 1 / (1 - p)))
    dropped = (y == 0).double().mean().item()
    sd = (p * (1 - p) / y.numel()) ** 0.5
    assert abs(dropped - p) < 5 * sd
    # backward draws the same mask again: dL/dx is the forward's keep pattern, scaled
    y.sum().backward()
    assert_close(x.grad, y.detach())


def test_mask_is_shared_by_branches_reading_the_same_input_only():
    k = 16
    model = nn.ModuleDict({"q": nn.Linear(k, k, bias=False), "v": nn.Linear(k, k, bias=False)})
    with torch.no_grad():
        for m in model.values():
            m.weight.zero_()
    lorakit.inject(model, LoraConfig(r=k, alpha=k, dropout=0.5, target_modules=["q", "v"]))
    with torch.no_grad():
        for name in ("q", "v"):
            model[name].adapters["default"].lora_A.weight.copy_(torch.eye(k))
            model[name].adapters["default"].lora_B.weight.copy_(torch.eye(k))
    model.train()
    x = torch.ones(64, k, requires_grad=True)
    q, v = model["q"](x), model["v"](x)
    assert torch.equal(q, v)                                      # q and v read x: one draw
    other = torch.ones(64, k, requires_grad=True)
    assert not torch.equal(model["v"](other), q)                  # another input: a new draw
    (q.sum() + v.sum()).backward()
    assert_close(x.grad, 2 * q.detach())


def test_a_layer_called_again_on_the_same_input_draws_a_new_mask():
    """The shared draw is per forward pass: the next step on the very same tensor gets a new mask."""
    model = identity_branch(0.5)
    x = torch.ones(64, 16)
    assert not torch.equal(model(x), model(x))


def test_dropout_replays_under_checkpointing():
    """torch.utils.checkpoint recomputes the forward in backward: the masks must be the same ones."""
    from torch.utils.checkpoint import checkpoint

    def run(use_checkpoint: bool):
        torch.manual_seed(0)
        model = wrap(a=nn.Linear(8, 8), b=nn.Linear(8, 8))
        lorakit.inject(model, LoraConfig(r=4, alpha=8, dropout=0.3, target_modules=["a", "b"]))
        randomize(model)
        model.train()
        x = torch.randn(32, 8, requires_grad=True)
        torch.manual_seed(7)
        y = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
        y.square().sum().backward()
        return y.detach(), [p.grad for p in model.parameters() if p.requires_grad] + [x.grad]

    (y1, g1), (y2, g2) = run(False), run(True)
    assert_close(y1, y2)
    for a, b in zip(g1, g2):
        assert_close(a, b)


def test_keep_mask_probability_is_exact_at_the_ends():
    assert kernels.keep_mask((1000,), 0.0, torch.device("cpu")).all()
    gen = torch.Generator().manual_seed(0)
    m = kernels.keep_mask((200_000,), 0.25, torch.device("cpu"), gen)
    assert abs((~m).float().mean().item() - 0.25) < 5 * (0.25 * 0.75 / 200_000) ** 0.5
    again = kernels.keep_mask((200_000,), 0.25, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(m, again)                                  # a seed is a mask: backward relies on it


def test_cpu_drop_rate_is_p_rounded_to_16_bits_and_the_scale_follows_it():
    cpu = torch.device("cpu")
    assert kernels.drop_rate(0.05, cpu) == 3277 / 65536                  # |0.05 - rate| < 2**-17
    assert kernels.drop_rate(0.25, cpu) == 0.25
    assert kernels.drop_rate(0.0, cpu) == 0.0
    gen = torch.Generator().manual_seed(1)
    m = kernels.keep_mask((400_000,), 0.05, cpu, gen, dtype=torch.float32)
    assert set(m.unique().tolist()) == {0.0, 1.0}
    for dtype in (torch.bool, torch.bfloat16, torch.float16):          # the same draw in every dtype
        same = kernels.keep_mask((400_000,), 0.05, cpu, torch.Generator().manual_seed(1), dtype=dtype)
        assert torch.equal(same.float(), m)
    assert abs(1 - m.mean().item() - 3277 / 65536) < 5 * (0.05 * 0.95 / 400_000) ** 0.5
    # identity branch, W = 0: the output is s/(1 - rate) · x ⊙ mask, i.e. exactly 0 or x / (1 - rate)
    model = identity_branch(0.05)
    x = torch.ones(512, 16)
    y = model(x)
    values = y.detach().unique()
    assert len(values) == 2 and values[0] == 0.0
    assert values[1].item() == pytest.approx(1 / (1 - 3277 / 65536), rel=1e-6)


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
    randomize(model)
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


def test_adapter_creation_initialises_once():
    """nn.Linear's own kaiming init is skipped: one uniform_ draw per A, B built as zeros."""
    model = wrap(lin=nn.Linear(32, 16))
    calls = []
    original = torch.Tensor.uniform_

    def counting(self, *args, **kwargs):
        calls.append(self.shape)
        return original(self, *args, **kwargs)

    torch.Tensor.uniform_ = counting
    try:
        lorakit.inject(model, LoraConfig(r=4, target_modules=["lin"]))
    finally:
        torch.Tensor.uniform_ = original
    assert calls == [torch.Size([4, 32])]
    ad = model.lin.adapters["default"]
    assert isinstance(ad.lora_A, nn.Linear) and ad.lora_A.bias is None and ad.lora_A.in_features == 32
    assert torch.equal(ad.lora_B.weight, torch.zeros(16, 4))


# --- per-row routing ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def many():
    """tiny Llama with five adapters of different ranks on all projections (one misses k_proj)."""
    model = tiny_llama(seed=0, hidden=32)
    for i in range(5):
        targets = [t for t in LLAMA_TARGETS if not (i == 4 and t == "k_proj")]
        lorakit.inject(model, LoraConfig(r=2 + i, alpha=4, target_modules=targets), name=f"a{i}")
    randomize(model, std=0.3)
    return model.eval()


ROWS = ["a3", None, "a0", "a4", "a1", "a3", "a2", None]


def test_per_row_prefill_uses_batched_matmuls_and_matches_single_runs(many, monkeypatch):
    x = ids(len(ROWS), 7, seed=2)
    calls = []
    monkeypatch.setattr(lorakit.LoraLinear, "_lora_forward",
                        lambda self, *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    with torch.no_grad(), lorakit.per_row(many, ROWS):
        mixed = many(x).logits
    assert not calls                                              # no per-adapter loop anywhere
    monkeypatch.undo()
    with torch.no_grad():
        alone = single_runs(many, x, ROWS, lambda xi: many(xi).logits, reset="a0")
    assert_close(mixed, alone, atol=1e-5, rtol=1e-5)


def test_per_row_decoding_with_kv_cache_matches_single_runs(many):
    x = ids(len(ROWS), 5, seed=3)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=True)
    with torch.no_grad():
        with lorakit.per_row(many, ROWS):
            mixed = many.generate(x, output_scores=True, return_dict_in_generate=True, **kwargs)
        alone = single_runs(many, x, ROWS, lambda xi: many.generate(xi, **kwargs), reset="a0")
    assert torch.equal(mixed.sequences, alone)
    # the cached per-row factors were built once per layer, not per step
    assert mixed.sequences.shape == (len(ROWS), 13)


def test_per_row_factors_are_gathered_once_per_routing(many):
    from lorakit.routing import Routing

    routing = Routing(ROWS)
    layer = many.model.layers[0].self_attn.k_proj
    a1, b1 = routing.row_factors(layer, len(ROWS), torch.device("cpu"), torch.float32)
    a2, _ = routing.row_factors(layer, len(ROWS), torch.device("cpu"), torch.float32)
    assert a1 is a2
    r_max = 5                                                     # a3; a4 (r=6) has no k_proj
    assert a1.shape == (len(ROWS), r_max, 32) and b1.shape == (len(ROWS), layer.out_features, r_max)
    assert not a1[1].any() and not b1[3].any()                   # None row and a4 (no k_proj here): zeros
    ad = layer.adapters["a3"]
    assert_close(b1[0, :, : ad.r] @ a1[0, : ad.r], ad.scaling * ad.lora_B.weight @ ad.lora_A.weight)


def test_adapter_stack_is_reused_across_routings_and_rebuilt_when_an_adapter_changes(many):
    from lorakit.routing import Routing, adapter_stack

    layer = many.model.layers[0].self_attn.q_proj
    cpu = torch.device("cpu")
    _, a1, _ = adapter_stack(layer, cpu, torch.float32)
    Routing(ROWS).row_factors(layer, len(ROWS), cpu, torch.float32)
    _, a2, _ = adapter_stack(layer, cpu, torch.float32)
    assert a1 is a2                                               # a new batch reuses the stack
    x = ids(len(ROWS), 4, seed=5)
    ad = layer.adapters["a1"]
    with torch.no_grad():
        ad.lora_A.weight.mul_(3.0)                                # in place: the version counter moves
        with lorakit.per_row(many, ROWS):
            mixed = many(x).logits
        alone = single_runs(many, x, ROWS, lambda xi: many(xi).logits, reset="a0")
    assert adapter_stack(layer, cpu, torch.float32)[1] is not a1
    assert_close(mixed, alone, atol=1e-5, rtol=1e-5)              # the change is seen, no stale stack


# --- bf16 autocast ----------------------------------------------------------------------------------------
def test_bf16_autocast_training_is_sane():
    model = wrap(lin=nn.Linear(32, 16))
    lorakit.inject(model, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["lin"]))
    randomize(model)
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


def test_plain_dropout_formula_matches_f_dropout_statistics():
    """Same distribution as PEFT's nn.Dropout on the branch: mean preserved, variance p/(1-p)·x²."""
    model = identity_branch(0.2, k=32)
    x = torch.full((2048, 32), 3.0)
    y = model(x).detach()
    ref = F.dropout(x, 0.2, True)
    assert abs(y.mean().item() - ref.mean().item()) < 0.05
    assert abs(y.var().item() - ref.var().item()) / ref.var().item() < 0.1


def test_per_row_on_gpt2_conv1d_matches_single_runs():
    """transformers' Conv1D stores W as (in, out); the batched path must not care."""
    from tiny import tiny_gpt2

    model = tiny_gpt2(seed=0)
    for i in range(3):
        lorakit.inject(model, LoraConfig(r=2 + i, alpha=4, target_modules=["c_attn", "c_proj", "c_fc"]), name=f"g{i}")
    randomize(model, std=0.3)
    model.eval()
    rows = ["g2", None, "g0", "g1"]
    x = ids(len(rows), 6, seed=4)
    with torch.no_grad():
        with lorakit.per_row(model, rows):
            mixed = model(x).logits
        alone = single_runs(model, x, rows, lambda xi: model(xi).logits, reset="g0")
    assert_close(mixed, alone, atol=1e-5, rtol=1e-5)

