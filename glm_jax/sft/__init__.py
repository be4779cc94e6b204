"""Supervised fine-tuning in GLM-4.5's chat format: conversation data with per-token loss
weights (data.py), the masked loss (loss.py), the embedded default task set (tasks.py), its
calculator tool (calculator.py) and its verifier / reward (reward.py)."""
