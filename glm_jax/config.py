"""GlmConfig: every field of transformers' `glm4_moe` config plus glm-jax compute options.

The HF fields keep their HF names so that `config.json` maps one to one. `from_hf` /
`to_hf` round-trip exactly: unknown keys (architectures, transformers_version,
quantization_config, ...) are carried along verbatim, and the RoPE keys are kept as read
(`rope_parameters`, the pre-5.0 `rope_scaling`, top-level `rope_theta` /
`partial_rotary_factor`, or a mix) so the written file looks like the one read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Literal, get_args

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
# Every config.json key that carries RoPE settings, in any transformers version.
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor")
# What transformers uses when a RoPE value is spelled nowhere: `default_theta` of its RoPE
# mixin (not GLM-4.5's 1e6) and the partial_rotary_factor that Glm4MoeConfig sets itself.
_HF_DEFAULT_ROPE = {"rope_theta": 10_000.0, "partial_rotary_factor": 0.5}

MoeBackend = Literal["ragged_dot", "buckets", "dense"]
AttentionBackend = Literal["einsum", "dot_product_attention"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch", "save_qkv_residual",
                      "save_kv_residual"]


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
    # The RoPE keys of the config.json read, as JSON (None: not read from one).
    hf_rope_source: str | None = dataclasses.field(default=None, compare=False)
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
        if self.remat_policy not in get_args(RematPolicy):
            fail("remat_policy", "must be one of " + ", ".join(get_args(RematPolicy)))

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
        rope_source = {k: hf.pop(k) for k in _ROPE_KEYS if k in hf}
        fields.update(_resolve_rope(rope_source))

        extra = tuple((k, json.dumps(v)) for k, v in hf.items())
        return cls(**{**fields, **overrides}, hf_rope_source=json.dumps(rope_source),
                   hf_extra=extra, hf_null_fields=null_fields)

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
        out.update(self._rope_to_hf())
        return out

    def _rope_to_hf(self) -> dict:
        """The RoPE keys as read (or a `rope_parameters` dict); a value changed since then is
        written at every place that spelled it, so no stale copy can win on reading."""
        if self.hf_rope_source is None:
            return {"rope_parameters": {"rope_theta": self.rope_theta,
                                        "partial_rotary_factor": self.partial_rotary_factor,
                                        "rope_type": "default"}}
        source = json.loads(self.hf_rope_source)
        read = _resolve_rope(source, warn=False)
        rope = source.get("rope_scaling") or source.get("rope_parameters")
        for key, value in (("rope_theta", self.rope_theta),
                           ("partial_rotary_factor", self.partial_rotary_factor)):
            if value == read[key]:
                continue
            places = [d for d in (source.get("rope_parameters"), source.get("rope_scaling"), source)
                      if isinstance(d, dict) and key in d]
            for place in places or [rope if rope else source]:
                place[key] = value
        return source

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


def _resolve_rope(source: dict, *, warn: bool = True) -> dict[str, float]:
    """rope_theta and partial_rotary_factor from a config.json's RoPE keys, read as
    transformers 5 reads them (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict and
    Glm4MoeConfig.__post_init__):
    - the RoPE dict is `rope_scaling` (pre-5.0 name) if non-empty, else `rope_parameters`;
    - a value inside the dict wins over the top-level key of the same name, which wins over
      the default (rope_theta 10000, partial_rotary_factor 0.5);
    - the dict's `rope_type` wins over its older `type`.
    Raises ValueError on what cannot be resolved: a `rope_scaling` and a `rope_parameters`
    that differ (transformers would silently drop the newer one), `type` and `rope_type`
    that differ, a RoPE type other than default, unknown dict keys, a null value."""
    scaling, params = source.get("rope_scaling"), source.get("rope_parameters")
    for name, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"config {name}={value!r}: must be a dict or null")
    if scaling and params and scaling != params:
        raise ValueError(f"config has both rope_parameters={params} and the older "
                         f"rope_scaling={scaling}, and they differ; keep only rope_parameters")
    rope = dict(scaling or params or {})
    name = "rope_scaling" if scaling else "rope_parameters"
    if "type" in rope and "rope_type" in rope and rope["type"] != rope["rope_type"]:
        raise ValueError(f"config {name} has type={rope['type']!r} and rope_type="
                         f"{rope['rope_type']!r}; keep only rope_type")
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config {name}.rope_type={rope_type!r}: only 'default' RoPE is used "
                         "by GLM-4.5")
    out = {}
    for key, default in _HF_DEFAULT_ROPE.items():
        if key in rope:
            value = rope.pop(key)
            if warn and key in source and source[key] != value:
                warnings.warn(f"config {key}={source[key]} (top level) is ignored: {name}.{key}="
                              f"{value} takes precedence, as in transformers", stacklevel=3)
        else:
            value = source.get(key, default)
        if value is None:
            raise ValueError(f"config {key} is null; give a number or leave the key out")
        out[key] = float(value)
    if rope:
        raise ValueError(f"config {name} has keys GLM-4.5 does not use: {sorted(rope)}")
    return out
