"""The rollout engine's copy of the policy, in the precision it samples with
(`config.rl.rollout_dtype`), made from the trainer's state at every weight update.

    weights = RolloutWeights(trainer, "fp8", fp8_layout="channel")
    model = weights.model(state)      # after each update; the rollout generates with it

rollout_dtype:
  model     the trainer's own arrays and compute dtype, no copy (the colocated default)
  float32   weights and activations in float32
  bfloat16  weights and activations in bfloat16 (the hub's bf16 checkpoints; what
            slime's rollout engine gets from a bf16 Megatron trainer)
  fp8       the Linear weights glm_jax.fp8.is_quantized_weight selects in float8_e4m3fn
            with `fp8_layout` scales ("channel": GLM-4.5-FP8's per-output-row
            `weight_scale`; "block": 128 x 128 `weight_scale_inv`), quantized from the
            trainer's weights at every update; the rest of the weights and the
            activations in bfloat16 (glm_jax.model.fp8_weights)

Training is unchanged: the trainer's weights, compute dtype and its recomputed
log-probabilities stay as configured; the gap between the rollout's and the trainer's
log-probabilities is what truncated importance sampling (`rl.tis_cap`) corrects.
Routers keep float32 routing scores in every precision (glm_jax.model.moe.router_scores),
and the correction biases stay float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from glm_jax import fp8
from glm_jax.cli_errors import ConfigError
from glm_jax.model import fp8_weights
from glm_jax.model.params import RouterBias
from glm_jax.model.transformer import GlmForCausalLM
from glm_jax.train.trainer import Trainer, TrainState
from sharding import rules

ROLLOUT_DTYPES = ("model", "float32", "bfloat16", "fp8")
# The weights and activations of each rollout dtype ("fp8": of what is not quantized).
_COMPUTE_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "fp8": "bfloat16"}


def check_config(rl: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming config.rl.rollout_dtype / rollout_fp8_layout when invalid."""
    if rl.rollout_dtype not in ROLLOUT_DTYPES:
        raise ConfigError(f"config.rl.rollout_dtype={rl.rollout_dtype!r}: choose from "
                          f"{', '.join(ROLLOUT_DTYPES)}")
    if rl.rollout_fp8_layout not in fp8.LAYOUTS:
        raise ConfigError(f"config.rl.rollout_fp8_layout={rl.rollout_fp8_layout!r}: choose "
                          f"from {', '.join(fp8.LAYOUTS)}")


class RolloutWeights:
    """Makes the rollout's model from a TrainState in `rollout_dtype` (see the module doc).

    compute_dtype: with "fp8", the dtype of the unquantized weights and of the activations
    (default bfloat16; float32 isolates the FP8 weights' own error in measurements).
    The copy lives on the trainer's mesh with the trainer's shardings (colocated); it is a
    new set of arrays, so the trainer may donate its state afterwards. Raises ValueError for
    an unknown rollout_dtype or fp8_layout."""

    def __init__(self, trainer: Trainer, rollout_dtype: str = "model", *,
                 fp8_layout: str = "channel", compute_dtype: str | None = None):
        if rollout_dtype not in ROLLOUT_DTYPES:
            raise ValueError(f"rollout_dtype={rollout_dtype!r}: choose from {ROLLOUT_DTYPES}")
        if fp8_layout not in fp8.LAYOUTS:
            raise ValueError(f"fp8_layout={fp8_layout!r}: choose from {tuple(fp8.LAYOUTS)}")
        self.trainer, self.rollout_dtype = trainer, rollout_dtype
        cfg = trainer.config
        dtype = compute_dtype or _COMPUTE_DTYPE.get(rollout_dtype, cfg.dtype)
        self.compute_dtype = dtype
        if rollout_dtype == "model" or (rollout_dtype != "fp8" and cfg.dtype == dtype
                                        and cfg.param_dtype == dtype):
            self._convert = None  # the trainer's arrays as they are
            return
        config = cfg.replace(dtype=dtype, param_dtype=dtype)
        # The graph of a model built in the rollout's dtype: layers read their compute
        # dtype from it (the weights are merged in below).
        self.graphdef = nnx.split(nnx.eval_shape(lambda: GlmForCausalLM(
            config, rngs=nnx.Rngs(0), mesh=trainer.mesh)), nnx.Param, RouterBias)[0]
        layout = fp8.LAYOUTS[fp8_layout] if rollout_dtype == "fp8" else None

        def convert(params: nnx.State, biases: nnx.State) -> tuple[nnx.State, nnx.State]:
            if layout is not None:  # from the trainer's weights, before any cast
                params = fp8_weights.quantize_state(params, cfg, layout, dtype)
            params = jax.tree.map(
                lambda x: x if isinstance(x, fp8_weights.Fp8Weight) else x.astype(dtype),
                params, is_leaf=lambda x: isinstance(x, fp8_weights.Fp8Weight))
            return params, biases  # biases: a copy, so the trainer may donate its own

        self._convert = jax.jit(convert)

    def model(self, state: TrainState) -> GlmForCausalLM:
        """The rollout's model holding `state`'s weights in the rollout precision."""
        return self.prepare(self.trainer.model(state))

    def prepare(self, model: GlmForCausalLM) -> GlmForCausalLM:
        """`model` in the rollout precision, on the mesh it is on (the trainer's, or a
        rollout mesh its weights were resharded to) with its shardings: the weight
        publishers' `prepare_rollout_model` (glm_jax.rl.roles)."""
        if self._convert is None:
            return model
        mesh = model.mesh if model.mesh is not None else self.trainer.mesh
        _, params, biases = nnx.split(model, nnx.Param, RouterBias)
        with jax.set_mesh(mesh):
            params, biases = self._convert(params, biases)
        return rules.bind_mesh(nnx.merge(self.graphdef, params, biases), mesh)


def param_bytes(model: GlmForCausalLM) -> int:
    """Bytes of a model's parameters as stored (e4m3 codes 1 byte, plus their scales)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
