"""inject: which modules a config targets (the same set as PEFT), per-module r/alpha, bias modes, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from torch import nn
from torch.testing import assert_close

import lorakit
from lorakit import LoraConfig, LoraLinear
from lorakit.inject import find_targets
from lorakit.state import lora_layers, require_state
from tiny import ids, randomize_lora, tiny_gpt2, tiny_llama, tiny_t5, toy_transformer

PEFT_KEYS = {"alpha": "lora_alpha"}


def peft_config(**kwargs) -> PeftLoraConfig:
    return PeftLoraConfig(**{PEFT_KEYS.get(k, k): v for k, v in kwargs.items()})


def lorakit_targets(model: nn.Module, **cfg) -> set[str]:
    return {n for n, _ in find_targets(model, LoraConfig(**cfg))}


def peft_targets(model: nn.Module, **cfg) -> set[str]:
    peft_model = get_peft_model(copy.deepcopy(model), peft_config(**cfg))
    return {n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, PeftLoraLayer)}


def same_targets_as_peft(model: nn.Module, **cfg) -> set[str]:
    ours = {n for n, _ in lora_layers(lorakit.inject(copy.deepcopy(model), LoraConfig(**cfg)))}
    assert ours == lorakit_targets(model, **cfg)
    theirs = peft_targets(model, **cfg)
    assert ours == theirs
    return ours


# --- matching rules --------------------------------------------------------------------------------
def test_suffix_list_matches_whole_name_or_dotted_suffix():
    model = toy_transformer()
    assert same_targets_as_peft(model, target_modules=["q", "v"]) == {
        "blocks.0.q", "blocks.0.v", "blocks.1.q", "blocks.1.v"}
    assert same_targets_as_peft(model, target_modules=["1.q", "head"]) == {"blocks.1.q", "head"}
    assert same_targets_as_peft(model, target_modules=["blocks.0.up"]) == {"blocks.0.up"}
    with pytest.raises(ValueError, match="matched no module"):            # "lq" is no dotted suffix of "blocks.0.q"
        lorakit_targets(model, target_modules=["0q", "lq"])


def test_regex_must_match_the_whole_name():
    model = toy_transformer()
    assert same_targets_as_peft(model, target_modules=r"blocks\.\d\.(q|o)") == {
        "blocks.0.q", "blocks.0.o", "blocks.1.q", "blocks.1.o"}
    assert same_targets_as_peft(model, target_modules=r".*\.(up|down)") == {
        "blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"}
    with pytest.raises(ValueError, match=r"target_modules='q' matched no module of ToyTransformer"):
        lorakit_targets(model, target_modules="q")                         # a regex, not a suffix: no full match


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_t5], ids=["llama", "gpt2", "t5"])
def test_all_linear_resolves_to_peft_set(build):
    targets = same_targets_as_peft(build(), target_modules="all-linear")
    assert "lm_head" not in targets and len(targets) > 6


def test_all_linear_on_bert_classifier_matches_peft(minilm):
    ours = {n for n, _ in find_targets(minilm, LoraConfig(target_modules="all-linear"))}
    theirs = peft_targets(minilm, target_modules="all-linear", task_type="SEQ_CLS")
    assert ours == theirs
    assert "classifier" not in ours and "bert.pooler.dense" in ours and len(ours) == 6 * 6 + 1


def test_all_linear_on_a_plain_module_takes_every_linear():
    assert same_targets_as_peft(toy_transformer(), target_modules="all-linear") == {
        f"blocks.{i}.{n}" for i in (0, 1) for n in ("q", "k", "v", "o", "up", "down")} | {"head"}


@pytest.mark.parametrize("exclude,gone", [(["k", "o"], {"blocks.0.k", "blocks.1.k", "blocks.0.o", "blocks.1.o"}),
                                          (r".*\.1\..*", {f"blocks.1.{n}" for n in ("q", "k", "v", "o", "up", "down")}),
                                          (["blocks.0.q"], {"blocks.0.q"})])
def test_exclude_modules(exclude, gone):
    everything = {f"blocks.{i}.{n}" for i in (0, 1) for n in ("q", "k", "v", "o", "up", "down")} | {"head"}
    assert same_targets_as_peft(toy_transformer(), target_modules="all-linear", exclude_modules=exclude) \
        == everything - gone


def test_layers_to_transform_llama():
    assert same_targets_as_peft(tiny_llama(layers=3), target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]) \
        == {f"model.layers.{i}.self_attn.{p}" for i in (0, 2) for p in ("q_proj", "v_proj")}


def test_layers_to_transform_reads_the_first_index_t5():
    """encoder.block.1.layer.0.SelfAttention.q: the block index is 1, not the sub-layer's 0 (as PEFT)."""
    targets = same_targets_as_peft(tiny_t5(), target_modules=["q"], layers_to_transform=[1])
    assert targets == {"encoder.block.1.layer.0.SelfAttention.q", "decoder.block.1.layer.0.SelfAttention.q",
                       "decoder.block.1.layer.1.EncDecAttention.q"}
    assert same_targets_as_peft(tiny_t5(), target_modules=["q"], layers_to_transform=[0], layers_pattern="layer") \
        == {f"{s}.block.{i}.layer.0.SelfAttention.q" for s in ("encoder", "decoder") for i in (0, 1)}


def test_rank_and_alpha_patterns_match_peft_per_module():
    cfg = dict(r=4, alpha=8, target_modules="all-linear", rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "down_proj": 6},
               alpha_pattern={"v_proj": 3, r"layers\.0\.mlp\..*": 24}, use_rslora=True)
    model = lorakit.inject(tiny_llama(), LoraConfig(**cfg))
    peft_model = get_peft_model(tiny_llama(), peft_config(**cfg))
    ours = {n: (layer.adapters["default"].r, layer.adapters["default"].scaling) for n, layer in lora_layers(model)}
    theirs = {n: (m.r["default"], m.scaling["default"]) for n, m in peft_model.base_model.model.named_modules()
              if isinstance(m, PeftLoraLayer)}
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name][0] == theirs[name][0], name
        assert ours[name][1] == pytest.approx(theirs[name][1]), name
    assert ours["model.layers.1.self_attn.q_proj"] == (2, pytest.approx(8 / 2 ** 0.5))
    assert ours["model.layers.0.mlp.down_proj"] == (6, pytest.approx(24 / 6 ** 0.5))
    assert ours["model.layers.1.self_attn.v_proj"] == (4, pytest.approx(3 / 2))
    lk_a = model.get_submodule("model.layers.0.mlp.down_proj").adapters["default"].lora_A.weight
    assert lk_a.shape == (6, 32)


# --- the model stays itself -----------------------------------------------------------------------
def test_inject_is_in_place_freezes_base_and_keeps_the_class():
    model = tiny_llama()
    cfg = LoraConfig(r=4, target_modules="all-linear")
    out = lorakit.inject(model, cfg)
    assert out is model and type(model).__name__ == "LlamaForCausalLM"
    assert cfg.target_modules == "all-linear" and cfg.task_type is None           # the given config is untouched
    assert require_state(model).configs["default"].task_type == "CAUSAL_LM"
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoraLinear)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)
    assert model.generate(ids(1, 3), max_new_tokens=2, do_sample=False).shape == (1, 5)


def test_second_adapter_is_added_inactive_and_first_stays_trainable():
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj"]), name="a")
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), name="b")
    assert lorakit.active_adapters(model) == ["a"] and lorakit.adapter_names(model) == ["a", "b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".adapters.a." in n for n in trainable) and any(".adapters.b." in n for n in trainable)
    q = model.model.layers[0].self_attn.q_proj
    assert list(q.adapters) == ["a", "b"] and not isinstance(q.base_layer, LoraLinear)


def test_hand_written_transformer_trains_only_the_adapter():
    model = toy_transformer()
    base = copy.deepcopy(model)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=["q", "k", "v", "o"]))
    x = ids(3, 5)
    assert_close(model(x), base(x), rtol=0, atol=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step()
    model.eval()
    assert (model(x) - base(x)).abs().max() > 1e-3                     # it learned something
    ours = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if ".adapters." not in n}
    theirs = dict(base.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)     # ... and only in the adapter
    with lorakit.disabled(model):
        assert_close(model(x), base(x), rtol=0, atol=0)


# --- modules_to_save ---------------------------------------------------------------------------------


def test_modules_to_save_is_never_a_lora_target():
    targets = same_targets_as_peft(toy_transformer(), target_modules="all-linear", modules_to_save=["head"])
    assert "head" not in targets


# --- bias modes: the same trainable parameters as PEFT -------------------------------------------
def _peft_names(names: set[str]) -> set[str]:
    """lorakit parameter names written the way PEFT names the same tensors."""
    out = set()
    for n in names:
        for t in ("lora_A", "lora_B"):
            n = n.replace(f".adapters.default.{t}.weight", f".{t}.default.weight")
        out.add("base_model.model." + n)
    return out


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_bias_modes_train_what_peft_trains(bias):
    model, peft_model = tiny_gpt2(), tiny_gpt2()
    cfg = dict(r=2, target_modules=["c_attn", "c_fc"], modules_to_save=["ln_f"], bias=bias)
    lorakit.inject(model, LoraConfig(alpha=2, **cfg))
    peft_model = get_peft_model(peft_model, PeftLoraConfig(lora_alpha=2, **cfg))
    ours = _peft_names({n for n, p in model.named_parameters() if p.requires_grad})
    theirs = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert ours == theirs
    assert any(n.endswith("c_attn.base_layer.bias") for n in ours) == (bias != "none")
    assert any(n.endswith("ln_1.bias") for n in ours) == (bias == "all")
    assert lorakit.count_parameters(model) == peft_model.get_nb_trainable_parameters()


# --- errors ------------------------------------------------------------------------------------------
def test_target_matching_nothing_lists_the_closest_names():
    with pytest.raises(ValueError) as err:
        lorakit.inject(tiny_llama(), LoraConfig(target_modules=["q_prj", "vproj"]))
    msg = str(err.value)
    assert "target_modules=['q_prj', 'vproj'] matched no module of LlamaForCausalLM" in msg
    assert "closest module names:" in msg and "'q_proj'" in msg and "'v_proj'" in msg


def test_layers_to_transform_matching_nothing_says_so():
    with pytest.raises(ValueError, match=r"matched no module of LlamaForCausalLM \(with layers_to_transform=\[7\]\)"):
        lorakit.inject(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))


def test_injecting_an_existing_name_refuses():
    model = lorakit.inject(tiny_llama(), LoraConfig(target_modules=["q_proj"]), name="task")
    with pytest.raises(ValueError, match=r"an adapter named 'task' already exists on this model \(adapters: \['task'\]\)"):
        lorakit.inject(model, LoraConfig(target_modules=["v_proj"]), name="task")
    with pytest.raises(ValueError, match=r"adapter name must be a non-empty string without dots, got 'a.b'"):
        lorakit.inject(model, LoraConfig(target_modules=["v_proj"]), name="a.b")


def test_missing_targets_and_unsupported_modules_are_explained():
    with pytest.raises(ValueError, match=r"target_modules is not set: pass module-name suffixes"):
        lorakit.inject(tiny_llama(), LoraConfig())
    with pytest.raises(TypeError, match=r"module 'model.norm' is a LlamaRMSNorm; LoRA supports nn.Linear"):
        lorakit.inject(tiny_llama(), LoraConfig(target_modules=["norm"]))
    with pytest.raises(ValueError, match=r"modules_to_save=\['classifier'\] matched no module of LlamaForCausalLM"):
        lorakit.inject(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))


def test_trained_adapter_on_gpt2_matches_peft_forward():
    """GPT-2's Conv1D through the whole model: same logits as PEFT with the same factors."""
    model = lorakit.inject(tiny_gpt2(), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model, seed=3)
    peft_model = get_peft_model(tiny_gpt2(), peft_config(r=4, alpha=8, target_modules="all-linear"))
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if isinstance(module, PeftLoraLayer):
                module.lora_A["default"].weight.copy_(layers[name].adapters["default"].lora_A.weight)
                module.lora_B["default"].weight.copy_(layers[name].adapters["default"].lora_B.weight)
    x = ids()
    assert_close(model(x).logits, peft_model(input_ids=x).logits, atol=1e-5, rtol=1e-5)
