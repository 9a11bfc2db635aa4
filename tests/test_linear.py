"""LoraLinear (lorakit/linear.py): the formula by hand on nn.Linear and GPT-2's Conv1D, scaling,
init, dropout on the branch only, and the fast path against the plain formula and PEFT.

Hand-placed weights, outputs checked by arithmetic; PEFT's layers as the oracle for gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig, LoraLinear
from lorakit.dropout import drop_rate
from lorakit.state import require_state
from tiny import ids, tiny_llama, wrap


def adapter(layer, name="default"):
    return layer.adapters[name]


def test_linear_forward_by_hand():
    model = wrap(lin=nn.Linear(3, 2))
    with torch.no_grad():
        model.lin.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
        model.lin.bias.copy_(torch.tensor([0.5, -1.0]))
    lorakit.inject(model, LoraConfig(r=2, alpha=4, target_modules=["lin"]))   # scale 4 / 2 = 2
    ad = adapter(model.lin)
    with torch.no_grad():
        ad.lora_A.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # A x = (x0, x1)
        ad.lora_B.weight.zero_()
        ad.lora_B.weight[1, 0] = 3.0                                             # B A x = (0, 3 x0)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # base: (1 + 0.5, 2 + 3 - 1) = (1.5, 4); LoRA: 2 * (0, 3 * 1) = (0, 6)
    assert_close(model(x), torch.tensor([[1.5, 10.0]]), rtol=0, atol=1e-6)
    assert isinstance(model.lin, LoraLinear) and model.lin.base_layer.weight[1, 2] == 1.0


def test_rslora_scales_by_alpha_over_sqrt_r():
    model = wrap(lin=nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model.lin.weight.zero_()
    lorakit.inject(model, LoraConfig(r=2, alpha=4, use_rslora=True, target_modules=["lin"]))
    ad = adapter(model.lin)
    assert ad.scaling == pytest.approx(4 / math.sqrt(2))
    with torch.no_grad():
        ad.lora_A.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        ad.lora_B.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    out = model(torch.tensor([[5.0, 7.0, 9.0]]))
    assert_close(out, torch.tensor([[5.0 * 4 / math.sqrt(2), 0.0]]))


def test_gpt2_conv1d_is_fan_in_fan_out():
    conv = Conv1D(2, 3)                                   # nf=2 outputs, nx=3 inputs; weight (3, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0], [-1.0, 0.0]]))
        conv.bias.copy_(torch.tensor([0.0, 1.0]))
    model = wrap(c_attn=conv)
    lorakit.inject(model, LoraConfig(r=1, alpha=2, target_modules=["c_attn"]))   # scale 2
    layer = model.c_attn
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (3, 2)
    assert require_state(model).configs["default"].fan_in_fan_out is True
    ad = adapter(layer)
    assert ad.lora_A.weight.shape == (1, 3) and ad.lora_B.weight.shape == (2, 1)  # nn.Linear orientation
    with torch.no_grad():
        ad.lora_A.weight.copy_(torch.tensor([[0.0, 0.0, 1.0]]))
        ad.lora_B.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    x = torch.tensor([[1.0, 1.0, 2.0]])
    # base: x @ W + b = (1 - 2, 2 + 1 + 1) = (-1, 4); LoRA: 2 * (2, -2)
    assert_close(model(x), torch.tensor([[3.0, 0.0]]))
    assert layer.delta_weight("default").shape == (3, 2)                         # the base weight's layout


def _ks_uniform(values: torch.Tensor, bound: float) -> float:
    """Kolmogorov-Smirnov distance between the samples and U(-bound, bound)."""
    v = values.flatten().double().sort().values
    n = v.numel()
    cdf = ((v + bound) / (2 * bound)).clamp(0, 1)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - cdf).abs().max().item(), (cdf - (i - 1) / n).abs().max().item())


def test_default_init_is_kaiming_uniform_a_and_zero_b():
    model = wrap(lin=nn.Linear(256, 32))
    lorakit.inject(model, LoraConfig(r=64, target_modules=["lin"]))
    a, b = adapter(model.lin).lora_A.weight, adapter(model.lin).lora_B.weight
    bound = 1 / math.sqrt(256)                       # kaiming_uniform(a=sqrt(5)) on fan_in 256
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    assert _ks_uniform(a.detach(), bound) < 0.02     # n = 16384: the 0.1% critical value is 0.015
    normal = torch.randn(64, 256) * bound / math.sqrt(3)  # same variance, wrong shape of distribution
    assert _ks_uniform(normal.clamp(-bound, bound), bound) > 0.03
    assert torch.count_nonzero(b) == 0


def test_gaussian_init_has_std_one_over_r():
    model = wrap(lin=nn.Linear(256, 32))
    lorakit.inject(model, LoraConfig(r=16, init="gaussian", target_modules=["lin"]))
    a, b = adapter(model.lin).lora_A.weight, adapter(model.lin).lora_B.weight
    assert a.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert abs(a.mean().item()) < 0.003
    assert torch.count_nonzero(b) == 0


def test_adapters_are_float32_on_a_bf16_base():
    model = wrap(lin=nn.Linear(8, 4).to(torch.bfloat16))
    lorakit.inject(model, LoraConfig(r=2, target_modules=["lin"]))
    assert adapter(model.lin).lora_A.weight.dtype == torch.float32
    assert model.lin.base_layer.weight.dtype == torch.bfloat16
    assert model(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_dropout_zero_draws_no_random_numbers_in_training():
    model = wrap(lin=nn.Linear(8, 6))
    lorakit.inject(model, LoraConfig(r=4, dropout=0.0, target_modules=["lin"]))
    with torch.no_grad():
        adapter(model.lin).lora_B.weight.normal_()
    model.train()
    x = torch.randn(5, 8, requires_grad=True)
    rng = torch.get_rng_state()
    out1 = model(x)
    out1.sum().backward()
    assert torch.equal(torch.get_rng_state(), rng)
    out2 = model(x)
    model.eval()
    assert torch.equal(out1, out2)
    with torch.no_grad():
        assert_close(model(x), out1)


def _invertible_layer(p: float, dtype=torch.float64, k: int = 6, d: int = 8):
    """LoRA with r = k and A, B of full rank, so the dropped-out input can be solved back from the output."""
    torch.manual_seed(1)
    model = wrap(lin=nn.Linear(k, d).to(dtype))
    lorakit.inject(model, LoraConfig(r=k, alpha=2 * k, dropout=p, target_modules=["lin"]))   # scale 2
    ad = adapter(model.lin)
    with torch.no_grad():
        ad.lora_A.weight.copy_(torch.eye(k, dtype=dtype) + 0.3 * torch.randn(k, k, dtype=dtype))
        ad.lora_B.weight.copy_(torch.randn(d, k, dtype=dtype))
    return model.train()


@pytest.mark.parametrize("p", [0.3, 0.6])
def test_dropout_is_inverted_on_the_lora_branch_only(p):
    """Recover each row's dropped-out input from the output: every element is 0 or x / (1 - p)."""
    model = _invertible_layer(p)
    layer, ad = model.lin, adapter(model.lin)
    x = torch.randn(1024, 6, dtype=torch.float64, requires_grad=True)
    y = model(x)
    a, b, s = ad.lora_A.weight, ad.lora_B.weight, ad.scaling
    base = layer.base_layer(x).detach()                           # the base sees the whole x
    xd = torch.linalg.lstsq(s * b @ a, (y.detach() - base).t()).solution.t()     # (N, k)
    rate = drop_rate(p, x.device)
    assert rate == p
    kept = xd * (1 - rate) / x.detach()                              # 1 where kept, 0 where dropped
    mask = kept.round()
    assert ((kept - mask).abs().max() < 1e-8) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (1 - mask.mean().item()) == pytest.approx(p, abs=0.03)  # 6144 draws: sd 0.006
    # gradients equal the masked formula, written out by hand
    g = torch.randn_like(y)
    (y * g).sum().backward()
    xdrop = x.detach() * mask / (1 - rate)
    assert_close(a.grad, s * (g @ b).t() @ xdrop)
    assert_close(b.grad, s * g.t() @ (xdrop @ a.t()))
    w = layer.base_layer.weight
    assert_close(x.grad, g @ w + (s * (g @ b) @ a) * mask / (1 - rate))


def test_each_adapter_keeps_its_own_dropout():
    """Two adapters active in training: the one with dropout 0 must see the whole input."""
    model = wrap(lin=nn.Linear(6, 8, bias=False).double())
    with torch.no_grad():
        model.lin.weight.zero_()
    lorakit.inject(model, LoraConfig(r=6, alpha=6, dropout=0.0, target_modules=["lin"]), name="plain")
    lorakit.inject(model, LoraConfig(r=6, alpha=6, dropout=0.5, target_modules=["lin"]), name="dropped")
    lorakit.set_adapter(model, ["plain", "dropped"])
    with torch.no_grad():
        for name in ("plain", "dropped"):
            adapter(model.lin, name).lora_A.weight.copy_(torch.eye(6))
        adapter(model.lin, "plain").lora_B.weight.copy_(torch.eye(8, 6))
        dropped_b = adapter(model.lin, "dropped").lora_B.weight
        dropped_b.zero_()
        dropped_b[6, 0] = dropped_b[7, 1] = 1.0                   # rows 6, 7 <- x0, x1
    model.train()
    x = torch.rand(512, 6, dtype=torch.float64) + 0.5
    y = model(x)
    assert_close(y[:, :6], x)                                     # undropped, with dropout 0
    dropped = y[:, 6:] / x[:, :2]
    assert set(dropped.round(decimals=6).unique().tolist()) == {0.0, 2.0}


def _copy_into_peft(model, peft_model, module: str):
    layer = model.get_submodule(module)
    peft_layer = peft_model.base_model.model.get_submodule(module)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(adapter(layer).lora_A.weight)
        peft_layer.lora_B["default"].weight.copy_(adapter(layer).lora_B.weight)
    return peft_layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_fused_path_matches_formula_and_peft(kind, bias):
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else Conv1D(10, 12)
    model, peft_base = wrap(lin=base), wrap(lin=Conv1D(10, 12) if kind == "conv1d" else nn.Linear(12, 10))
    peft_base.load_state_dict(model.state_dict())
    lorakit.inject(model, LoraConfig(r=4, alpha=12, target_modules=["lin"], bias=bias))     # scale 3
    peft_model = get_peft_model(peft_base, PeftLoraConfig(r=4, lora_alpha=12, target_modules=["lin"], bias=bias))
    with torch.no_grad():
        adapter(model.lin).lora_B.weight.normal_()
    peft_layer = _copy_into_peft(model, peft_model, "lin")
    model.train(), peft_model.train()

    x = torch.randn(3, 5, 12)
    g = torch.randn(3, 5, 10)
    results = []
    for run in ("lorakit", "formula", "peft"):
        xr = x.clone().requires_grad_(True)
        if run == "lorakit":
            out = model(xr)
            assert "Lora" in type(out.grad_fn).__name__           # the custom autograd function ran
            ad, bias_p = adapter(model.lin), model.lin.base_layer.bias
            a, b = ad.lora_A.weight, ad.lora_B.weight
        elif run == "formula":
            a = adapter(model.lin).lora_A.weight.detach().clone().requires_grad_(True)
            b = adapter(model.lin).lora_B.weight.detach().clone().requires_grad_(True)
            w = model.lin.base_layer.weight.detach()
            w = w.t() if kind == "conv1d" else w
            bias_p = model.lin.base_layer.bias.detach().clone().requires_grad_(bias != "none")
            out = F.linear(xr, w, bias_p) + 3.0 * F.linear(F.linear(xr, a), b)
        else:
            out = peft_model(xr)
            a, b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
            bias_p = peft_layer.base_layer.bias
        (out * g).sum().backward()
        results.append((out.detach(), xr.grad, a.grad, b.grad, bias_p.grad))
    for other in results[1:]:
        for got, want in zip(results[0], other):
            if want is None:
                assert got is None
            else:
                assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert model.lin.base_layer.weight.grad is None


def test_two_active_adapters_fused_matches_formula():
    torch.manual_seed(0)
    model = wrap(lin=nn.Linear(8, 6))
    lorakit.inject(model, LoraConfig(r=2, alpha=4, target_modules=["lin"]), name="a")   # scale 2
    lorakit.inject(model, LoraConfig(r=3, alpha=3, target_modules=["lin"]), name="b")   # scale 1
    lorakit.set_adapter(model, ["a", "b"])
    lorakit.set_trainable(model, "b", True)
    with torch.no_grad():
        for n in ("a", "b"):
            adapter(model.lin, n).lora_B.weight.normal_()
    model.train()
    x = torch.randn(7, 8, requires_grad=True)
    out = model(x)
    (out ** 2).sum().backward()
    base, ad_a, ad_b = model.lin.base_layer, adapter(model.lin, "a"), adapter(model.lin, "b")
    params = [t.detach().clone().requires_grad_(True) for t in
              (x, ad_a.lora_A.weight, ad_a.lora_B.weight, ad_b.lora_A.weight, ad_b.lora_B.weight)]
    xr, a1, b1, a2, b2 = params
    want = base(xr) + 2.0 * xr @ a1.t() @ b1.t() + 1.0 * xr @ a2.t() @ b2.t()
    (want ** 2).sum().backward()
    assert_close(out, want)
    for got, ref in zip((x, ad_a.lora_A.weight, ad_a.lora_B.weight, ad_b.lora_A.weight, ad_b.lora_B.weight), params):
        assert_close(got.grad, ref.grad, atol=1e-5, rtol=1e-5)


def test_unfusable_base_trainable_weight_gets_its_gradient():
    """A trainable base weight takes the unfused path; all gradients still equal the formula."""
    torch.manual_seed(0)
    model = wrap(lin=nn.Linear(8, 6))
    lorakit.inject(model, LoraConfig(r=2, alpha=2, target_modules=["lin"]))
    model.lin.base_layer.weight.requires_grad_(True)
    ad = adapter(model.lin)
    with torch.no_grad():
        ad.lora_B.weight.normal_()
    model.train()
    x = torch.randn(4, 8, requires_grad=True)
    (model(x) ** 2).sum().backward()
    w, a, b, xr = (t.detach().clone().requires_grad_(True)
                   for t in (model.lin.base_layer.weight, ad.lora_A.weight, ad.lora_B.weight, x))
    ((F.linear(xr, w, model.lin.base_layer.bias) + xr @ a.t() @ b.t()) ** 2).sum().backward()
    for got, ref in zip((model.lin.base_layer.weight, ad.lora_A.weight, ad.lora_B.weight, x), (w, a, b, xr)):
        assert_close(got.grad, ref.grad, atol=1e-5, rtol=1e-5)


def test_base_weights_frozen_and_get_no_gradient():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)
    model.train()
    x = ids()
    model(x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n


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
