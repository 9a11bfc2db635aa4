"""The training tier: datasets and chat masking, the training loop, checkpoints, evaluation, reports."""

from .config import TrainConfig
from .trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
