"""GlmConfig: every field of transformers' `glm4_moe` config plus glm-jax compute options.

The HF fields keep their HF names so that `config.json` maps one to one. `from_hf` /
`to_hf` round-trip exactly: unknown keys (architectures, transformers_version,
quantization_config, ...) are carried along verbatim, and the rope spelling
(`rope_parameters` dict, or the older top-level `rope_theta` / `partial_rotary_factor`)
is remembered so the written file looks like the one read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

# HF keys we model as fields, in the order HF writes them.
_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
    "tie_word_embeddings", "attention_bias", "attention_dropout",
    "moe_intermediate_size", "num_experts_per_tok", "n_shared_experts", "n_routed_experts",
    "routed_scaling_factor", "n_group", "topk_group", "first_k_dense_replace",
    "norm_topk_prob", "use_qk_norm", "bos_token_id", "eos_token_id", "pad_token_id",
    "num_nextn_predict_layers",
)
# Keys that HF accepts as aliases of ours.
_HF_ALIASES = {"num_mtp_layers": "num_nextn_predict_layers", "num_local_experts": "n_routed_experts"}

MoeBackend = Literal["ragged_dot", "buckets", "dense"]
AttentionBackend = Literal["einsum", "dot_product_attention"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]


def _freeze(value: Any) -> Any:
    """Lists become tuples so the config stays hashable (it is a static jit argument)."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class GlmConfig:
    # ---- glm4_moe fields (HF names and defaults of GLM-4.5-Air, as transformers) ----
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 10944
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    partial_rotary_factor: float = 0.5
    attention_bias: bool = False
    attention_dropout: float = 0.0
    moe_intermediate_size: int = 1408
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_routed_experts: int = 128
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    use_qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    num_nextn_predict_layers: int = 1

    # ---- glm-jax compute options (never written to config.json) ----
    dtype: str = "float32"  # activation / compute dtype
    param_dtype: str = "float32"
    moe_backend: MoeBackend = "buckets"
    # None = dropless. A float C gives each expert ceil(C * tokens * top_k / experts) slots;
    # overflow is dropped deterministically (later tokens first) and counted.
    capacity_factor: float | None = None
    attention_backend: AttentionBackend = "einsum"
    remat_policy: RematPolicy = "none"

    # ---- round-trip bookkeeping (not part of the architecture) ----
    hf_rope_spelling: Literal["rope_parameters", "top_level"] = dataclasses.field(
        default="rope_parameters", compare=False)
    hf_extra: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False)
    hf_null_fields: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    def __post_init__(self):
        object.__setattr__(self, "eos_token_id", _freeze(self.eos_token_id))
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def num_dense_layers(self) -> int:
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def num_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    def replace(self, **changes: Any) -> "GlmConfig":
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"GlmConfig.{field}={getattr(self, field)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "moe_intermediate_size",
                     "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "must be a positive integer")
        for name in ("num_hidden_layers", "first_k_dense_replace", "n_shared_experts",
                     "num_nextn_predict_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                fail(name, "must be a non-negative integer")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_attention_heads",
                 f"must be divisible by num_key_value_heads={self.num_key_value_heads}")
        if self.n_routed_experts % self.n_group:
            fail("n_routed_experts", f"must be divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            fail("topk_group", f"cannot exceed n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            fail("n_group", "group scores sum each group's top-2, so every group needs >= 2 experts")
        if self.num_experts_per_tok > self.topk_group * per_group:
            fail("num_experts_per_tok",
                 f"exceeds the {self.topk_group * per_group} experts of the "
                 f"topk_group={self.topk_group} selected groups")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            fail("partial_rotary_factor", "must be in (0, 1]")
        if self.head_dim * self.partial_rotary_factor != self.rotary_dim or self.rotary_dim % 2:
            fail("partial_rotary_factor",
                 f"head_dim * partial_rotary_factor = {self.head_dim * self.partial_rotary_factor} "
                 "must be an even integer (the rotary width)")
        if self.hidden_act != "silu":
            fail("hidden_act", "only 'silu' (SwiGLU) is used by glm4_moe")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be positive")
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "must be positive")
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", "GLM-4.5 has an untied lm_head; tied heads are not supported")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            fail("dtype", "must be float32, bfloat16 or float16")
        if self.param_dtype not in ("float32", "bfloat16", "float16"):
            fail("param_dtype", "must be float32, bfloat16 or float16")
        if self.moe_backend not in ("ragged_dot", "buckets", "dense"):
            fail("moe_backend", "must be 'ragged_dot', 'buckets' or 'dense'")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            fail("capacity_factor", "must be positive, or None for dropless")
        if self.attention_backend not in ("einsum", "dot_product_attention"):
            fail("attention_backend", "must be 'einsum' or 'dot_product_attention'")
        if self.remat_policy not in ("none", "full", "dots", "dots_no_batch"):
            fail("remat_policy", "must be one of none, full, dots, dots_no_batch")

    # ---------------------------------------------------------------- HF <-> us
    @classmethod
    def from_hf(cls, source: dict | str | os.PathLike, **overrides: Any) -> "GlmConfig":
        """Build from a HF `config.json` dict, the file, or the folder holding it. `overrides`
        set any field (compute options such as moe_backend, or an architecture field)."""
        if not isinstance(source, dict):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no HF config at {path}")
            with open(path) as f:
                source = json.load(f)
        hf = dict(source)
        if hf.get("model_type", "glm4_moe") != "glm4_moe":
            raise ValueError(f"config model_type={hf['model_type']!r}: expected 'glm4_moe'")
        for alias, name in _HF_ALIASES.items():
            if alias in hf:
                value = hf.pop(alias)
                hf.setdefault(name, value)

        fields: dict[str, Any] = {}
        for name in _HF_FIELDS:
            if name in hf:
                fields[name] = _freeze(hf.pop(name))
        if fields.get("head_dim") is None:
            fields["head_dim"] = fields.get("hidden_size", cls.hidden_size) // fields.get(
                "num_attention_heads", cls.num_attention_heads)

        null_fields = tuple(k for k in fields if fields[k] is None)
        rope = hf.pop("rope_parameters", None)
        if rope is None and hf.get("rope_scaling") is not None:  # the pre-5.0 spelling
            rope = hf.pop("rope_scaling")
        if rope is not None:
            spelling = "rope_parameters"
            rope = dict(rope)
            rope_type = rope.pop("rope_type", rope.pop("type", "default"))
            if rope_type != "default":
                raise ValueError(f"config rope_parameters.rope_type={rope_type!r}: only 'default' "
                                 "RoPE is used by GLM-4.5")
            # Keys inside rope_parameters win over stray top-level copies.
            hf.pop("rope_theta", None)
            hf.pop("partial_rotary_factor", None)
        else:
            spelling = "top_level"
            rope = {}
            for key in ("rope_theta", "partial_rotary_factor"):
                if key in hf:
                    rope[key] = hf.pop(key)
        if "rope_theta" in rope:
            fields["rope_theta"] = float(rope.pop("rope_theta"))
        if "partial_rotary_factor" in rope:
            fields["partial_rotary_factor"] = float(rope.pop("partial_rotary_factor"))
        if rope:
            raise ValueError(f"config rope_parameters has keys GLM-4.5 does not use: {sorted(rope)}")

        extra = tuple((k, json.dumps(v)) for k, v in hf.items())
        return cls(**{**fields, **overrides}, hf_rope_spelling=spelling, hf_extra=extra,
                   hf_null_fields=null_fields)

    def to_hf(self) -> dict:
        """The `config.json` dict: every glm4_moe field, plus what `from_hf` carried along."""
        out: dict[str, Any] = {k: json.loads(v) for k, v in self.hf_extra}
        out.setdefault("model_type", "glm4_moe")
        out.setdefault("architectures", ["Glm4MoeForCausalLM"])
        for name in _HF_FIELDS:
            value = getattr(self, name)
            if value is None and name not in self.hf_null_fields:
                continue  # unset optional ids are left out, unless the source spelled them null
            out[name] = list(value) if isinstance(value, tuple) else value
        if self.hf_rope_spelling == "rope_parameters":
            out["rope_parameters"] = {"rope_theta": self.rope_theta,
                                      "partial_rotary_factor": self.partial_rotary_factor,
                                      "rope_type": "default"}
        else:
            out["rope_theta"] = self.rope_theta
            out["partial_rotary_factor"] = self.partial_rotary_factor
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "GlmConfig":
        """From a plain dict of our own field names (e.g. an ml_collections ConfigDict)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GlmConfig field(s): {unknown}")
        return cls(**{k: _freeze(v) for k, v in values.items()})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.name.startswith("hf_")}
