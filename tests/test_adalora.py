"""AdaLoRA: the SVD-form layer by hand, and PEFT 0.21.2's AdaLoRA as the oracle.

PEFT and lorakit start from the same base and the same P, Λ, Q (copied tensor by tensor); forward,
gradients, orthogonality penalty, budget schedule, masks, files and merged weights must agree.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import AdaLoraConfig as PeftAdaLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

import lorakit
from lorakit import AdaLoraConfig, LoraConfig
from lorakit.adalora import RankAllocator, SVDLinear, regularizer, svd_adapters
from lorakit.state import require_state
from tiny import fresh, ids, tiny_gpt2, tiny_llama

TENSORS = ("lora_A", "lora_B", "lora_E")
LLAMA_QV = ["q_proj", "v_proj"]
SCHEDULE = dict(init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2, deltaT=2)


def peft_pair(build=tiny_llama, targets=LLAMA_QV, alpha=8, **schedule):
    """(lorakit model, PEFT model) on the same base with the same non-trivial adapter "default"."""
    schedule = {**SCHEDULE, **schedule}
    base = build()
    torch.manual_seed(3)
    theirs = get_peft_model(fresh(base), PeftAdaLoraConfig(lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM",
                                                            init_lora_weights=False, **schedule))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.mul_(0.3)                                              # randn is large for a 16-wide model
    ours = lorakit.inject(fresh(base), AdaLoraConfig(alpha=alpha, target_modules=targets, **schedule))
    copy_from_peft(ours, theirs)
    return ours, theirs


def copy_from_peft(ours, theirs, grads: bool = False) -> None:
    with torch.no_grad():
        for mod, ad in svd_adapters(ours):
            layer = theirs.base_model.model.get_submodule(mod)
            for key in TENSORS:
                src = getattr(layer, key)["default"]
                getattr(ad, key).copy_(src)
                if grads:
                    getattr(ad, key).grad = src.grad.clone()


def peft_pattern(theirs) -> dict[str, list[bool]] | None:
    pattern = theirs.peft_config["default"].rank_pattern
    return None if pattern is None else {k.replace(".default", ""): v for k, v in pattern.items()}


def sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)


def lm_loss(model, x):
    return model(input_ids=x, labels=x).loss


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


# --- the layer -------------------------------------------------------------------------------------
class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.proj(x)


def test_forward_by_hand():
    model = One()
    nn.init.zeros_(model.proj.weight)
    lorakit.inject(model, AdaLoraConfig(init_r=2, target_r=1, alpha=4, total_step=10, target_modules=["proj"]))
    ad = model.proj.adapters["default"]
    with torch.no_grad():
        ad.lora_A.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))   # Q x = (x0, x1)
        ad.lora_E.copy_(torch.tensor([[2.0], [3.0]]))                       # Λ = diag(2, 3)
        ad.lora_B.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))             # P = I
    y = model(torch.tensor([[1.0, 2.0, 3.0]]))
    scale = 4 / (2 + 1e-5)                                                  # alpha / (ranknum + 1e-5)
    assert_close(y, torch.tensor([[2.0 * scale, 6.0 * scale]]))
    assert_close(model.proj.delta_weight("default"), torch.tensor([[2.0, 0, 0], [0, 3.0, 0]]) * scale)


def test_starts_as_the_base_model_with_peft_init():
    base = tiny_llama()
    ours = lorakit.inject(fresh(base), AdaLoraConfig(target_modules=LLAMA_QV, total_step=10))
    x = ids()
    assert_close(logits(ours, x), logits(base, x))
    ad = ours.model.layers[0].self_attn.q_proj.adapters["default"]
    assert ad.lora_A.shape == (12, 16) and ad.lora_B.shape == (16, 12) and ad.lora_E.shape == (12, 1)
    assert (ad.lora_E == 0).all() and 0.01 < ad.lora_A.std() < 0.03 and ad.ranknum.item() == 12


@pytest.mark.parametrize("build,targets", [(tiny_llama, LLAMA_QV), (tiny_gpt2, ["c_attn", "c_fc"])],
                         ids=["llama", "gpt2-conv1d"])
def test_forward_penalty_and_gradients_match_peft(build, targets):
    ours, theirs = peft_pair(build, targets)
    x = ids()
    assert (logits(ours, x) - logits(build(), x)).abs().max() > 1e-2       # the adapter does something
    assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-5)
    penalty = regularizer(ours)
    assert penalty > 0.1
    ours_loss = lm_loss(ours, x) + penalty
    theirs_loss = theirs(input_ids=x, labels=x).loss                       # PEFT adds the penalty itself
    assert_close(ours_loss, theirs_loss, atol=1e-5, rtol=1e-5)
    ours_loss.backward()
    theirs_loss.backward()
    for mod, ad in svd_adapters(ours):
        layer = theirs.base_model.model.get_submodule(mod)
        for key in TENSORS:
            assert_close(getattr(ad, key).grad, getattr(layer, key)["default"].grad, atol=1e-5, rtol=1e-5)


def test_trainable_parameters_match_peft():
    ours, theirs = peft_pair()
    trainable, total = lorakit.count_parameters(ours)
    peft_trainable, peft_total = theirs.get_nb_trainable_parameters()
    assert trainable == peft_trainable == 2 * ((4 * 16 + 4 + 16 * 4) + (4 * 16 + 4 + 8 * 4))  # q (16→16), v (16→8)
    # PEFT also counts each layer's ranknum (a frozen 1-element Parameter); lorakit keeps it as a buffer
    assert total == peft_total - len(svd_adapters(ours))


def test_disabled_per_row_and_delete_work_as_for_lora():
    base = tiny_llama()
    model = lorakit.inject(fresh(base), AdaLoraConfig(target_modules=LLAMA_QV, total_step=10))
    lorakit.inject(model, AdaLoraConfig(target_modules=["q_proj"], init_r=3, total_step=10), name="b")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters." in n:
                p.normal_(0, 0.3)
    x = ids(batch=3)
    with lorakit.disabled(model):
        assert_close(logits(model, x), logits(base, x))
    alone = {}
    for name in ("default", "b"):
        lorakit.set_adapter(model, name)
        alone[name] = logits(model, x)
    with lorakit.per_row(model, ["b", None, "default"]):
        mixed = logits(model, x)
    assert_close(mixed[0], alone["b"][0])
    assert_close(mixed[2], alone["default"][2])
    assert_close(mixed[1], logits(base, x)[1])
    lorakit.delete_adapter(model, "b")
    assert lorakit.adapter_names(model) == ["default"] and "b" not in model.model.layers[0].self_attn.q_proj.adapters


# --- the allocator -----------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [dict(init_r=6, target_r=2, total_step=20, tinit=3, tfinal=4, deltaT=2),
                                      dict(init_r=4, target_r=1, total_step=7, tinit=0, tfinal=0, deltaT=1),
                                      dict(init_r=12, target_r=8, total_step=100, tinit=10, tfinal=20, deltaT=5)])
def test_budget_schedule_matches_peft(schedule):
    ours, theirs = peft_pair(**schedule)
    allocator = RankAllocator(ours)
    assert allocator.init_bgt == theirs.base_model.rankallocator.init_bgt == 4 * schedule["init_r"]
    for step in range(schedule["total_step"] + 3):
        assert allocator.budget_schedule(step) == theirs.base_model.rankallocator.budget_schedule(step), step


def test_masks_match_peft_given_the_same_weights_and_gradients():
    ours, theirs = peft_pair()
    allocator, opt, x = RankAllocator(ours), sgd(theirs), ids()
    seen = []
    for step in range(SCHEDULE["total_step"] + 2):                        # through the final allocation and past it
        theirs(input_ids=x, labels=x).loss.backward()
        opt.step()
        copy_from_peft(ours, theirs, grads=True)
        theirs.base_model.update_and_allocate(step)
        budget = allocator.step(step)
        opt.zero_grad()
        assert require_state(ours).configs["default"].rank_pattern == peft_pattern(theirs), step
        for mod, ad in svd_adapters(ours):
            assert torch.equal(ad.lora_E, theirs.base_model.model.get_submodule(mod).lora_E["default"]), (step, mod)
        kept = sum(sum(v) for v in (peft_pattern(theirs) or {"": [True] * allocator.init_bgt}).values())
        seen.append((budget, kept))
    # 16 ranks while step <= tinit; then b = 8 + 8·(1 - (t-1)/5)³ (12.1, 9.7, 8.5, 8.1, 8), masked at even
    # steps (deltaT 2); the final allocation at step 6 = total_step - tfinal, re-applied after it
    assert seen == [(16, 16), (16, 16), (12, 12), (9, 12), (8, 8), (8, 8), (8, 8), (8, 8), (8, 8), (8, 8)]


def test_independent_training_ends_with_peft_masks():
    ours, theirs = peft_pair()
    allocator, x = RankAllocator(ours), ids()
    opt_ours, opt_theirs = sgd(ours), sgd(theirs)
    for step in range(SCHEDULE["total_step"]):
        (lm_loss(ours, x) + regularizer(ours)).backward()
        theirs(input_ids=x, labels=x).loss.backward()
        for opt in (opt_ours, opt_theirs):
            opt.step()
        allocator.step(step)
        theirs.base_model.update_and_allocate(step)
        for opt in (opt_ours, opt_theirs):
            opt.zero_grad()
        assert require_state(ours).configs["default"].rank_pattern == peft_pattern(theirs), step
    assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-5)


def test_allocator_needs_the_gradients_and_a_shrinking_budget():
    ours, _ = peft_pair()
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.lora_A has no gradient: call "
                                         r"RankAllocator.step after loss.backward\(\) and optimizer.step\(\)"):
        RankAllocator(ours).step(0)
    grown, _ = peft_pair(init_r=2, target_r=3)
    with pytest.raises(ValueError, match=r"target_r=3 is above init_r=2: the budget would grow"):
        RankAllocator(grown)
    lora = lorakit.inject(tiny_llama(), LoraConfig(target_modules=LLAMA_QV))
    with pytest.raises(ValueError, match="adapter 'default' is a LoraConfig adapter; RankAllocator needs an AdaLoRA"):
        RankAllocator(lora)


# --- files -------------------------------------------------------------------------------------------
def allocate(ours, theirs=None, steps: int = 8):
    """Train both a few steps through the final allocation (total_step 8, tfinal 2: final at step 6)."""
    allocator, x = RankAllocator(ours), ids()
    opt_ours = sgd(ours)
    opt_theirs = sgd(theirs) if theirs is not None else None
    for step in range(steps):
        (lm_loss(ours, x) + regularizer(ours)).backward()
        opt_ours.step()
        allocator.step(step)
        opt_ours.zero_grad()
        if theirs is not None:
            theirs(input_ids=x, labels=x).loss.backward()
            opt_theirs.step()
            theirs.base_model.update_and_allocate(step)
            opt_theirs.zero_grad()


def test_saved_files_match_peft_and_load_in_peft(tmp_path):
    ours, theirs = peft_pair()
    allocate(ours, theirs)
    lorakit.save_adapter(ours, tmp_path / "lorakit")
    theirs.save_pretrained(tmp_path / "peft")
    mine, peft = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("lorakit", "peft"))
    assert sorted(mine) == sorted(peft)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_E" in mine       # no ".weight", no ranknum
    for key in mine:                                                               # cut to the kept ranks
        assert_close(mine[key], peft[key], atol=1e-5, rtol=1e-5)
    cfg_mine, cfg_peft = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("lorakit", "peft"))
    assert set(cfg_mine) == set(cfg_peft)
    for key in ("peft_type", "init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                "total_step", "rank_pattern", "lora_alpha", "r", "fan_in_fan_out"):
        assert cfg_mine[key] == cfg_peft[key], key
    assert sorted(cfg_mine["target_modules"]) == sorted(cfg_peft["target_modules"])  # PEFT writes a set: any order
    assert cfg_mine["peft_type"] == "ADALORA" and sum(map(sum, cfg_mine["rank_pattern"].values())) == 8

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lorakit").eval()
    x = ids(seed=5)
    diff = (logits(ours, x) - logits(loaded, x)).abs().max().item()
    print(f"\nADALORA lorakit->PEFT max|diff| = {diff:.3g}")
    assert diff < 1e-5


def test_peft_files_load_in_lorakit_and_save_back_the_same(tmp_path):
    _, theirs = peft_pair()
    allocate(lorakit.inject(tiny_llama(), AdaLoraConfig(target_modules=LLAMA_QV, **SCHEDULE)), theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorakit.load_adapter(tiny_llama(), tmp_path / "peft")
    pattern = peft_pattern(theirs)
    for mod, ad in svd_adapters(ours):                                # built at the kept ranks, ranknum still init_r
        assert ad.lora_A.shape[0] == sum(pattern[f"{mod}.lora_E"]) and ad.ranknum.item() == 4
    x = ids(seed=5)
    diff = (logits(ours, x) - logits(theirs, x)).abs().max().item()
    print(f"\nADALORA PEFT->lorakit max|diff| = {diff:.3g}")
    assert diff < 1e-5
    lorakit.save_adapter(ours, tmp_path / "again")
    again, peft = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("again", "peft"))
    assert sorted(again) == sorted(peft) and all(torch.equal(again[k], peft[k]) for k in peft)
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"] == pattern


def test_unallocated_peft_adapter_loads_at_init_r(tmp_path):
    _, theirs = peft_pair(build=tiny_gpt2, targets=["c_attn"])
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorakit.load_adapter(tiny_gpt2(), tmp_path / "peft")
    assert require_state(ours).configs["default"].fan_in_fan_out is True
    assert_close(logits(ours, ids()), logits(theirs, ids()), atol=1e-5, rtol=1e-5)


def test_config_round_trips_through_peft_dict():
    cfg = AdaLoraConfig(target_modules=LLAMA_QV, alpha=16, dropout=0.1, total_step=50, tinit=5, tfinal=10,
                        deltaT=3, rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": [True, False]})
    d = cfg.to_peft_dict()
    assert d["peft_type"] == "ADALORA" and d["lora_alpha"] == 16 and d["deltaT"] == 3
    assert AdaLoraConfig.from_peft_dict(d) == cfg


# --- merging -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("build,targets", [(tiny_llama, LLAMA_QV), (tiny_gpt2, ["c_attn", "c_fc"])],
                         ids=["llama", "gpt2-conv1d"])
def test_merge_matches_unmerged_and_peft(build, targets):
    ours, theirs = peft_pair(build, targets)
    x = ids()
    before = logits(ours, x)
    lorakit.merge(ours)
    assert_close(logits(ours, x), before, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(ours)
    assert_close(logits(ours, x), before, atol=1e-5, rtol=1e-5)
    plain = lorakit.merge_and_unload(ours)
    assert not any(isinstance(m, SVDLinear) for m in plain.modules())
    assert_close(logits(plain, x), before, atol=1e-5, rtol=1e-5)
    peft_plain = theirs.merge_and_unload()
    for (name, w), (_, w_peft) in zip(plain.state_dict().items(), peft_plain.state_dict().items()):
        assert_close(w, w_peft, atol=1e-6, rtol=1e-5), name


# --- errors ------------------------------------------------------------------------------------------
def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"total_step must be the number of training steps \(> 0\), got total_step=None"):
        AdaLoraConfig(target_modules=LLAMA_QV)
    with pytest.raises(ValueError, match=r"tinit=5, tfinal=5, total_step=10 leave no steps"):
        AdaLoraConfig(target_modules=LLAMA_QV, total_step=10, tinit=5, tfinal=5)
    with pytest.raises(ValueError, match=r"AdaLoRA does not support \{'use_dora': True\}"):
        AdaLoraConfig(target_modules=LLAMA_QV, total_step=10, use_dora=True)
    with pytest.raises(ValueError, match=r"rank_pattern is the allocation PEFT writes"):
        AdaLoraConfig(target_modules=LLAMA_QV, total_step=10, rank_pattern={"q_proj": 4})


@pytest.mark.parametrize("field, value, message", [
    ("init_r", 0, r"init_r must be a positive integer, got init_r=0"),
    ("target_r", 2.5, r"target_r must be a positive integer, got target_r=2.5"),
    ("deltaT", 0, r"deltaT must be a positive number of steps, got deltaT=0"),
    ("beta1", 1.0, r"beta1 must be in \(0, 1\), got beta1=1.0"),
    ("beta2", 0, r"beta2 must be in \(0, 1\), got beta2=0"),
    ("orth_reg_weight", -0.1, r"orth_reg_weight must be >= 0, got orth_reg_weight=-0.1"),
])
def test_each_schedule_field_is_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(target_modules=LLAMA_QV, total_step=10, **{field: value})


def test_a_lora_config_file_is_not_read_as_adalora():
    d = LoraConfig(target_modules=LLAMA_QV).to_peft_dict()
    with pytest.raises(ValueError, match=r"cfg.json: peft_type='LORA' is not 'ADALORA'"):
        AdaLoraConfig.from_peft_dict(d, source="cfg.json")


def test_regularizer_needs_an_adalora_adapter():
    model = lorakit.inject(tiny_llama(), LoraConfig(target_modules=LLAMA_QV))
    with pytest.raises(ValueError, match=r"adapter 'default' has no AdaLoRA layers; regularizer\(\) is for AdaLoRA"):
        regularizer(model, "default")


def test_lora_and_adalora_cannot_share_a_layer():
    model = lorakit.inject(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.q_proj' already holds LoRA adapters"):
        lorakit.inject(model, AdaLoraConfig(target_modules=["q_proj"], total_step=10), name="ada")
    model = lorakit.inject(tiny_llama(), AdaLoraConfig(target_modules=["q_proj"], total_step=10))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj holds AdaLoRA adapters"):
        lorakit.inject(model, LoraConfig(target_modules=["q_proj"]), name="lora")


def test_unsupported_module_and_combine_are_refused():
    with pytest.raises(TypeError, match=r"module 'model.embed_tokens' is a Embedding; AdaLoRA supports nn.Linear"):
        lorakit.inject(tiny_llama(), AdaLoraConfig(target_modules=["embed_tokens"], total_step=10))
    model = lorakit.inject(tiny_llama(), AdaLoraConfig(target_modules=LLAMA_QV, total_step=10))
    with pytest.raises(ValueError, match=r"combine: \['default'\] are AdaLoRA adapters"):
        lorakit.combine(model, ["default"], [1.0], name="c")


# --- the trainer -------------------------------------------------------------------------------------
def test_trainer_adalora_run_reaches_the_target_budget(tmp_path):
    from tiny import byte_tokenizer, make

    tok = byte_tokenizer()
    t = make(tmp_path, tok, train_type="adalora", max_steps=20, learning_rate=5e-2, lr_scheduler="constant",
             target_modules="q_proj,v_proj,down_proj")
    cfg = require_state(t.model).configs["default"]
    assert isinstance(cfg, AdaLoraConfig) and (cfg.init_r, cfg.target_r, cfg.total_step) == (4, 2, 20)
    rows = [t.train_data[i] for i in range(8)]

    def task_loss() -> float:
        with torch.no_grad():
            batch = t._batch(rows)
            return (t.loss_sum(batch) / sum(r.n_trained for r in rows)).item()

    before = task_loss()
    result = t.train()
    after = task_loss()
    print(f"\nADALORA trainer: task loss {before:.4f} -> {after:.4f}")
    assert after < 0.5 * before
    n_matrices = len(svd_adapters(t.model))
    pattern = require_state(t.model).configs["default"].rank_pattern
    assert n_matrices == 6 and sum(map(sum, pattern.values())) == 2 * n_matrices   # the target budget
    for mod, ad in svd_adapters(t.model):                                           # masked ranks stay zero
        keep = torch.tensor(pattern[f"{mod}.lora_E"])
        assert (ad.lora_E[~keep] == 0).all()
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert sum(v.shape[0] for k, v in saved.items() if k.endswith("lora_E")) == 2 * n_matrices
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["peft_type"] == "ADALORA"
    assert result["step"] == 20
    from tiny import tiny_model

    peft_model = PeftModel.from_pretrained(tiny_model(tok), tmp_path / "run").eval()
    t.model.eval()
    x = ids(vocab=len(tok))
    assert_close(logits(t.model, x), logits(peft_model, x), atol=1e-5, rtol=1e-5)


def test_trainer_adalora_refuses_resume(tmp_path):
    from tiny import byte_tokenizer, make

    t = make(tmp_path, byte_tokenizer(), train_type="adalora", resume=True)
    with pytest.raises(ValueError, match="--resume does not support AdaLoRA runs yet"):
        t.train()
