"""Pretraining: grain data (data), losses (loss), aux-loss-free balancing (balance),
optimizer (optimizer), the jitted step (step), orbax checkpoints (checkpoint), metrics
(metrics) and the CLI loop (loop, called by train.py)."""
