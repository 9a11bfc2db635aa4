"""merge / unmerge / merge_and_unload / combine, against the unmerged model and against PEFT."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from torch import nn
from torch.testing import assert_close

import lorakit
from lorakit import LoraConfig, LoraLayer, ModulesToSave
from lorakit.state import lora_layers, require_state
from tiny import conv_toy, ids, randomize_lora, tiny_gpt2, tiny_llama, toy_transformer

CASES = {  # name: (build, config, input)
    "llama": (tiny_llama, LoraConfig(r=4, alpha=8, target_modules="all-linear"), lambda: ids(2, 5)),
    "gpt2": (tiny_gpt2, LoraConfig(r=4, alpha=8, target_modules="all-linear"), lambda: ids(2, 5)),
    "toy": (toy_transformer, LoraConfig(r=3, alpha=6, target_modules=["embed", "q", "v", "head"]), lambda: ids(2, 5)),
    "conv": (conv_toy, LoraConfig(r=2, alpha=4, target_modules=["conv", "conv1d", "lin"]),
             lambda: torch.randn(2, 3, 8, 8)),
}


def run(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def adapted(case: str, seed: int = 1):
    build, cfg, make_x = CASES[case]
    model = lorakit.inject(build(), cfg)
    randomize_lora(model, seed=seed)
    return model, build(), make_x()


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_unmerged_and_unmerge_restores_base(case):
    model, base, x = adapted(case)
    before = base_weights(model)
    unmerged = run(model, x)
    assert (unmerged - run(base, x)).abs().max() > 1e-3
    lorakit.merge(model)
    assert all(layer.merged == ["default"] for _, layer in lora_layers(model))
    assert_close(run(model, x), unmerged, atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(p, before[n]) for n, p in base_weights(model).items())
    lorakit.unmerge(model)
    for name, weight in base_weights(model).items():
        assert_close(weight, before[name], atol=1e-6, rtol=0, msg=name)
    assert_close(run(model, x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_delta_weight_equals_peft(case, tmp_path):
    model, base, _ = adapted(case)
    lorakit.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(base, tmp_path)
    ours = dict(lora_layers(model))
    theirs = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, PeftLoraLayer)}
    assert ours.keys() == theirs.keys()
    for name, layer in ours.items():
        want = theirs[name].get_delta_weight("default")
        assert want.shape == layer.base_layer.weight.shape
        assert_close(layer.delta_weight("default"), want, atol=1e-6, rtol=1e-5, msg=name)


def test_merge_twice_is_a_no_op():
    model, _, x = adapted("llama")
    lorakit.merge(model)
    once = base_weights(model)
    lorakit.merge(model)
    lorakit.merge(model, ["default"])
    assert all(torch.equal(p, once[n]) for n, p in base_weights(model).items())
    assert all(layer.merged == ["default"] for _, layer in lora_layers(model))
    lorakit.unmerge(model)
    lorakit.unmerge(model)                                  # and unmerging twice too
    assert all(layer.merged == [] for _, layer in lora_layers(model))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_refuses_nan_inf_naming_the_layer_and_writes_nothing(bad):
    model, _, x = adapted("llama")
    before = base_weights(model)
    broken = "model.layers.1.mlp.down_proj"                 # not the first layer merged
    with torch.no_grad():
        model.get_submodule(broken).adapters["default"].lora_B.weight[0, 0] = bad
    with pytest.raises(ValueError, match=rf"NaNs or Infs detected in the merged weights of {broken}: "
                                         r"the adapter 'default' seems to be broken"):
        lorakit.merge(model, safe=True)
    after = base_weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert all(layer.merged == [] for _, layer in lora_layers(model))


def test_merge_unknown_name_lists_the_known_ones():
    model, _, _ = adapted("llama")
    with pytest.raises(ValueError, match=r"merge: unknown adapter name\(s\) \['x'\]; this model has \['default'\]"):
        lorakit.merge(model, ["x"])


def test_merge_and_unload_gives_a_plain_model(tmp_path):
    model, base, x = adapted("llama")
    unmerged = run(model, x)
    plain = lorakit.merge_and_unload(model)
    assert plain is model and type(plain).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    assert list(plain.state_dict()) == list(base.state_dict())
    assert "_lorakit_state" not in plain.__dict__
    assert_close(run(plain, x), unmerged, atol=1e-5, rtol=1e-5)
    plain.save_pretrained(tmp_path)
    reloaded = type(base).from_pretrained(tmp_path).eval()
    assert_close(run(reloaded, x), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_keeps_the_modules_to_save_copy():
    model = lorakit.inject(toy_transformer(), LoraConfig(r=2, target_modules=["q"], modules_to_save=["head"]))
    randomize_lora(model, seed=4)
    x = ids(2, 4)
    unmerged = run(model, x)
    plain = lorakit.merge_and_unload(model)
    assert type(plain.head) is nn.Linear
    assert list(plain.state_dict()) == list(toy_transformer().state_dict())
    assert_close(run(plain, x), unmerged, atol=1e-5, rtol=1e-5)


def test_bf16_merge_computes_the_delta_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48)).to(torch.bfloat16)
    w0 = model[0].weight.detach().clone()
    lorakit.inject(model, LoraConfig(r=8, alpha=16, target_modules=["0"]))
    ad = model[0].adapters["default"]
    assert ad.lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        ad.lora_B.weight.normal_(std=0.05)
    a, b = ad.lora_A.weight.detach(), ad.lora_B.weight.detach()
    lorakit.merge(model)
    merged = model[0].base_layer.weight
    assert merged.dtype == torch.bfloat16
    fp32_ref = w0.float() + 2.0 * b @ a
    assert torch.equal(merged, fp32_ref.to(torch.bfloat16))             # one rounding, at the end
    assert_close(merged.float(), fp32_ref, atol=0.0, rtol=2 ** -8)      # within bf16's half-ulp
    in_bf16 = w0 + (2.0 * b.to(torch.bfloat16) @ a.to(torch.bfloat16))
    assert not torch.equal(in_bf16, merged)                              # the bf16 shortcut would differ


# --- several adapters ---------------------------------------------------------------------------------
@pytest.fixture
def ab():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), name="a")
    lorakit.inject(model, LoraConfig(r=2, alpha=2, target_modules=["q_proj", "o_proj"]), name="b")
    randomize_lora(model, "a", seed=1)
    randomize_lora(model, "b", seed=2)
    return model, ids(2, 5)


def test_merging_one_named_adapter_equals_running_it(ab):
    model, x = ab
    base_w = base_weights(model)
    running_a = run(model, x)                                           # "a" is active
    lorakit.set_adapter(model, ["a", "b"])
    running_ab = run(model, x)
    lorakit.set_adapter(model, "a")
    lorakit.merge(model, ["a"])
    assert_close(run(model, x), running_a, atol=1e-5, rtol=1e-5)
    lorakit.set_adapter(model, ["a", "b"])                              # b on top of merged a
    assert_close(run(model, x), running_ab, atol=1e-5, rtol=1e-5)
    lorakit.merge(model, ["b"])
    assert_close(run(model, x), running_ab, atol=1e-5, rtol=1e-5)
    assert model.model.layers[0].self_attn.q_proj.merged == ["a", "b"]
    lorakit.unmerge(model)
    for name, weight in base_weights(model).items():
        assert_close(weight, base_w[name], atol=1e-6, rtol=0)


def test_switching_to_an_unmerged_adapter_while_merged_refuses(ab):
    model, _ = ab
    lorakit.merge(model, ["a"])
    with pytest.raises(ValueError, match=r"set_adapter: adapters \['a'\] are merged into the base weights"):
        lorakit.set_adapter(model, "b")


# --- combine: PEFT's add_weighted_adapter -----------------------------------------------------------
COMBINE_CASES = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], ["q_proj", "v_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"], ["c_attn"]),
    "toy": (toy_transformer, ["embed", "q", "k"], ["embed", "q"]),
    "conv": (conv_toy, ["conv", "lin"], ["conv"]),
}


def combine_pair(case: str, r_b: int, tmp_path):
    build, targets_a, targets_b = COMBINE_CASES[case]
    model = build()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=targets_a), name="a")
    lorakit.inject(model, LoraConfig(r=r_b, alpha=3, target_modules=targets_b), name="b")
    randomize_lora(model, "a", seed=1)
    randomize_lora(model, "b", seed=2)
    for n in ("a", "b"):
        lorakit.save_adapter(model, tmp_path / n, name=n)
    peft_model = PeftModel.from_pretrained(build(), tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    return model, peft_model


@pytest.mark.parametrize("case", list(COMBINE_CASES))
@pytest.mark.parametrize("method,r_b", [("linear", 4), ("cat", 2), ("svd", 2)])
def test_combine_equals_peft_add_weighted_adapter(case, method, r_b, tmp_path):
    model, peft_model = combine_pair(case, r_b, tmp_path)
    weights = [0.7, -0.4]
    lorakit.combine(model, ["a", "b"], weights, name="ab", method=method)
    peft_model.add_weighted_adapter(["a", "b"], weights, "ab", combination_type=method)
    cfg = require_state(model).configs["ab"]
    assert cfg.r == {"linear": 4, "cat": 6, "svd": 4}[method] == peft_model.peft_config["ab"].r
    assert cfg.alpha == cfg.r
    theirs = {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, PeftLoraLayer)}
    checked = 0
    for name, layer in lora_layers(model):
        if "ab" not in layer.adapters:
            continue
        want = theirs[name].get_delta_weight("ab")
        assert_close(layer.delta_weight("ab"), want, atol=1e-4, rtol=1e-4, msg=name)
        if method == "cat":  # exact: Σ w_i ΔW_i
            exact = sum(w * layer.delta_weight(n) for n, w in zip(("a", "b"), weights) if n in layer.adapters)
            assert_close(layer.delta_weight("ab"), exact, atol=1e-5, rtol=1e-4)
        checked += 1
    assert checked == len(theirs)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters.ab." in n)


def test_combine_rank_rules():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj"]), name="a")
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 6}),
                   name="b")
    with pytest.raises(ValueError, match=r"method='linear' needs adapters of equal rank, got ranks \{'a': 4, 'b': 6\}"):
        lorakit.combine(model, ["a", "b"], [1, 1], name="x", method="linear")
    lorakit.combine(model, ["a", "b"], [1, 1], name="cat", method="cat")
    lorakit.combine(model, ["a", "b"], [1, 1], name="svd", method="svd")
    lorakit.combine(model, ["a", "b"], [1, 1], name="svd3", method="svd", rank=3)
    configs = require_state(model).configs
    assert (configs["cat"].r, configs["svd"].r, configs["svd3"].r) == (10, 6, 3)
    lorakit.combine(model, ["b"], [0.5], name="one", method="cat")           # one adapter: always linear
    assert configs["one"].r == 6


def test_combine_negative_weight_subtracts():
    model = nn.Sequential(nn.Linear(6, 5))
    lorakit.inject(model, LoraConfig(r=2, alpha=6, target_modules=["0"]), name="a")
    randomize_lora(model, "a", seed=1)
    lorakit.combine(model, ["a"], [-1.0], name="neg")
    lorakit.combine(model, ["a", "a"], [1.0, -1.0], name="zero", method="cat")
    x = torch.randn(4, 6)
    base = model[0].base_layer(x)
    lorakit.set_adapter(model, "a")
    delta_a = model(x) - base
    lorakit.set_adapter(model, "neg")
    assert_close(model(x), base - delta_a, atol=1e-6, rtol=1e-5)
    assert_close(model[0].delta_weight("zero"), torch.zeros(5, 6), atol=1e-6, rtol=0)


def test_combine_errors_are_explained():
    model = lorakit.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), name="a")
    with pytest.raises(ValueError, match=r"combine: unknown adapter name\(s\) \['z'\]; this model has \['a'\]"):
        lorakit.combine(model, ["a", "z"], [1, 1], name="x")
    with pytest.raises(ValueError, match=r"combine: got 1 adapters and 2 weights; give one weight each"):
        lorakit.combine(model, ["a"], [1, 1], name="x")
    with pytest.raises(ValueError, match=r"combine: an adapter named 'a' already exists"):
        lorakit.combine(model, ["a"], [1], name="a")
    with pytest.raises(ValueError, match=r"combine: method='ties' is not supported; use 'linear', 'cat' or 'svd'"):
        lorakit.combine(model, ["a"], [1], name="x", method="ties")


def test_combine_never_reinitialises_the_base():
    """A PiSSA adapter rewrites the base at inject; combining it must not do that a second time."""
    model = lorakit.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init="pissa"), name="p")
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj"]), name="q")
    before = base_weights(model)
    x = ids(2, 4)
    lorakit.combine(model, ["p", "q"], [1.0, 1.0], name="pq", method="cat")
    assert all(torch.equal(p, before[n]) for n, p in base_weights(model).items())
    lorakit.set_adapter(model, "pq")
    assert run(model, x).isfinite().all()


def test_combine_refuses_dora_adapters():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), name="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), name="b")
    with pytest.raises(ValueError, match=r"\['a'\] are DoRA adapters"):
        lorakit.combine(model, ["a", "b"], [0.5, 0.5], name="ab", method="cat")
