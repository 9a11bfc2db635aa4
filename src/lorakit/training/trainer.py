"""The training loop, as a Python API: `lorakit.train(TrainConfig(...))` or `Trainer(cfg).train()`.

One straight loop. Each optimizer step takes `grad_accum` micro-batches; the loss is the sum of
token losses over *all* of them divided by their total number of trained tokens, so
`batch 1 x accum 4` and `batch 4 x accum 1` give the same gradient. Checkpoints hold the adapter,
optimizer, scheduler, RNG and data position, so `resume` reproduces an uninterrupted run.
Under torchrun every process takes its share of each global micro-batch and rank 0 alone writes
(distributed.py: DDP or FSDP2).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import adalora
from ..adapters import shared_dropout
from . import datasets as datalib
from .batching import batches, collate
from . import distributed
from . import precision
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from ..inject import inject, set_trainable
from ..io import load_adapter, save_adapter
from .config import TrainConfig
from .loss import loss_sum
from .packing import collate_packed, packing_supported
from .optim import make_optimizer, make_scheduler


def detect_task(path: str) -> str:
    """causal_lm, seq_cls or seq2seq, from the first row's shape."""
    first = datalib.load_rows(path)[0]
    return datalib.task_of_shape(datalib.detect_shape(first, f"{path} line 1"))


class DivergedError(RuntimeError):
    pass


class Trainer:
    """Builds model, data and optimizer from a TrainConfig; `train()` runs the loop.

    Pass `model` and `tokenizer` to train an in-memory model (any torch module with LoRA layers
    injected, or a plain one: a LoRA adapter is injected from the config).
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.world = distributed.world_from_env(cfg)  # this process under torchrun; checks that need no model
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.task = detect_task(cfg.dataset[0]) if cfg.task == "auto" else cfg.task
        if tokenizer is None:
            from ..models import load_tokenizer

            tokenizer = load_tokenizer(cfg.model)
        self.tokenizer = tokenizer
        self.train_data = datalib.build_dataset(cfg.dataset, tokenizer, self.task, cfg.max_length, system=cfg.system)
        self.eval_data = (datalib.build_dataset(cfg.eval_dataset, tokenizer, self.task, cfg.max_length,
                                                label2id=self.train_data.label2id, system=cfg.system)
                          if cfg.eval_dataset else None)
        if self.eval_data is not None and cfg.eval_max_rows:
            self.eval_data.rows = self.eval_data.rows[: cfg.eval_max_rows]
        if cfg.dry_run:
            self.model = model
            return
        self.model = model if model is not None else self._load_model()
        self.adapter = "default"
        self.micro_per_epoch = math.ceil(len(self.train_data) / (cfg.batch_size * self.world.size))
        self.total_steps = (cfg.max_steps if cfg.max_steps > 0
                            else max(1, math.ceil(cfg.epochs * self.micro_per_epoch / cfg.grad_accum)))
        self._attach_adapter()
        self.allocator = adalora.allocator_for(self.model, self.adapter)  # AdaLoRA's rank allocator, else None
        unpackable = packing_supported(self.model, self.task) if cfg.packing else None
        self.packing = cfg.packing and unpackable is None
        if unpackable:
            self.train_data.warnings.append(f"--packing: {unpackable}; training on padded batches")
        self.device = next(self.model.parameters()).device
        if cfg.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):   # transformers >= 5.x
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            elif hasattr(self.model, "gradient_checkpointing_enable"):
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            else:
                raise ValueError("--gradient-checkpointing needs a transformers model; this model has no "
                                 "activation/gradient checkpointing switch")
        self.precision = precision.resolve(cfg.precision, self.device)
        self.autocast_dtype, self.scaler = self.precision.autocast_dtype, self.precision.scaler()
        if self.precision.base_dtype and model is None and cfg.train_type == "lora":  # a model we loaded ourselves
            precision.cast_frozen(self.model, self.precision.base_dtype)
        self.train_model = distributed.wrap(self.world, self.model)  # what a training forward calls (DDP wrapper)
        self.optimizer = make_optimizer(self.model, cfg.learning_rate, cfg.weight_decay, cfg.loraplus_lr_ratio)
        # transformers' rounding, ceil(ratio * total) (0.0833 of 120 steps is 10, not 9), less float noise
        # (0.1 * 60 is 6.000000000000001: 6 steps, not 7)
        self.warmup_steps = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.total_steps - 1e-9)
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_scheduler, self.warmup_steps, self.total_steps)
        self.step, self.epoch, self.micro_in_epoch = 0, 0, 0
        self.last_loss: float | None = None
        self.history: list[dict] = []

    # --- set-up ---
    @property
    def id2label(self) -> dict[int, str] | None:
        """Class names by id (seq_cls), from the training data's labels; None for other tasks."""
        label2id = self.train_data.label2id
        return {i: name for name, i in label2id.items()} if label2id else None

    def _load_model(self) -> nn.Module:
        from ..models import load_model

        num_labels = self.cfg.num_labels or (len(self.train_data.label2id) if self.train_data.label2id else None)
        kwargs: dict[str, Any] = {"num_labels": num_labels, "id2label": self.id2label} if self.task == "seq_cls" else {}
        if self.cfg.train_type == "qlora":
            from ..qlora import quantization_config

            kwargs["quantization_config"] = quantization_config()
        model = load_model(self.cfg.model, task=self.task, **kwargs)
        if self.cfg.train_type == "qlora":
            from ..qlora import prepare_model

            prepare_model(model)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.world.device.type == "cuda" and self.cfg.train_type != "qlora":
            model = model.to(self.world.device)
        return model

    def _attach_adapter(self) -> None:
        from ..state import get_state

        state = get_state(self.model)
        if self.cfg.adapter:
            load_adapter(self.model, self.cfg.adapter, name=self.adapter, trainable=True)
        elif state is None or self.adapter not in state.configs:
            lcfg = self.cfg.lora_config()
            if self.cfg.train_type == "adalora":  # SVD-form adapter; its rank schedule spans the whole run
                lcfg = adalora.training_config(lcfg, total_step=self.total_steps)
            if self.task == "seq_cls":
                heads = [h for h in ("classifier", "score") if getattr(self.model, h, None) is not None]
                lcfg = lcfg.replace(modules_to_save=heads, task_type="SEQ_CLS")
            inject(self.model, lcfg, name=self.adapter)
        else:
            set_trainable(self.model, self.adapter, True)
        from ..adapters import set_adapter

        set_adapter(self.model, self.adapter)

    # --- data stream ---
    def _order(self, epoch: int) -> list[list[int]]:
        """Global micro-batches (all processes' rows together), the same in every process."""
        return batches(self.train_data, self.cfg.batch_size * self.world.size, shuffle=True,
                       seed=self.cfg.seed, epoch=epoch, group_by_length=self.cfg.group_by_length)

    def _next_micro_batches(self) -> list[list[int]]:
        """The next grad_accum micro-batches; advances the data position (epoch, index in epoch)."""
        out = []
        while len(out) < self.cfg.grad_accum:
            order = self._order(self.epoch)
            if self.micro_in_epoch >= len(order):
                self.epoch, self.micro_in_epoch = self.epoch + 1, 0
                continue
            out.append(order[self.micro_in_epoch])
            self.micro_in_epoch += 1
        return out

    def _batch(self, rows: list[datalib.Encoded]) -> dict[str, torch.Tensor]:
        batch = collate_packed(rows) if self.packing else collate(rows, self.tokenizer.pad_token_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    # --- loss ---
    def loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum (not mean) of the token losses of a batch; the caller divides by the step's token count."""
        return loss_sum(self.train_model, self.task, batch)

    def autocast(self):
        """The autocast context of this run's precision (disabled at fp32): every forward runs in it."""
        return self.precision.autocast(self.device.type)

    # --- one optimizer step ---
    def accumulate(self, micro: list[list[int]]) -> tuple[float, int]:
        """Forward/backward over micro-batches of row indices; gradients sum to d(mean token loss).

        Returns (loss, input tokens) of the whole step, over all processes. The divisor is the
        trained-token count of all micro-batches of all processes together, so how the rows are
        split into micro-batches and processes does not change the gradient (distributed.py).
        """
        shares = [distributed.share(self.world, idx) for idx in micro]  # this process's rows of each
        n_mine = sum(self.train_data[i].n_trained for idx, real in shares if real for i in idx)
        n_tokens = distributed.sum_all(self.world, n_mine)[0]
        total, n_input = 0.0, 0
        for k, (idx, real) in enumerate(shares):
            batch = self._batch([self.train_data[i] for i in idx])
            with shared_dropout(self.model), \
                    distributed.grad_sync(self.world, self.train_model, sync=k == len(shares) - 1):
                with self.autocast():
                    loss = self.loss_sum(batch) * self.world.size / n_tokens  # DDP/FSDP average over processes
                if not real:  # a stand-in row: this process has none in this micro-batch
                    loss = loss * 0.0
                if self.allocator:  # AdaLoRA: orthogonality penalty on A and B, once per optimizer step
                    loss = loss + self.allocator.regularizer() / len(micro)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.item() / self.world.size
            n_input += sum(len(self.train_data[i].input_ids) for i in idx) if real else 0
        total, n_input = distributed.sum_all(self.world, total, n_input)
        return total, int(n_input)

    def train_step(self) -> dict[str, float]:
        self.model.train()
        distributed.step_seed(self.world, self.cfg.seed, self.step)
        t0 = time.perf_counter()
        total, n_input = self.accumulate(self._next_micro_batches())
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            raise DivergedError(total)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
                     if self.cfg.max_grad_norm > 0 else torch.tensor(0.0))
        lr = self.scheduler.get_last_lr()[0]
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.allocator:  # AdaLoRA: scores read this step's gradients, so before zero_grad
            self.allocator.step(self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.last_loss = total
        dt = time.perf_counter() - t0
        return {"step": self.step, "loss": total, "lr": lr, "grad_norm": distributed.to_float(grad_norm),
                "tokens_per_s": n_input / dt, "epoch": self.epoch + self.micro_in_epoch / self.micro_per_epoch}

    # --- evaluation ---
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        from .evaluate import accuracy, eval_loss, exact_match

        self.model.eval()
        out = {"eval_loss": eval_loss(self, self.eval_data)}
        if self.cfg.eval_metric == "exact_match" and self.task == "causal_lm":
            out["eval_exact_match"] = exact_match(self.model, self.tokenizer, self.cfg.eval_dataset,
                                                  max_new_tokens=self.cfg.eval_max_new_tokens)["exact_match"]
        elif self.cfg.eval_metric == "accuracy" or self.task == "seq_cls":
            out["eval_accuracy"] = accuracy(self, self.eval_data)
        return out

    # --- checkpoints ---
    def trainer_state(self) -> dict:
        return {"epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch, "last_loss": self.last_loss,
                "total_steps": self.total_steps, "world_size": self.world.size,
                "config": dataclasses.asdict(self.cfg)}

    def save_checkpoint(self) -> Path | None:
        """Every process calls this (a sharded model is gathered whole); rank 0 writes, the others wait."""
        tensors = distributed.full_adapter(self.world, self.model, self.adapter)
        opt_state = distributed.full_optimizer(self.world, self.model, self.optimizer)
        path = None
        if self.world.is_main:
            path = save_checkpoint(self.out / "checkpoints", self.step, self.model, self.adapter, self.optimizer,
                                   self.scheduler, self.trainer_state(), keep=self.cfg.save_total_limit,
                                   tensors=tensors, optimizer_state=opt_state)
        distributed.barrier(self.world)
        return path

    def resume(self) -> Path:
        if self.allocator:  # checkpoints hold PEFT's rank-cut AdaLoRA files, not the allocator's scores
            raise ValueError("--resume does not support AdaLoRA runs yet; start the run again without --resume")
        found = list_checkpoints(self.out / "checkpoints")
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out / 'checkpoints'}; "
                                    f"start without --resume (or point --output-dir at the earlier run)")
        path = found[-1]
        load_weights = distributed.state_loader(self.world, self.model, self.adapter, self.optimizer)
        state = load_checkpoint(path, self.model, self.adapter, self.optimizer, self.scheduler, load_weights)
        self.step, self.epoch, self.micro_in_epoch = state["step"], state["epoch"], state["micro_in_epoch"]
        self.last_loss = state["last_loss"]
        self.history = [r for r in _read_metrics(self.out / "metrics.jsonl") if r.get("step", 0) <= self.step]
        if self.world.is_main:
            print(f"resumed from {path} (step {self.step}, loss {self.last_loss:.4f})")
        return path

    # --- the loop ---
    def train(self) -> dict[str, Any]:
        from .report import RunLog

        cfg = self.cfg
        if cfg.dry_run:
            print(datalib.preview(self.train_data, self.tokenizer, n=3))
            return {"dry_run": True}
        if self.world.is_main:  # with several processes, rank 0 alone writes and prints
            self.out.mkdir(parents=True, exist_ok=True)
            for warning in self.train_data.warnings:
                print(f"warning: {warning}")
        if cfg.resume:
            self.resume()
        log = RunLog(self.out, self.history, resumed=cfg.resume, write=self.world.is_main)
        log.write_run_yaml(cfg, self)
        print(f"{self.total_steps} optimizer steps of {cfg.batch_size} x {cfg.grad_accum} rows; "
              f"warmup {self.warmup_steps} step{'' if self.warmup_steps == 1 else 's'}, then {cfg.lr_scheduler}")
        bar = log.progress(self.total_steps, initial=self.step)
        try:
            while self.step < self.total_steps:
                try:
                    rec = self.train_step()
                except DivergedError as e:
                    good = list_checkpoints(self.out / "checkpoints")
                    keep = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was saved yet"
                    raise DivergedError(f"loss became {e.args[0]} at step {self.step + 1}; training stopped and "
                                        f"{keep}. Lower --learning-rate or check the data") from None
                log.step(rec, bar, every=cfg.logging_steps, last=self.step == self.total_steps)
                if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < self.total_steps:
                    log.eval(self.step, self.evaluate(), bar)
                if cfg.save_steps and self.step % cfg.save_steps == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            if self.world.active:  # the other processes may be mid-step: gathering a checkpoint could hang
                raise
            path = self.save_checkpoint()
            print(f"\ninterrupted: saved {path}; continue with --resume")
            raise
        bar.close()
        if not cfg.save_steps or self.step % cfg.save_steps:
            self.save_checkpoint()
        final_eval = self.evaluate()
        if final_eval:
            log.eval(self.step, final_eval, None)
        tensors = distributed.full_adapter(self.world, self.model, self.adapter)
        if self.world.is_main:
            save_adapter(self.model, self.out, name=self.adapter, tensors=tensors)
            log.finish(self, final_eval)
        distributed.barrier(self.world)
        distributed.close(self.world)
        return {"step": self.step, "loss": self.last_loss, **final_eval}


def _read_metrics(path: Path) -> list[dict]:
    import json

    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(cfg: TrainConfig | None = None, model: nn.Module | None = None, tokenizer: Any = None,
          **overrides: Any) -> dict[str, Any]:
    """Run a whole fine-tune: `lorakit.train(dataset=["train.jsonl"], max_steps=100)`."""
    cfg = dataclasses.replace(cfg, **overrides) if cfg else TrainConfig(**overrides)
    return Trainer(cfg, model=model, tokenizer=tokenizer).train()


__all__ = ["TrainConfig", "Trainer", "train"]
