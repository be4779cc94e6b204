"""Teacher models for distillation: load one or more checkpoints on the student's mesh and
add their logits to each training batch (the training loop's `batch_transform`).

    teachers = Teachers(["runs/math", "runs/tools"], mesh, vocab_size=student_vocab)
    batch = teachers(batch)  # + teacher_logits [B, K, T, V] float32, rows sharded like tokens

The teachers run one jitted forward (all K models in one program) on the batch the student
trains on, before the student's step. It is deterministic (no dropout, no sampling), so a
resumed run sees the same teacher logits and resumes exactly.

Memory: the batch holds B * T * V float32 values per teacher, sharded over the batch axes
(configs/sft_tiny.py: 4 x 1024 x 320 x 4 B = 5 MB per teacher). At hub sizes that is what
does not fit: GLM-4.5's vocabulary of 151,552 on a batch of 10^6 tokens is 606 GB
per teacher. A hub-size run would keep each teacher's top-k logits per position (k ~ 64:
values and ids, 0.5 KB per token) and compute the KL over those, or run the teacher
forward inside the step per micro-batch and drop its logits after the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax.checkpoint_source import ResolvedCheckpoint, resolve_checkpoint
from glm_jax.cli_errors import ConfigError
from glm_jax.train.loss import Batch
from sharding import rules


def check_teachers(paths: Sequence[str], vocab_size: int, *,
                   what: str = "config.sft.teachers") -> list[ResolvedCheckpoint]:
    """Resolve every teacher checkpoint (reads only their stored configs) and check its
    vocabulary is the student's: the KL compares distributions over the same token ids.
    Raises CheckpointPathError for a path that is not a checkpoint, ConfigError for a
    vocabulary mismatch or no path at all; each message names the checkpoint."""
    if not paths:
        raise ConfigError(f"{what}: no teacher checkpoint given")
    sources = []
    for path in paths:
        source = resolve_checkpoint(path, what=what)
        if source.config.vocab_size != vocab_size:
            raise ConfigError(
                f"{what}: teacher {path} has vocab_size={source.config.vocab_size} but the "
                f"student has vocab_size={vocab_size}; distillation needs the same "
                "vocabulary (use a teacher trained with the student's tokenizer)")
        sources.append(source)
    return sources


class Teachers:
    """K teacher models on `mesh`, called on a batch to add `teacher_logits` [B, K, T, V]
    float32 (K in the order of `paths`; the layout `DistillationLoss` reads).

    paths: checkpoints as glm_jax.checkpoint_source accepts them (a train.py workdir, a step
    folder, or a converted hub checkpoint). vocab_size: the student's. compute_options:
    GlmConfig compute fields for every teacher (dtype, moe_backend, ...; default: each
    checkpoint's own). Raises as `check_teachers` does, before any weight is read."""

    def __init__(self, paths: Sequence[str], mesh: jax.sharding.Mesh, *, vocab_size: int,
                 what: str = "config.sft.teachers", **compute_options: Any):
        from glm_jax.convert import load_checkpoint

        self.sources = check_teachers(paths, vocab_size, what=what)
        self.paths = tuple(paths)
        self.mesh = mesh
        graphdefs, states = [], []
        for source in self.sources:
            graphdef, state = nnx.split(load_checkpoint(source.path, mesh, **compute_options))
            graphdefs.append(graphdef)
            states.append(state)
        self.states = tuple(states)
        batch_sharding = rules.batch_sharding(mesh)

        # Only the main head's logits leave the program, so XLA drops a teacher's MTP
        # layers from it (their outputs are unused).
        def forward(states, tokens, positions, segment_ids):
            logits = []
            for graphdef, state in zip(graphdefs, states):
                out = nnx.merge(graphdef, state)(tokens, positions=positions,
                                                 segment_ids=segment_ids)
                logits.append(out.logits.astype(jnp.float32))
            return jnp.stack(logits, axis=1)

        self._forward = jax.jit(forward, out_shardings=batch_sharding)

    def __len__(self) -> int:
        return len(self.paths)

    def __call__(self, batch: Batch) -> Batch:
        """`batch` (tokens, and positions / segment_ids when packed) plus teacher_logits."""
        # Under the mesh, as the train step: the MoE's expert-parallel exchange and the
        # activation constraints read it.
        with jax.set_mesh(self.mesh):
            logits = self._forward(self.states, batch["tokens"], batch.get("positions"),
                                   batch.get("segment_ids"))
        return dict(batch, teacher_logits=logits)
