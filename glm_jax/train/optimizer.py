"""The optimizer from the config: optax AdamW (default) or the project's Muon, a learning-rate
schedule (warmup + cosine, or warmup-stable-decay), global-norm clipping and the weight-decay
mask of glm_jax.optim.labels.TABLE."""

from __future__ import annotations

from typing import Any, Callable

import optax

from glm_jax.cli_errors import ConfigError
from glm_jax.optim import labels, muon, param_shardings

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon")


def validate(opt_cfg, steps: int) -> None:
    """Raise a clear error for a bad optimizer section (called before anything compiles)."""
    def fail(field: str, why: str) -> None:
        raise ConfigError(f"config.optimizer.{field}={opt_cfg[field]!r}: {why}")

    if opt_cfg.name not in OPTIMIZERS:
        fail("name", f"must be one of {OPTIMIZERS}")
    if opt_cfg.schedule not in SCHEDULES:
        fail("schedule", f"must be one of {SCHEDULES}")
    if not opt_cfg.learning_rate > 0:
        fail("learning_rate", "must be positive")
    if not isinstance(opt_cfg.warmup_steps, int) or opt_cfg.warmup_steps < 0:
        fail("warmup_steps", "must be a non-negative integer")
    if not 0.0 <= opt_cfg.min_lr_ratio <= 1.0:
        fail("min_lr_ratio", "must be in [0, 1]")
    if not 0.0 <= opt_cfg.decay_fraction <= 1.0:
        fail("decay_fraction", "must be in [0, 1]")
    if opt_cfg.weight_decay < 0:
        fail("weight_decay", "must be >= 0")
    if opt_cfg.clip_norm < 0:
        fail("clip_norm", "must be >= 0 (0 = no clipping)")


def make_schedule(opt_cfg, steps: int) -> optax.Schedule:
    peak, warmup = opt_cfg.learning_rate, opt_cfg.warmup_steps
    end = peak * opt_cfg.min_lr_ratio
    if opt_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), end)
    if opt_cfg.schedule == "constant":
        return optax.warmup_constant_schedule(0.0, peak, warmup)
    # Warmup-stable-decay: linear warmup, flat, then a linear decay over the last
    # `decay_fraction` of the run.
    decay = max(1, int(round(steps * opt_cfg.decay_fraction)))
    stable_end = max(warmup, steps - decay)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)),
         optax.constant_schedule(peak),
         optax.linear_schedule(peak, end, decay)],
        [warmup, stable_end])


def decay_mask_fn(opt_cfg) -> Callable[[Any], Any]:
    """True where weight decay applies: the `decay` column of glm_jax.optim.labels.TABLE
    (norm gains, biases and the token embedding are exempt; the lm_head is a matmul and is
    decayed), with the exempt rows switched on by `decay_embeddings` /
    `decay_norms_and_biases`."""
    opt_in = tuple(name for name in ("embeddings", "norms_and_biases")
                   if opt_cfg[f"decay_{name}"])
    return lambda params: labels.decay_mask(params, opt_in)


def make_optimizer(opt_cfg, steps: int, params: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`params` (the placed nnx.Param state) lets Muon orthogonalize sharded weights where
    they live; AdamW ignores it."""
    schedule = make_schedule(opt_cfg, steps)
    mask = decay_mask_fn(opt_cfg)
    if opt_cfg.name == "adamw":
        tx = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                         weight_decay=opt_cfg.weight_decay, mask=mask)
    else:
        tx = muon(learning_rate=schedule, weight_decay=opt_cfg.weight_decay,
                  weight_decay_mask=mask, adam_b1=opt_cfg.b1, adam_b2=opt_cfg.b2,
                  adam_eps=opt_cfg.eps,
                  shardings=param_shardings(params) if params is not None else None,
                  **opt_cfg.muon.to_dict())
    if opt_cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt_cfg.clip_norm), tx)
    return tx, schedule
