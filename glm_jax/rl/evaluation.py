"""Held-out evaluation of the RL policy: completions of a fixed prompt set per level, scored
by the run's reward (slime's `--eval-interval`, verl's `test_freq`), two ways: greedy (one
completion per prompt, temperature 0) and sampled (k completions per prompt at a fixed
temperature, the same sampling seed at every evaluation).

The training batch's reward is a poor view of progress: it is sampled at the run's
temperature (which the plateau rule raises), on fresh prompts every step, at the level the
curriculum is on. This evaluation holds the prompts and the decoding fixed, so a change of
its rewards between steps is the policy's. The two can move apart: RL sharpens the sampling
distribution toward the answers it rewards (the sampled reward rises toward the greedy one)
without necessarily changing the most likely answer.

The prompts come from `levels.draw_prompts` with step = round = -1, a stream the training
rounds (step, round >= 0) never draw from; a small level (add1 has 81 questions) can still
repeat a trained question by chance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from glm_jax.chat.tokens import ChatTokenizer
from glm_jax.rl import levels as levels_mod
from glm_jax.rl import rewards as rewards_mod

HELD_OUT_STEP = HELD_OUT_ROUND = -1


def held_out_prompts(level_names: Sequence[str], count: int, *, seed: int, thinking: bool,
                     tokenizer: ChatTokenizer) -> dict[str, list[levels_mod.Prompt]]:
    """`count` fixed prompts per level (deterministic in `seed`)."""
    return {name: levels_mod.draw_prompts(name, count, seed=seed, step=HELD_OUT_STEP,
                                          round_=HELD_OUT_ROUND, thinking=thinking,
                                          tokenizer=tokenizer)
            for name in level_names}


def _rewards(model, prompts: list[levels_mod.Prompt], samples: int, temperature: float,
             seed: int, reward_fn, rollout_fn, tokenizer, **kw) -> np.ndarray:
    """[len(prompts) * samples] rewards of one batched rollout (samples rows per prompt)."""
    roll = rollout_fn(model, [p.ids for p in prompts], samples_per_prompt=samples,
                      temperature=temperature, seed=seed, record_routing=False, **kw)
    results = rewards_mod.score(reward_fn, *levels_mod.rollout_completions(
        prompts, roll, samples, tokenizer))
    return np.array([r.reward for r in results], np.float64)


def evaluate(model, prompts: dict[str, list[levels_mod.Prompt]], *,
             reward_fn: rewards_mod.RewardFn, rollout_fn: Callable[..., Any],
             tokenizer: ChatTokenizer, max_new_tokens: int, eos_ids: Sequence[int],
             pad_id: int, samples: int = 0, temperature: float = 1.0,
             seed: int = 0) -> dict[str, float]:
    """Every level's prompts answered greedily and, if samples > 0, `samples` times at
    `temperature` with sampling seed `seed` (one batched rollout per level and way), scored.

    Returns {"reward/<level>": greedy mean reward, "pass_rate/<level>": share of greedy
    rewards >= 1, "reward": greedy mean over all levels' prompts} and, with samples > 0,
    "sampled_reward/<level>" and "sampled_reward" (means over prompts x samples)."""
    out: dict[str, float] = {}
    greedy, sampled = [], []
    kw = dict(reward_fn=reward_fn, rollout_fn=rollout_fn, tokenizer=tokenizer,
              max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id)
    for level, level_prompts in prompts.items():
        rewards = _rewards(model, level_prompts, 1, 0.0, 0, **kw)
        out[f"reward/{level}"] = float(rewards.mean())
        out[f"pass_rate/{level}"] = float((rewards >= 1.0).mean())
        greedy.append(rewards)
        if samples:
            rewards = _rewards(model, level_prompts, samples, temperature, seed, **kw)
            out[f"sampled_reward/{level}"] = float(rewards.mean())
            sampled.append(rewards)
    out["reward"] = float(np.concatenate(greedy).mean())
    if samples:
        out["sampled_reward"] = float(np.concatenate(sampled).mean())
    return out
