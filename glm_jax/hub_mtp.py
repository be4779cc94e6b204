"""Hub folders without their MTP layer, and fresh MTP weights for them.

GLM-4.5 checkpoints on the hub store the multi-token-prediction layer at index
`num_hidden_layers`, and their config.json says `num_nextn_predict_layers: 1`. transformers'
`Glm4MoeForCausalLM` has no MTP module, so a folder written by its `save_pretrained` keeps
that config line but leaves the layer's tensors out. Such a folder converts in one of two
ways, chosen by the user:

  * "drop": without MTP; the output config says `num_nextn_predict_layers: 0`;
  * "init": with a freshly initialised MTP layer (to train it), drawn as `GlmForCausalLM`
    initialises a new model: normal(0, initializer_range) matrices, unit norm scales,
    zero biases and router correction bias. The values are generated a converter unit at
    a time from a seeded numpy generator, so memory stays bounded for the full-size models
    (the same distribution as jax's initialisers, not the same draws).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from glm_jax.config import GlmConfig

MISSING_MTP_CHOICES = ("drop", "init")


def mtp_prefixes(config: GlmConfig) -> list[str]:
    return [f"model.layers.{config.num_hidden_layers + d}."
            for d in range(config.num_mtp_layers)]


def mtp_missing(tensor_names: Iterable[str], config: GlmConfig) -> bool:
    """True when the config has MTP layers but no tensor of any of them is present."""
    prefixes = tuple(mtp_prefixes(config))
    return bool(prefixes) and not any(n.startswith(prefixes) for n in tensor_names)


def missing_mtp_message(folder: object, config: GlmConfig) -> str:
    return (f"{folder}: config.json has num_nextn_predict_layers="
            f"{config.num_nextn_predict_layers} but no {mtp_prefixes(config)[0]}* tensors "
            "(transformers' save_pretrained leaves the MTP layer out); pass --drop-mtp to "
            "convert without it (num_nextn_predict_layers 0), or --init-mtp to initialise a "
            "fresh MTP layer for training")


def is_mtp_leaf(path: tuple) -> bool:
    return path[0] == "mtp_layers"


def fresh_block(path: tuple, shape: tuple[int, ...], dtype: np.dtype, config: GlmConfig,
                seed: int, leaf_index: int, start: tuple[int, ...]) -> np.ndarray:
    """One block of a freshly initialised leaf at `path` (see the module docstring).
    Deterministic in (seed, leaf_index, start)."""
    name = path[-1]
    if name == "scale":
        return np.ones(shape, dtype)
    if name in ("bias", "correction_bias"):
        return np.zeros(shape, dtype)
    rng = np.random.default_rng([seed, leaf_index, *start])
    value = rng.standard_normal(shape, dtype=np.float32) * np.float32(config.initializer_range)
    return value.astype(dtype, copy=False)
