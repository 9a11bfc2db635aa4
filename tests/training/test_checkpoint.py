"""lorakit.training.checkpoint: what --resume needs, written atomically, without pickle."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from tiny import randomize_lora, tiny_llama

import lorakit
from lorakit.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from lorakit.training.optim import make_optimizer, make_scheduler


def setup(seed: int = 0):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, seed=seed)
    opt = make_optimizer(model, lr=1e-2)
    sched = make_scheduler(opt, "linear", warmup_steps=1, total_steps=10)
    return model, opt, sched


def step(model, opt, sched):
    model(input_ids=torch.arange(3, 9)[None]).logits.square().mean().backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def test_round_trip_restores_adapter_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = setup()
    for _ in range(3):
        step(model, opt, sched)
    path = save_checkpoint(tmp_path, 3, model, "default", opt, sched, {"epoch": 0, "micro_in_epoch": 3})
    want = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    want_opt = opt.state_dict()

    model2, opt2, sched2 = setup(seed=9)                                   # different weights everywhere
    state = load_checkpoint(path, model2, "default", opt2, sched2)
    assert state["step"] == 3 and state["micro_in_epoch"] == 3
    for n, p in model2.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, want[n], atol=0, rtol=0)
    got_opt = opt2.state_dict()
    for k, st in want_opt["state"].items():
        for name, value in st.items():
            torch.testing.assert_close(torch.as_tensor(got_opt["state"][k][name]), torch.as_tensor(value))
    assert sched2.get_last_lr() == sched.get_last_lr()
    step(model, opt, sched)                                                # both go on identically
    step(model2, opt2, sched2)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_rng_is_restored(tmp_path):
    model, opt, sched = setup()
    path = save_checkpoint(tmp_path, 1, model, "default", opt, sched, {})
    want = (torch.rand(4), random.random())
    model2, opt2, sched2 = setup()                                          # reseeds torch (tiny_llama)
    torch.rand(100), random.random()                                        # and moves both generators on
    load_checkpoint(path, model2, "default", opt2, sched2)
    torch.testing.assert_close(torch.rand(4), want[0])
    assert random.random() == want[1]


def test_files_are_safetensors_and_json_only(tmp_path):
    model, opt, sched = setup()
    step(model, opt, sched)
    path = save_checkpoint(tmp_path, 1, model, "default", opt, sched, {"epoch": 0})
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "optimizer.safetensors", "rng_state.safetensors",
                                                      "trainer_state.json"]
    assert any(k.endswith(".exp_avg") for k in load_file(path / "optimizer.safetensors"))
    assert json.loads((path / "trainer_state.json").read_text())["step"] == 1


def test_keep_prunes_oldest_and_list_skips_incomplete(tmp_path):
    model, opt, sched = setup()
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, model, "default", opt, sched, {}, keep=2)
    (tmp_path / "step-9").mkdir()                                           # no trainer_state.json: not complete
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-3"]
    assert list_checkpoints(tmp_path / "missing") == []


def test_a_crash_while_writing_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = setup()
    old = save_checkpoint(tmp_path, 1, model, "default", opt, sched, {"mark": "old"})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.training.checkpoint.write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 1, model, "default", opt, sched, {"mark": "new"})
    assert json.loads((old / "trainer_state.json").read_text())["mark"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["step-1"]               # no temp folder left
