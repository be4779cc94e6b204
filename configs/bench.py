"""The "bench" shape of docs (cpu-baselines): the anchor transformers is measured on.
231M parameters, 53.5M active matmul parameters, batch 4 x 1024 tokens, float32."""

import ml_collections


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
    config.batch_size = 4
    config.seq_len = 1024
    _training_sections(config, steps=20, batch_size=4, seq_len=1024, learning_rate=1e-3,
                       warmup_steps=2, checkpoint_every=0, log_every=1)
    return config


def _training_sections(config: ml_collections.ConfigDict, *, steps: int, batch_size: int,
                       seq_len: int, learning_rate: float, warmup_steps: int,
                       checkpoint_every: int, log_every: int) -> None:
    """train / optimizer / data / checkpoint: the loop's sections (glm_jax.train)."""
    config.init_from = ""  # an orbax checkpoint of converted weights (params item)
    config.train = ml_collections.ConfigDict(dict(
        steps=steps,
        batch_size=batch_size,  # global, in rows of seq_len tokens
        seq_len=seq_len,
        seed=0,  # model init
        log_every=log_every,
        mtp_loss_weight=0.3,  # GLM-4.5: 0.3, later 0.1
        z_loss_weight=0.0,
        bias_update_rate=1e-3,  # aux-loss-free balancing (DeepSeek-V3: 1e-3)
        seq_aux_loss_weight=0.0,
        peak_flops=0.0,  # per device, for MFU; 0 = measure a float32 matmul at start-up
        mesh="data=-1",  # sharding.mesh spelling, e.g. "fsdp=4,expert=2"
    ))
    config.optimizer = ml_collections.ConfigDict(dict(
        name="adamw",  # or "muon" (glm_jax.optim.muon; AdamW for embed/head/norms/router)
        learning_rate=learning_rate,
        schedule="cosine",  # "cosine" (warmup + cosine), "wsd" (warmup-stable-decay), "constant"
        warmup_steps=warmup_steps,
        min_lr_ratio=0.1,
        decay_fraction=0.2,  # wsd: the share of steps spent decaying
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        decay_embeddings=False,
        decay_norms_and_biases=False,
        clip_norm=1.0,  # global-norm clipping; 0 = off
        muon=ml_collections.ConfigDict(dict(beta=0.95, ns_steps=5, consistent_rms=0.2)),
    ))
    config.data = ml_collections.ConfigDict(dict(
        path="",  # a folder from `python -m glm_jax.train.data prepare`; "" = stdlib source
        max_bytes=0,  # embedded default: cap on text bytes read (0 = all)
        seed=0,  # shuffle
        num_workers=0,  # grain worker processes (0 = read in the training process)
        worker_buffer_size=2,
    ))
    config.checkpoint = ml_collections.ConfigDict(dict(
        every=checkpoint_every,  # steps between (asynchronous) saves; 0 = only at the end
        keep=3,
        async_save=True,
    ))
