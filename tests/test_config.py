"""GlmConfig: exact HF round trip in both rope spellings, configs/ files, clear validation."""

import importlib
import json

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
