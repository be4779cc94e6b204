"""The RL run's held-out evaluation (glm_jax.rl.evaluation, config.rl.eval_every): greedy
completions of fixed prompts per level, at the start, every eval_every steps and at the end,
written to metrics.jsonl as eval/reward/<level>; what it records is what evaluate() gives
for the saved weights. Whether the reward it measures rises after RL from the SFT demo
model is bench/rl_run.py's question (minutes, docs/benchmarks.md)."""

from __future__ import annotations

import json
import os

import numpy as np

from glm_jax.chat.tokens import load_chat_tokenizer
from glm_jax.convert import load_checkpoint
from glm_jax.rl import evaluation, levels
from glm_jax.rl.loop import run_rl
from glm_jax.rl.rollout import rollout
from test_rl_async import _config, parity_reward


def test_held_out_evaluation_runs_at_start_every_k_steps_and_end(tmp_path):
    workdir = str(tmp_path / "rl")
    cfg = _config(**{"rl.eval_every": 2, "rl.eval_prompts": 3, "train.steps": 3})
    result = run_rl(cfg, workdir, progress=False, reward_fn=parity_reward)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    for r in evals:
        per_level = [r["eval/reward/add1"], r["eval/reward/add2"]]
        assert r["eval/reward"] == np.mean(per_level)  # equal prompt counts per level
        assert all(x in (0, 1 / 3, 2 / 3, 1) for x in per_level)  # 3 prompts, reward 0/1

    # The recorded end-of-run evaluation is evaluate() on the final weights: greedy, so
    # the same prompts give the same completions.
    tokenizer = load_chat_tokenizer(None)
    prompts = evaluation.held_out_prompts(("add1", "add2"), 3, seed=cfg.rl.seed,
                                          thinking=False, tokenizer=tokenizer)
    assert result["step"] == 3
    again = evaluation.evaluate(
        load_checkpoint(workdir), prompts, reward_fn=parity_reward, rollout_fn=rollout,
        tokenizer=tokenizer, max_new_tokens=cfg.rl.max_new_tokens,
        eos_ids=levels.stop_ids(tokenizer), pad_id=tokenizer.pad_id)
    assert {f"eval/{k}": v for k, v in again.items()} == {
        k: v for k, v in evals[-1].items() if k.startswith("eval/")}
    # Fixed prompts, none of them a training round's (those draw with step, round >= 0).
    trained = levels.draw_prompts("add1", 3, seed=cfg.rl.seed, step=0, round_=0,
                                  thinking=False, tokenizer=tokenizer)
    assert [p.ids for p in prompts["add1"]] != [p.ids for p in trained]
