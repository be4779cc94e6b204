"""In-memory conversion between a hub-layout state dict and a GlmForCausalLM.

`from_hf_state_dict` / `to_hf_state_dict` are the public API; the streaming converter
(convert.py) uses the same table, `hf_names.leaf_map`, a leaf at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax.config import GlmConfig
from glm_jax.hf_names import LeafMap, leaf_map, mtp_copy_names, tied_copy_names
from glm_jax.model.transformer import GlmForCausalLM

# Cast to float32, not to an asked-for lower dtype: the router's choices are sensitive to
# rounding. Without a dtype they keep the hub's dtype (the router computes in float32).
_FLOAT32_LEAVES = ("router_kernel", "correction_bias")


def abstract_model(config: GlmConfig) -> GlmForCausalLM:
    """The model with shapes and dtypes only; nothing is allocated."""
    return nnx.eval_shape(lambda: GlmForCausalLM(config, rngs=nnx.Rngs(0)))


def get_path(tree: Mapping, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def hf_shape(leaf: LeafMap, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of each hub tensor that makes up a leaf of shape `our_shape`."""
    inner = our_shape[leaf.names.ndim:]
    return tuple(reversed(inner)) if leaf.transpose else tuple(inner)


def leaf_from_hf(leaf: LeafMap, tensors: Mapping[str, np.ndarray],
                 expected: tuple[int, ...]) -> np.ndarray:
    """Stack the hub tensors of one leaf into our layout, checking each one's shape."""
    want = hf_shape(leaf, expected)
    parts = []
    for name in leaf.names.reshape(-1):
        if name not in tensors:
            raise KeyError(f"missing tensor {name!r} (needed for parameter {'.'.join(map(str, leaf.path))})")
        t = np.asarray(tensors[name])
        if t.shape != want:
            raise ValueError(f"tensor {name!r} has shape {list(t.shape)}, expected {list(want)}")
        parts.append(t.T if leaf.transpose else t)
    if leaf.names.ndim == 0:
        return parts[0]
    return np.stack(parts).reshape(expected)


def leaf_to_hf(leaf: LeafMap, value: np.ndarray) -> dict[str, np.ndarray]:
    """Split one leaf back into hub tensors (contiguous [out, in] copies)."""
    out = {}
    for idx in np.ndindex(leaf.names.shape):
        t = value[idx]
        out[leaf.names[idx]] = np.ascontiguousarray(t.T if leaf.transpose else t)
    return out


def check_copies(tensors: Mapping[str, np.ndarray], config: GlmConfig) -> set[str]:
    """The MTP layer's embedding / head copies, and a tied model's `lm_head.weight`, must
    equal the tensor they copy. Returns the names of those present."""
    # transformers unties a differing head with a warning; here the config is the truth.
    kinds = ((mtp_copy_names(config), "glm-jax shares one embedding and head between the main "
              "model and MTP"),
             (tied_copy_names(config), "config.json has tie_word_embeddings=true; set it "
              "to false to load an untied head"))
    seen = set()
    for copies, why in kinds:
        for copy, main in copies.items():
            if copy not in tensors:
                continue
            if main in tensors and not np.array_equal(np.asarray(tensors[copy]),
                                                      np.asarray(tensors[main])):
                raise ValueError(f"tensor {copy!r} differs from {main!r}; {why}")
            seen.add(copy)
    return seen


def from_hf_state_dict(state_dict: Mapping[str, np.ndarray], config: GlmConfig, *,
                       dtype: str | None = None, mesh: jax.sharding.Mesh | None = None
                       ) -> GlmForCausalLM:
    """Build the model from hub-layout tensors (per-expert, MTP at layer num_hidden_layers).

    dtype None keeps each tensor's dtype, the router's included (a bit-exact round trip:
    `to_hf_state_dict` gives back every tensor in its source dtype); otherwise floating
    tensors are cast to `dtype`, except the router weight and correction bias (float32).
    With a mesh, every parameter is placed by the logical-axis rules of `sharding.rules`."""
    model = abstract_model(config)
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    leaves = leaf_map(config)
    used = check_copies(state_dict, config)
    for leaf in leaves:
        expected = tuple(get_path(pure, leaf.path).shape)
        value = leaf_from_hf(leaf, state_dict, expected)
        if dtype is not None:
            value = value.astype(np.float32 if leaf.path[-1] in _FLOAT32_LEAVES
                                 else jnp.dtype(dtype))
        set_path(pure, leaf.path, value)
        used.update(leaf.names.reshape(-1))
    unexpected = sorted(set(state_dict) - used)
    if unexpected:
        raise KeyError(f"unexpected tensor(s) not used by the glm4_moe config: {unexpected[:10]}"
                       + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    model = nnx.merge(graphdef, state)
    if mesh is not None:
        from sharding.rules import shard_model
        model = shard_model(model, mesh)
    return model


def to_hf_state_dict(model: GlmForCausalLM) -> dict[str, np.ndarray]:
    """The inverse of `from_hf_state_dict`: hub names, [out, in] weights, per-expert tensors,
    the MTP layer at index num_hidden_layers (without the embedding / head copies); with
    tie_word_embeddings no `lm_head.weight`, as transformers' save_pretrained."""
    pure = nnx.to_pure_dict(nnx.state(model))
    out: dict[str, np.ndarray] = {}
    for leaf in leaf_map(model.config):
        out.update(leaf_to_hf(leaf, np.asarray(jax.device_get(get_path(pure, leaf.path)))))
    return out
