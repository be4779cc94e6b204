"""Held-out evaluation of the RL policy: greedy completions of a fixed prompt set per level,
scored by the run's reward (slime's `--eval-interval`, verl's `test_freq`).

The training batch's reward is a poor view of progress: it is sampled at the run's
temperature (which the plateau rule raises), on fresh prompts every step, at the level the
curriculum is on. This evaluation holds the prompts and the decoding fixed (temperature 0,
one completion per prompt), so a change of its reward between steps is the policy's.

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


def evaluate(model, prompts: dict[str, list[levels_mod.Prompt]], *,
             reward_fn: rewards_mod.RewardFn, rollout_fn: Callable[..., Any],
             tokenizer: ChatTokenizer, max_new_tokens: int, eos_ids: Sequence[int],
             pad_id: int) -> dict[str, float]:
    """Greedy completions of every level's prompts (one batched rollout per level), scored.

    Returns {"reward/<level>": mean reward, "pass_rate/<level>": share of rewards >= 1,
    "reward": mean over all levels' prompts}."""
    out: dict[str, float] = {}
    everything = []
    for level, level_prompts in prompts.items():
        roll = rollout_fn(model, [p.ids for p in level_prompts], samples_per_prompt=1,
                          max_new_tokens=max_new_tokens, temperature=0.0, eos_ids=eos_ids,
                          seed=0, pad_id=pad_id, record_routing=False)
        completions = []
        for row, prompt in enumerate(level_prompts):
            begin = int(roll.prompt_lengths[row])
            ids = roll.tokens[row, begin:begin + int(roll.completion_lengths[row])]
            completions.append(levels_mod.completion_text(prompt, ids, tokenizer))
        results = rewards_mod.score(reward_fn, [p.example for p in level_prompts], completions)
        rewards = np.array([r.reward for r in results], np.float64)
        out[f"reward/{level}"] = float(rewards.mean())
        out[f"pass_rate/{level}"] = float((rewards >= 1.0).mean())
        everything.append(rewards)
    out["reward"] = float(np.concatenate(everything).mean())
    return out
