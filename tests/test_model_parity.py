"""glm-jax equals transformers' Glm4MoeForCausalLM (and its MtpModel) in float32."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from glm_jax import from_hf_state_dict
from hf_reference import glm_config, hf_model, hf_mtp_model, hub_state_dict, mtp_hub_state_dict

ROPE = lambda factor: {"rope_parameters": {  # noqa: E731
    "rope_theta": 10000.0, "partial_rotary_factor": factor, "rope_type": "default"}}

# Together these cover every switch of the architecture (issue 2).
CONFIGS = {
    "glm45_like": dict(use_qk_norm=True, attention_bias=True, first_k_dense_replace=1,
                       routed_scaling_factor=2.5, **ROPE(0.5)),
    "air_like_no_qknorm": dict(use_qk_norm=False, attention_bias=True, first_k_dense_replace=2,
                               routed_scaling_factor=1.0, num_hidden_layers=4, **ROPE(0.5)),
    "groups_no_norm_topk": dict(n_group=4, topk_group=2, num_experts_per_tok=3,
                                norm_topk_prob=False, routed_scaling_factor=1.7,
                                first_k_dense_replace=0, attention_bias=False, **ROPE(1.0)),
    "full_rope_no_bias": dict(attention_bias=False, use_qk_norm=True, head_dim=16,
                              num_attention_heads=6, num_key_value_heads=3,
                              first_k_dense_replace=0, **ROPE(1.0)),
    "two_dense_groups": dict(n_group=2, topk_group=1, num_experts_per_tok=2,
                             first_k_dense_replace=2, num_hidden_layers=3, head_dim=24,
                             n_shared_experts=2, **ROPE(0.5)),
}


@nnx.jit
def _forward(model, ids):
    return model(ids)


def _ids(seed=0, batch=2, length=24, vocab=97):
    return np.random.RandomState(seed).randint(0, vocab, (batch, length))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_transformers(name):
    hf = hf_model(seed=len(name), **CONFIGS[name])
    ids = _ids(len(name))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    config = glm_config(hf, num_nextn_predict_layers=0)
    model = from_hf_state_dict(hub_state_dict(hf), config)
    out = _forward(model, jnp.asarray(ids))
    assert np.abs(np.asarray(out.logits) - ref).max() <= 1e-4
    # Every MoE layer routed every token to top_k experts.
    counts = np.asarray(out.expert_counts)
    assert counts.shape == (config.num_moe_layers, config.n_routed_experts)
    assert (counts.sum(-1) == ids.size * config.num_experts_per_tok).all()


def test_head_dim_differs_from_hidden_over_heads():
    hf = hf_model(0, **CONFIGS["full_rope_no_bias"])
    assert hf.config.head_dim * hf.config.num_attention_heads != hf.config.hidden_size


def test_mtp_logits_equal_transformers_mtp_model():
    hf = hf_model(seed=3, **CONFIGS["glm45_like"])
    mtp = hf_mtp_model(hf, seed=3)
    ids = _ids(3, length=20)
    rolled = np.roll(ids, -1, axis=1)  # depth 1 reads token i+1 at position i
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        main = hf(torch.tensor(ids), output_hidden_states=True)
        h = mtp.forward_layer(0, main.hidden_states[-1], positions, None,
                              input_ids=torch.tensor(rolled))
        ref = mtp._project_to_logits(h).numpy()

    config = glm_config(hf)
    state = {**hub_state_dict(hf), **mtp_hub_state_dict(mtp, config.num_hidden_layers)}
    model = from_hf_state_dict(state, config)
    out = _forward(model, jnp.asarray(ids))
    assert len(out.mtp_logits) == 1
    assert np.abs(np.asarray(out.logits) - main.logits.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(out.mtp_logits[0]) - ref).max() <= 1e-4
    assert np.asarray(out.mtp_expert_counts).sum() == ids.size * config.num_experts_per_tok


# The config.json RoPE mixes that glm-jax once misread (rotary width 8 instead of 4, theta
# 1e6 instead of 5000): logits off by up to 1.1. Real GLM-4.5 values equal the old defaults.
MIXED_ROPE = {
    "dict_theta_top_factor": {"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
                              "partial_rotary_factor": 0.25},
    "dict_factor_top_theta": {"rope_parameters": {"rope_type": "default",
                                                  "partial_rotary_factor": 0.25},
                              "rope_theta": 5000.0},
    "pre5_scaling_type_top": {"rope_parameters": None, "rope_scaling": {"type": "default"},
                              "rope_theta": 5000.0, "partial_rotary_factor": 0.25},
}


@pytest.mark.parametrize("name", sorted(MIXED_ROPE))
def test_mixed_rope_spellings_give_transformers_logits(name):
    from hf_reference import BASE

    from glm_jax import GlmConfig
    spelling = dict(MIXED_ROPE[name], head_dim=16, num_hidden_layers=2)
    hf = hf_model(seed=5, **spelling)
    ids = _ids(5, length=16)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    # Read from the config.json spelling itself, not transformers' standardized copy.
    config_json = {k: v for k, v in {**BASE, **spelling}.items() if v is not None}
    config = GlmConfig.from_hf(config_json, num_nextn_predict_layers=0)
    assert (config.rotary_dim, config.rope_theta) == (4, 5000.0)
    model = from_hf_state_dict(hub_state_dict(hf), config)
    assert np.abs(np.asarray(_forward(model, jnp.asarray(ids)).logits) - ref).max() <= 1e-4
