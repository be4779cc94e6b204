"""The one table between hub tensor names and glm-jax parameter paths.

`leaf_map(config)` yields, for every leaf of the model's state, the hub tensors it is made
of: `names` is an object array shaped like the leaf's stacking axes ([] for a plain tensor,
[layers] for a layer stack, [layers, experts] for stacked experts), and `transpose` says
whether the hub stores the matrix as [out, in] (every Linear weight). The Python API and
the converter both read this table, so the mapping is written once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from glm_jax.config import GlmConfig

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class LeafMap:
    path: Path  # key path in nnx.to_pure_dict(nnx.state(model))
    names: np.ndarray  # hub tensor names, shape = the leaf's stacking axes
    transpose: bool  # hub stores [out, in]; we store [in, out]


# (our path inside a decoder layer, hub suffix, transpose)
_ATTENTION = [
    (("input_norm", "scale"), "input_layernorm.weight", False),
    (("post_attn_norm", "scale"), "post_attention_layernorm.weight", False),
    (("attn", "o_proj", "kernel"), "self_attn.o_proj.weight", True),
]
_ATTENTION_BIAS = [(("attn", f"{p}_proj", "bias"), f"self_attn.{p}_proj.bias", False) for p in "qkv"]
_ATTENTION_KERNEL = [(("attn", f"{p}_proj", "kernel"), f"self_attn.{p}_proj.weight", True)
                     for p in "qkv"]
_QK_NORM = [(("attn", f"{p}_norm", "scale"), f"self_attn.{p}_norm.weight", False) for p in "qk"]
_DENSE_MLP = [(("mlp", f"{p}_proj", "kernel"), f"mlp.{p}_proj.weight", True)
              for p in ("gate", "up", "down")]
_ROUTER = [
    (("mlp", "router_kernel"), "mlp.gate.weight", True),
    (("mlp", "correction_bias"), "mlp.gate.e_score_correction_bias", False),
]
_SHARED_EXPERT = [(("mlp", "shared_experts", f"{p}_proj", "kernel"),
                   f"mlp.shared_experts.{p}_proj.weight", True) for p in ("gate", "up", "down")]
# Routed experts: stacked [E, ...] in one leaf, one hub tensor per expert.
_EXPERTS = [(("mlp", f"w_{p}"), p + "_proj.weight", True) for p in ("gate", "up", "down")]
_MTP_EXTRA = [
    (("embed_norm", "scale"), "enorm.weight", False),
    (("hidden_norm", "scale"), "hnorm.weight", False),
    (("eh_proj", "kernel"), "eh_proj.weight", True),
    (("final_norm", "scale"), "shared_head.norm.weight", False),
]

# Copies of the main embedding and head that GLM-4.5 / Air store inside the MTP layer
# (GLM-4.6 dropped them). Checked equal to the main tensors, never duplicated.
MTP_SHARED_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight",
                     "shared_head.head.weight": "lm_head.weight"}
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _layer_entries(config: GlmConfig, moe: bool) -> list[tuple[Path, str, bool]]:
    entries = _ATTENTION + _ATTENTION_KERNEL
    if config.attention_bias:
        entries = entries + _ATTENTION_BIAS
    if config.use_qk_norm:
        entries = entries + _QK_NORM
    if not moe:
        return entries + _DENSE_MLP
    entries = entries + _ROUTER
    if config.n_shared_experts:
        entries = entries + _SHARED_EXPERT
    return entries


def _names(fmt: str, *dims: range) -> np.ndarray:
    out = np.empty(tuple(len(d) for d in dims), dtype=object)
    for idx in np.ndindex(out.shape):
        out[idx] = fmt.format(*(d[i] for d, i in zip(dims, idx)))
    return out


def _stack(prefix: Path, layers: range, config: GlmConfig, moe: bool) -> Iterator[LeafMap]:
    for sub, suffix, transpose in _layer_entries(config, moe):
        yield LeafMap(prefix + sub, _names("model.layers.{}." + suffix, layers), transpose)
    if moe:
        experts = range(config.n_routed_experts)
        for sub, suffix, transpose in _EXPERTS:
            yield LeafMap(prefix + sub, _names("model.layers.{}.mlp.experts.{}." + suffix,
                                               layers, experts), transpose)


def leaf_map(config: GlmConfig) -> list[LeafMap]:
    """Every leaf of the model's state and the hub tensors it holds."""
    scalar = lambda name: np.array(name, dtype=object)  # noqa: E731
    out = [
        LeafMap(("embed",), scalar("model.embed_tokens.weight"), False),
        LeafMap(("final_norm", "scale"), scalar("model.norm.weight"), False),
    ]
    if not config.tie_word_embeddings:  # tied: the head is the embedding, no tensor of its own
        out.append(LeafMap(("lm_head", "kernel"), scalar(HEAD), True))
    nd, nl = config.num_dense_layers, config.num_hidden_layers
    out += _stack(("dense_layers", "layers"), range(0, nd), config, moe=False) if nd else []
    out += _stack(("moe_layers", "layers"), range(nd, nl), config, moe=True) if nl > nd else []
    for depth in range(config.num_mtp_layers):
        layer = nl + depth
        for sub, suffix, transpose in _MTP_EXTRA:
            out.append(LeafMap(("mtp_layers", depth) + sub,
                               scalar(f"model.layers.{layer}.{suffix}"), transpose))
        for leaf in _stack(("mtp_layers", depth, "block"), range(layer, layer + 1), config, True):
            # A single layer: drop the stacking axis of length 1.
            out.append(dataclasses.replace(leaf, names=leaf.names[0, ...]))
    return out


def head_name(config: GlmConfig) -> str:
    """The hub tensor that holds the output head: the embedding when tied."""
    return EMBED if config.tie_word_embeddings else HEAD


def mtp_copy_names(config: GlmConfig) -> dict[str, str]:
    """Hub names of the MTP layers' embedding / head copies -> the main tensor they copy."""
    main = {"embed_tokens.weight": EMBED, "shared_head.head.weight": head_name(config)}
    return {f"model.layers.{config.num_hidden_layers + d}.{k}": main[k]
            for d in range(config.num_mtp_layers) for k in MTP_SHARED_COPIES}


def tied_copy_names(config: GlmConfig) -> dict[str, str]:
    """With tie_word_embeddings, `lm_head.weight` is an optional copy of the embedding:
    transformers' save_pretrained leaves it out, other writers keep it. Read when present
    (it must equal the embedding), never written."""
    return {HEAD: EMBED} if config.tie_word_embeddings else {}
