"""training/loss.py: the fused head + cross-entropy against the plain full-logits path."""

import pytest
import torch
import torch.nn.functional as F
from tiny import randomize_lora, tiny_gpt2, tiny_t5

import lorakit
from lorakit.training import loss as losslib
from lorakit.training.loss import LinearCrossEntropy, fused_head, loss_sum

VOCAB = 96


def llama(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).train()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return model


def padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three rows of lengths 9, 6, 4, right-padded, with labels only on each row's last tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.long)
    labels = torch.full((3, 9), -100)
    for row, (length, answer) in enumerate([(9, 3), (6, 2), (4, 1)]):
        mask[row, :length] = 1
        labels[row, length - answer:length] = ids[row, length - answer:length]
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plain_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), reduction="sum")


def loss_and_grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def with_lora(model, **kw):
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", **kw))
    randomize_lora(model, std=0.2)
    return model


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk_rows", [1000, 2])  # one chunk, and several (CHUNK_ELEMENTS // VOCAB rows each)
def test_fused_loss_and_lora_grads_equal_the_plain_path(tied, chunk_rows, monkeypatch):
    monkeypatch.setattr(losslib, "CHUNK_ELEMENTS", chunk_rows * VOCAB)
    model = with_lora(llama(tied))
    assert fused_head(model) is not None
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    batch = padded_batch()
    fused, g_fused = loss_and_grads(model, lambda m, b: loss_sum(m, "causal_lm", b), batch)
    plain, g_plain = loss_and_grads(model, plain_loss, batch)
    assert g_fused.keys() == g_plain.keys() and len(g_plain) == 2 * 7 * 2  # A and B of 7 modules x 2 layers
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_against_cross_entropy_and_gradcheck(monkeypatch):
    monkeypatch.setattr(losslib, "CHUNK_ELEMENTS", 3 * 11)  # chunks of 3 rows
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 11, (7,), generator=g)
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    torch.testing.assert_close(LinearCrossEntropy.apply(h, w, y), ref, rtol=1e-12, atol=1e-12)
    h32 = h.detach().float().requires_grad_()
    (LinearCrossEntropy.apply(h32, w.float(), y) * 2.5).backward()       # the incoming gradient scales dL/dh
    (ref * 2.5).backward()
    torch.testing.assert_close(h32.grad, h.grad.float(), rtol=1e-5, atol=1e-5)
    assert torch.autograd.gradcheck(lambda x: LinearCrossEntropy.apply(x, w, y), (h.detach().requires_grad_(),))


def test_gpt2_takes_the_fused_path_with_the_same_loss():
    model = with_lora(tiny_gpt2(vocab=VOCAB).train(), fan_in_fan_out=True)
    assert fused_head(model) is not None
    batch = padded_batch(seed=1)
    fused, g_fused = loss_and_grads(model, lambda m, b: loss_sum(m, "causal_lm", b), batch)
    plain, g_plain = loss_and_grads(model, plain_loss, batch)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for name in g_plain:
        torch.testing.assert_close(g_fused[name], g_plain[name], rtol=1e-5, atol=1e-5)


def _inject(model, **kw):
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, **kw))
    randomize_lora(model, std=0.2)
    return model


@pytest.mark.parametrize("case", ["lora_on_head", "modules_to_save", "trainable_head", "hooked", "unknown_type"])
def test_anything_unsure_takes_the_plain_path_with_the_same_loss(case):
    model = llama(tied=False)
    if case == "lora_on_head":
        _inject(model, target_modules=["q_proj", "lm_head"])
    elif case == "modules_to_save":
        _inject(model, target_modules=["q_proj"], modules_to_save=["lm_head"])
    else:
        _inject(model, target_modules=["q_proj"])
    if case == "trainable_head":
        model.lm_head.weight.requires_grad_(True)
    elif case == "hooked":
        model.register_forward_pre_hook(lambda mod, args: None)
    elif case == "unknown_type":
        model.config.model_type = "gemma2"  # soft-capped logits: the backbone + head shortcut would be wrong
    assert fused_head(model) is None
    batch = padded_batch()
    got, g_got = loss_and_grads(model, lambda m, b: loss_sum(m, "causal_lm", b), batch)
    want, g_want = loss_and_grads(model, plain_loss, batch)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert g_got.keys() == g_want.keys() and g_got


def test_seq2seq_and_plain_modules_are_not_fused():
    assert fused_head(tiny_t5()) is None
    assert fused_head(torch.nn.Linear(3, 3)) is None


def test_fused_loss_under_bf16_autocast_is_close_to_the_plain_one():
    model = with_lora(llama(tied=True))
    batch = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, g_fused = loss_and_grads(model, lambda m, b: loss_sum(m, "causal_lm", b), batch)
        plain, g_plain = loss_and_grads(model, plain_loss, batch)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=0)
    for name in g_plain:
        assert g_fused[name].dtype == torch.float32
        torch.testing.assert_close(g_fused[name], g_plain[name], rtol=0.1, atol=0.1 * g_plain[name].abs().max().item())
