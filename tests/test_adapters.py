"""Many adapters on one base: switching, several at once, disabling, deleting, per-row routing, counts.

PEFT is the oracle: the same adapter files loaded into PEFT must give the same outputs.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn
from torch.testing import assert_close

import lorakit
from lorakit import LoraConfig
from lorakit.state import lora_layers, require_state
from tiny import flan_t5_base_shaped, ids, randomize_lora, single_runs, tiny_llama, tiny_t5, toy_transformer

PEFT_LINE = re.compile(r"^trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}$")


# --- parameter counts ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flan_t5_pair():
    """flan-t5-base's layout on the meta device (no memory), adapted by lorakit and by PEFT."""
    ours = lorakit.inject(flan_t5_base_shaped(), LoraConfig(r=16, alpha=32, target_modules=["q", "v"]))
    theirs = get_peft_model(flan_t5_base_shaped(), PeftLoraConfig(r=16, lora_alpha=32, target_modules=["q", "v"]))
    return ours, theirs


def test_flan_t5_base_report_is_peft_line(flan_t5_pair, capsys):
    ours, theirs = flan_t5_pair
    assert sum(p.numel() for n, p in ours.named_parameters() if ".adapters." not in n) == 247_577_856
    assert len(lora_layers(ours)) == 72                     # (12 enc + 12 dec self + 12 cross) x {q, v}
    lorakit.print_trainable_parameters(ours)
    line = capsys.readouterr().out
    assert line == "trainable params: 1,769,472 || all params: 249,347,328 || trainable%: 0.7096\n"
    theirs.print_trainable_parameters()
    assert capsys.readouterr().out == line
    assert lorakit.count_parameters(ours) == (1_769_472, 249_347_328)


def test_counts_match_peft_with_modules_to_save_and_bias(capsys):
    cfg = dict(r=3, target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"], bias="all")
    ours = lorakit.inject(tiny_llama(), LoraConfig(alpha=3, **cfg))
    theirs = get_peft_model(tiny_llama(), PeftLoraConfig(lora_alpha=3, **cfg))
    assert lorakit.count_parameters(ours) == theirs.get_nb_trainable_parameters()
    lorakit.print_trainable_parameters(ours)
    theirs.print_trainable_parameters()
    mine, peft_line = capsys.readouterr().out.splitlines()
    assert PEFT_LINE.match(mine) and mine == peft_line


# --- two adapters, saved once, loaded into lorakit and into PEFT ------------------------------------
@pytest.fixture
def two(tmp_path):
    """A tiny Llama with adapters "a" (q, v; r 4) and "b" (all-linear; r 2), plus PEFT with the same two."""
    model = tiny_llama()
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name="a")
    lorakit.inject(model, LoraConfig(r=2, alpha=4, target_modules="all-linear"), name="b")
    randomize_lora(model, "a", seed=1)
    randomize_lora(model, "b", seed=2)
    lorakit.save_adapter(model, tmp_path / "a", name="a")
    lorakit.save_adapter(model, tmp_path / "b", name="b")
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    return model.eval(), peft_model.eval(), tiny_llama()


def logits(model, x, **kwargs):
    with torch.no_grad():
        return model(input_ids=x, **kwargs).logits


def test_set_adapter_switches_like_peft(two):
    model, peft_model, base = two
    x = ids(3, 5)
    outs = {}
    for name in ("a", "b", "a"):
        lorakit.set_adapter(model, name)
        peft_model.set_adapter(name)
        outs[name] = logits(model, x)
        assert_close(outs[name], logits(peft_model, x), atol=1e-5, rtol=1e-5)
        assert lorakit.active_adapters(model) == [name]
    assert (outs["a"] - outs["b"]).abs().max() > 1e-2
    assert (outs["a"] - logits(base, x)).abs().max() > 1e-2


def test_a_list_activates_several_as_peft(two):
    model, peft_model, _ = two
    x = ids(3, 5)
    lorakit.set_adapter(model, ["a", "b"])
    peft_model.base_model.set_adapter(["a", "b"])
    both = logits(model, x)
    assert_close(both, logits(peft_model, x), atol=1e-5, rtol=1e-5)
    lorakit.set_adapter(model, "a")
    assert (both - logits(model, x)).abs().max() > 1e-2


def test_several_active_adapters_add_their_updates():
    model = nn.Sequential(OrderedDict(lin=nn.Linear(5, 4)))
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        lorakit.inject(model, LoraConfig(r=2, alpha=float(seed), target_modules=["lin"]), name=name)
        randomize_lora(model, name, seed=seed)
    x = torch.randn(6, 5)
    base = model.lin.base_layer(x)
    single = {}
    for name in ("a", "b", "c"):
        lorakit.set_adapter(model, name)
        single[name] = model(x) - base
    lorakit.set_adapter(model, ["a", "c"])
    assert_close(model(x), base + single["a"] + single["c"])


def test_set_adapter_unknown_name_lists_the_known_ones(two):
    model, _, _ = two
    with pytest.raises(ValueError, match=r"set_adapter: unknown adapter name\(s\) \['c'\]; this model has \['a', 'b'\]"):
        lorakit.set_adapter(model, ["a", "c"])
    assert lorakit.active_adapters(model) == ["a"]


def test_disabled_gives_base_and_restores(two):
    model, peft_model, base = two
    x = ids(2, 4)
    before = logits(model, x)
    with lorakit.disabled(model):
        assert_close(logits(model, x), logits(base, x), rtol=0, atol=0)
        with peft_model.disable_adapter():
            assert_close(logits(model, x), logits(peft_model, x), rtol=0, atol=0)
    assert_close(logits(model, x), before, rtol=0, atol=0)
    with pytest.raises(RuntimeError), lorakit.disabled(model):       # an error inside still restores
        raise RuntimeError
    assert_close(logits(model, x), before, rtol=0, atol=0)


def test_disabled_after_merge_gives_base_then_merged_again(two):
    model, _, base = two
    x = ids(2, 4)
    unmerged = logits(model, x)
    lorakit.merge(model)
    merged_weight = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with lorakit.disabled(model):
        assert_close(logits(model, x), logits(base, x), atol=1e-5, rtol=1e-5)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, merged_weight)
    assert_close(logits(model, x), unmerged, atol=1e-5, rtol=1e-5)


def test_delete_adapter_leaves_no_trace(two):
    model, _, _ = two
    x = ids(2, 4)
    lorakit.set_adapter(model, "a")
    only_a = logits(model, x)
    lorakit.delete_adapter(model, "b")
    assert lorakit.adapter_names(model) == ["a"] and lorakit.active_adapters(model) == ["a"]
    names = list(model.state_dict()) + [n for n, _ in model.named_modules()]
    assert not [n for n in names if ".b." in n or n.endswith(".b")]
    assert all("b" not in layer.adapters for _, layer in lora_layers(model))
    assert_close(logits(model, x), only_a, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"delete_adapter: unknown adapter name\(s\) \['b'\]; this model has \['a'\]"):
        lorakit.delete_adapter(model, "b")


def test_delete_active_adapter_falls_back_and_last_can_go(two):
    model, _, base = two
    x = ids(2, 4)
    lorakit.delete_adapter(model, "a")
    assert lorakit.active_adapters(model) == ["b"]
    lorakit.delete_adapter(model, "b")
    assert lorakit.adapter_names(model) == [] and lorakit.active_adapters(model) == []
    assert not [n for n in model.state_dict() if ".adapters." in n]
    assert_close(logits(model, x), logits(base, x), rtol=0, atol=0)


def test_delete_merged_adapter_refuses_and_changes_nothing(two):
    model, _, _ = two
    lorakit.merge(model, ["a"])
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=r"adapter 'a' is merged into the base weights; call lorakit.unmerge"):
        lorakit.delete_adapter(model, "a")
    assert set(model.state_dict()) == keys and lorakit.adapter_names(model) == ["a", "b"]


# --- per-row routing ------------------------------------------------------------------------------------
ROWS = ["a", "b", None, "a", "b"]
PEFT_ROWS = [n or "__base__" for n in ROWS]


def test_per_row_forward_equals_single_adapter_runs_and_peft(two):
    model, peft_model, base = two
    x = ids(len(ROWS), 6, seed=4)
    with lorakit.per_row(model, ROWS):
        mixed = logits(model, x)
    alone = single_runs(model, x, ROWS, lambda xi: logits(model, xi))
    assert_close(mixed, alone, atol=1e-5, rtol=1e-5)
    assert_close(mixed[2], logits(base, x[2:3])[0], atol=1e-6, rtol=1e-6)
    assert_close(mixed, logits(peft_model, x, adapter_names=PEFT_ROWS), atol=1e-5, rtol=1e-5)
    assert (mixed[0] - logits(base, x[0:1])[0]).abs().max() > 1e-2           # the adapters do act


def test_per_row_generate_equals_single_runs_and_peft(two):
    model, peft_model, base = two
    x = ids(len(ROWS), 4, seed=5)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with lorakit.per_row(model, ROWS):
            mixed = model.generate(x, **kwargs)
        alone = single_runs(model, x, ROWS, lambda xi: model.generate(xi, **kwargs))
        theirs = peft_model.generate(input_ids=x, adapter_names=PEFT_ROWS, **kwargs)
    assert mixed.shape == (5, 10)
    assert torch.equal(mixed, alone)
    assert torch.equal(mixed, theirs)
    with torch.no_grad():
        assert not torch.equal(mixed, base.generate(x, **kwargs))             # the adapters do act


def test_per_row_follows_beam_search(two):
    """Beam search repeats each row num_beams times; row i's beams keep adapter i."""
    model, _, _ = two
    rows = ["b", None, "a"]
    x = ids(3, 4, seed=8)
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad():
        with lorakit.per_row(model, rows):
            mixed = model.generate(x, **kwargs)
        alone = single_runs(model, x, rows, lambda xi: model.generate(xi, **kwargs))
    assert torch.equal(mixed, alone)


def test_per_row_generate_scores_on_t5(tmp_path):
    """Encoder-decoder generate: per-row scores equal each adapter's own scores."""
    model = tiny_t5()
    lorakit.inject(model, LoraConfig(r=2, alpha=4, target_modules=["q", "v", "wo"]), name="a")
    lorakit.inject(model, LoraConfig(r=4, alpha=4, target_modules="all-linear"), name="b")
    randomize_lora(model, "a", seed=1, std=0.3)
    randomize_lora(model, "b", seed=2, std=0.3)
    rows = ["b", None, "a"]
    x = ids(3, 5, seed=6)
    kwargs = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        with lorakit.per_row(model, rows):
            mixed = model.generate(input_ids=x, **kwargs)
        for i, name in enumerate(rows):
            if name is None:
                with lorakit.disabled(model):
                    alone = model.generate(input_ids=x[i:i + 1], **kwargs)
            else:
                lorakit.set_adapter(model, name)
                alone = model.generate(input_ids=x[i:i + 1], **kwargs)
            assert_close(mixed.scores[0][i], alone.scores[0][0], atol=1e-5, rtol=1e-5)


def test_per_row_with_embedding_and_modules_to_save():
    """Routing also covers LoRA embeddings and per-adapter copies of a saved module."""
    model = toy_transformer()
    lorakit.inject(model, LoraConfig(r=2, target_modules=["embed", "q", "v"], modules_to_save=["head"]), name="a")
    lorakit.inject(model, LoraConfig(r=3, target_modules=["embed", "o"]), name="b")
    randomize_lora(model, "a", seed=1)
    randomize_lora(model, "b", seed=2)
    x = ids(len(ROWS), 5, seed=7)
    with torch.no_grad():
        with lorakit.per_row(model, ROWS):
            mixed = model(x)
        alone = single_runs(model, x, ROWS, model)
    assert_close(mixed, alone, atol=1e-5, rtol=1e-5)


def test_per_row_refuses_training_merged_unknown_and_wrong_length(two):
    model, _, _ = two
    model.train()
    with pytest.raises(ValueError, match=r"per_row is for inference: call model.eval\(\) first"):
        with lorakit.per_row(model, ["a", "b"]):
            pass
    model.eval()
    with pytest.raises(ValueError, match=r"per_row: unknown adapter name\(s\) \['z'\]; this model has \['a', 'b'\]"):
        with lorakit.per_row(model, ["a", "z"]):
            pass
    with pytest.raises(ValueError, match=r"per_row was given 3 adapter names but the batch has 2 rows"):
        with lorakit.per_row(model, ["a", "b", None]):
            model(ids(2, 3))
    lorakit.merge(model, ["a"])
    with pytest.raises(ValueError, match=r"per_row cannot route rows while adapters are merged"):
        with lorakit.per_row(model, ["a", None]):
            pass
    lorakit.unmerge(model)
    with lorakit.per_row(model, ["a", None]):
        pass
    assert require_state(model).routing is None


def test_using_picks_one_adapter_base_or_rows_and_restores(two):
    model, peft_model, base = two
    x = ids(len(ROWS), 6, seed=5)
    lorakit.set_adapter(model, "a")
    with lorakit.using(model, "b"):
        assert lorakit.active_adapters(model) == ["b"]
        with_b = logits(model, x)
    assert lorakit.active_adapters(model) == ["a"]                        # the previous choice is back
    peft_model.set_adapter("b")
    assert_close(with_b, logits(peft_model, x), atol=1e-5, rtol=1e-5)
    with lorakit.using(model, [None] * len(ROWS)):
        assert_close(logits(model, x), logits(base, x), atol=1e-6, rtol=1e-6)
    with lorakit.using(model, ROWS):
        mixed = logits(model, x)
    assert_close(mixed, logits(peft_model, x, adapter_names=PEFT_ROWS), atol=1e-5, rtol=1e-5)
    with lorakit.using(model, None):                                       # None: what is active now
        assert_close(logits(model, x), single_runs(model, x, ["a"] * len(ROWS), lambda xi: logits(model, xi)))
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) \['zz'\]"):
        with lorakit.using(model, "zz"):
            pass
