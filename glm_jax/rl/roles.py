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
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from glm_jax.cli_errors import ConfigError
from glm_jax.model.transformer import GlmForCausalLM
from glm_jax.train import run_config
from glm_jax.train.trainer import Trainer, TrainState
from sharding import rules

PrepareRolloutModel = Callable[[GlmForCausalLM], GlmForCausalLM]


def check_roles(r: ml_collections.ConfigDict) -> None:
    """The rl section's role and mode fields (configs/rl_tiny.py documents them).
    Raises ConfigError naming the field."""

    def fail(field: str, why: str):
        raise ConfigError(f"config.rl.{field}={r[field]!r}: {why}")

    if r.mode not in ("sync", "async"):
        fail("mode", "must be 'sync' (rollout and training take turns) or 'async'")
    for name in ("weight_sync_every", "rollout_chunk_tokens", "queue_size"):
        if not isinstance(r[name], int) or r[name] < 1:
            fail(name, "must be a positive integer")
    if not isinstance(r.rollout_devices, int) or r.rollout_devices < 0:
        fail("rollout_devices", "must be >= 0 (0 = colocated with the trainer)")
    if r.rollout_devices == 0 and r.weight_sync_every != 1:
        fail("weight_sync_every", "colocated (rl.rollout_devices=0), the rollout uses the "
             "trainer's own arrays, which every step replaces: must be 1")
    if r.mode == "async" and r.rollout_devices == 0:
        fail("rollout_devices", "async mode needs the rollout on its own devices: set "
             "--config.rl.rollout_devices=N (e.g. half of them)")
    if not isinstance(r.max_staleness, int) or r.max_staleness < 0:
        fail("max_staleness", "must be an integer >= 0")
    if r.mode == "async" and r.max_staleness < 1:
        fail("max_staleness", "async mode trains on batches drawn while the previous update "
             "ran, 1 version old at least: must be >= 1")
    rollout_mesh_axes(r.rollout_mesh, None)


def rollout_mesh_axes(spec: str, devices: list | None) -> dict[str, int]:
    """rl.rollout_mesh parsed (and resolved over `devices`); errors name that field."""
    try:
        return run_config.mesh_axes(spec, devices)
    except ConfigError as e:
        raise ConfigError(str(e).replace("config.train.mesh", "config.rl.rollout_mesh", 1)
                          ) from None


def split_devices(devices: Sequence, rollout_devices: int) -> tuple[list, list]:
    """(trainer devices, rollout devices): of every process's devices, the last
    rollout_devices / processes generate and the others train (one process: the last
    `rollout_devices` generate); rollout_devices=0 gives both roles all devices
    (colocated). Every process holds devices of both roles, so the weights move between
    them by copies inside each process (see ReshardedWeights).
    Raises ValueError unless 0 <= rollout_devices < len(devices), split evenly over the
    processes."""
    devices = list(devices)
    if not 0 <= rollout_devices < len(devices):
        raise ValueError(f"rollout_devices={rollout_devices}: must be 0 (colocated) or leave "
                         f"the trainer at least one of the {len(devices)} devices")
    if rollout_devices == 0:
        return devices, devices
    processes = sorted({d.process_index for d in devices})
    if rollout_devices % len(processes):
        raise ValueError(f"rollout_devices={rollout_devices}: must split evenly over the "
                         f"{len(processes)} processes")
    per_process = rollout_devices // len(processes)
    trainer, rollout = [], []
    for p in processes:
        mine = [d for d in devices if d.process_index == p]
        if per_process >= len(mine):
            raise ValueError(f"rollout_devices={rollout_devices}: leaves process {p} no "
                             "trainer device")
        trainer += mine[:len(mine) - per_process]
        rollout += mine[len(mine) - per_process:]
    return trainer, rollout


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
    so a published version is whole when a rollout reads it.

    Several processes (jax.distributed): JAX's device_put refuses a reshard between
    different device sets that span processes ("For a cross-host reshard in
    multi-controller JAX, input and target sharding should have the same set of devices"),
    so the move takes two legal steps: a reshard inside the trainer's devices to the
    rollout layout on a twin of the rollout mesh (each rollout device's twin a trainer
    device of the same process), then a copy of every shard to its rollout device inside
    its process. That needs as many trainer as rollout devices in every process."""

    def __init__(self, trainer: Trainer, rollout_mesh: jax.sharding.Mesh,
                 prepare_rollout_model: PrepareRolloutModel | None = None):
        super().__init__(trainer, prepare_rollout_model)
        self.mesh = rollout_mesh
        abstract = trainer.abstract_state
        self._param_shardings = rules.state_shardings(abstract.params, rollout_mesh)
        self._bias_shardings = rules.state_shardings(abstract.biases, rollout_mesh)
        self._twin = None
        if jax.process_count() > 1:
            self._twin = _twin_devices(rollout_mesh, trainer.mesh)

    def _move(self, tree, shardings):
        if self._twin is None:
            return jax.device_put(tree, shardings)
        twin_mesh, to_rollout = self._twin

        def move(x: jax.Array, target: NamedSharding) -> jax.Array:
            staged = jax.device_put(x, NamedSharding(twin_mesh, target.spec))
            by_device = {to_rollout[s.device]: jax.device_put(s.data, to_rollout[s.device])
                         for s in staged.addressable_shards}
            return jax.make_array_from_single_device_arrays(
                x.shape, target, [by_device[d] for d in target.addressable_devices])

        return jax.tree.map(move, tree, shardings)

    def publish(self, state: TrainState, version: int) -> None:
        params = self._move(state.params, self._param_shardings)
        biases = self._move(state.biases, self._bias_shardings)
        jax.block_until_ready((params, biases))
        model = rules.bind_mesh(nnx.merge(self.trainer.graphdef, params, biases), self.mesh)
        if self.prepare is not None:
            model = self.prepare(model)
        with self._lock:
            self._model, self._version = model, version



def _twin_devices(rollout_mesh: Mesh, trainer_mesh: Mesh) -> tuple[Mesh, dict]:
    """(a mesh of the rollout mesh's shape over the trainer's devices, in which each device
    is in the process of the rollout device at its place; twin device -> rollout device).
    Raises ValueError unless every process has as many trainer as rollout devices."""
    spare: dict[int, list] = {}
    for d in trainer_mesh.devices.flat:
        spare.setdefault(d.process_index, []).append(d)
    counts = {p: len(v) for p, v in spare.items()}
    need: dict[int, int] = {}
    for d in rollout_mesh.devices.flat:
        need[d.process_index] = need.get(d.process_index, 0) + 1
    if counts != need:
        raise ValueError(f"trainer devices per process {counts} and rollout devices per "
                         f"process {need} differ; moving weights between processes needs "
                         "them equal")
    twin = np.empty(rollout_mesh.devices.shape, dtype=object)
    to_rollout = {}
    for idx, d in np.ndenumerate(rollout_mesh.devices):
        t = spare[d.process_index].pop(0)
        twin[idx] = t
        to_rollout[t] = d
    return Mesh(twin, rollout_mesh.axis_names, axis_types=rollout_mesh.axis_types), to_rollout
