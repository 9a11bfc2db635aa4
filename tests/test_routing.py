"""Per-row routing (lorakit/routing.py, `lorakit.per_row`): row j of a batch uses adapter names[j].

- the batched path (two bmm's per linear) equals each adapter run alone, in prefill and in KV-cache
  decoding, also on GPT-2's Conv1D and for a batch whose rows are repeated (beam search);
- everything is built when per_row is entered: the slots' factors once (a view of the layer's
  adapter stack when the batch uses at least half of it), the stack reused across routings and
  rebuilt when an adapter changes, the rows grouped by slot; `reroute` regroups a changed batch
  without copying factors; forward writes nothing.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import lorakit
from lorakit import LoraConfig
from lorakit.routing import Routing, adapter_stack
from lorakit.state import require_state
from tiny import ids, randomize_adapters, single_runs, tiny_llama

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = ["a3", None, "a0", "a4", "a1", "a3", "a2", None]


def assert_per_row_matches_single_runs(model, rows, x, reset):
    """Logits of x under per_row(rows) equal each row run alone with its own adapter."""
    with torch.no_grad():
        with lorakit.per_row(model, rows):
            mixed = model(x).logits
        alone = single_runs(model, x, rows, lambda xi: model(xi).logits, reset=reset)
    assert_close(mixed, alone, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def many():
    """tiny Llama with five adapters of different ranks on all projections (one misses k_proj)."""
    model = tiny_llama(seed=0, hidden=32)
    for i in range(5):
        targets = [t for t in LLAMA_TARGETS if not (i == 4 and t == "k_proj")]
        lorakit.inject(model, LoraConfig(r=2 + i, alpha=4, target_modules=targets), name=f"a{i}")
    randomize_adapters(model, std=0.3)
    return model.eval()


def test_per_row_prefill_uses_batched_matmuls_and_matches_single_runs(many, monkeypatch):
    x = ids(len(ROWS), 7, seed=2)
    calls = []
    monkeypatch.setattr(lorakit.LoraLinear, "update",                 # the per-adapter formula
                        lambda self, *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    with torch.no_grad(), lorakit.per_row(many, ROWS):
        mixed = many(x).logits
    assert not calls                                              # no per-adapter loop anywhere
    monkeypatch.undo()
    with torch.no_grad():
        alone = single_runs(many, x, ROWS, lambda xi: many(xi).logits, reset="a0")
    assert_close(mixed, alone, atol=1e-5, rtol=1e-5)


def test_per_row_decoding_with_kv_cache_matches_single_runs(many):
    x = ids(len(ROWS), 5, seed=3)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=True)
    with torch.no_grad():
        with lorakit.per_row(many, ROWS):
            mixed = many.generate(x, output_scores=True, return_dict_in_generate=True, **kwargs)
        alone = single_runs(many, x, ROWS, lambda xi: many.generate(xi, **kwargs), reset="a0")
    assert torch.equal(mixed.sequences, alone)
    # the cached per-row factors were built once per layer, not per step
    assert mixed.sequences.shape == (len(ROWS), 13)


def test_per_row_factors_are_prepared_once_when_per_row_is_entered(many):
    layer = many.model.layers[0].self_attn.k_proj
    x = ids(len(ROWS), 4, seed=6)
    with torch.no_grad(), lorakit.per_row(many, ROWS):
        routing = require_state(many).routing
        plan = routing.plan(layer)
        a1, b1 = plan.a, plan.bt
        many(x)
        many(x)
        assert routing.plan(layer) is plan and plan.a is a1    # forward read them, built nothing new
    assert plan.batched and not plan.dropout
    # the rows use all four adapters this layer has (a4 has no k_proj): the slots are its whole
    # stack, a view of it (no copy); a4's row gets no term here
    _, a_all, _ = adapter_stack(layer, torch.device("cpu"), torch.float32)
    assert plan.slots == ("a0", "a1", "a2", "a3") and a1.data_ptr() == a_all.data_ptr()
    r_max = 5                                                     # a3
    assert a1.shape == (5, r_max, 32) and b1.shape == (5, r_max, layer.out_features)   # entry 0: zeros
    assert not a1[0].any() and not b1[0].any()
    ad = layer.adapters["a3"]
    assert_close(b1[4, : ad.r].t() @ a1[4, : ad.r], ad.scaling * ad.lora_B.weight @ ad.lora_A.weight)
    # rows grouped by slot: a0 [2], a1 [4], a2 [6], a3 [0, 5]; g = 2, padding repeats the first row
    groups = routing.grouping(plan.slots, torch.device("cpu"))
    assert groups.size == 2 and groups.gather.tolist() == [2, 2, 4, 4, 6, 6, 0, 5]
    # each row takes its own position; rows 1, 7 (None) and 3 (a4) the first padding one, zeroed
    assert groups.scatter.tolist() == [6, 1, 0, 1, 2, 7, 4, 1]
    assert groups.pad.flatten().tolist() == [False, True, False, True, False, True, False, False]
    assert groups.row_slot.tolist() == [4, 0, 1, 0, 2, 4, 3, 0] and not groups.identity  # for a prefill
    every = Routing(["a1", "a0", "a1", "a0"], [layer]).grouping(plan.slots, torch.device("cpu"))
    assert every.scatter.tolist() == [2, 0, 3, 1] and every.pad is None      # unused slots' padding never read
    crowded = Routing(["a0", None], [layer]).grouping(("a0",), torch.device("cpu"))
    assert crowded.scatter is None and crowded.pad is None        # no padding to point None at: index_add_


def test_a_batch_using_few_of_many_adapters_copies_only_theirs(many):
    layer = many.model.layers[0].self_attn.q_proj
    rows = ["a3", None, "a1", "a3"]
    x = ids(len(rows), 5, seed=9)
    with torch.no_grad():
        with lorakit.per_row(many, rows):
            plan = require_state(many).routing.plan(layer)
            mixed = many(x).logits
        alone = single_runs(many, x, rows, lambda xi: many(xi).logits, reset="a0")
    assert plan.slots == ("a1", "a3") and plan.a.shape[0] == 3    # the zero entry, a1's, a3's
    assert_close(mixed, alone, atol=1e-5, rtol=1e-5)


def test_reroute_regroups_a_changed_batch_without_copying_factors(many):
    layer = many.model.layers[0].self_attn.q_proj
    with torch.no_grad(), lorakit.per_row(many, ROWS):
        a_before = require_state(many).routing.plan(layer).a
        rows = ROWS[3:] + ["a0", "a0"]                            # three rows left, two joined
        lorakit.adapters.reroute(many, rows)
        assert require_state(many).routing.plan(layer).a.data_ptr() == a_before.data_ptr()
        mixed = many(ids(len(rows), 4, seed=11)).logits
        with pytest.raises(ValueError, match="nope"):
            lorakit.adapters.reroute(many, ["nope"])
        with pytest.raises(ValueError, match="one adapter name .or None. per batch row, got an empty list"):
            lorakit.adapters.reroute(many, [])
    assert require_state(many).routing is None                     # leaving the block ends the rerouted routing
    with torch.no_grad():
        alone = single_runs(many, ids(len(rows), 4, seed=11), rows, lambda xi: many(xi).logits, reset="a0")
    assert_close(mixed, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="inside a per_row block"):
        lorakit.adapters.reroute(many, ROWS)


def test_adapter_stack_is_reused_across_routings_and_rebuilt_when_an_adapter_changes(many):
    layer = many.model.layers[0].self_attn.q_proj
    cpu = torch.device("cpu")
    _, a1, _ = adapter_stack(layer, cpu, torch.float32)
    Routing(ROWS, [layer])                                        # what per_row builds for this layer
    _, a2, _ = adapter_stack(layer, cpu, torch.float32)
    assert a1 is a2                                               # a new batch reuses the stack
    x = ids(len(ROWS), 4, seed=5)
    ad = layer.adapters["a1"]
    with torch.no_grad():
        ad.lora_A.weight.mul_(3.0)                                # in place: the version counter moves
        with lorakit.per_row(many, ROWS):
            mixed = many(x).logits
        alone = single_runs(many, x, ROWS, lambda xi: many(xi).logits, reset="a0")
    assert adapter_stack(layer, cpu, torch.float32)[1] is not a1
    assert_close(mixed, alone, atol=1e-5, rtol=1e-5)              # the change is seen, no stale stack


def test_per_row_on_gpt2_conv1d_matches_single_runs():
    """transformers' Conv1D stores W as (in, out); the batched path must not care."""
    from tiny import tiny_gpt2

    model = tiny_gpt2(seed=0)
    for i in range(3):
        lorakit.inject(model, LoraConfig(r=2 + i, alpha=4, target_modules=["c_attn", "c_proj", "c_fc"]), name=f"g{i}")
    randomize_adapters(model, std=0.3)
    model.eval()
    rows = ["g2", None, "g0", "g1"]
    assert_per_row_matches_single_runs(model, rows, ids(len(rows), 6, seed=4), reset="g0")


def test_rows_repeated_m_times_use_the_same_routing(many):
    """generate(num_beams=m) repeats each row m times in a row: the n names route all n·m rows."""
    x = ids(len(ROWS), 5, seed=7)
    with torch.no_grad():
        with lorakit.per_row(many, ROWS):
            once = many(x).logits
            thrice = many(x.repeat_interleave(3, 0)).logits
        with lorakit.per_row(many, [n for n in ROWS for _ in range(3)]):
            spelled_out = many(x.repeat_interleave(3, 0)).logits
    assert_close(thrice, once.repeat_interleave(3, 0), atol=1e-5, rtol=1e-5)
    assert_close(thrice, spelled_out, atol=1e-5, rtol=1e-5)


def _attributes(model) -> dict:
    """Every module's own attributes (not parameters or submodules), by identity."""
    return {(name, k): id(v) for name, m in model.named_modules() for k, v in vars(m).items()
            if k not in ("_parameters", "_buffers", "_modules")}


def test_forward_writes_nothing(many):
    """Forward is pure math: no attribute of any module, and nothing in the routing, changes."""
    x = ids(len(ROWS), 4, seed=8)
    with torch.no_grad(), lorakit.per_row(many, ROWS):
        routing = require_state(many).routing
        before = _attributes(many), dict(vars(routing)), dict(routing._plans), dict(routing._groups), dict(routing._groupings)
        many(x)
        many.generate(x, max_new_tokens=2, do_sample=False, pad_token_id=0)
        after = _attributes(many), dict(vars(routing)), dict(routing._plans), dict(routing._groups), dict(routing._groupings)
    assert before == after
    lorakit.set_adapter(many, "a1")
    with torch.no_grad():
        before = _attributes(many)
        many(x)
    assert _attributes(many) == before
    lorakit.set_adapter(many, "a0")


def test_a_layer_per_row_did_not_prepare_takes_the_per_adapter_path(many):
    layer = many.model.layers[0].self_attn.q_proj
    routing = Routing(ROWS)                                       # prepared for no layer
    assert routing.plan(layer) is None
    x = torch.randn(len(ROWS), 3, 32)
    state = require_state(many)
    with torch.no_grad():
        with lorakit.per_row(many, ROWS):
            want = layer(x)
        previous, state.routing = state.routing, routing
        try:
            got = layer(x)
        finally:
            state.routing = previous
    assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 7])                        # decoding (rows by slot), prefill (rows' own factors)
def test_a_row_whose_adapter_a_layer_lacks_gets_no_other_adapters_term(length):
    """v_proj holds x and z, not y: for rows [y, z] its slots (x, z) put padding first, so the
    positions read [0, 1] like rows already in slot order, yet row 0 must get no term there."""
    model = tiny_llama(seed=0, hidden=32)
    for name, targets in (("x", LLAMA_TARGETS), ("y", [t for t in LLAMA_TARGETS if t != "v_proj"]),
                          ("z", LLAMA_TARGETS)):
        lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=targets), name=name)
    randomize_adapters(model, std=0.3)
    model.eval()
    for rows in (["y", "z"], ["z", "y"], ["y", "x"], ["z", "z"]):
        assert_per_row_matches_single_runs(model, rows, ids(len(rows), length, seed=12), reset="x")


def test_a_long_per_row_block_keeps_the_plans_of_few_adapter_sets(many):
    """The serving engine keeps one block open for hours: plans (which may hold copies of factors)
    are kept for the KEPT_PLANS most recently used sets of adapters, not for every set seen."""
    from itertools import combinations

    from lorakit.routing import KEPT_PLANS

    sets = [list(c) for c in combinations(["a0", "a1", "a2", "a3", "a4"], 2)]      # 10 > KEPT_PLANS sets
    with torch.no_grad(), lorakit.per_row(many, ROWS):
        for rows in sets:
            lorakit.adapters.reroute(many, rows)
        prepared = require_state(many).routing._prepared
        assert len(prepared.plans) == KEPT_PLANS
        assert list(prepared.plans)[-1] == tuple(sets[-1])                # the newest kept, the oldest gone
        assert tuple(sets[0]) not in prepared.plans
        lorakit.adapters.reroute(many, sets[-2])                          # a kept set: reused, moved last
        assert list(prepared.plans)[-1] == tuple(sets[-2]) and len(prepared.plans) == KEPT_PLANS
