"""GlmConfig: exact HF round trip in every RoPE spelling, configs/ files, clear validation."""

import copy
import importlib
import json
import warnings

import pytest
import transformers

from glm_jax import GlmConfig

GLM45_HUB = {  # the shape of zai-org/GLM-4.5's config.json (old rope spelling)
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 5120, "partial_rotary_factor": 0.5,
    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 131072,
    "model_type": "glm4_moe", "moe_intermediate_size": 1536, "norm_topk_prob": True,
    "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 160,
    "n_shared_experts": 1, "routed_scaling_factor": 2.5, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "num_hidden_layers": 92, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0", "use_cache": True, "use_qk_norm": True,
    "vocab_size": 151552,
}


def test_hub_config_round_trips_exactly_old_spelling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GLM45_HUB))
    config = GlmConfig.from_hf(tmp_path)
    assert config.rope_theta == 1e6 and config.rotary_dim == 64 and config.num_dense_layers == 3
    assert config.eos_token_id == (151329, 151336, 151338)
    hf = config.to_hf()
    assert "rope_parameters" not in hf
    assert hf == {k: v for k, v in GLM45_HUB.items() if k != "rope_scaling"} | {"rope_scaling": None}


def test_transformers_config_round_trips_exactly_new_spelling():
    hf = json.loads(transformers.Glm4MoeConfig(  # what save_pretrained writes to config.json
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        rope_parameters={"rope_theta": 1e6, "partial_rotary_factor": 0.5, "rope_type": "default"},
    ).to_json_string(use_diff=False))
    config = GlmConfig.from_hf(hf)
    assert config.to_hf() == hf
    assert GlmConfig.from_hf(config.to_hf()) == config
    # transformers reads our output back to the same values.
    again = transformers.Glm4MoeConfig(**config.to_hf())
    assert again.rope_parameters["rope_theta"] == 1e6 and again.head_dim == 32


@pytest.mark.parametrize("name", ["tiny", "bench", "glm4_5", "glm4_5_air"])
def test_configs_build(name):
    model = importlib.import_module(f"configs.{name}").get_config().model.to_dict()
    config = GlmConfig.from_dict(model)
    assert config.num_moe_layers > 0 and config.n_shared_experts == 1


def test_full_size_configs_match_the_reference_table():
    big = GlmConfig.from_dict(importlib.import_module("configs.glm4_5").get_config().model.to_dict())
    air = GlmConfig.from_dict(importlib.import_module("configs.glm4_5_air").get_config().model.to_dict())
    assert (big.num_hidden_layers, big.n_routed_experts, big.first_k_dense_replace) == (92, 160, 3)
    assert big.use_qk_norm and big.routed_scaling_factor == 2.5
    assert (air.num_hidden_layers, air.n_routed_experts, air.first_k_dense_replace) == (46, 128, 1)
    assert not air.use_qk_norm and air.routed_scaling_factor == 1.0


@pytest.mark.parametrize("change,field", [
    (dict(num_attention_heads=12, num_key_value_heads=5), "num_attention_heads"),
    (dict(n_routed_experts=10, n_group=4), "n_routed_experts"),
    (dict(n_group=2, topk_group=3), "topk_group"),
    (dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(head_dim=36, partial_rotary_factor=0.25), "partial_rotary_factor"),
    (dict(head_dim=30, partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(moe_backend="megablox"), "moe_backend"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_validation_names_the_field(change, field):
    with pytest.raises(ValueError, match=rf"GlmConfig\.{field}="):
        GlmConfig(**change)


def test_unknown_rope_type_and_unknown_field_are_refused():
    with pytest.raises(ValueError, match="rope_type"):
        GlmConfig.from_hf({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}})
    with pytest.raises(ValueError, match="num_expert"):
        GlmConfig.from_dict({"num_expert": 4})


# Every way a config.json can spell the RoPE settings, with what transformers 5 reads from
# it on head_dim 16: (rotary width, theta). The first three are mixes glm-jax once misread
# (width 8 / theta 1e6); "absent" is transformers' own default theta, 10000.
ROPE_SPELLINGS = {
    "dict_theta_top_factor": ({"rope_parameters": {"rope_type": "default", "rope_theta": 5000},
                               "partial_rotary_factor": 0.25}, (4, 5000.0)),
    "dict_factor_top_theta": ({"rope_parameters": {"rope_type": "default",
                                                   "partial_rotary_factor": 0.25},
                               "rope_theta": 5000}, (4, 5000.0)),
    "pre5_scaling_type_top": ({"rope_scaling": {"type": "default"}, "rope_theta": 5000,
                               "partial_rotary_factor": 0.25}, (4, 5000.0)),
    "top_level": ({"rope_theta": 5000, "partial_rotary_factor": 0.25}, (4, 5000.0)),
    "top_level_null_scaling": ({"rope_theta": 5000, "partial_rotary_factor": 0.25,
                                "rope_scaling": None}, (4, 5000.0)),
    "null_parameters_top": ({"rope_parameters": None, "rope_theta": 5000,
                             "partial_rotary_factor": 0.25}, (4, 5000.0)),
    "dict_full": ({"rope_parameters": {"rope_type": "default", "rope_theta": 5000,
                                       "partial_rotary_factor": 0.25}}, (4, 5000.0)),
    "dict_no_type": ({"rope_parameters": {"rope_theta": 5000}}, (8, 5000.0)),
    "pre5_scaling_full": ({"rope_scaling": {"rope_type": "default", "rope_theta": 5000,
                                            "partial_rotary_factor": 0.25}}, (4, 5000.0)),
    "empty_scaling_and_dict": ({"rope_scaling": {}, "rope_parameters": {
        "rope_type": "default", "rope_theta": 5000}}, (8, 5000.0)),
    "same_scaling_and_dict": ({"rope_scaling": {"rope_type": "default", "rope_theta": 5000},
                               "rope_parameters": {"rope_type": "default", "rope_theta": 5000}},
                              (8, 5000.0)),
    "dict_wins_over_top": ({"rope_parameters": {"rope_type": "default", "rope_theta": 5000,
                                                "partial_rotary_factor": 0.25},
                            "rope_theta": 7000, "partial_rotary_factor": 1.0}, (4, 5000.0)),
    "factor_only": ({"partial_rotary_factor": 0.25}, (4, 10000.0)),
    "dict_factor_only": ({"rope_parameters": {"rope_type": "default",
                                              "partial_rotary_factor": 0.25}}, (4, 10000.0)),
    "absent": ({}, (8, 10000.0)),
}
SMALL = {"model_type": "glm4_moe", "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16}
ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor")


def _transformers_rope(hf: dict) -> tuple[int, float]:
    ref = transformers.Glm4MoeConfig.from_dict(copy.deepcopy(hf))
    rope = ref.rope_parameters
    return int(ref.head_dim * rope["partial_rotary_factor"]), float(rope["rope_theta"])


IGNORED_TOP_LEVEL = "ignore:config .* is ignored:UserWarning"  # dict_wins_over_top, by design


@pytest.mark.filterwarnings(IGNORED_TOP_LEVEL)
@pytest.mark.parametrize("name", sorted(ROPE_SPELLINGS))
def test_rope_spelling_read_as_transformers_reads_it(name):
    spelling, expected = ROPE_SPELLINGS[name]
    hf = {**SMALL, **copy.deepcopy(spelling)}
    config = GlmConfig.from_hf(hf)
    assert (config.rotary_dim, config.rope_theta) == expected == _transformers_rope(hf)
    # Written back in the spelling read, and read back to the same values by both.
    out = config.to_hf()
    assert {k: out.get(k, "absent") for k in ROPE_KEYS} == {k: hf.get(k, "absent")
                                                             for k in ROPE_KEYS}
    assert _transformers_rope(out) == expected
    assert GlmConfig.from_hf(out) == config


@pytest.mark.filterwarnings(IGNORED_TOP_LEVEL)
@pytest.mark.parametrize("name", sorted(ROPE_SPELLINGS))
def test_changed_rope_values_are_written_where_they_are_read(name):
    config = GlmConfig.from_hf({**SMALL, **copy.deepcopy(ROPE_SPELLINGS[name][0])},
                               rope_theta=2000.0, partial_rotary_factor=0.5)
    assert _transformers_rope(config.to_hf()) == (8, 2000.0)
    assert GlmConfig.from_hf(config.to_hf()) == config


def test_ignored_top_level_rope_value_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GlmConfig.from_hf({**SMALL, **ROPE_SPELLINGS["dict_wins_over_top"][0]})
    assert sorted(str(w.message).split(" (")[0] for w in caught) == [
        "config partial_rotary_factor=1.0", "config rope_theta=7000"]


@pytest.mark.parametrize("rope,match", [
    # transformers would take rope_scaling and silently drop the newer rope_parameters.
    ({"rope_scaling": {"type": "default"},
      "rope_parameters": {"rope_type": "default", "rope_theta": 5000}}, "both rope_parameters"),
    ({"rope_parameters": {"rope_type": "default", "type": "yarn"}}, "type='yarn' and rope_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type='linear'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": None}}, "rope_theta is null"),
    ({"rope_theta": None}, "rope_theta is null"),
    ({"rope_parameters": {"rope_type": "default", "factor": 2.0}}, "does not use: \\['factor'\\]"),
    ({"rope_parameters": [1e6]}, "must be a dict"),
])
def test_unresolvable_rope_settings_are_refused(rope, match):
    with pytest.raises(ValueError, match=match):
        GlmConfig.from_hf({**SMALL, **rope})
