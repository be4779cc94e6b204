"""RL of the SFT demo model (configs/sft_tiny.py) on the embedded verifiable tasks:
`python -m glm_jax.rl [--config.init_from=runs/sft_tiny] [--workdir runs/rl_tiny]`.
A few minutes on a 2-core CPU (60 steps of 8 prompts x 8 samples; docs/benchmarks.md,
"RL (issue 16)"). Adam moves every weight by ~lr per step whatever the gradient's size, and a
64-sample gradient is mostly noise: 1e-3 collapsed a one-digit-addition policy's reward to ~0
within 15 steps, 3e-4 raised the SFT demo model's held-out greedy reward on add2 from 0.45
to 0.59-0.68 in 40 steps ("RL held-out reward, session 7"). The learning rate warms up over
10 steps. Every field is a flag (`--help` lists them)."""

import ml_collections

from configs import tiny
from configs.training import add_training_sections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = tiny.get_config().model  # replaced by init_from's model
    # steps are RL steps; batch_size = rl.prompts_per_step x rl.samples_per_prompt rows of
    # seq_len tokens (prompt + completion, right-padded).
    add_training_sections(config, steps=60, batch_size=64, seq_len=64, learning_rate=3e-4,
                          warmup_steps=10, checkpoint_every=10, log_every=1, eval_every=0)
    config.init_from = "runs/sft_tiny"  # `python -m glm_jax.sft`'s default workdir
    config.optimizer.weight_decay = 0.0
    config.optimizer.schedule = "constant"
    config.train.bias_update_rate = 0.0  # keep the SFT model's routing balance fixed
    config.rl = ml_collections.ConfigDict(dict(
        # Prompts: curriculum levels of glm_jax.rl.levels, easiest first.
        # A task of the SFT set with an optional operand digit cap (add2: two-digit addition,
        # what the SFT demo model was fine-tuned on; it answers no one-digit sum, a format it
        # never saw); "word" prompts need train.seq_len ~ 200.
        levels="add2,add3,add,sub2,mul1,sub,mul",
        chat_mode="non_thinking",  # "thinking" (reason in <think> first) or "non_thinking"
        # Roles (glm_jax.rl.roles, glm_jax.rl.async_rollout). mode: "sync" (rollout, then
        # training, in turns) or "async" (the rollout generates continuously in a
        # background thread on its own devices; needs rollout_devices > 0).
        mode="sync",
        rollout_devices=0,  # the last N devices generate, the rest train; 0 = colocated
        rollout_mesh="data=-1",  # the rollout mesh's axes over those N devices
        weight_sync_every=1,  # publish the weights to the rollout every k RL steps
        # (slime: --update-weights-interval); must be 1 colocated
        max_staleness=1,  # async: drop groups whose oldest token is > N versions old
        queue_size=1,  # async: batches the rollout may run ahead of the trainer
        rollout_chunk_tokens=16,  # async: tokens per chunk; new weights are picked up
        # between chunks (partial rollouts; glm_jax.rl.partial_rollout)
        tokenizer="",  # a hub tokenizer.json; "" = the byte-level default
        seed=0,  # prompts and sampling: a pure function of (seed, step, round)
        # Rollout.
        prompts_per_step=8,  # groups per batch (slime: rollout_batch_size)
        samples_per_prompt=8,  # G (slime: n_samples_per_prompt)
        max_new_tokens=32,  # non-thinking answers: ~20 tokens
        speculative="none",  # or "mtp"
        # Held-out evaluation (glm_jax.rl.evaluation): eval_prompts fixed prompts per level
        # answered greedily (eval/reward/<level>) and eval_samples times at eval_temperature
        # (eval/sampled_reward/<level>; 0 = greedy only), at the start, every eval_every
        # steps and at the end (0 = off).
        eval_every=10,
        eval_prompts=32,
        eval_samples=4,
        eval_temperature=1.0,
        # The rollout's weights: "model" (the trainer's, no copy), "float32", "bfloat16", or
        # "fp8" (e4m3 Linear weights, requantized at every update; glm_jax.rl.rollout_weights)
        rollout_dtype="model",
        rollout_fp8_layout="channel",  # FP8 scales: "channel" (per row) or "block" (128 x 128)
        # Dynamic sampling: refill rounds of over_sampling_prompts prompts while the batch
        # lacks groups with signal, at most max_extra_prompts extra prompts per step.
        over_sampling_prompts=8,
        max_extra_prompts=16,
        reward="exact_answer",  # or "unit_tests" (glm_jax.rl.rewards.BUILTIN_REWARDS)
        # Objective.
        normalize_std=True,  # GRPO's std-normalized advantages (False: Dr. GRPO)
        loss_agg="token",  # "token" (DAPO) or "sequence" (GRPO)
        updates_per_rollout=1,  # optimizer steps per RL step (the batch in equal parts)
        recompute_logprobs=True,  # old_logprobs from the trainer (else the rollout's)
        routing_replay=True,  # the trainer reuses the rollout's expert choices
        tis_cap=2.0,  # truncated importance sampling cap C; 0 = off
        kl_coef=0.0,  # KL to a reference policy: off (no reference model is kept)
        eps_low=0.2, eps_high=0.28,  # initial clip range (DAPO's clip-higher)
        # Adaptive clipping (glm_jax.rl.objective.AdaptiveClip).
        clip_band_low=0.001, clip_band_high=0.02, clip_factor=1.05, eps_min=0.05, eps_max=0.5,
        # Curriculum (glm_jax.rl.curriculum): advance at this pass rate over the window.
        curriculum_threshold=0.8, curriculum_window=4, curriculum_min_attempts=64,
        # Sampling temperature (glm_jax.rl.temperature.PlateauTemperature).
        temperature=1.0, max_temperature=1.3, temperature_step=0.05, temperature_patience=5,
        temperature_min_delta=0.01,
    ))
    return config
