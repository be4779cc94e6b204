"""The "bench" shape of docs (cpu-baselines): the anchor transformers is measured on.
231M parameters, 53.5M active matmul parameters, batch 4 x 1024 tokens, float32."""

import ml_collections

from configs.training import add_training_sections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        vocab_size=16384,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=6,
        first_k_dense_replace=1,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        partial_rotary_factor=0.5,
        rope_theta=1_000_000.0,
        max_position_embeddings=4096,
        attention_bias=True,
        use_qk_norm=True,
        moe_intermediate_size=256,
        n_routed_experts=64,
        num_experts_per_tok=8,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=0,
        dtype="float32",
        param_dtype="float32",
        moe_backend="buckets",
        capacity_factor=None,
        attention_backend="einsum",
        remat_policy="none",
    ))
    add_training_sections(config, steps=20, batch_size=4, seq_len=1024, learning_rate=1e-3,
                          warmup_steps=2, checkpoint_every=0, log_every=1)
    return config

