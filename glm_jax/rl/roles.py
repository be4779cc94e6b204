"""Roles on meshes: which devices train, which generate, and how the weights get from one
to the other.

Colocated (rl.rollout_devices=0): the rollout engine generates with the trainer's own
arrays on the trainer's mesh (`ColocatedWeights`, no copy).

Disaggregated (rl.rollout_devices=R > 0): the last R devices form the rollout mesh
(rl.rollout_mesh's axes), the others the trainer's (train.mesh's axes). Publishing a
weight version reshards the trainer's parameters onto the rollout mesh with
`jax.device_put` to the NamedShardings the sharding rules give the rollout mesh (the way
Tunix moves weights between its roles' meshes): XLA copies each shard device to device,
there is no serialization and no RPC of our own. The copy lives on devices the trainer
never touches, so the trainer may donate and overwrite its state while the rollout still
generates with the copy (the asynchronous mode relies on that).

Both classes expose `latest() -> (model, version)`; `publish` is called by the trainer
side, `latest` by the rollout side (any thread: a lock guards the pair).

`prepare_rollout_model` is the seam for a rollout copy that differs from the trainer's
(e.g. quantized to FP8): a callable applied to every published model on the rollout mesh,
returning the model the rollout engine generates with.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import jax
from flax import nnx

from glm_jax.model.transformer import GlmForCausalLM
from glm_jax.train.trainer import Trainer, TrainState
from sharding import rules

PrepareRolloutModel = Callable[[GlmForCausalLM], GlmForCausalLM]


def split_devices(devices: Sequence, rollout_devices: int) -> tuple[list, list]:
    """(trainer devices, rollout devices): the last `rollout_devices` of `devices` generate,
    the rest train; rollout_devices=0 gives both roles all devices (colocated).
    Raises ValueError unless 0 <= rollout_devices < len(devices)."""
    devices = list(devices)
    if not 0 <= rollout_devices < len(devices):
        raise ValueError(f"rollout_devices={rollout_devices}: must be 0 (colocated) or leave "
                         f"the trainer at least one of the {len(devices)} devices")
    if rollout_devices == 0:
        return devices, devices
    cut = len(devices) - rollout_devices
    return devices[:cut], devices[cut:]


class ColocatedWeights:
    """The colocated hand-off: the rollout generates with the trainer's own arrays (no
    copy). A train step donates the state it is given, so the model must be re-published
    after every update before the next rollout (weight_sync_every must be 1)."""

    def __init__(self, trainer: Trainer,
                 prepare_rollout_model: PrepareRolloutModel | None = None):
        self.trainer = trainer
        self.prepare = prepare_rollout_model
        self.mesh = trainer.mesh
        self._lock = threading.Lock()
        self._model: GlmForCausalLM | None = None
        self._version = -1

    def publish(self, state: TrainState, version: int) -> None:
        model = self.trainer.model(state)
        if self.prepare is not None:
            model = self.prepare(model)
        with self._lock:
            self._model, self._version = model, version

    def latest(self) -> tuple[GlmForCausalLM, int]:
        with self._lock:
            return self._model, self._version

    @property
    def version(self) -> int:
        return self.latest()[1]


class ReshardedWeights(ColocatedWeights):
    """The disaggregated hand-off: `publish` reshards the trainer's parameters and router
    biases onto `rollout_mesh` (the NamedShardings sharding.rules gives that mesh) and binds
    the model to it, so generate runs there. The copy is independent of the trainer's
    buffers: the trainer keeps donating its state. publish blocks until the copy is done,
    so a published version is whole when a rollout reads it."""

    def __init__(self, trainer: Trainer, rollout_mesh: jax.sharding.Mesh,
                 prepare_rollout_model: PrepareRolloutModel | None = None):
        super().__init__(trainer, prepare_rollout_model)
        self.mesh = rollout_mesh
        abstract = trainer.abstract_state
        self._param_shardings = rules.state_shardings(abstract.params, rollout_mesh)
        self._bias_shardings = rules.state_shardings(abstract.biases, rollout_mesh)

    def publish(self, state: TrainState, version: int) -> None:
        params = jax.device_put(state.params, self._param_shardings)
        biases = jax.device_put(state.biases, self._bias_shardings)
        jax.block_until_ready((params, biases))
        model = rules.bind_mesh(nnx.merge(self.trainer.graphdef, params, biases), self.mesh)
        if self.prepare is not None:
            model = self.prepare(model)
        with self._lock:
            self._model, self._version = model, version

