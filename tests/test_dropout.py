"""Dropout on the LoRA branch (lorakit/dropout.py, `lorakit.shared_dropout`).

- inverted, with probability p, the same distribution as PEFT's nn.Dropout (on the CPU drawn as
  the dropped positions, geometric gaps: tested to be i.i.d. Bernoulli(p));
- a mask comes from a seed, replayed by checkpointing; on the CPU its positions are kept for
  backward (nothing mask-sized), elsewhere it is drawn again;
- inside `shared_dropout` the branches reading one input tensor share a mask, outside every layer
  draws its own; either way values and gradients equal the plain formula with the masks drawn.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import lorakit
from lorakit import LoraConfig
from lorakit.dropout import DropoutDraws, drop_positions, drop_rate, keep_mask
from lorakit.state import require_state
from tiny import randomize_adapters, wrap


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


def identity_pair(k: int = 16, p: float = 0.5) -> nn.ModuleDict:
    """q and v, base weights 0, A = B = I, s = 1: each output *is* its dropped-out input."""
    model = nn.ModuleDict({"q": nn.Linear(k, k, bias=False), "v": nn.Linear(k, k, bias=False)})
    with torch.no_grad():
        for m in model.values():
            m.weight.zero_()
    lorakit.inject(model, LoraConfig(r=k, alpha=k, dropout=p, target_modules=["q", "v"]))
    with torch.no_grad():
        for name in ("q", "v"):
            model[name].adapters["default"].lora_A.weight.copy_(torch.eye(k))
            model[name].adapters["default"].lora_B.weight.copy_(torch.eye(k))
    return model.train()


def test_mask_is_shared_by_branches_reading_the_same_input_only():
    k = 16
    model = identity_pair(k)
    x = torch.ones(64, k, requires_grad=True)
    with lorakit.shared_dropout(model):
        q, v = model["q"](x), model["v"](x)
        assert torch.equal(q, v)                                  # q and v read x: one draw
        other = torch.ones(64, k, requires_grad=True)
        assert not torch.equal(model["v"](other), q)              # another input: a new draw
        (q.sum() + v.sum()).backward()
    assert_close(x.grad, 2 * q.detach())


def test_outside_shared_dropout_every_layer_draws_its_own_mask():
    """PEFT's behaviour: q and v reading the same x get independent masks (and backward each its own)."""
    k = 16
    model = identity_pair(k)
    x = torch.ones(64, k, requires_grad=True)
    q, v = model["q"](x), model["v"](x)
    assert not torch.equal(q, v)
    for y in (q, v):                                              # each an inverted dropout of x
        assert set(y.detach().unique().tolist()) == {0.0, 1 / (1 - drop_rate(0.5, x.device))}
    (q.sum() + v.sum()).backward()
    assert_close(x.grad, q.detach() + v.detach())
    assert require_state(model).dropout_draws is None


def test_shared_dropout_restores_the_state_and_needs_adapters():
    model = identity_pair()
    state = require_state(model)
    with lorakit.shared_dropout(model):
        outer = state.dropout_draws
        assert isinstance(outer, DropoutDraws)
        with lorakit.shared_dropout(model):
            assert state.dropout_draws is not outer               # nested: a fresh set of draws
        assert state.dropout_draws is outer
    assert state.dropout_draws is None
    with pytest.raises(ValueError, match=r"ModuleDict has no LoRA adapters; call lorakit.inject\(model, config\)"):
        with lorakit.shared_dropout(nn.ModuleDict({"q": nn.Linear(2, 2)})):
            pass


def two_readers(k: int = 6, p: float = 0.5) -> nn.ModuleDict:
    """q and v with random float64 weights, A (r = k) and B of full rank: each mask can be solved back."""
    model = nn.ModuleDict({"q": nn.Linear(k, k).double(), "v": nn.Linear(k, k).double()})
    lorakit.inject(model, LoraConfig(r=k, alpha=2 * k, dropout=p, target_modules=["q", "v"]))   # scale 2
    with torch.no_grad():
        for name in ("q", "v"):
            ad = model[name].adapters["default"]
            ad.lora_A.weight.copy_(torch.eye(k, dtype=torch.float64) + 0.3 * torch.randn(k, k, dtype=torch.float64))
            ad.lora_B.weight.copy_(torch.randn(k, k, dtype=torch.float64))
    return model.train()


def solved_mask(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The 0/1 mask layer's branch used, from y = W x + b + s/(1 - rate) · B A (x ⊙ mask)."""
    ad = layer.adapters["default"]
    scale = ad.scaling / (1 - drop_rate(ad.dropout, x.device))
    with torch.no_grad():
        xm = torch.linalg.solve(scale * ad.lora_B.weight @ ad.lora_A.weight, (y - layer.base_layer(x)).t()).t()
    mask = (xm / x.detach()).round()
    assert_close(mask, xm / x.detach())                           # really 0 or 1 everywhere
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    return mask


@pytest.mark.parametrize("shared", [True, False])
def test_gradients_equal_the_plain_formula_with_the_same_masks(shared):
    """Inside shared_dropout q and v use one mask, outside two; either way values and gradients are
    the plain formula's, W x + b + s/(1 - rate) · B A (x ⊙ mask), with the masks the layers drew."""
    model = two_readers()
    x = (torch.rand(256, 6, dtype=torch.float64) + 0.5).requires_grad_(True)
    grads = {n: torch.randn(256, 6, dtype=torch.float64) for n in ("q", "v")}
    with lorakit.shared_dropout(model) if shared else contextlib.nullcontext():
        out = {n: model[n](x) for n in ("q", "v")}
        sum((out[n] * grads[n]).sum() for n in out).backward()
    masks = {n: solved_mask(model[n], x, out[n]) for n in out}
    assert torch.equal(masks["q"], masks["v"]) == shared
    xr = x.detach().clone().requires_grad_(True)
    for n, layer in model.items():
        ad, base = layer.adapters["default"], layer.base_layer
        a, b = (t.detach().clone().requires_grad_(True) for t in (ad.lora_A.weight, ad.lora_B.weight))
        scale = ad.scaling / (1 - drop_rate(ad.dropout, x.device))
        want = F.linear(xr, base.weight, base.bias) + scale * F.linear(F.linear(xr * masks[n], a), b)
        (want * grads[n]).sum().backward()
        assert_close(out[n], want)
        assert_close(ad.lora_A.weight.grad, a.grad)
        assert_close(ad.lora_B.weight.grad, b.grad)
    assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("shared", [True, False])
def test_a_layer_called_again_on_the_same_input_draws_a_new_mask(shared):
    """The shared draw is per forward pass: the next step on the very same tensor gets a new mask."""
    model = identity_branch(0.5)
    x = torch.ones(64, 16)
    with lorakit.shared_dropout(model) if shared else contextlib.nullcontext():
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("shared", [True, False])
def test_dropout_replays_under_checkpointing(shared):
    """torch.utils.checkpoint recomputes the forward in backward: the masks must be the same ones."""
    from torch.utils.checkpoint import checkpoint

    def run(use_checkpoint: bool):
        torch.manual_seed(0)
        model = wrap(a=nn.Linear(8, 8), b=nn.Linear(8, 8))
        lorakit.inject(model, LoraConfig(r=4, alpha=8, dropout=0.3, target_modules=["a", "b"]))
        randomize_adapters(model)
        model.train()
        x = torch.randn(32, 8, requires_grad=True)
        torch.manual_seed(7)
        with lorakit.shared_dropout(model) if shared else contextlib.nullcontext():
            y = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
            y.square().sum().backward()
        return y.detach(), [p.grad for p in model.parameters() if p.requires_grad] + [x.grad]

    (y1, g1), (y2, g2) = run(False), run(True)
    assert_close(y1, y2)
    for a, b in zip(g1, g2):
        assert_close(a, b)


def test_keep_mask_probability_is_exact_at_the_ends():
    assert keep_mask((1000,), 0.0, torch.device("cpu")).all()
    assert not keep_mask((1000,), 1.0, torch.device("cpu")).any()
    gen = torch.Generator().manual_seed(0)
    m = keep_mask((200_000,), 0.25, torch.device("cpu"), gen)
    assert abs((~m).float().mean().item() - 0.25) < 5 * (0.25 * 0.75 / 200_000) ** 0.5
    again = keep_mask((200_000,), 0.25, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(m, again)                                  # a seed is a mask: checkpointing's replay relies on it


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_drop_positions_are_independent_bernoulli_p(p):
    """Geometric gaps give i.i.d. Bernoulli(p) drops: the rate, the runs between drops, and
    neighbouring elements uncorrelated, all within 5 standard deviations."""
    n = 400_000
    pos = drop_positions(n, p, torch.Generator().manual_seed(3))
    assert pos.dtype == torch.int64 and bool((pos[1:] > pos[:-1]).all()) and 0 <= int(pos[0]) and int(pos[-1]) < n
    dropped = torch.zeros(n, dtype=torch.float64)
    dropped[pos] = 1
    assert abs(dropped.mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    both = (dropped[1:] * dropped[:-1]).mean().item()             # P(two neighbours dropped) = p²
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5
    gaps = torch.diff(pos).double()                               # geometric: mean 1/p
    assert abs(gaps.mean().item() - 1 / p) < 5 * ((1 - p) / p**2 / len(gaps)) ** 0.5


def test_drop_positions_in_several_rounds_of_gaps(monkeypatch):
    """When one round of gaps falls short of n (rare), further rounds continue from the last drop."""
    from lorakit import dropout as droplib

    monkeypatch.setattr(droplib, "GAP_SIGMAS", -40)              # rounds far too short: many of them
    n, p = 100_000, 0.1
    pos = drop_positions(n, p, torch.Generator().manual_seed(2))
    assert bool((torch.diff(pos) > 0).all()) and int(pos[-1]) < n and int(pos[-1]) > n - 200
    assert abs(len(pos) / n - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_cpu_drop_rate_is_p_and_the_scale_follows_it():
    cpu = torch.device("cpu")
    assert drop_rate(0.05, cpu) == 0.05
    gen = torch.Generator().manual_seed(1)
    m = keep_mask((400_000,), 0.05, cpu, gen, dtype=torch.float32)
    assert set(m.unique().tolist()) == {0.0, 1.0}
    for dtype in (torch.bool, torch.bfloat16, torch.float16):          # the same draw in every dtype
        same = keep_mask((400_000,), 0.05, cpu, torch.Generator().manual_seed(1), dtype=dtype)
        assert torch.equal(same.float(), m)
    assert abs(1 - m.mean().item() - 0.05) < 5 * (0.05 * 0.95 / 400_000) ** 0.5
    # identity branch, W = 0: the output is s/(1 - p) · x ⊙ mask, i.e. exactly 0 or x / (1 - p)
    model = identity_branch(0.05)
    x = torch.ones(512, 16)
    y = model(x)
    values = y.detach().unique()
    assert len(values) == 2 and values[0] == 0.0
    assert values[1].item() == pytest.approx(1 / (1 - 0.05), rel=1e-6)


def test_plain_dropout_formula_matches_f_dropout_statistics():
    """Same distribution as PEFT's nn.Dropout on the branch: mean preserved, variance p/(1-p)·x²."""
    model = identity_branch(0.2, k=32)
    x = torch.full((2048, 32), 3.0)
    y = model(x).detach()
    ref = F.dropout(x, 0.2, True)
    assert abs(y.mean().item() - ref.mean().item()) < 0.05
    assert abs(y.var().item() - ref.var().item()) / ref.var().item() < 0.1
