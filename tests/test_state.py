"""LoraState and the walks over a model's LoRA modules (lorakit/state.py)."""

from __future__ import annotations

import pytest
from torch import nn

import lorakit
from lorakit import LoraConfig, ModulesToSave
from lorakit.state import get_state, lora_layers, require_state, set_child, wrapped_modules
from tiny import tiny_llama, wrap


def test_wrapper_walk_finds_what_named_modules_finds_in_the_same_order():
    """lora_layers / wrapped_modules skip the inside of LoRA layers; the result must not change."""
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=2, target_modules="all-linear", modules_to_save=["lm_head"]))
    lorakit.inject(model, LoraConfig(r=3, target_modules=["q_proj"]), name="second")
    want = [(n, m) for n, m in model.named_modules() if isinstance(m, (lorakit.LoraLayer, ModulesToSave))]
    got = wrapped_modules(model)
    assert [(n, m) for n, _, _, m in got] == want
    assert all(getattr(parent, key) is m for _, parent, key, m in got)
    assert lora_layers(model) == [(n, m) for n, m in want if isinstance(m, lorakit.LoraLayer)]


def test_state_is_shared_by_every_layer_and_invisible_to_state_dict():
    model = lorakit.inject(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    state = require_state(model)
    assert all(layer.state is state for _, layer in lora_layers(model))
    assert (state.active, state.disabled, state.routing, state.dropout_draws) == (("default",), False, None, None)
    assert not any("state" in k for k in model.state_dict())


def test_a_model_without_adapters_has_no_state_and_says_how_to_get_one():
    model = wrap(lin=nn.Linear(2, 2))
    assert get_state(model) is None
    with pytest.raises(ValueError, match=r"Sequential has no LoRA adapters; call lorakit.inject\(model, config\) "
                                         r"or lorakit.load_adapter\(model, path\) first"):
        require_state(model)
    assert get_state(model, create=True) is get_state(model)


def test_set_child_replaces_a_nested_module():
    model = tiny_llama()
    new = nn.Identity()
    set_child(model, "model.layers.1.mlp.down_proj", new)
    assert model.model.layers[1].mlp.down_proj is new
