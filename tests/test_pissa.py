"""PiSSA / OLoRA initialisation: output unchanged at step 0, factors and base equal to PEFT's."""

import pytest
import torch
from peft import LoraConfig as PeftConfig
from peft import get_peft_model
from tiny import ids, tiny_llama

import lorakit


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_keeps_outputs_and_matches_peft(init):
    x = ids()
    base = tiny_llama(hidden=32)
    with torch.no_grad():
        want = base(x).logits
    ours = lorakit.inject(tiny_llama(hidden=32), lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "up_proj"],
                                                                   init=init))
    theirs = get_peft_model(tiny_llama(hidden=32), PeftConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                              init_lora_weights=init))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, want, atol=1e-5, rtol=1e-5)
    q_ours = ours.model.layers[0].self_attn.q_proj
    q_peft = theirs.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q_ours.adapters["default"].lora_A.weight, q_peft.lora_A["default"].weight,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(q_ours.adapters["default"].lora_B.weight, q_peft.lora_B["default"].weight,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(q_ours.base_layer.weight, q_peft.base_layer.weight, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(q_ours.adapters["default"].lora_B.weight, torch.zeros(1))  # B is not zero

