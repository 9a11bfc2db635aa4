"""training/prefix.py: a shared prompt prefix run once gives the one-pass loss and gradients."""

import json

import pytest
import torch
from tiny import byte_tokenizer, make, randomize_lora

import lorakit
from lorakit.training import prefix as prefixlib
from lorakit.training.loss import loss_sum
from lorakit.training.prefix import can_share, shared_prefix

VOCAB = 96


def llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model, std=0.2)
    return model


def batch_with_prefix(p: int = 10, lengths=(16, 14, 15)) -> dict[str, torch.Tensor]:
    """Rows sharing their first p tokens, right-padded, labels on each row's last 3 tokens."""
    g = torch.Generator().manual_seed(0)
    t = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), t), generator=g)
    ids[:, :p] = ids[0, :p]
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
        labels[row, length - 3:length] = ids[row, length - 3:length]
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_shared_prefix_by_hand(monkeypatch):
    batch = batch_with_prefix(p=10)
    assert shared_prefix(batch) == 10
    batch["labels"][1, 9] = 5      # token 9 is predicted at position 8, which must then run per row
    assert shared_prefix(batch) == 8
    batch["labels"][1, 7] = 5      # 6 tokens left: too few to share
    assert shared_prefix(batch) == 0
    monkeypatch.setattr(prefixlib, "MIN_PREFIX", 4)
    assert shared_prefix(batch) == 6
    assert shared_prefix(batch_with_prefix(p=3)) == 0  # shorter than MIN_PREFIX
    one = {k: v[:1] for k, v in batch_with_prefix().items()}
    assert shared_prefix(one) == 0                     # a single row shares nothing
    same = batch_with_prefix(p=16, lengths=(16, 16, 16))
    same["labels"][:] = -100
    same["labels"][:, -1] = same["input_ids"][:, -1]
    assert shared_prefix(same) == 14                   # every row keeps at least one token after the prefix
    packed = dict(batch_with_prefix(), position_ids=torch.zeros(3, 16, dtype=torch.long))
    assert shared_prefix(packed) == 0
    left = batch_with_prefix()
    left["attention_mask"] = left["attention_mask"].flip(1)   # left padding: the rows' tokens are not where the prefix is
    assert shared_prefix(left) == 0


def qwen2(window: int | None = None):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      use_sliding_window=window is not None, sliding_window=window, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg).train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(model, std=0.2)
    return model


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lengths", [(16, 14, 15), (16, 11, 14, 16, 15)])  # 11: a row of one token after the prefix
def test_prefix_run_once_equals_one_pass(tied, attn, lengths, monkeypatch):
    model = llama(tied)
    model.config._attn_implementation = attn
    batch = batch_with_prefix(lengths=lengths)
    if 11 in lengths:                                  # its one token after the prefix is predicted by the prefix
        batch["labels"][lengths.index(11)] = -100

    def run():
        model.zero_grad(set_to_none=True)
        loss = loss_sum(model, "causal_lm", batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    real = prefixlib.prefix_forward
    monkeypatch.setattr("lorakit.training.loss.prefix_forward", lambda *a: calls.append(a[2]) or real(*a))
    shared, g_shared = run()
    assert calls == [10]
    monkeypatch.setattr(prefixlib, "MIN_PREFIX", 1000)   # off: one pass over every token
    monkeypatch.setattr("lorakit.training.loss.shared_prefix", lambda b: 0)
    whole, g_whole = run()
    assert calls == [10]
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-5)
    assert g_shared.keys() == g_whole.keys() and len(g_whole) == 28
    for name in g_whole:
        torch.testing.assert_close(g_shared[name], g_whole[name], rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == attn                  # the model's own attention is back


def test_qwen2_rows_in_one_sequence_equal_the_padded_pass(monkeypatch):
    """Grouped-query attention (4 heads, 2 kv heads), 3 layers, rows of uneven length."""
    model = qwen2()
    batch = batch_with_prefix(lengths=(16, 14, 15, 13))
    assert can_share(model, 16) and shared_prefix(batch) == 9

    def run():
        model.zero_grad(set_to_none=True)
        loss = loss_sum(model, "causal_lm", batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared, g_shared = run()
    monkeypatch.setattr("lorakit.training.loss.shared_prefix", lambda b: 0)
    whole, g_whole = run()
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-5)
    assert g_shared.keys() == g_whole.keys() and len(g_whole) == 3 * 7 * 2
    for name in g_whole:
        torch.testing.assert_close(g_shared[name], g_whole[name], rtol=1e-5, atol=1e-5)


def test_an_older_transformers_without_attention_by_name_turns_sharing_off(monkeypatch):
    model = llama(tied=True)
    assert can_share(model)
    monkeypatch.setattr(prefixlib, "_dispatches_by_name", lambda: False)
    assert not can_share(model)


def test_a_sliding_window_shorter_than_the_batch_turns_sharing_off():
    assert can_share(qwen2(window=32), 16)
    assert not can_share(qwen2(window=8), 16)


def test_rows_attention_refuses_to_run_outside_its_layout():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="only inside lorakit's prefix_forward"):
        prefixlib.rows_attention(None, q, q, q, None)


def test_a_model_that_does_not_dispatch_attention_by_name_is_refused(monkeypatch):
    """If attention never reaches rows_attention, the rows would attend to each other: refuse."""
    model = llama(tied=True)
    batch = batch_with_prefix()
    monkeypatch.setattr(prefixlib, "_register", lambda: None)              # transformers never learns the name
    monkeypatch.setattr(prefixlib, "_registered", set())
    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, prefixlib.ATTENTION,
                        AttentionInterface._global_mapping["sdpa"])      # a plain sdpa under our name
    with pytest.raises(RuntimeError, match="0 of 2 attention layers"):
        loss_sum(model, "causal_lm", batch)


def test_activation_checkpointing_turns_sharing_off():
    model = llama(tied=True)
    assert can_share(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert not can_share(model)


def test_sharing_is_for_the_cpu_only():
    model = llama(tied=True)
    assert can_share(model)
    assert not can_share(model.to("meta"))  # any other device: a GPU step is bound by launches, not arithmetic


def test_per_row_routing_turns_sharing_off():
    model = llama(tied=True).eval()
    with lorakit.per_row(model, ["default", None, "default"]):
        assert not can_share(model)
        batch = batch_with_prefix()
        with torch.no_grad():
            got = loss_sum(model, "causal_lm", batch)
    rows = []
    for i, name in enumerate(["default", None, "default"]):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        with torch.no_grad():
            if name is None:
                with lorakit.disabled(model):
                    rows.append(loss_sum(model, "causal_lm", one))
            else:
                rows.append(loss_sum(model, "causal_lm", one))
    torch.testing.assert_close(got, sum(rows), rtol=1e-5, atol=1e-5)


def write_chat_with_system(path, n=16):
    rows = [{"messages": [{"role": "system", "content": "You answer in capitals."},
                          {"role": "user", "content": w}, {"role": "assistant", "content": w.upper()}]}
            for w in ["red", "blue cat", "green dog sun", "sun", "cat dog", "red red blue"] * (n // 6 + 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    return str(path)


def test_trainer_step_with_a_system_prompt_equals_the_unshared_step(tmp_path, monkeypatch):
    tok = byte_tokenizer()
    data = write_chat_with_system(tmp_path / "sys.jsonl")
    a = make(tmp_path / "a", tok, dataset=[data])
    b = make(tmp_path / "b", tok, dataset=[data])
    randomize_lora(a.model, std=0.2)
    b.model.load_state_dict(a.model.state_dict())
    rows = [0, 1, 2, 3]
    assert shared_prefix(a._batch([a.train_data[i] for i in rows])) >= 20  # the system turn, run once
    loss_a, _ = a.accumulate([rows])
    monkeypatch.setattr("lorakit.training.loss.shared_prefix", lambda batch: 0)
    loss_b, _ = b.accumulate([rows])
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    grads = {n: p.grad for n, p in b.model.named_parameters() if p.grad is not None}
    for n, p in a.model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-5)


def test_gpt2_prefix_run_once_equals_one_pass(monkeypatch):
    from tiny import tiny_gpt2

    model = tiny_gpt2(vocab=VOCAB).train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                             fan_in_fan_out=True))
    randomize_lora(model, std=0.2)
    batch = batch_with_prefix()
    assert shared_prefix(batch) == 10 and can_share(model)
    shared = loss_sum(model, "causal_lm", batch)
    shared.backward()
    g_shared = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr("lorakit.training.loss.shared_prefix", lambda b: 0)
    whole = loss_sum(model, "causal_lm", batch)
    whole.backward()
    torch.testing.assert_close(shared, whole, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_shared[n], p.grad, rtol=1e-5, atol=1e-5)
