"""lorakit.train: the loop on a tiny Llama with a byte tokenizer (fast, exact, offline)."""

import json

import pytest
import torch
from tiny import byte_tokenizer, make, tiny_llama, tiny_model, write_chat  # noqa: F401

import lorakit
from lorakit.training import checkpoint as ckpt
from lorakit.training.trainer import DivergedError, TrainConfig, Trainer


@pytest.fixture
def tok():
    return byte_tokenizer()


def lora_grads(trainer):
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_loss_goes_down_on_tiny_overfit(tmp_path, tok):
    t = make(tmp_path, tok, max_steps=40, learning_rate=1e-2, lr_scheduler="constant")
    first = t.train_step()["loss"]
    for _ in range(39):
        last = t.train_step()["loss"]
    assert last < 0.3 * first


def test_grad_accumulation_matches_one_big_batch(tmp_path, tok):
    a = make(tmp_path, tok)
    b = make(tmp_path, tok)
    b.model.load_state_dict(a.model.state_dict())
    rows = [0, 5, 9, 13]  # rows of different lengths: per-micro-batch means would weigh them differently
    loss_a, _ = a.accumulate([rows])
    loss_b, _ = b.accumulate([[r] for r in rows])
    ga, gb = lora_grads(a), lora_grads(b)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-5, rtol=1e-5)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)


def test_only_lora_parameters_get_optimizer_state(tmp_path, tok):
    t = make(tmp_path, tok)
    t.train_step()
    with_state = {id(p) for p in t.optimizer.state}
    lora = {id(p) for n, p in t.model.named_parameters() if ".adapters.default." in n}
    assert with_state == lora
    frozen = [n for n, p in t.model.named_parameters() if ".adapters." not in n]
    assert frozen and all(not t.model.get_parameter(n).requires_grad for n in frozen)


def test_loraplus_gives_b_a_higher_learning_rate(tmp_path, tok):
    t = make(tmp_path, tok, loraplus_lr_ratio=16)
    lrs = {id(p): g["lr"] for g in t.optimizer.param_groups for p in g["params"]}
    for n, p in t.model.named_parameters():
        if "lora_B" in n:
            assert lrs[id(p)] == pytest.approx(16 * 5e-3)
        elif "lora_A" in n:
            assert lrs[id(p)] == pytest.approx(5e-3)


def test_resume_continues_exactly(tmp_path, tok):
    # dropout on, so the restored RNG state matters too
    full = make(tmp_path / "a", tok, lora_dropout=0.1, batch_size=3)
    losses_full = [full.train_step()["loss"] for _ in range(6)]

    part = make(tmp_path / "b", tok, lora_dropout=0.1, batch_size=3)
    for _ in range(3):
        part.train_step()
    part.save_checkpoint()
    del part  # "crash"
    resumed = make(tmp_path / "b", tok, lora_dropout=0.1, batch_size=3, resume=True)
    path = resumed.resume()
    assert path.name == "step-3" and resumed.step == 3
    losses_after = [resumed.train_step()["loss"] for _ in range(3)]
    assert losses_after == pytest.approx(losses_full[3:], abs=1e-6)


def test_resume_says_where_it_resumed_from(tmp_path, tok, capsys):
    t = make(tmp_path, tok, save_steps=2, max_steps=4)
    t.train()
    r = make(tmp_path, tok, save_steps=2, max_steps=6, resume=True)
    r.train()
    out = capsys.readouterr().out
    assert "resumed from" in out and "step-4" in out and "(step 4, loss" in out
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6


def test_resume_without_checkpoint_is_an_error(tmp_path, tok):
    t = make(tmp_path, tok, resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        t.train()


def test_crash_while_checkpointing_leaves_the_previous_checkpoint(tmp_path, tok, monkeypatch):
    t = make(tmp_path, tok)
    t.train_step()
    t.save_checkpoint()
    t.train_step()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "write_safetensors", boom)
    with pytest.raises(OSError):
        t.save_checkpoint()
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-1"]  # no half-written step-2, no temp dir
    monkeypatch.undo()
    r = make(tmp_path, tok, resume=True)
    assert r.resume().name == "step-1"


def test_nan_loss_stops_with_a_clear_message(tmp_path, tok):
    t = make(tmp_path, tok, save_steps=1, max_steps=5)
    t.cfg.max_steps = 5
    calls = {"n": 0}
    real = t.accumulate

    def poisoned(micro):
        calls["n"] += 1
        loss, n = real(micro)
        return (float("nan") if calls["n"] == 3 else loss), n

    t.accumulate = poisoned
    with pytest.raises(DivergedError, match=r"loss became nan at step 3.*last good checkpoint is .*step-2"):
        t.train()


def test_zero_trainable_parameters_is_an_error(tmp_path, tok):
    model = tiny_model(tok)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.set_trainable(model, "default", False)
    cfg = TrainConfig(dataset=[write_chat(tmp_path / "d.jsonl")], output_dir=str(tmp_path / "r"), max_steps=1)
    from lorakit.training.optim import make_optimizer

    with pytest.raises(ValueError, match="no trainable parameters"):
        make_optimizer(model, 1e-3)
    del cfg


def test_run_writes_every_output(tmp_path, tok):
    evald = write_chat(tmp_path / "eval.jsonl", n=8, seed=5)
    t = make(tmp_path, tok, eval_dataset=[evald], eval_steps=3, max_steps=6)
    result = t.train()
    out = tmp_path / "run"
    for f in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "run.yaml", "report.md"):
        assert (out / f).is_file(), f
    assert (out / "checkpoints" / "step-6" / "optimizer.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in records) and "eval_loss" in result
    # the saved adapter reproduces the trained model
    ids = torch.tensor([[5, 6, 7, 8]])
    t.model.eval()
    with torch.no_grad():
        want = t.model(ids).logits
    fresh = tiny_llama(vocab=len(tok), hidden=32)
    fresh.load_state_dict(tiny_model(tok).state_dict())  # same base weights as the trained model
    lorakit.load_adapter(fresh, out)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, want)


def test_dry_run_trains_nothing(tmp_path, tok, capsys):
    t = make(tmp_path, tok, dry_run=True)
    assert t.train() == {"dry_run": True}
    out = capsys.readouterr().out
    assert "rows from" in out and not (tmp_path / "run").exists()


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--lora-rank must be positive"):
        TrainConfig(dataset=["x.jsonl"], lora_rank=0)
    with pytest.raises(ValueError, match="--train-type must be one of"):
        TrainConfig(dataset=["x.jsonl"], train_type="full")
    with pytest.raises(ValueError, match="--dataset is required"):
        TrainConfig()


def test_eval_max_rows_limits_evaluation(tmp_path, tok):
    evald = write_chat(tmp_path / "eval.jsonl", n=8, seed=5)
    t = make(tmp_path, tok, eval_dataset=[evald], eval_max_rows=3)
    assert len(t.eval_data) == 3 and "eval_loss" in t.evaluate()


def test_each_micro_batch_runs_inside_its_own_shared_dropout(tmp_path, tok, monkeypatch):
    """accumulate() wraps every micro-batch's forward and backward in lorakit.shared_dropout."""
    from lorakit.state import require_state

    monkeypatch.setattr("lorakit.training.loss.shared_prefix", lambda batch: 0)  # one forward per micro-batch
    t = make(tmp_path, tok, lora_dropout=0.1)
    attn = t.model.model.layers[0].self_attn
    seen = []
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(attn, name).register_forward_hook(lambda m, args, out: seen.append(m.state.dropout_draws))
    t.accumulate([[0, 1], [2, 3]])
    assert len(seen) == 6 and all(d is not None for d in seen)
    assert seen[0] is seen[1] is seen[2] and seen[3] is seen[4] is seen[5]   # one set of draws per micro-batch
    assert seen[0] is not seen[3]
    assert require_state(t.model).dropout_draws is None                       # and none after
