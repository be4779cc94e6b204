"""The training loop's config sections (train / optimizer / data / checkpoint), shared by
the configs that train: every field has its default here, each config sets the sizes."""

import ml_collections


def add_training_sections(config: ml_collections.ConfigDict, *, steps: int, batch_size: int,
                          seq_len: int, learning_rate: float, warmup_steps: int,
                          checkpoint_every: int, log_every: int,
                          eval_every: int | None = None) -> None:
    """train / optimizer / data / checkpoint: the loop's sections (glm_jax.train)."""
    config.init_from = ""  # an orbax checkpoint of converted weights (params item)
    config.train = ml_collections.ConfigDict(dict(
        steps=steps,
        batch_size=batch_size,  # global, in rows of seq_len tokens
        micro_batches=1,  # gradient accumulation: the step runs the batch in this many parts
        seq_len=seq_len,
        seed=0,  # model init
        log_every=log_every,
        # Held-out loss every this many steps on data.eval_fraction of the documents
        # (never trained on); 0 = no evaluation, and then every document is trained on.
        eval_every=checkpoint_every if eval_every is None else eval_every,
        eval_batches=4,
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
        eval_fraction=0.01,  # held out for evaluation (whole documents, the corpus's last)
        num_workers=0,  # grain worker processes (0 = read in the training process)
        worker_buffer_size=2,
    ))
    config.checkpoint = ml_collections.ConfigDict(dict(
        every=checkpoint_every,  # steps between (asynchronous) saves; 0 = only at the end
        keep=3,
        async_save=True,
        initial_save=False,  # also save the first step of a fresh run
    ))
