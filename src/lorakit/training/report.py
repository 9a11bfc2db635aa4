"""What a run leaves behind: progress bar, metrics.jsonl, loss.png, run.yaml, report.md."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import yaml

from ..io import atomic_write, write_text


class RunLog:
    """Appends metrics as they come and redraws the loss plot; every file write is atomic.

    `write=False` (every process but rank 0 of a distributed run): keeps count, writes and prints nothing.
    """

    def __init__(self, out: Path, history: list[dict] | None = None, resumed: bool = False,
                 write: bool = True) -> None:
        self.out = out
        self.write = write
        self.history = list(history or [])
        self.metrics = out / "metrics.jsonl"
        self.t0 = time.perf_counter()
        self._flush()  # a resumed run drops records past its checkpoint

    def _flush(self) -> None:
        if not self.write:
            return
        write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in self.history))

    def progress(self, total: int, initial: int = 0):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True,
                    disable=not self.write)

    def step(self, rec: dict, bar: Any, every: int, last: bool) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if rec["step"] % max(every, 1) == 0 or last or rec["step"] == 1:
            self.history.append({k: round(v, 6) if isinstance(v, float) else v for k, v in rec.items()})
            self._flush()

    def eval(self, step: int, metrics: dict[str, float], bar: Any) -> None:
        if not metrics or not self.write:
            return
        self.history.append({"step": step, **{k: round(v, 6) for k, v in metrics.items()}})
        self._flush()
        line = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        (bar.write if bar is not None else print)(f"step {step}: {line}")

    def write_run_yaml(self, cfg: Any, trainer: Any) -> None:
        from .. import __version__

        if not self.write:
            return
        settings = dataclasses.asdict(cfg)
        settings["resolved"] = {"task": trainer.task, "total_steps": trainer.total_steps,
                                "train_rows": len(trainer.train_data), "lorakit_version": __version__,
                                "world_size": trainer.world.size, "distributed": trainer.world.mode,
                                "precision": trainer.precision.name, "packing": trainer.packing}
        if trainer.id2label:  # class names by id: `lorakit generate` prints them for a classifier
            settings["resolved"]["id2label"] = trainer.id2label
        write_text(self.out / "run.yaml", yaml.safe_dump(settings, sort_keys=False))

    def finish(self, trainer: Any, final_eval: dict[str, float]) -> None:
        plot_losses(self.history, self.out / "loss.png")
        from ..adapters import count_parameters

        trainable, total = count_parameters(trainer.model)
        lines = ["# Training report", "",
                 f"- model: `{trainer.cfg.model}`, task `{trainer.task}`, train type `{trainer.cfg.train_type}`",
                 f"- data: {trainer.train_data.summary()}",
                 f"- trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)",
                 f"- steps: {trainer.step}, final train loss {trainer.last_loss:.4f}, "
                 f"wall time {time.perf_counter() - self.t0:.0f} s", ""]
        if final_eval:
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in final_eval.items()]
        write_text(self.out / "report.md", "\n".join(lines) + "\n")


def plot_losses(history: list[dict], path: Path) -> None:
    """Train loss per logged step and eval loss where measured, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
