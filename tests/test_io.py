"""Adapter files in PEFT's format: lorakit -> PEFT and PEFT -> lorakit give the same outputs, the same
keys and config fields; every damaged or wrong file is refused with a message naming it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import lorakit
from lorakit import LoraConfig, ModulesToSave
from lorakit.inject import find_targets
from lorakit.state import lora_layers, require_state
from tiny import conv_toy, fresh, ids, randomize_lora, tiny_gpt2, tiny_llama, tiny_t5, toy_transformer

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Fields that decide which modules are adapted and what they compute (PEFT_FORMAT.md, "structural keys").
STRUCTURAL = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "bias", "lora_bias",
              "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "task_type")


def output(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def both_directions(build, cfg: dict, inputs: dict, tmp_path, peft_task=None, tweak_peft=None):
    """Save with lorakit, load in PEFT; save with PEFT, load in lorakit. Returns the two max-diffs and dirs."""
    lk_cfg = LoraConfig(**{ {"lora_alpha": "alpha"}.get(k, k): v for k, v in cfg.items()})
    ours = lorakit.inject(build(), lk_cfg)
    randomize_lora(ours, seed=11)
    lorakit.save_adapter(ours, tmp_path / "lorakit")
    peft_loaded = PeftModel.from_pretrained(build(), tmp_path / "lorakit").eval()
    lk_to_peft = (output(ours, inputs) - output(peft_loaded, inputs)).abs().max().item()
    assert (output(ours, inputs) - output(build(), inputs)).abs().max() > 1e-3          # the adapter does something

    torch.manual_seed(12)
    theirs = get_peft_model(build(), PeftLoraConfig(init_lora_weights=False, task_type=peft_task, **cfg)).eval()
    if tweak_peft:
        tweak_peft(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    lk_loaded = lorakit.load_adapter(build(), tmp_path / "peft")
    peft_to_lk = (output(theirs, inputs) - output(lk_loaded, inputs)).abs().max().item()
    assert (output(lk_loaded, inputs) - output(build(), inputs)).abs().max() > 1e-3
    return lk_to_peft, peft_to_lk, ours, lk_loaded


def same_files_as_peft(tmp_path, model) -> tuple[dict, dict]:
    """Key set, shapes and dtypes equal; config has PEFT's fields and the same structural values."""
    ours, theirs = load_file(tmp_path / "lorakit" / WEIGHTS), load_file(tmp_path / "peft" / WEIGHTS)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert (ours[key].shape, ours[key].dtype) == (theirs[key].shape, theirs[key].dtype), key
    with safe_open(tmp_path / "lorakit" / WEIGHTS, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    cfg_ours = json.loads((tmp_path / "lorakit" / CONFIG).read_text())
    cfg_theirs = json.loads((tmp_path / "peft" / CONFIG).read_text())
    assert set(cfg_ours) == set(cfg_theirs)
    assert {k: cfg_ours[k] for k in STRUCTURAL} == {k: cfg_theirs[k] for k in STRUCTURAL}
    # target_modules may be spelled differently (PEFT shortens long lists to suffixes); it must mean the same
    as_config = lambda d: LoraConfig.from_peft_dict(d)  # noqa: E731
    assert {n for n, _ in find_targets(model, as_config(cfg_ours))} == {
        n for n, _ in find_targets(model, as_config(cfg_theirs))}
    return cfg_ours, cfg_theirs


def report(name: str, lk_to_peft: float, peft_to_lk: float) -> None:
    print(f"\nINTEROP {name}: lorakit->PEFT max|diff| = {lk_to_peft:.3g}, PEFT->lorakit max|diff| = {peft_to_lk:.3g}")


# --- interop: four model families ------------------------------------------------------------------
def test_llama_all_linear_both_directions(tmp_path):
    x = {"input_ids": ids(2, 6)}
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear")
    d1, d2, ours, _ = both_directions(tiny_llama, cfg, x, tmp_path, peft_task="CAUSAL_LM")
    report("tiny Llama (all-linear)", d1, d2)
    assert d1 < 1e-5 and d2 < 1e-5
    cfg_ours, _ = same_files_as_peft(tmp_path, tiny_llama())
    assert cfg_ours["task_type"] == "CAUSAL_LM" and len(cfg_ours["target_modules"]) == 14


def test_gpt2_conv1d_both_directions(tmp_path):
    x = {"input_ids": ids(2, 6)}
    cfg = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])
    d1, d2, _, _ = both_directions(tiny_gpt2, cfg, x, tmp_path, peft_task="CAUSAL_LM")
    report("tiny GPT-2 (Conv1D)", d1, d2)
    assert d1 < 1e-5 and d2 < 1e-5
    cfg_ours, cfg_theirs = same_files_as_peft(tmp_path, tiny_gpt2())
    assert cfg_ours["fan_in_fan_out"] is True and cfg_theirs["fan_in_fan_out"] is True
    keys = load_file(tmp_path / "lorakit" / WEIGHTS)
    assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 16)   # (r, in)
    assert keys["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (48, 4)   # (out, r)


def test_bert_classifier_with_modules_to_save_both_directions(tmp_path, minilm):
    x = {"input_ids": ids(2, 7), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["classifier"])

    def tweak(peft_model):  # a trained head copy, not the original
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)

    d1, d2, ours, loaded = both_directions(lambda: fresh(minilm), cfg, x, tmp_path, peft_task="SEQ_CLS",
                                           tweak_peft=tweak)
    report("all-MiniLM-L6-v2 classifier (modules_to_save)", d1, d2)
    assert d1 < 1e-5 and d2 < 1e-5
    cfg_ours, cfg_theirs = same_files_as_peft(tmp_path, minilm)
    assert cfg_ours["modules_to_save"] == ["classifier"] and "classifier" in cfg_theirs["modules_to_save"]
    keys = load_file(tmp_path / "lorakit" / WEIGHTS)
    assert keys["base_model.model.classifier.weight"].shape == (3, 384)
    assert isinstance(loaded.classifier, ModulesToSave)
    assert torch.equal(loaded.classifier.original_module.weight, minilm.classifier.weight)


def test_t5_both_directions(tmp_path):
    x = {"input_ids": ids(2, 6), "decoder_input_ids": ids(2, 3, seed=1)}
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear")
    d1, d2, _, _ = both_directions(tiny_t5, cfg, x, tmp_path, peft_task="SEQ_2_SEQ_LM")
    report("tiny T5 (all-linear)", d1, d2)
    assert d1 < 1e-5 and d2 < 1e-5
    same_files_as_peft(tmp_path, tiny_t5())


def test_embedding_and_convs_on_plain_modules_both_directions(tmp_path):
    x = {"ids": ids(2, 5)}
    cfg = dict(r=3, lora_alpha=6, target_modules=["embed", "q", "down"])
    d1, d2, _, _ = both_directions(toy_transformer, cfg, x, tmp_path / "toy")
    report("hand-written transformer (Embedding)", d1, d2)
    assert d1 < 1e-5 and d2 < 1e-5
    same_files_as_peft(tmp_path / "toy", toy_transformer())
    keys = load_file(tmp_path / "toy" / "lorakit" / WEIGHTS)
    assert keys["base_model.model.embed.lora_embedding_A"].shape == (3, 64)
    assert keys["base_model.model.embed.lora_embedding_B"].shape == (16, 3)

    x = {"x": torch.randn(2, 3, 8, 8)}
    cfg = dict(r=2, lora_alpha=4, target_modules=["conv", "conv1d"])
    d1, d2, _, _ = both_directions(conv_toy, cfg, x, tmp_path / "conv")
    report("Conv2d + Conv1d toy", d1, d2)
    assert d1 < 1e-5 and d2 < 1e-5
    same_files_as_peft(tmp_path / "conv", conv_toy())
    keys = load_file(tmp_path / "conv" / "lorakit" / WEIGHTS)
    assert keys["base_model.model.conv.lora_A.weight"].shape == (2, 3, 3, 3)
    assert keys["base_model.model.conv.lora_B.weight"].shape == (4, 2, 1, 1)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_bias_keys_match_peft(bias, tmp_path):
    x = {"input_ids": ids(2, 5)}
    cfg = dict(r=2, lora_alpha=4, target_modules=["c_attn"], bias=bias)

    def tweak(peft_model):
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if n.endswith(".bias") and p.requires_grad:
                    p.add_(0.1)

    d1, d2, ours, _ = both_directions(tiny_gpt2, cfg, x, tmp_path, peft_task="CAUSAL_LM", tweak_peft=tweak)
    assert d1 < 1e-5 and d2 < 1e-5
    same_files_as_peft(tmp_path, tiny_gpt2())
    keys = set(load_file(tmp_path / "lorakit" / WEIGHTS))
    assert ("base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in keys)
    assert ("base_model.model.transformer.h.0.ln_1.bias" in keys) == (bias == "all")


# --- round trips and layout ---------------------------------------------------------------------------
def test_round_trip_restores_every_tensor_and_writes_only_two_files(tmp_path):
    model = lorakit.inject(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                                    rank_pattern={"v_proj": 2}, modules_to_save=["lm_head"]))
    randomize_lora(model, seed=5)
    out = lorakit.save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(out)) == [CONFIG, WEIGHTS]                 # no temp file left behind
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path / "a", name="task")
    ours = lorakit.adapter_state_dict(model, "default")
    again = lorakit.adapter_state_dict(loaded, "task")
    assert ours.keys() == again.keys()
    assert all(torch.equal(ours[k], again[k]) for k in ours)
    assert not any(p.requires_grad for p in loaded.parameters())        # trainable=False by default
    assert require_state(loaded).configs["task"].rank_pattern == {"v_proj": 2}
    x = ids(2, 4)
    assert_close(output(loaded, {"input_ids": x}), output(model, {"input_ids": x}), rtol=0, atol=0)


def test_load_trainable_and_into_a_model_that_already_has_layers(tmp_path):
    model = lorakit.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), name="first")
    randomize_lora(model, "first", seed=1)
    lorakit.save_adapter(model, tmp_path, name="first")
    lorakit.load_adapter(model, tmp_path, name="second", trainable=True)
    q = model.model.layers[0].self_attn.q_proj
    assert list(q.adapters) == ["first", "second"]
    assert torch.equal(q.adapters["first"].lora_B.weight, q.adapters["second"].lora_B.weight)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".adapters.second." in n)
    with pytest.raises(ValueError, match=r"an adapter named 'second' is already loaded; pass another name="):
        lorakit.load_adapter(model, tmp_path, name="second")


def test_peft_subfolder_for_a_named_adapter(tmp_path):
    torch.manual_seed(3)
    peft_model = get_peft_model(tiny_llama(), PeftLoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.add_adapter("other", PeftLoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "both", selected_adapters=["default", "other"])
    peft_model.save_pretrained(tmp_path / "only", selected_adapters=["other"])
    assert (tmp_path / "both" / "other" / WEIGHTS).is_file() and not (tmp_path / "only" / CONFIG).exists()
    x = {"input_ids": ids(2, 4)}
    peft_model.set_adapter("other")
    want = output(peft_model, x)
    for path in (tmp_path / "both" / "other", tmp_path / "only"):    # the folder itself, or its parent
        model = lorakit.load_adapter(tiny_llama(), path, name="other")
        assert_close(output(model, x), want, atol=1e-5, rtol=1e-5)
    peft_model.set_adapter("default")
    model = lorakit.load_adapter(tiny_llama(), tmp_path / "both")
    assert_close(output(model, x), output(peft_model, x), atol=1e-5, rtol=1e-5)


# --- errors: each names the file and the problem ----------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = lorakit.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, seed=1)
    return lorakit.save_adapter(model, tmp_path / "adapter")


def assert_untouched(model, **kwargs):
    """A failed load leaves the model exactly as it was: same modules, same keys, nothing frozen."""
    assert "_lorakit_state" not in model.__dict__
    assert list(model.state_dict()) == list(tiny_llama(**kwargs).state_dict())
    assert all(p.requires_grad for p in model.parameters())


def test_missing_directory_and_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match=rf"adapter directory {tmp_path / 'nowhere'} does not exist"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "nowhere")
    (saved / WEIGHTS).unlink()
    model = tiny_llama()
    with pytest.raises(FileNotFoundError, match=rf"{saved / WEIGHTS} not found"):
        lorakit.load_adapter(model, saved)
    assert_untouched(model)
    (saved / CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{saved / CONFIG} not found: an adapter directory holds"):
        lorakit.load_adapter(model, saved)


def test_damaged_json(saved):
    (saved / CONFIG).write_text('{"r": 4, "target_modules": ["q_pr')
    model = tiny_llama()
    with pytest.raises(ValueError, match=rf"{saved / CONFIG} is not valid JSON \(.*\); the file is damaged"):
        lorakit.load_adapter(model, saved)
    (saved / CONFIG).write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{saved / CONFIG} must hold a JSON object, got list"):
        lorakit.load_adapter(model, saved)
    assert_untouched(model)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_names_the_file(saved, damage):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x10\x00" * 40,
                                   "empty": b""}[damage])
    model = tiny_llama()
    with pytest.raises(ValueError, match=rf"{saved / WEIGHTS} is not a valid safetensors file .*truncated or damaged"):
        lorakit.load_adapter(model, saved)
    assert_untouched(model)


def test_key_for_a_module_the_model_lacks(saved):
    tensors = load_file(saved / WEIGHTS)
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 16)
    save_file(tensors, saved / WEIGHTS)
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"key 'base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight' is "
                                         r"for module 'model.layers.9.self_attn.q_proj', which LlamaForCausalLM "
                                         r"does not have"):
        lorakit.load_adapter(model, saved)
    assert_untouched(model)


def test_shape_mismatch_names_module_and_both_shapes(saved):
    model = tiny_llama(hidden=24)                                      # the adapter was made for hidden=16
    with pytest.raises(ValueError) as err:
        lorakit.load_adapter(model, saved)
    msg = str(err.value)
    assert str(saved / WEIGHTS) in msg and "shape mismatch for 'model.layers.0.self_attn.q_proj'" in msg
    assert "file has (4, 16), model expects (4, 24)" in msg
    assert_untouched(model, hidden=24)                                 # nothing half-loaded is left behind


def test_config_rank_disagreeing_with_weights(saved):
    cfg = json.loads((saved / CONFIG).read_text())
    cfg["r"] = 8
    (saved / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"shape mismatch for 'model.layers.0.self_attn.q_proj' .*"
                                         r"file has \(4, 16\), model expects \(8, 16\)"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_unknown_peft_type_says_what_is_supported(saved):
    cfg = json.loads((saved / CONFIG).read_text())
    cfg["peft_type"] = "PREFIX_TUNING"
    (saved / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"{saved / CONFIG}: peft_type='PREFIX_TUNING' is not supported; lorakit "
                                         r"loads LoRA adapters \(peft_type 'LORA', including rsLoRA and DoRA\)"):
        lorakit.load_adapter(tiny_llama(), saved)


def test_pickle_bin_is_refused(saved):
    tensors = load_file(saved / WEIGHTS)
    (saved / WEIGHTS).unlink()
    torch.save(tensors, saved / "adapter_model.bin")
    model = tiny_llama()
    with pytest.raises(ValueError, match=rf"{saved / 'adapter_model.bin'} is a pickle file; lorakit loads weights only "
                                         r"from safetensors"):
        lorakit.load_adapter(model, saved)
    assert_untouched(model)


def test_failed_save_leaves_the_old_files(saved, monkeypatch):
    """Writes are atomic: a crash mid-write leaves the previous adapter intact and no temp file."""
    before = (saved / WEIGHTS).read_bytes()
    model = lorakit.inject(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lorakit.io, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(model, saved)
    assert (saved / WEIGHTS).read_bytes() == before
    assert sorted(os.listdir(saved)) == [CONFIG, WEIGHTS]
    assert len(lora_layers(model)) == 4
