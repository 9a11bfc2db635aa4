"""lorakit.training.optim: AdamW over the trainable parameters only, LoRA+ groups, the schedules."""

import math

import pytest
import torch
from tiny import tiny_llama

import lorakit
from lorakit.training.optim import lr_lambda, make_optimizer, make_scheduler, param_groups


def adapted(dora: bool = False):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=dora))
    return model


def test_groups_hold_exactly_the_trainable_parameters():
    model = adapted()
    groups = param_groups(model, lr=1e-3)
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == 2 * 2 * 2                                      # A and B, q and v, 2 layers
    assert [g["lr"] for g in groups] == [1e-3]


def test_loraplus_puts_b_and_1d_parameters_in_the_fast_group():
    model = adapted(dora=True)                                          # DoRA's magnitude is 1-D
    a_group, b_group = param_groups(model, lr=1e-3, loraplus_lr_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_A" in names[id(p)] for p in a_group["params"])
    assert {n.rsplit(".", 2)[-2] if n.endswith(".weight") else n.rsplit(".", 1)[-1]
            for n in (names[id(p)] for p in b_group["params"])} == {"lora_B", "lora_magnitude_vector"}
    assert b_group["lr"] == pytest.approx(16e-3)


def test_no_trainable_parameter_is_an_error():
    with pytest.raises(ValueError, match="the model has no trainable parameters: inject an adapter"):
        param_groups(tiny_llama().requires_grad_(False), lr=1e-3)


def test_optimizer_is_adamw_over_the_groups():
    model = adapted()
    opt = make_optimizer(model, lr=2e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[0]["lr"] == 2e-3


@pytest.mark.parametrize("kind, step, want", [
    ("linear", 0, 1 / 5), ("linear", 3, 4 / 5),                        # warmup: (step + 1) / (warmup + 1)
    ("linear", 4, 1.0), ("linear", 9, 1 - 5 / 8), ("linear", 12, 0.0),
    ("cosine", 4, 1.0), ("cosine", 8, 0.5 * (1 + math.cos(math.pi * 0.5))), ("cosine", 12, 0.0),
    ("constant", 0, 1 / 5), ("constant", 11, 1.0),
])
def test_schedule_multipliers_by_hand(kind, step, want):
    assert lr_lambda(kind, warmup_steps=4, total_steps=12)(step) == pytest.approx(want)


def test_scheduler_drives_the_optimizer_lr():
    model = adapted()
    opt = make_optimizer(model, lr=1.0)
    sched = make_scheduler(opt, "linear", warmup_steps=0, total_steps=4)
    seen = []
    for _ in range(4):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="--lr-scheduler must be cosine, linear or constant, got 'step'"):
        lr_lambda("step", 0, 10)
