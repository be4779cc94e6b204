"""Reinforcement learning on verifiable rewards, slime-style:

  rollout.py      the rollout engine: G samples per prompt through glm_jax.generate, with
                  each token's sampling log-probability and every MoE layer's expert choices
                  (for routing replay in the trainer's forward)
  sandbox.py      model-written Python run against unit tests in a limited subprocess
  rewards.py      reward(example, completion) -> RewardResult: exact final answer, unit tests
  objective.py    group-relative advantages, the clipped policy-gradient loss, truncated
                  importance sampling, dynamic-sampling filter, adaptive clip range
  policy_loss.py  that objective as a training-core loss: make_trainer(..., PolicyGradientLoss())
  curriculum.py   difficulty levels that advance on pass rate
  temperature.py  sampling temperature that rises when the reward plateaus
  levels.py       the curriculum's levels of the embedded tasks, rendered as chat prompts
  sampling.py     one step's rollout rounds with dynamic-sampling refill -> the trainer batch
  loop.py         the run: rollout -> reward -> batch -> updates -> weight hand-off, with
                  checkpoints, metrics and exact resume (`python -m glm_jax.rl`), in sync
                  or async mode
  roles.py        which devices train and which generate; publishing weights to the
                  rollout (colocated, or resharded onto the rollout's own mesh)
  async_rollout.py  the async mode's background rollout worker and staleness bound
  partial_rollout.py  generation in chunks that continues with newly published weights
  rollout_weights.py  the rollout's copy of the weights in its precision (rl.rollout_dtype:
                  bf16, FP8 e4m3 per channel or block), made at every weight update
  progress.py, plots.py  the progress bar and rl_curves.png
"""
