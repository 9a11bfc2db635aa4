"""LoRA layers (lorakit/layers.py): the formula by hand for embeddings and convolutions, init, and
an untrained adapter changing nothing. LoraLinear has its own file (test_linear.py).

Hand-placed weights, outputs checked by arithmetic.
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

import lorakit
from lorakit import LoraConfig, LoraConv, LoraEmbedding
from lorakit.state import lora_layers
from tiny import ids, tiny_llama, wrap


def adapter(layer, name="default"):
    return layer.adapters[name]


# --- the formula, by hand -----------------------------------------------------------------------
def test_embedding_forward_by_hand():
    model = wrap(emb=nn.Embedding(5, 3))
    table = model.emb.weight.detach().clone()
    lorakit.inject(model, LoraConfig(r=1, alpha=3, target_modules=["emb"]))      # scale 3
    layer = model.emb
    assert isinstance(layer, LoraEmbedding)
    ad = adapter(layer)
    assert ad.lora_embedding_A.shape == (1, 5) and ad.lora_embedding_B.shape == (3, 1)
    with torch.no_grad():
        ad.lora_embedding_A.zero_()
        ad.lora_embedding_A[0, 2] = 2.0                                          # token 2 -> 2.0
        ad.lora_embedding_B.copy_(torch.tensor([[1.0], [0.0], [-1.0]]))
    out = model(torch.tensor([[2, 4, 2]]))
    want = table[[2, 4, 2]].clone()
    want[0] += torch.tensor([6.0, 0.0, -6.0])                                    # 3 * 2 * (1, 0, -1)
    want[2] += torch.tensor([6.0, 0.0, -6.0])
    assert_close(out[0], want)


def test_conv2d_forward_by_hand():
    model = wrap(conv=nn.Conv2d(1, 1, 3, padding=1))
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.bias.fill_(0.25)
    lorakit.inject(model, LoraConfig(r=1, alpha=1, target_modules=["conv"]))
    ad = adapter(model.conv)
    assert isinstance(model.conv, LoraConv)
    assert ad.lora_A.weight.shape == (1, 1, 3, 3) and ad.lora_B.weight.shape == (1, 1, 1, 1)
    with torch.no_grad():
        ad.lora_A.weight.zero_()
        ad.lora_A.weight[0, 0, 1, 1] = 1.0                                       # identity kernel
        ad.lora_B.weight.fill_(2.0)
    x = torch.randn(2, 1, 5, 5)
    assert_close(model(x), 0.25 + 2.0 * x)


def test_conv1d_forward_matches_conv_with_merged_kernel():
    model = wrap(conv=nn.Conv1d(2, 3, 3))
    base = nn.Conv1d(2, 3, 3)
    base.load_state_dict(model.conv.state_dict())
    lorakit.inject(model, LoraConfig(r=2, alpha=6, target_modules=["conv"]))     # scale 3
    ad = adapter(model.conv)
    with torch.no_grad():
        ad.lora_B.weight.normal_()
    x = torch.randn(4, 2, 7)
    a, b = ad.lora_A.weight, ad.lora_B.weight                                    # (2, 2, 3), (3, 2, 1)
    want = base(x) + 3.0 * F.conv1d(F.conv1d(x, a), b)
    assert_close(model(x), want)
    kernel = base.weight + 3.0 * torch.einsum("or,rik->oik", b[..., 0], a)      # (3, 2, 3)
    assert_close(model(x), F.conv1d(x, kernel, base.bias), atol=1e-5, rtol=1e-5)


# --- untrained adapters and init ------------------------------------------------------------------
@pytest.mark.parametrize("targets", ["all-linear", ["embed_tokens", "q_proj", "down_proj"]])
def test_untrained_adapter_changes_nothing(targets):
    model = tiny_llama()
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=targets))
    with torch.no_grad():
        after = model(x).logits
    assert torch.equal(before, after)
    assert len(lora_layers(model)) > 0


def test_embedding_init_is_zero_a_and_normal_b_as_peft():
    model = wrap(emb=nn.Embedding(1000, 64))
    lorakit.inject(model, LoraConfig(r=16, target_modules=["emb"]))
    ad = adapter(model.emb)
    assert torch.count_nonzero(ad.lora_embedding_A) == 0
    assert ad.lora_embedding_B.std().item() == pytest.approx(1.0, rel=0.05)
    peft_model = get_peft_model(wrap(emb=nn.Embedding(1000, 64)), PeftLoraConfig(r=16, target_modules=["emb"]))
    peft_emb = peft_model.base_model.model.emb
    assert torch.count_nonzero(peft_emb.lora_embedding_A["default"]) == 0
    assert peft_emb.lora_embedding_B["default"].std().item() == pytest.approx(1.0, rel=0.05)


def test_conv_init_is_kaiming_a_and_zero_b():
    model = wrap(conv=nn.Conv2d(16, 8, 3))
    lorakit.inject(model, LoraConfig(r=8, target_modules=["conv"]))
    ad = adapter(model.conv)
    bound = 1 / math.sqrt(16 * 9)
    assert ad.lora_A.weight.abs().max() <= bound and ad.lora_A.weight.abs().max() > 0.95 * bound
    assert torch.count_nonzero(ad.lora_B.weight) == 0
