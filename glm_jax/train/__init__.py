"""Training: the trainer (trainer: TrainState, make_trainer), losses (loss), grain data
(data), aux-loss-free balancing (balance), optimizer (optimizer), orbax checkpoints
(checkpoint), metrics (metrics) and the CLI loop (loop, called by train.py)."""

from glm_jax.train.loss import NextTokenLoss
from glm_jax.train.trainer import Trainer, TrainState, make_trainer

__all__ = ["NextTokenLoss", "TrainState", "Trainer", "make_trainer"]
