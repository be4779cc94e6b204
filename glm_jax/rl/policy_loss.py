"""The RL objective as a trainer loss: `make_trainer(cfg, mesh, PolicyGradientLoss())`.

It follows the training core's loss protocol (glm_jax.train.loss): `prepare(batch)` runs
once on the whole global batch and turns the loss mask into per-token weights normalized
over it; `__call__(out, batch)` returns a weighted sum, so the trainer may split the rows
into micro-batches and add the parts.

The batch (rows = prompt + completion, one sample per row; every [B, T] array is aligned
with `tokens`, position t describing token t):
  tokens        [B, T] int32
  loss_mask     [B, T] nonzero on the completion tokens trained on (0 on the prompt,
                padding, and groups the dynamic-sampling filter dropped)
  advantages    [B] float32, one per sample (objective.group_advantages, flattened)
  old_logprobs  [B, T] float32: log p(token t | tokens < t) under the policy that sampled
  temperature   [B] float32 (optional): the row's sampling temperature; the logits are
                divided by it before the log-softmax, so the trainer's log-probabilities
                are of the distribution the rollout sampled from (without it: 1)
  optional: rollout_logprobs [B, T] (the rollout engine's, for truncated importance
  sampling), ref_logprobs [B, T] (reference policy, for the KL term), eps_low / eps_high [B]
  (this step's clip range, e.g. from objective.AdaptiveClip, repeated per row so that it
  splits with the rows; without them the loss's own values apply), segment_ids, positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp

from glm_jax.generate import scale_by_temperature
from glm_jax.rl import objective

Batch = dict[str, jax.Array]


def token_logprobs(logits: jax.Array, tokens: jax.Array,
                   temperature: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(log p(token t | tokens < t), entropy of that prediction), both [B, T] float32 and
    aligned with `tokens`; position 0 (nothing predicts it) holds 0.
    logits: [B, T, V], position t predicting token t + 1 (the model's output).
    temperature: [B] (optional): p = softmax(logits / temperature of the row), the
    distribution a sampler at that temperature draws from (temperature 0, greedy: 1)."""
    logits = logits[:, :-1].astype(jnp.float32)
    if temperature is not None:
        logits = scale_by_temperature(logits, temperature)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    entropy = -(jnp.exp(logp) * logp).sum(axis=-1)
    pad = jnp.zeros((tokens.shape[0], 1), jnp.float32)
    return jnp.concatenate([pad, picked], axis=1), jnp.concatenate([pad, entropy], axis=1)


@dataclasses.dataclass(frozen=True)
class PolicyGradientLoss:
    """objective.policy_gradient_loss on the model's output; see the module doc for the batch.

    eps_low, eps_high: the clip range when the batch does not carry one.
    loss_agg: "token" (DAPO) or "sequence" (GRPO) normalization (objective.token_loss_weights).
    tis_cap: truncated importance sampling against batch["rollout_logprobs"]; None = off.
    kl_coef: weight of the k3 KL to batch["ref_logprobs"]; 0 = off (default).
    """

    eps_low: float = 0.2
    eps_high: float = 0.28
    loss_agg: Literal["token", "sequence"] = "token"
    tis_cap: float | None = None
    kl_coef: float = 0.0

    def prepare(self, batch: Batch) -> Batch:
        """Adds `loss_weights` [B, T], normalized over this (whole) batch. Raises KeyError
        naming a missing batch field."""
        for key in ("tokens", "loss_mask", "advantages", "old_logprobs"):
            if key not in batch:
                raise KeyError(f"PolicyGradientLoss needs batch[{key!r}]; see glm_jax.rl."
                               "policy_loss for the batch layout")
        # Nothing predicts the first token. As bool, so any mask dtype (bool, int, float) works.
        mask = (batch["loss_mask"] != 0).at[:, 0].set(False)
        return dict(batch, loss_weights=objective.token_loss_weights(mask, self.loss_agg))

    def __call__(self, out: Any, batch: Batch) -> tuple[jax.Array, objective.Metrics]:
        logprobs, entropy = token_logprobs(out.logits, batch["tokens"],
                                           batch.get("temperature"))

        def per_row(key, default):  # [B] -> [B, 1], broadcasting over tokens
            return batch[key][:, None] if key in batch else default

        return objective.policy_gradient_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], batch["loss_weights"],
            eps_low=per_row("eps_low", self.eps_low), eps_high=per_row("eps_high", self.eps_high),
            rollout_logprobs=batch.get("rollout_logprobs"), tis_cap=self.tis_cap,
            ref_logprobs=batch.get("ref_logprobs"), kl_coef=self.kl_coef, entropy=entropy)
