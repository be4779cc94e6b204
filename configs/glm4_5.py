"""GLM-4.5 (355B total, 32B active), as zai-org/GLM-4.5's config.json. bfloat16 compute,
float32 parameters; ragged_dot experts for GPU/TPU."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=151552,
        hidden_size=5120,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_hidden_layers=92,
        num_attention_heads=96,
        num_key_value_heads=8,
        head_dim=128,
        partial_rotary_factor=0.5,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        n_routed_experts=160,
        n_shared_experts=1,
        num_experts_per_tok=8,
        first_k_dense_replace=3,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        use_qk_norm=True,
        attention_bias=True,
        tie_word_embeddings=False,
        num_nextn_predict_layers=1,
        pad_token_id=151329,
        eos_token_id=(151329, 151336, 151338),
        dtype="bfloat16",
        param_dtype="float32",
        moe_backend="ragged_dot",
        capacity_factor=None,
        attention_backend="dot_product_attention",
        remat_policy="full",
    ))
    return config
