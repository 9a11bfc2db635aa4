"""Which base modules LoRA wraps (lorakit/bases.py), decided in one place for inject, AdaLoRA,
"all-linear" and analyze."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig, bases
from tiny import wrap


class Linear8bitLt(nn.Module):
    """Stands in for bitsandbytes' 8-bit linear: recognised by its name and in_features."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 4, 2
        self.weight = nn.Parameter(torch.ones(2, 4, dtype=torch.int8), requires_grad=False)


class Linear4bit(nn.Module):
    """A module merely named like bitsandbytes' 4-bit linear, without its attributes."""


def test_kinds_of_base_modules():
    assert bases.kind(nn.Linear(3, 2)) == "linear"
    assert bases.kind(Conv1D(2, 3)) == "linear"
    assert bases.kind(Linear8bitLt()) == "linear"
    assert bases.kind(nn.Embedding(5, 3)) == "embedding"
    assert [bases.kind(c) for c in (nn.Conv1d(1, 1, 3), nn.Conv2d(1, 1, 3), nn.Conv3d(1, 1, 3))] == ["conv"] * 3
    assert bases.kind(nn.LayerNorm(3)) is None and bases.kind(Linear4bit()) is None


def test_conv1d_and_quantized_detection():
    assert bases.is_conv1d(Conv1D(2, 3)) and not bases.is_conv1d(nn.Linear(3, 2))
    assert bases.is_quantized_linear(Linear8bitLt()) and not bases.is_quantized_linear(Linear4bit())
    assert not bases.is_4bit(Linear8bitLt())
    assert bases.is_exact_linear(nn.Linear(3, 2)) and bases.is_exact_linear(Conv1D(2, 3))

    class MyLinear(nn.Linear):
        pass

    assert not bases.is_exact_linear(MyLinear(3, 2)) and bases.is_linear(MyLinear(3, 2))  # wrapped, never fused


def test_linear_shape_reads_conv1d_as_in_out():
    assert bases.linear_shape(Conv1D(2, 3)) == (3, 2, True)                     # nf=2 outputs, weight (3, 2)
    assert bases.linear_shape(nn.Linear(3, 2)) == (3, 2, False)
    assert bases.linear_shape(Linear8bitLt()) == (4, 2, False)


def test_real_bitsandbytes_linear4bit_is_recognised():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(8, 4, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    assert bases.is_4bit(layer) and bases.is_quantized_linear(layer) and bases.kind(layer) == "linear"
    assert not bases.is_exact_linear(layer)


def test_a_quantized_stand_in_is_wrapped_as_a_linear_and_all_linear_sees_it():
    model = wrap(lin=Linear8bitLt(), head=nn.Linear(2, 2))
    assert lorakit.find_targets(model, LoraConfig(target_modules="all-linear"))[0][0] == "lin"
    lorakit.inject(model, LoraConfig(r=2, target_modules=["lin"]))
    assert isinstance(model.lin, lorakit.LoraLinear)
    assert (model.lin.in_features, model.lin.out_features, model.lin.fan_in_fan_out) == (4, 2, False)
