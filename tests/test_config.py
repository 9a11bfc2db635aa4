"""LoraConfig: validation messages, pattern matching, PEFT's adapter_config.json both ways."""

from __future__ import annotations

import math

import pytest
from peft import LoraConfig as PeftLoraConfig
from peft.utils.other import get_pattern_key

from lorakit import LoraConfig


@pytest.mark.parametrize("r", [0, -4, 2.5, True, None])
def test_rank_must_be_a_positive_integer(r):
    with pytest.raises(ValueError, match=rf"r must be a positive integer .*got r={r!r}"):
        LoraConfig(r=r)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), "8"])
def test_alpha_must_be_positive_and_finite(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a positive number, got alpha="):
        LoraConfig(alpha=alpha)


@pytest.mark.parametrize("dropout", [1.0, 1.5, -0.1])
def test_dropout_must_lie_in_zero_one(dropout):
    with pytest.raises(ValueError, match=rf"dropout must be in \[0, 1\), got dropout={dropout!r}"):
        LoraConfig(dropout=dropout)


def test_bias_and_init_list_the_choices():
    with pytest.raises(ValueError, match=r"bias must be one of \('none', 'lora_only', 'all'\), got bias='some'"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match=r"init must be one of .*'gaussian'.*got init='xavier'"):
        LoraConfig(init="xavier")


def test_bad_regex_and_bad_target_types_are_named():
    with pytest.raises(ValueError, match=r"target_modules='q_proj\(' is not a valid regular expression"):
        LoraConfig(target_modules="q_proj(")
    with pytest.raises(ValueError, match=r"exclude_modules must hold non-empty module names"):
        LoraConfig(target_modules=["q"], exclude_modules=["", "k"])
    with pytest.raises(ValueError, match=r"target_modules must be a list of module-name suffixes"):
        LoraConfig(target_modules=3)


def test_patterns_and_layers_are_checked():
    with pytest.raises(ValueError, match=r"rank_pattern\['q'\] must be a positive integer, got 0"):
        LoraConfig(rank_pattern={"q": 0})
    with pytest.raises(ValueError, match=r"alpha_pattern\['q'\] must be a positive number, got -2"):
        LoraConfig(alpha_pattern={"q": -2})
    with pytest.raises(ValueError, match=r"layers_to_transform must be non-negative block indices, got \[0, -1\]"):
        LoraConfig(target_modules=["q"], layers_to_transform=[0, -1])
    with pytest.raises(ValueError, match=r"layers_to_transform cannot be combined with a regex"):
        LoraConfig(target_modules=r".*\.q", layers_to_transform=[0])


def test_sets_become_sorted_lists_and_the_given_config_is_never_mutated():
    cfg = LoraConfig(target_modules={"v", "q"}, layers_to_transform=3)
    assert cfg.target_modules == ["q", "v"]
    assert cfg.layers_to_transform == [3]
    changed = cfg.replace(r=4)
    assert (cfg.r, changed.r) == (8, 4)
    with pytest.raises(AttributeError):
        cfg.r = 16  # frozen


def test_scaling_plain_and_rslora():
    assert LoraConfig(r=16, alpha=32).scaling(16, 32) == 2.0
    assert LoraConfig(r=16, alpha=32, use_rslora=True).scaling(16, 32) == 8.0   # 32 / sqrt(16)
    assert LoraConfig(use_rslora=True).scaling(8, 8) == pytest.approx(8 / math.sqrt(8))


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                                  "model.layers.10.mlp.down_proj", "encoder.block.1.layer.0.SelfAttention.q",
                                  "q_proj", "k_proj"])
def test_rank_and_alpha_follow_peft_get_pattern_key(name):
    rank_pattern = {r"layers\.1\.self_attn\.q_proj": 2, "q_proj": 4, "down_proj": 6, "q": 3}
    alpha_pattern = {"down_proj": 12.0, r"layers\.0\..*": 1.0}
    cfg = LoraConfig(r=8, alpha=16, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    want_r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), 8)
    want_alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), 16)
    assert cfg.rank_and_alpha(name) == (want_r, want_alpha)


def test_peft_dict_has_exactly_peft_keys_and_values():
    ours = LoraConfig(r=4, alpha=16, dropout=0.1, target_modules=["q", "v"], bias="lora_only", use_rslora=True,
                      rank_pattern={"q": 2}, alpha_pattern={"v": 3}, layers_to_transform=[1],
                      modules_to_save=["head"]).to_peft_dict()
    theirs = PeftLoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q", "v"], bias="lora_only",
                            use_rslora=True, rank_pattern={"q": 2}, alpha_pattern={"v": 3}, layers_to_transform=[1],
                            modules_to_save=["head"]).to_dict()
    assert set(ours) == set(theirs)
    theirs["target_modules"] = sorted(theirs["target_modules"])
    theirs["inference_mode"] = True  # PEFT sets it when saving
    different = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k] and k != "peft_type"}
    assert different == {}
    assert ours["peft_type"] == "LORA" and str(theirs["peft_type"]) in ("LORA", "PeftType.LORA")


def test_peft_dict_round_trip():
    cfg = LoraConfig(r=4, alpha=16, dropout=0.1, target_modules=["q", "v"], exclude_modules=["x"], bias="all",
                     use_rslora=True, use_dora=True, rank_pattern={"q": 2}, alpha_pattern={"v": 3.0},
                     layers_to_transform=[0, 2], layers_pattern="blocks", modules_to_save=["head"], init="gaussian",
                     fan_in_fan_out=True, task_type="CAUSAL_LM", base_model_name_or_path="m")
    assert LoraConfig.from_peft_dict(cfg.to_peft_dict()) == cfg


def test_from_peft_dict_reads_init_false_as_default_and_defaults_missing_keys():
    cfg = LoraConfig.from_peft_dict({"target_modules": ["q"], "peft_type": "LORA", "init_lora_weights": False})
    assert (cfg.r, cfg.alpha, cfg.init, cfg.target_modules) == (8, 8, "default", ["q"])


def test_from_peft_dict_refuses_other_methods_and_unsupported_options():
    with pytest.raises(ValueError, match=r"cfg.json: peft_type='IA3' is not supported; lorakit loads LoRA adapters "
                                         r"\(peft_type 'LORA'"):
        LoraConfig.from_peft_dict({"peft_type": "IA3", "target_modules": ["q"]}, source="cfg.json")
    with pytest.raises(ValueError, match=r"not supported by lorakit: \{'lora_bias': True\}"):
        LoraConfig.from_peft_dict({"peft_type": "LORA", "target_modules": ["q"], "lora_bias": True})
