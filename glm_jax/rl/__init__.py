"""Reinforcement learning on verifiable rewards, slime-style (the pieces that do not depend on
the rollout engine or the trainer):

  sandbox.py      model-written Python run against unit tests in a limited subprocess
  rewards.py      reward(example, completion) -> RewardResult: exact final answer, unit tests
  objective.py    group-relative advantages, the clipped policy-gradient loss, truncated
                  importance sampling, dynamic-sampling filter, adaptive clip range
  policy_loss.py  that objective as a training-core loss: make_trainer(..., PolicyGradientLoss())
  curriculum.py   difficulty levels that advance on pass rate
  temperature.py  sampling temperature that rises when the reward plateaus
"""
