"""The rl config section's checks (`python -m glm_jax.rl` runs them before anything
compiles): every field named in a one-line ConfigError."""

from __future__ import annotations

import os

import ml_collections

from glm_jax.cli_errors import ConfigError
from glm_jax.rl import levels as levels_mod
from glm_jax.rl import rewards as rewards_mod
from glm_jax.rl.curriculum import Curriculum
from glm_jax.rl.objective import AdaptiveClip
from glm_jax.rl.roles import check_roles
from glm_jax.rl.rollout_weights import check_config as check_rollout_weights
from glm_jax.rl.temperature import PlateauTemperature


def check(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The rl section's checks (loop.validate checks the rest). Returns the level names.
    Raises ConfigError naming the field."""
    r = cfg.rl

    def fail(field: str, why: str):
        raise ConfigError(f"config.rl.{field}={r[field]!r}: {why}")

    try:
        names = levels_mod.parse_levels(r.levels)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in ("prompts_per_step", "samples_per_prompt", "max_new_tokens",
                 "over_sampling_prompts", "updates_per_rollout"):
        if not isinstance(r[name], int) or r[name] < 1:
            fail(name, "must be a positive integer")
    if r.samples_per_prompt < 2:
        fail("samples_per_prompt", "group-relative advantages need >= 2 samples per prompt")
    if not isinstance(r.max_extra_prompts, int) or r.max_extra_prompts < 0:
        fail("max_extra_prompts", "must be >= 0 (0 = no refill)")
    if not isinstance(r.eval_every, int) or r.eval_every < 0:
        fail("eval_every", "must be >= 0 (0 = no held-out evaluation)")
    if not isinstance(r.eval_prompts, int) or r.eval_prompts < 1:
        fail("eval_prompts", "must be a positive integer")
    if not isinstance(r.eval_samples, int) or r.eval_samples < 0:
        fail("eval_samples", "must be >= 0 (0 = greedy only)")
    if not r.eval_temperature > 0:
        fail("eval_temperature", "must be > 0 (the greedy evaluation always runs)")
    if r.chat_mode not in ("thinking", "non_thinking"):
        fail("chat_mode", "must be 'thinking' or 'non_thinking'")
    check_roles(r)
    if r.reward not in rewards_mod.BUILTIN_REWARDS:
        fail("reward", f"choose from {sorted(rewards_mod.BUILTIN_REWARDS)}")
    if r.speculative not in ("none", "mtp"):
        fail("speculative", "must be 'none' or 'mtp'")
    if r.loss_agg not in ("token", "sequence"):
        fail("loss_agg", "must be 'token' or 'sequence'")
    if r.tis_cap < 0:
        fail("tis_cap", "must be >= 0 (0 = off)")
    check_rollout_weights(r)
    if r.kl_coef != 0:
        fail("kl_coef", "only 0: the run keeps no reference policy to take the KL to")
    rows = r.prompts_per_step * r.samples_per_prompt
    if cfg.train.batch_size != rows:
        raise ConfigError(f"config.train.batch_size={cfg.train.batch_size}: the RL batch is "
                          f"rl.prompts_per_step x rl.samples_per_prompt = {rows} rows; set "
                          f"--config.train.batch_size={rows}")
    if rows % r.updates_per_rollout:
        fail("updates_per_rollout", f"must divide the batch's {rows} rows")
    try:
        Curriculum(len(names), r.curriculum_threshold, r.curriculum_window,
                   r.curriculum_min_attempts)
        PlateauTemperature(r.temperature, r.max_temperature, r.temperature_step,
                           r.temperature_patience, r.temperature_min_delta)
        AdaptiveClip(r.clip_band_low, r.clip_band_high, r.clip_factor, r.eps_min, r.eps_max)
    except ValueError as e:
        raise ConfigError(f"config.rl: {e}") from None
    if r.tokenizer and not os.path.isfile(r.tokenizer):
        fail("tokenizer", "no such file (a hub tokenizer.json, or '' for the byte-level default)")
    return names
