"""Training losses: the summed token loss of a batch, for every task.

A causal LM's plain loss computes the full-vocabulary logits of every position, though in SFT
most positions (system prompt, user turn, padding) carry no label. Where it is safe
(`fused_head`), the causal loss instead runs the model's backbone, keeps the hidden states
whose shifted label is not -100, and computes head + cross-entropy on those only, chunk by
chunk (`LinearCrossEntropy`), so no (tokens, vocab) logits tensor ever exists:

    input_ids ─► backbone ─► h (b, t, H) ─► h[:, :-1][labels[:, 1:] != -100] ─► hs (n, H)
    hs ─► for each chunk of rows: z = hs_c Wᵀ (c, V) ─► logsumexp, z[target] ─► Σ loss

A prompt prefix that every row of the batch shares runs through the backbone once, and the rows
after it without padding (prefix.py).

Anything else (seq2seq, seq_cls, a head with a LoRA adapter, a trainable or wrapped head, an
unknown architecture, a model wrapped by DDP/FSDP or with hooks on its forward) takes the plain
path: ``model(...).logits`` and ``F.cross_entropy``. Both give the same loss and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import compute_dtype
from .prefix import can_share, prefix_forward, shared_prefix

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**23  # logits per chunk (32 MB in float32): rows per chunk = this // vocab
# Architectures whose causal-LM forward is exactly `head(backbone(...).last_hidden_state)`, with no
# logit scaling or soft-capping (Gemma 2/3, Granite and Cohere have those and take the plain path).
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "smollm3", "olmo2", "phi3"})


def loss_sum(model: nn.Module, task: str, batch: dict[str, Tensor]) -> Tensor:
    """Sum (not mean) of the token losses of a batch; the caller divides by the token count.

    `batch` holds ``labels`` and the model's inputs (``input_ids`` and ``attention_mask``, or
    ``position_ids`` for a packed batch).
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if task == "seq2seq":
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(**inputs, decoder_input_ids=decoder_input_ids).logits  # (b, t, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
    if task == "seq_cls":
        logits = model(**inputs).logits                                      # (b, classes)
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    core = getattr(model, "module", model)                                   # inside a DDP wrapper
    if hasattr(getattr(core, "config", None), "use_cache"):  # no KV cache in training (it also hides packing)
        inputs["use_cache"] = False
    parts = fused_head(model)
    if parts is None:
        logits = model(**inputs).logits[:, :-1]                              # predict token t+1 from <= t
        return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")
    backbone, head = parts
    p = shared_prefix(batch) if can_share(model, labels.shape[1]) else 0   # prefix.py: run it once
    if p:
        hidden, targets = prefix_forward(backbone, batch, p)                 # (n, H), (n,): rows packed
    else:
        hidden, targets = backbone(**inputs).last_hidden_state[:, :-1], labels[:, 1:]  # (b, t - 1, H)
    keep = targets != IGNORE_INDEX
    return LinearCrossEntropy.apply(hidden[keep], head.weight, targets[keep])


def fused_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(backbone, head) when the causal loss can skip unlabelled logits; None for the plain path.

    Only for a transformers model of a known architecture (`FUSED_MODEL_TYPES`), called as
    itself (no hooks on its forward: DDP, FSDP and friends need that forward to run), whose
    head is a plain frozen `nn.Linear` without bias (tied to the embeddings or not). A LoRA
    adapter on the head, or a trainable head, makes the head something else or trainable.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FUSED_MODEL_TYPES or config.is_encoder_decoder:
        return None
    if model._forward_hooks or model._forward_pre_hooks or not hasattr(model, "get_output_embeddings"):
        return None
    head, backbone = model.get_output_embeddings(), getattr(model, "base_model", None)
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    if backbone is None or backbone is model:
        return None
    return backbone, head


class LinearCrossEntropy(torch.autograd.Function):
    """Σ_i CE(h_i Wᵀ, y_i) without keeping (n, V) logits: chunked, recomputed in backward.

    Forward, per chunk of rows c (at most CHUNK_ELEMENTS // V of them):

        z   = h_c Wᵀ                      (c, V) in the matmul dtype, then at least float32
        lse = logsumexp(z, -1)            (c,)   kept for backward
        L  += Σ (lse - z[y])

    Backward, with g = dL_total/dL (a scalar) and the chunk's logits recomputed:

        p        = exp(z - lse)           softmax (c, V)
        dL/dz    = g (p - onehot(y))      (c, V), built in place in p
        dL/dh_c  = dL/dz W                (c, H)

    The frozen W gets no gradient (`fused_head` sends a trainable head to the plain path).
    Saved for backward: h (n, H), which the backbone output already holds, and lse (n,).

    Args (of ``apply``): h (n, H) hidden states of the labelled positions; weight (V, H); targets (n,).
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        dtype = compute_dtype(h)
        acc = torch.promote_types(dtype, torch.float32)                        # softmax in float32 at least
        w = weight.to(dtype)
        lse = torch.empty(h.shape[0], dtype=acc, device=h.device)             # (n,)
        total = torch.zeros((), dtype=acc, device=h.device)
        for rows in _chunks(h.shape[0], weight.shape[0]):
            z = torch.mm(h[rows].to(dtype), w.t()).to(acc)                     # (c, V)
            lse[rows] = torch.logsumexp(z, dim=-1)
            total += lse[rows].sum() - z.gather(1, targets[rows, None]).sum()
        ctx.dtype = dtype
        ctx.save_for_backward(h, weight, targets, lse)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight, targets, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w = weight.to(ctx.dtype)
        grad_h = torch.empty_like(h)                                            # (n, H)
        for rows in _chunks(h.shape[0], weight.shape[0]):
            z = torch.mm(h[rows].to(ctx.dtype), w.t()).to(lse.dtype)            # (c, V)
            p = z.sub_(lse[rows, None]).exp_()                                  # softmax, in place
            p.scatter_add_(1, targets[rows, None], torch.full_like(lse[rows, None], -1.0))
            p.mul_(grad)
            grad_h[rows] = torch.mm(p.to(ctx.dtype), w).to(h.dtype)             # (c, H)
        return grad_h, None, None


def _chunks(n: int, vocab: int) -> list[slice]:
    size = max(1, CHUNK_ELEMENTS // vocab)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
