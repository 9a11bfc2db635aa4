"""TrainConfig: every setting of a training run; `lorakit sft` flags and `run.yaml` keys have its field names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import LoraConfig
from ..tasks import TASKS


@dataclass
class TrainConfig:
    """Every setting of a run; `lorakit sft` flags and `run.yaml` keys have these names."""

    dataset: list[str] = field(default_factory=list)  # training files (JSONL/JSON/CSV/Parquet); repeatable
    model: str = "smollm2-135m-instruct"              # embedded model, local HF dir or hub id
    eval_dataset: list[str] = field(default_factory=list)  # held-out files for eval loss / metrics
    output_dir: str = "runs/sft"                      # adapter, checkpoints/, metrics.jsonl, loss.png, run.yaml
    task: str = "auto"                                # causal_lm | seq_cls | seq2seq | auto (from the rows)
    train_type: str = "lora"                          # lora | dora | qlora (4-bit NF4 base) | adalora (adalora.py)
    lora_rank: int = 8                                # r
    lora_alpha: float = 32                            # scale numerator (alpha / r)
    lora_dropout: float = 0.05                        # dropout on the LoRA branch input
    target_modules: str = "all-linear"                # comma list of suffixes, a regex, or all-linear
    use_rslora: bool = False                          # alpha / sqrt(r)
    init: str = "default"                             # default | gaussian | pissa | olora
    adapter: str | None = None                        # continue training this adapter directory
    epochs: float = 1.0                               # passes over the data (ignored when max_steps > 0)
    max_steps: int = -1                               # optimizer steps; -1: from epochs
    learning_rate: float = 1e-4                       # peak learning rate
    loraplus_lr_ratio: float | None = None            # LoRA+: B's lr = lr * ratio (e.g. 16)
    weight_decay: float = 0.0
    batch_size: int = 4                               # rows per micro-batch
    grad_accum: int = 1                               # micro-batches per optimizer step
    max_length: int = 1024                            # tokens per row; longer rows are cut (and counted)
    warmup_ratio: float = 0.0                         # fraction of steps with linear warmup
    lr_scheduler: str = "cosine"                      # cosine | linear | constant
    max_grad_norm: float = 1.0                        # clip the LoRA gradients' global norm; 0: off
    precision: str = "auto"                           # auto | fp32 | bf16 | fp16: see training/precision.py
    gradient_checkpointing: bool = False              # trade compute for activation memory
    packing: bool = False                             # a batch's rows as one unpadded sequence (llama-family causal
    #   LMs; others train padded, with a warning). Off by default: length-grouped batches pad little (0.2% on the
    #   demo, 0.4% on sft_e2e's data) and a packed step took 1.1x the padded one there, with no prefix sharing
    save_steps: int = 0                               # checkpoint every N steps; 0: only at the end
    save_total_limit: int = 2                         # keep the newest N checkpoints
    eval_steps: int = 0                               # evaluate every N steps; 0: only at the end
    eval_metric: str = "loss"                         # loss | exact_match (greedy generation) | accuracy
    eval_max_new_tokens: int = 128                    # for exact_match
    eval_max_rows: int | None = None                  # evaluate on the first N eval rows only (None: all)
    logging_steps: int = 10                           # metrics.jsonl / progress bar every N steps
    seed: int = 42
    resume: bool = False                              # continue from the newest checkpoint in output_dir
    dry_run: bool = False                             # show tokenised rows (trained tokens highlighted), no training
    num_labels: int | None = None                     # seq_cls: taken from the data when unset
    # --- several processes (training/distributed.py); --batch-size stays per process ---
    distributed: str = "auto"                         # auto (ddp when there are several processes) | ddp | fsdp
    dist_backend: str = "auto"                        # auto (nccl with GPUs, else gloo) | gloo | nccl
    nproc: int = 1                                    # processes on this node; > 1 relaunches under torchrun
    nnodes: str = "1"                                 # torchrun --nnodes: nodes, or a MIN:MAX range
    rdzv_backend: str = "c10d"                        # torchrun --rdzv-backend (used with --rdzv-endpoint)
    rdzv_endpoint: str = ""                           # torchrun --rdzv-endpoint HOST:PORT of the rendezvous
    rdzv_id: str = "lorakit"                          # torchrun --rdzv-id: the same on every node of one job

    def __post_init__(self) -> None:
        positive = {"lora_rank": self.lora_rank, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "max_length": self.max_length, "learning_rate": self.learning_rate}
        for name, value in positive.items():
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        choices = {"task": ("auto",) + TASKS, "train_type": ("lora", "dora", "qlora", "adalora"),
                   "precision": ("auto", "fp32", "bf16", "fp16"), "lr_scheduler": ("cosine", "linear", "constant"),
                   "eval_metric": ("loss", "exact_match", "accuracy"), "distributed": ("auto", "ddp", "fsdp"),
                   "dist_backend": ("auto", "gloo", "nccl")}
        for name, allowed in choices.items():
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
        targets: Any = self.target_modules
        if isinstance(targets, str) and ("," in targets or targets.isidentifier()):  # a list of suffixes
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return LoraConfig(r=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout, target_modules=targets,
                          use_rslora=self.use_rslora, use_dora=self.train_type == "dora", init=self.init)
