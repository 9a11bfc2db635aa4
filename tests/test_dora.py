"""DoRA: the magnitude vector, the forward by hand, and PEFT 0.21.2 as the oracle.

PEFT and lorakit start from the same base and the same adapter tensors (copied through PEFT's own
state-dict loader); outputs, gradients, files and merged weights must agree.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

import lorakit
from lorakit import LoraConfig
from lorakit.state import lora_layers
from tiny import conv_toy, ids, tiny_gpt2, toy_transformer

# model builder, targets (Linear + Embedding, GPT-2 Conv1D, Conv2d + Conv1d + Linear), input
CASES = {
    "linear+embedding": (toy_transformer, ["q", "v", "up", "embed"], lambda: ids()),
    "conv1d-gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], lambda: ids()),
    "conv2d": (conv_toy, ["conv", "conv1d", "lin"], lambda: torch.randn(2, 3, 8, 8)),
}


def out(model, x):
    y = model(x)
    return y.logits if hasattr(y, "logits") else y


def randomize(model: nn.Module, name: str = "default", seed: int = 1) -> None:
    """Non-trivial adapter `name`: A, B ~ N(0, 0.2²), magnitude = its initial norm · (1 ± 20%)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if f".adapters.{name}." not in pname:
                continue
            if pname.endswith("lora_magnitude_vector"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def peft_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                          use_dora=cfg.use_dora, init_lora_weights=False)


def pair(case: str, dropout: float = 0.0):
    """(lorakit model, PEFT model, base model, input) with identical DoRA adapters named "default"."""
    build, targets, make_input = CASES[case]
    base = build()
    cfg = LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=targets, use_dora=True)
    ours = lorakit.inject(copy.deepcopy(base), cfg)
    randomize(ours)
    theirs = get_peft_model(copy.deepcopy(base), peft_config(cfg))
    result = set_peft_model_state_dict(theirs, lorakit.adapter_state_dict(ours))
    assert not result.unexpected_keys
    return ours, theirs, base, make_input()


def peft_key(our_key: str) -> str:
    """lorakit's in-memory parameter name -> PEFT's, e.g. emb.adapters.default.lora_embedding_A ->
    base_model.model.emb.lora_embedding_A.default."""
    module, tail = our_key.split(".adapters.default.")
    if tail == "lora_magnitude_vector":
        return f"base_model.model.{module}.lora_magnitude_vector.default.weight"
    if tail.endswith(".weight"):
        return f"base_model.model.{module}.{tail[:-len('.weight')]}.default.weight"
    return f"base_model.model.{module}.{tail}.default"


# --- the magnitude and the formula by hand ---------------------------------------------------------
def test_magnitude_starts_at_the_weight_norm_so_output_is_unchanged():
    model = nn.Sequential(OrderedDict(lin=nn.Linear(2, 2, bias=False)))
    with torch.no_grad():
        model.lin.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))        # row norms 5 and 2
    x = torch.tensor([[1.0, -1.0]])
    before = model(x)
    lorakit.inject(model, LoraConfig(r=1, target_modules=["lin"], use_dora=True))
    m = model.lin.adapters["default"].lora_magnitude_vector
    assert m.requires_grad and m.shape == (2,)
    assert_close(m.detach(), torch.tensor([5.0, 2.0]))
    assert_close(model(x), before)


def test_forward_by_hand():
    model = nn.Sequential(OrderedDict(lin=nn.Linear(2, 2)))
    with torch.no_grad():
        model.lin.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        model.lin.bias.copy_(torch.tensor([1.0, 1.0]))
    lorakit.inject(model, LoraConfig(r=1, alpha=2, target_modules=["lin"], use_dora=True))  # scaling 2
    ad = model.lin.adapters["default"]
    with torch.no_grad():
        ad.lora_A.weight.copy_(torch.tensor([[1.0, 0.0]]))
        ad.lora_B.weight.copy_(torch.tensor([[0.5], [0.0]]))   # s·B·A = [[1, 0], [0, 0]]
        ad.lora_magnitude_vector.copy_(torch.tensor([8.0, 2.0]))
    # W + sBA = [[4, 0], [0, 1]]: norms (4, 1); f = m / norm = (2, 2); W' = f·(W + sBA) = [[8, 0], [0, 2]]
    x = torch.tensor([[1.0, 3.0]])
    assert_close(model(x), torch.tensor([[8.0 + 1.0, 6.0 + 1.0]]))   # W'x + b


# --- PEFT as the oracle ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_gradients_and_files_match_peft(case, tmp_path):
    ours, theirs, base, x = pair(case)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        y = out(ours, x)
        assert_close(y, out(theirs, x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(y, out(base, x), atol=1e-3)           # the adapter does something
    # gradients in train mode (dropout 0) for A, B and the magnitude of every layer
    ours.train(), theirs.train()
    out(ours, x).pow(2).mean().backward()
    out(theirs, x).pow(2).mean().backward()
    theirs_params = dict(theirs.named_parameters())
    grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert any(k.endswith("lora_magnitude_vector") for k in grads)
    for key, grad in grads.items():
        assert_close(grad, theirs_params[peft_key(key)].grad, atol=1e-5, rtol=1e-4, msg=key)
    # files: same keys and shapes as PEFT writes, and each loads in the other
    lorakit.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    mine, peft_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in peft_file.items()}
    assert any(k.endswith(".lora_magnitude_vector") for k in mine)
    ours.eval()
    peft_loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    ours_loaded = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "theirs").eval()
    with torch.no_grad():
        y = out(ours, x)
        assert_close(out(peft_loaded, x), y, atol=1e-5, rtol=1e-5)
        assert_close(out(ours_loaded, x), y, atol=1e-5, rtol=1e-5)


def test_magnitude_shapes_as_peft_writes_them():
    shapes = {}
    for case in ("linear+embedding", "conv1d-gpt2", "conv2d"):
        ours, *_ = pair(case)
        shapes.update({k: tuple(v.shape) for k, v in lorakit.adapter_state_dict(ours).items()
                       if k.endswith("lora_magnitude_vector")})
    assert shapes["base_model.model.blocks.0.q.lora_magnitude_vector"] == (16,)          # (out,)
    assert shapes["base_model.model.embed.lora_magnitude_vector"] == (16,)               # (embedding_dim,)
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"] == (48,)  # Conv1D nf
    assert shapes["base_model.model.conv.lora_magnitude_vector"] == (1, 4, 1, 1)         # Conv2d
    assert shapes["base_model.model.conv1d.lora_magnitude_vector"] == (1, 6, 1)          # Conv1d


def test_parameter_count_matches_peft(capsys):
    ours, theirs, _, _ = pair("conv2d")                                  # magnitudes of all three shapes
    lorakit.print_trainable_parameters(ours)
    theirs.print_trainable_parameters()
    mine, peft_line = capsys.readouterr().out.splitlines()
    assert mine == peft_line


def test_dropout_replicates_peft():
    """Train mode with dropout: PEFT recomputes W0·dropout(x) for the base term; so do we."""
    ours, theirs, _, x = pair("linear+embedding", dropout=0.3)
    ours.train(), theirs.train()
    torch.manual_seed(5)
    y_ours = out(ours, x)
    torch.manual_seed(5)
    y_theirs = out(theirs, x)
    assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    y_ours.pow(2).mean().backward()
    y_theirs.pow(2).mean().backward()
    theirs_params = dict(theirs.named_parameters())
    for key, p in ours.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, theirs_params[peft_key(key)].grad, atol=1e-5, rtol=1e-4, msg=key)


def two_adapters():
    """DoRA adapter "mag" and plain LoRA adapter "plain" on one base, in lorakit and in PEFT.

    (Not "a"/"b": PEFT warns about adapter names contained in its "lora_" prefix.)
    """
    base = toy_transformer()
    targets = ["q", "v", "up", "embed"]
    cfg_a = LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True)
    cfg_b = LoraConfig(r=2, alpha=2, target_modules=["q", "up", "embed"])
    ours = lorakit.inject(copy.deepcopy(base), cfg_a, name="mag")
    lorakit.inject(ours, cfg_b, name="plain")
    randomize(ours, "mag", seed=1)
    randomize(ours, "plain", seed=2)
    theirs = get_peft_model(copy.deepcopy(base), peft_config(cfg_a), adapter_name="mag")
    theirs.add_adapter("plain", peft_config(cfg_b))
    for name in ("mag", "plain"):
        set_peft_model_state_dict(theirs, lorakit.adapter_state_dict(ours, name), adapter_name=name)
    return ours.eval(), theirs.eval(), base.eval()


def peft_weights(theirs) -> dict[str, torch.Tensor]:
    return {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
            for n, p in theirs.named_parameters() if ".base_layer." in n}


def our_weights(ours) -> dict[str, torch.Tensor]:
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in ours.named_parameters() if ".base_layer." in n}


def test_several_adapters_forward_and_merge_as_peft():
    ours, theirs, base = two_adapters()
    x = ids()
    lorakit.set_adapter(ours, ["mag", "plain"])
    theirs.base_model.set_adapter(["mag", "plain"])
    with torch.no_grad():
        both = out(ours, x)
        assert_close(both, out(theirs, x), atol=1e-5, rtol=1e-5)
        original = our_weights(ours)
        lorakit.merge(ours)                                  # "mag" (DoRA), then "plain", into the same weights
        theirs.merge_adapter()
        merged = our_weights(ours)
        for key, w in peft_weights(theirs).items():
            assert_close(merged[key], w, atol=1e-5, rtol=1e-5, msg=key)
        assert_close(out(ours, x), both, atol=1e-5, rtol=1e-5)
        with lorakit.disabled(ours):
            assert_close(out(ours, x), out(base, x), atol=1e-5, rtol=1e-5)
        lorakit.unmerge(ours)
        for key, w in our_weights(ours).items():
            assert_close(w, original[key], atol=1e-6, rtol=1e-5, msg=key)
        assert_close(out(ours, x), both, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_unmerge_and_unload(case):
    ours, theirs, base, x = pair(case)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        expected = out(ours, x)
        original = our_weights(ours)
        lorakit.merge(ours, safe=True)
        theirs.merge_adapter()
        merged = our_weights(ours)
        for key, w in peft_weights(theirs).items():
            assert_close(merged[key], w, atol=1e-5, rtol=1e-5, msg=key)
        assert_close(out(ours, x), expected, atol=1e-5, rtol=1e-5)
        lorakit.unmerge(ours)
        for key, w in our_weights(ours).items():
            assert_close(w, original[key], atol=1e-6, rtol=1e-5, msg=key)
        plain = lorakit.merge_and_unload(ours)
        assert not lora_layers(plain)
        assert_close(out(plain, x), expected, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_a_broken_magnitude():
    ours, _, _, _ = pair("linear+embedding")
    with torch.no_grad():
        ours.blocks[0].q.adapters["default"].lora_magnitude_vector[3] = float("nan")
    with pytest.raises(ValueError, match="NaNs or Infs detected in the merged weights of blocks.0.q"):
        lorakit.merge(ours, safe=True)


def test_per_row_with_dora_equals_each_adapter_alone():
    """PEFT refuses mixed batches with DoRA; lorakit supports them: each row is that adapter alone."""
    ours, _, base = two_adapters()
    x = ids(batch=4)
    names = ["mag", None, "plain", "mag"]
    with torch.no_grad():
        alone = {}
        for name in ("mag", "plain"):
            lorakit.set_adapter(ours, name)
            alone[name] = out(ours, x)
        alone[None] = out(base, x)
        with lorakit.per_row(ours, names):
            mixed = out(ours, x)
    for i, name in enumerate(names):
        assert_close(mixed[i], alone[name][i], atol=1e-5, rtol=1e-5, msg=f"row {i} ({name})")
