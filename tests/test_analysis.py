"""lorakit analyze: parameter, FLOP and memory numbers checked against hand arithmetic."""

from __future__ import annotations


import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, T5Config

import lorakit
from lorakit.analysis import analyze, meta_model

# Tiny Llama: h=64, 4 heads × 16, 2 kv heads (k/v: 32 × 64), MLP 160, 2 layers, vocab 100.
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
# embed 6400 + 2 × (q 4096 + k 2048 + v 2048 + o 4096 + 3 × 10240 MLP + 2 × 64 norms) + norm 64 + head 6400
TINY_BASE = 6400 + 2 * (4096 + 2048 + 2048 + 4096 + 3 * 10240 + 128) + 64 + 6400


@pytest.fixture
def tiny() -> LlamaConfig:
    return LlamaConfig(**TINY)


@pytest.fixture
def tiny_dir(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "tiny")  # a config alone, no weights
    return tmp_path / "tiny"


def test_tiny_llama_table_by_hand(tiny):
    rep = analyze(tiny, lorakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    q, v = rep.rows
    assert (q.module, q.d, q.k, q.r, q.count) == ("q_proj", 64, 64, 8, 2)
    assert (v.module, v.d, v.k, v.r, v.count) == ("v_proj", 32, 64, 8, 2)
    assert q.base_params == 2 * 64 * 64 and v.base_params == 2 * 32 * 64
    assert q.lora_params == 2 * 8 * (64 + 64) and v.lora_params == 2 * 8 * (32 + 64)
    assert q.flops_lora == 2 * 2 * 8 * 128  # B(Ax): 2r(d+k) per token, 2 modules
    assert q.flops_product == 2 * (2 * 8 * 64 * 64 + 2 * 64 * 64)  # (BA)x: 2rdk + 2dk
    assert v.flops_base == 2 * 2 * 32 * 64
    assert rep.base_params == TINY_BASE == 99136
    assert rep.trainable_params == rep.added_params == 2048 + 1536
    assert rep.total_params == TINY_BASE + 3584
    assert rep.trainable_percent == pytest.approx(100 * 3584 / (TINY_BASE + 3584))


def test_counts_match_inject_on_a_real_model(tiny):
    cfg = lorakit.LoraConfig(r=4, target_modules="all-linear", rank_pattern={"down_proj": 2},
                             modules_to_save=["lm_head"])
    rep = analyze(tiny, cfg)
    torch.manual_seed(0)
    model = lorakit.inject(LlamaForCausalLM(tiny), cfg)
    assert (rep.trainable_params, rep.total_params) == lorakit.count_parameters(model)
    down = next(r for r in rep.rows if r.module == "down_proj")
    assert down.r == 2 and down.lora_params == 2 * 2 * (64 + 160)
    assert rep.extra_trainable["modules_to_save"] == 6400


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_counts_match_inject_for_classification(bias):
    cfg = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                     vocab_size=100, architectures=["BertForSequenceClassification"])
    lora = lorakit.LoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"], bias=bias)
    rep = analyze(cfg, lora)  # the architecture picks the classification class, head included
    assert rep.model == "BertForSequenceClassification" and rep.extra_trainable["modules_to_save"] == 64 * 2 + 2
    model = lorakit.inject(BertForSequenceClassification(cfg), lora)
    assert (rep.trainable_params, rep.total_params) == lorakit.count_parameters(model)


def test_counts_match_peft_with_dora(tiny):
    peft = pytest.importorskip("peft")
    cfg = lorakit.LoraConfig(r=4, target_modules="all-linear", rank_pattern={"down_proj": 2}, use_dora=True,
                             modules_to_save=["lm_head"])
    rep = analyze(tiny, cfg)
    pcfg = peft.LoraConfig(r=4, target_modules="all-linear", rank_pattern={"down_proj": 2}, use_dora=True,
                           modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    oracle = peft.get_peft_model(LlamaForCausalLM(tiny), pcfg)
    assert (rep.trainable_params, rep.total_params) == oracle.get_nb_trainable_parameters()
    down = next(r for r in rep.rows if r.module == "down_proj")
    assert down.lora_params == 2 * (2 * (64 + 160) + 64)  # + DoRA's magnitude vector (d)


def test_model_is_not_modified(tiny):
    model = LlamaForCausalLM(tiny)
    before = [(n, p.requires_grad) for n, p in model.named_parameters()]
    rep = analyze(model, lorakit.LoraConfig(r=8, target_modules=["q_proj"]))
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == before
    assert rep.base_params == TINY_BASE


def test_flan_t5_base_figure():
    cfg = T5Config(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
                   feed_forward_proj="gated-gelu", vocab_size=32128)
    cfg.tie_word_embeddings = False  # T5Config forces True in __post_init__; flan-t5 has its own lm_head
    model = meta_model(cfg)
    # encoder/decoder embeddings are `shared` itself (as in PEFT's README figure): count it once
    model.encoder.embed_tokens = model.decoder.embed_tokens = model.shared
    rep = analyze(model, lorakit.LoraConfig(r=16, target_modules=["q", "v"]))
    assert rep.base_params == 247_577_856
    assert rep.trainable_params == 1_769_472 and rep.total_params == 249_347_328
    assert f"{rep.trainable_percent:.4f}" == "0.7096"
    assert sum(r.count for r in rep.rows) == 72  # 12 encoder self + 12 decoder self + 12 cross, × q, v


def test_tied_parameters_are_counted_once():
    cfg = T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, vocab_size=100)  # all tied
    rep = analyze(cfg, lorakit.LoraConfig(r=2, target_modules=["q"]))
    model = meta_model(cfg)
    assert model.lm_head.weight is model.shared.weight
    assert rep.base_params == sum(p.numel() for p in set(model.parameters()))


def test_memory_by_hand(tiny):
    rep = analyze(tiny, lorakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
                  dtype="float32", batch_size=2, max_length=8)
    P, T, tokens = TINY_BASE, 3584, 16
    per_layer = 4 * 64 + 2 * 64 + 2 * 32 + 3 * 160  # residuals/norms, q + attn out, k + v, gate/up/act
    acts = tokens * (2 * per_layer * 4 + 100 * (4 + 4))  # + logits (float32 copy for the loss)
    m = rep.memory
    assert m.full == {"weights": 4 * P, "gradients": 4 * P, "optimizer": 8 * P, "activations": acts,
                      "total": 16 * P + acts}
    lora_acts = acts + 4 * 8 * tokens * 4  # r per token for each of the 4 targets
    assert m.lora == {"weights": 4 * P + 4 * T, "gradients": 4 * T, "optimizer": 8 * T,
                      "activations": lora_acts, "total": 4 * P + 16 * T + lora_acts}
    half = analyze(tiny, lorakit.LoraConfig(r=8, target_modules=["q_proj"]), dtype="bfloat16").memory
    assert half.full["weights"] == 2 * P + 4 * P  # bf16 weights + float32 master copy
    assert any("master" in a for a in half.assumptions)


def test_full_rank_warning_and_sweep(tiny):
    # q_proj is 64 × 64: dk / (d + k) = 32, so r = 32 is no cheaper than the matrix
    rep = analyze(tiny, lorakit.LoraConfig(r=32, target_modules=["q_proj", "gate_proj"]))
    flags = {r.module: r.full_rank for r in rep.rows}
    assert flags == {"q_proj": True, "gate_proj": False}  # 160·64/224 ≈ 45.7 > 32
    assert "q_proj !" in str(rep) and "as many parameters as the matrix" in str(rep)
    assert not analyze(tiny, lorakit.LoraConfig(r=31, target_modules=["q_proj"])).rows[0].full_rank
    sweep = {s["r"]: s["trainable"] for s in rep.sweep}
    assert list(sweep) == [4, 8, 16, 32, 64, 128, 256] and sweep[8] == 2 * sweep[4]


def test_from_directory_and_config_file(tiny_dir):
    cfg = lorakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])
    assert analyze(str(tiny_dir), cfg).base_params == TINY_BASE
    assert analyze(str(tiny_dir / "config.json"), cfg).trainable_params == 3584


def test_errors(tiny):
    with pytest.raises(ValueError, match="dtype='int8'.*bfloat16"):
        analyze(tiny, lorakit.LoraConfig(target_modules=["q_proj"]), dtype="int8")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        analyze(tiny, lorakit.LoraConfig(target_modules=["q_proj"]), batch_size=0)
    with pytest.raises(ValueError, match="q_prj.*matched no module.*q_proj"):
        analyze(tiny, lorakit.LoraConfig(target_modules=["q_prj"]))
    with pytest.raises(ValueError, match="input_layernorm.*LlamaRMSNorm.*nn.Linear"):
        analyze(tiny, lorakit.LoraConfig(target_modules=r".*\.input_layernorm"))
