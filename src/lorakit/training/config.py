"""TrainConfig: every setting of a training run; `lorakit sft` flags and `run.yaml` keys have its field names.

The string under each field is its documentation, and `lorakit sft --help` prints it (with
`CHOICES` and the default): write it for a user reading the help.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import LoraConfig, parse_targets
from ..tasks import TASKS

CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("auto",) + TASKS,
    "train_type": ("lora", "dora", "qlora", "adalora"),
    "init": ("default", "gaussian", "pissa", "olora"),
    "lr_scheduler": ("cosine", "linear", "constant"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "eval_metric": ("loss", "exact_match", "accuracy"),
    "distributed": ("auto", "ddp", "fsdp"),
    "dist_backend": ("auto", "gloo", "nccl"),
}


@dataclass
class TrainConfig:
    """Every setting of a run; `lorakit sft` flags and `run.yaml` keys have these names."""

    dataset: list[str] = field(default_factory=list)
    """Training data: JSONL, JSON, CSV or Parquet files (chat, Alpaca, prompt/completion, text, text/label or source/target rows). Required."""
    model: str = "smollm2-135m-instruct"
    """Base model: the embedded smollm2-135m-instruct, a local Hugging Face folder or a hub id."""
    eval_dataset: list[str] = field(default_factory=list)
    """Held-out files, same row shapes; evaluated every --eval-steps and at the end (report.md)."""
    output_dir: str = "runs/sft"
    """Folder for the adapter, checkpoints/, metrics.jsonl, loss.png, run.yaml and report.md."""
    task: str = "auto"
    """What the model learns; auto decides from the first row (text/label: seq_cls, source/target: seq2seq, else causal_lm)."""
    train_type: str = "lora"
    """lora; dora (weight-decomposed); qlora (LoRA over a 4-bit NF4 base, needs bitsandbytes); adalora (ranks start at --lora-rank and shrink to half on average, kept where they matter)."""
    lora_rank: int = 8
    """Rank r of each update B·A: more capacity, more parameters."""
    lora_alpha: float = 32
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with --use-rslora)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch's input while training."""
    target_modules: str | list[str] = "all-linear"
    """Modules to adapt: name suffixes (q_proj,v_proj or q_proj v_proj), one regex (full match), or all-linear."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    init: str = "default"
    """How A and B start: default (PEFT's), gaussian, pissa or olora (principal directions of the weights)."""
    adapter: str | None = None
    """Continue training this existing adapter folder instead of starting a new one."""
    system: str | None = None
    """System prompt for chat rows that have none (ms-swift's --system)."""
    epochs: float = 1.0
    """Passes over the training data; ignored when --max-steps is set."""
    max_steps: int = -1
    """Optimizer steps to run; -1: as many as --epochs takes."""
    learning_rate: float = 1e-4
    """Peak learning rate (AdamW), reached after warmup."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: B matrices learn this many times faster than A (e.g. 16)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay on the trained weights."""
    batch_size: int = 4
    """Rows per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: the effective batch is --batch-size x this."""
    max_length: int = 1024
    """Tokens per row; longer rows are cut (and counted in the summary)."""
    warmup_ratio: float = 0.0
    """Fraction of the steps with a linear warmup, rounded up to whole steps (as transformers does)."""
    warmup_steps: int = 0
    """Steps of linear warmup; use this or --warmup-ratio, not both."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warmup (constant_with_warmup is the same as constant)."""
    max_grad_norm: float = 1.0
    """Clip the global norm of the LoRA gradients to this; 0: no clipping."""
    precision: str = "auto"
    """auto (bf16 or fp16 on a GPU, fp32 on CPU: training/precision.py), fp32, bf16 (the frozen base kept in bf16, LoRA weights, grads and AdamW in fp32; fast only with bf16 units, e.g. CPU flags avx512_bf16 / amx_bf16), fp16 (GPU only, loss-scaled). ms-swift's float32/bfloat16/float16 spellings work too."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    group_by_length: bool = False
    """Batch rows of similar length together: less padding, but when length follows content (one kind of task is always short) each batch holds one kind, which can learn worse; off: shuffled rows, as Hugging Face's Trainer."""
    packing: bool = False
    """Concatenate a batch's rows into one sequence without padding (llama-family causal LMs; others train padded, with a warning). Off by default: length-grouped batches pad little (0.2% on the demo, 0.4% on chat data) and a packed step took 1.1x the padded one there, without prefix sharing."""
    save_steps: int = 0
    """Save a checkpoint every N optimizer steps; 0: only at the end."""
    save_total_limit: int = 2
    """Keep only the newest N checkpoints."""
    eval_steps: int = 0
    """Evaluate on --eval-dataset every N steps; 0: only at the end."""
    eval_metric: str = "loss"
    """What evaluation reports besides the loss: exact_match (greedy generation) or accuracy (classifiers)."""
    eval_max_new_tokens: int = 128
    """Tokens generated per row for exact_match."""
    eval_max_rows: int | None = None
    """Evaluate on the first N rows of --eval-dataset only; unset: all rows."""
    logging_steps: int = 10
    """Write a line to metrics.jsonl every N steps."""
    seed: int = 42
    """Seed for the adapter's initialisation, the data order and dropout."""
    resume: bool = False
    """Continue exactly from the newest checkpoint in --output-dir."""
    dry_run: bool = False
    """Print a few tokenised rows with the trained tokens highlighted, then stop (what `lorakit data` does)."""
    num_labels: int | None = None
    """seq_cls: number of classes; unset: the labels in the data."""
    # --- several processes (training/distributed.py); --batch-size stays per process ---
    distributed: str = "auto"
    """How several processes share the work: ddp (a copy per process; the default with several processes) or fsdp (the frozen base sharded across processes)."""
    dist_backend: str = "auto"
    """torch.distributed backend: auto (nccl with GPUs, else gloo), gloo or nccl."""
    nproc: int = 1
    """Training processes on this node; above 1, lorakit relaunches itself under torchrun."""
    nnodes: str = "1"
    """torchrun --nnodes: the number of nodes, or a MIN:MAX range."""
    rdzv_backend: str = "c10d"
    """torchrun --rdzv-backend (used with --rdzv-endpoint)."""
    rdzv_endpoint: str = ""
    """torchrun --rdzv-endpoint HOST:PORT where the nodes meet; needed with --nnodes above 1."""
    rdzv_id: str = "lorakit"
    """torchrun --rdzv-id: the same on every node of one job."""

    def __post_init__(self) -> None:
        positive = {"lora_rank": self.lora_rank, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "max_length": self.max_length, "learning_rate": self.learning_rate}
        for name, value in positive.items():
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be a whole number >= 0, got {self.warmup_steps!r}")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(f"set --warmup-steps ({self.warmup_steps}) or --warmup-ratio ({self.warmup_ratio}), "
                             f"not both")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(self, name)!r}")
        if isinstance(self.dataset, str):
            self.dataset = [self.dataset]
        if isinstance(self.eval_dataset, str):
            self.eval_dataset = [self.eval_dataset]
        if not self.dataset:
            raise ValueError("--dataset is required: a JSONL/JSON/CSV/Parquet file of training rows")
        if not isinstance(self.nproc, int) or self.nproc < 1:
            raise ValueError(f"--nproc must be a positive number of processes, got {self.nproc!r}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("set --epochs > 0 or --max-steps > 0")

    def lora_config(self) -> LoraConfig:
        return lora_config_of(vars(self))


def lora_config_of(settings: dict[str, Any]) -> LoraConfig:
    """The LoraConfig that run settings (TrainConfig's field names) describe; `lorakit analyze` reads its
    flags through this too, so both commands mean the same by the same flags."""
    return LoraConfig(r=settings["lora_rank"], alpha=settings["lora_alpha"], dropout=settings["lora_dropout"],
                      target_modules=parse_targets(settings["target_modules"]), use_rslora=settings["use_rslora"],
                      use_dora=settings["train_type"] == "dora", init=settings["init"])
