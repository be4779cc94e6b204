"""A very small training config for the tests of glm_jax.train (test_train_*.py): the tiny
config's structure (dense layer, MoE layer, MTP layer, byte vocabulary) at a size that
compiles and steps in seconds on 2 cores."""

from __future__ import annotations

import ml_collections

from configs import tiny

# ml_collections command-line spelling of the same overrides, for train.py subprocesses.
OVERRIDES = {
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 2,
    "model.num_attention_heads": 2, "model.num_key_value_heads": 1, "model.head_dim": 16,
    "model.moe_intermediate_size": 16, "model.n_routed_experts": 4,
    "model.num_experts_per_tok": 2,
    "train.batch_size": 8, "train.seq_len": 32, "train.steps": 30, "train.log_every": 1,
    "train.peak_flops": 1e11,  # skip the start-up matmul measurement
    "train.eval_every": 0,  # no held-out evaluation (its own tests turn it on)
    "optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 3,
    "data.max_bytes": 2_000_000, "checkpoint.every": 5, "checkpoint.keep": 2,
}


def small_config(**changes) -> ml_collections.ConfigDict:
    cfg = tiny.get_config()
    for key, value in {**OVERRIDES, **changes}.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def flag_args(**changes) -> list[str]:
    return [f"--config.{k}={v}" for k, v in {**OVERRIDES, **changes}.items()]
