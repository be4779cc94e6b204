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

`DistillationLoss` is the same loss in the trainer's loss protocol (glm_jax.train.loss):
`make_trainer(cfg, mesh, DistillationLoss(...))`, with the teachers' logits added to each
batch by `glm_jax.sft.teachers.Teachers` (the training loop's `batch_transform`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from glm_jax.train.loss import Batch, Metrics, NextTokenLoss, shifted_targets


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


@dataclasses.dataclass(frozen=True)
class DistillationLoss:
    """`distillation_loss` as a trainer loss, optionally mixed with the masked next-token
    loss: total = (1 - ce_weight) * KL + ce_weight * CE + mtp_loss_weight * MTP +
    z_loss_weight * z, where KL is the weighted mean over (teacher, token) pairs above and
    CE / MTP / z are `NextTokenLoss`'s terms (the teachers' logits are their main head's,
    so the MTP depths keep learning from the data's tokens).

    Batch layout (leading axis = rows, so micro-batches split them with the rows):
      teacher_logits [B, K, T, V] float: teacher k's logits at each position (any float
        dtype; the KL runs in float32); V must be the student's vocabulary.
      teacher_mask [B, K] (optional; default all ones): 1 where row b is distilled from
        teacher k, e.g. to route each domain's records to its specialist.
    A (teacher, token) pair counts where the token's next-token target is valid (same
    document, and marked by `loss_mask` when the batch has one) and the row's teacher_mask
    is set. `prepare` turns those pairs into weights normalized over the whole batch:
    `distill_weights` [B, K, T] (over all pairs: the loss) and `teacher_weights` [B, K, T]
    (over each teacher's pairs: the metric kl/teacher_k).

    Metrics: NextTokenLoss's (ce, mtp_loss, z_loss, valid_tokens) plus kl, kl/teacher_k
    and distilled_tokens (the number of (teacher, token) pairs). Raises ValueError for a
    temperature <= 0 or a ce_weight outside [0, 1]."""

    temperature: float = 1.0
    ce_weight: float = 0.0
    mtp_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    mtp_depths: int = 0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"DistillationLoss temperature={self.temperature!r}: must be > 0")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"DistillationLoss ce_weight={self.ce_weight!r}: must be in "
                             "[0, 1] (0 = distillation only, 1 = next-token loss only)")

    @property
    def next_token(self) -> NextTokenLoss:
        return NextTokenLoss(self.mtp_loss_weight, self.z_loss_weight, self.mtp_depths)

    def prepare(self, batch: Batch) -> Batch:
        if "teacher_logits" not in batch:
            raise ValueError("DistillationLoss: the batch has no 'teacher_logits' [B, K, T, V] "
                             "(add them with glm_jax.sft.teachers.Teachers)")
        batch = self.next_token.prepare(batch)
        rows, teachers = batch["teacher_logits"].shape[:2]
        valid = shifted_targets(batch["tokens"], batch["segment_ids"], 1,
                                batch.get("loss_mask"))[1].astype(jnp.float32)
        mask = batch.get("teacher_mask", jnp.ones((rows, teachers), jnp.float32))
        pairs = valid[:, None, :] * mask.astype(jnp.float32)[:, :, None]  # [B, K, T]
        per_teacher = pairs.sum(axis=(0, 2))
        return dict(batch, distill_weights=pairs / jnp.maximum(pairs.sum(), 1.0),
                    teacher_weights=pairs / jnp.maximum(per_teacher, 1.0)[None, :, None])

    def __call__(self, out: Any, batch: Batch) -> tuple[jax.Array, Metrics]:
        _, metrics = self.next_token(out, batch)
        teacher_logits = jax.lax.stop_gradient(batch["teacher_logits"])
        w, per_teacher = batch["distill_weights"], batch["teacher_weights"]
        kl = jnp.zeros((), jnp.float32)
        for k in range(teacher_logits.shape[1]):
            kl_k = token_kl(out.logits, teacher_logits[:, k], temperature=self.temperature)
            kl = kl + (kl_k * w[:, k]).sum()
            metrics[f"kl/teacher_{k}"] = (kl_k * per_teacher[:, k]).sum()
        total = ((1.0 - self.ce_weight) * kl + self.ce_weight * metrics["ce"]
                 + self.mtp_loss_weight * metrics["mtp_loss"]
                 + self.z_loss_weight * metrics["z_loss"])
        return total, {**metrics, "kl": kl,
                       "distilled_tokens": (w > 0).sum().astype(jnp.float32)}
