"""ModulesToSave (lorakit/modules_to_save.py): a trained full copy per adapter, the original untouched,
the same trainable names as PEFT."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch.testing import assert_close

import lorakit
from lorakit import LoraConfig, ModulesToSave
from tiny import ids, tiny_gpt2, toy_transformer


def peft_config(**kwargs) -> PeftLoraConfig:
    return PeftLoraConfig(**{{"alpha": "lora_alpha"}.get(k, k): v for k, v in kwargs.items()})


def test_modules_to_save_trains_a_copy_and_leaves_the_original():
    model = toy_transformer()
    base = copy.deepcopy(model)
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q"], modules_to_save=["head"]))
    assert isinstance(model.head, ModulesToSave)
    copy_ = model.head.modules_to_save["default"]
    assert all(p.requires_grad for p in copy_.parameters())
    assert not any(p.requires_grad for p in model.head.original_module.parameters())
    with torch.no_grad():
        copy_.weight.add_(1.0)
    x = ids(2, 4)
    assert (model(x) - base(x)).abs().max() > 0.5                      # the copy is used
    assert torch.equal(model.head.original_module.weight, base.head.weight)
    with lorakit.disabled(model):
        assert_close(model(x), base(x), rtol=0, atol=0)               # disabling restores the original
    assert (model(x) - base(x)).abs().max() > 0.5                      # and leaving restores the copy


def test_modules_to_save_trainable_names_match_peft():
    model = lorakit.inject(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["ln_f", "wpe"]))
    peft_model = get_peft_model(tiny_gpt2(), peft_config(r=2, target_modules=["c_attn"], modules_to_save=["ln_f", "wpe"]))
    ours = {n for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in n}
    theirs = {n.removeprefix("base_model.model.") for n, p in peft_model.named_parameters()
              if p.requires_grad and ".modules_to_save." in n}
    assert ours == theirs == {"transformer.ln_f.modules_to_save.default.weight",
                              "transformer.ln_f.modules_to_save.default.bias",
                              "transformer.wpe.modules_to_save.default.weight"}
