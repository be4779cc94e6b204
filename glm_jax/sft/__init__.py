"""Supervised fine-tuning in GLM-4.5's chat format: conversation data with a per-token loss
mask (data.py; the loss is the trainer's `NextTokenLoss`, which reads the mask), the
embedded default task set (tasks.py), its calculator tool (calculator.py), the verifier / reward (reward.py), held-out evaluation by
generation (evaluate.py) and the distillation loss (distill.py)."""
