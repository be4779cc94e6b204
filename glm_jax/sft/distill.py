"""Distillation: match a student's next-token distributions to one or more teachers'
(GLM-4.5's "expert distillation" merges specialist models back into one).

Per position the loss is the forward KL divergence from teacher to student,
KL(p_teacher || p_student) = sum_v p_t(v) (log p_t(v) - log p_s(v)), at a softmax temperature
T on both sides, scaled by T^2 so gradient magnitudes do not depend on T (Hinton et al.,
"Distilling the Knowledge in a Neural Network", 2015). Each teacher comes with its own
per-token weights (e.g. the assistant-token mask of the records in that teacher's domain);
the loss is the weighted mean over all (teacher, token) pairs. It is zero, with zero
gradient, exactly when the student's distributions equal the teachers' wherever a weight
is set.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def token_kl(student_logits: jax.Array, teacher_logits: jax.Array, *,
             temperature: float = 1.0) -> jax.Array:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2 per position: [B, T] float32
    from two [B, T, V] logit arrays (any float dtype; computed in float32)."""
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    return (jnp.exp(t) * (t - s)).sum(-1) * temperature ** 2


def distillation_loss(student_logits: jax.Array,
                      teachers: Sequence[tuple[jax.Array, jax.Array]], *,
                      temperature: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """student_logits [B, T, V]; teachers: (teacher_logits [B, T, V], weights [B, T]) pairs,
    the weights aligned with the logits (position t predicts token t + 1: use
    `glm_jax.train.loss.shifted_targets(tokens, segment_ids, 1, loss_mask)[1]`).
    Teacher logits get no gradient.
    Returns (sum of w * KL / sum of w, {"kl", "kl/teacher_k", "distilled_tokens"})."""
    if not teachers:
        raise ValueError("distillation_loss needs at least one (teacher_logits, weights) pair")
    total, count, metrics = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), {}
    for k, (logits, weights) in enumerate(teachers):
        w = weights.astype(jnp.float32)
        kl = (token_kl(student_logits, jax.lax.stop_gradient(logits), temperature=temperature)
              * w).sum()
        metrics[f"kl/teacher_{k}"] = kl / jnp.maximum(w.sum(), 1e-9)
        total, count = total + kl, count + w.sum()
    loss = total / jnp.maximum(count, 1e-9)
    return loss, {"kl": loss, "distilled_tokens": count, **metrics}
