"""Roles on sub-meshes and the asynchronous RL mode (glm_jax.rl.roles, async_rollout,
partial_rollout), on the 8 simulated CPU devices of conftest.py split 4 / 4.

- Sync mode with the rollout on its own mesh (weights resharded to it every step) equals
  the colocated sync mode on the same seed: the same batches, rewards and losses, the same
  held-out evaluations, and the same parameters after the steps (float tolerance: the
  trainer's mesh differs, 4 devices instead of 8, so its reductions sum in another order).
- The held-out evaluation (glm_jax.rl.evaluation, rl.eval_every): greedy completions of
  fixed prompts per level at the start, every k steps and at the end; what metrics.jsonl
  records is evaluate() on the saved final weights. Whether the reward it measures rises
  after RL from the SFT demo model is bench/post_training.py's question (minutes).
- Async mode: no group the trainer trains on is older than rl.max_staleness versions; the
  staleness filter itself on hand-made groups.
- A partial rollout whose weights change between chunks: each token carries the version
  that drew it, and its log-probability is that version's (a full forward of each)."""

from __future__ import annotations

import json
import os
import subprocess
import types

import jax
import numpy as np
import pytest
from flax import nnx

from configs import rl_tiny
from glm_jax import GlmForCausalLM
from glm_jax.chat.tokens import load_chat_tokenizer
from glm_jax.convert import load_checkpoint
from glm_jax.rl import evaluation, levels
from glm_jax.rl.async_rollout import drop_stale
from glm_jax.rl.loop import run_rl
from glm_jax.rl.partial_rollout import chunk_seed, chunked_rollout
from glm_jax.rl.rewards import RewardResult
from glm_jax.rl.rollout import rollout
from glm_jax.rl.sampling import CollectStats, Collected, ScoredRound
from test_rl_rollout import CONFIG, PROMPTS, _copy, real_tokens, score
from test_rl_run import FLAGS, ROOT


def parity_reward(example, completion: str) -> RewardResult:
    """A reward the random tiny model earns half the time, so groups carry signal and the
    steps move the weights (the tasks' exact answers it never gets)."""
    return RewardResult(float(sum(completion.encode()) % 2), "parity")


def _config(**changes):
    cfg = rl_tiny.get_config()
    for key, value in {**FLAGS, "train.steps": 3, "rl.max_new_tokens": 6, **changes}.items():
        section, *name = key.split(".")
        if name:
            cfg[section][name[0]] = value
        else:
            cfg[section] = value
    return cfg


def _run(tmp_path, name: str, **changes) -> dict:
    return run_rl(_config(**changes), str(tmp_path / name), progress=False,
                  reward_fn=parity_reward)


# Evaluations at steps 0, 2 and 3: 3 prompts per level, greedy and 2 samples each.
EVAL = {"rl.eval_every": 2, "rl.eval_prompts": 3, "rl.eval_samples": 2}


def _evaluations(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "eval/reward" in r]


def test_sync_on_sub_meshes_equals_colocated_sync(tmp_path):
    colocated = _run(tmp_path, "colocated", **EVAL)
    split = _run(tmp_path, "split", **{"rl.rollout_devices": 4}, **EVAL)
    evals = _evaluations(str(tmp_path / "colocated"))
    assert [r["step"] for r in evals] == [0, 2, 3]
    assert evals == _evaluations(str(tmp_path / "split"))
    assert len(split["records"]) == len(colocated["records"]) == 3
    for a, b in zip(colocated["records"], split["records"]):
        for key in ("batch_digest", "reward", "kept_groups", "policy_version"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-7)
    # Groups with signal were trained on, so the comparison below compares moved weights.
    assert sum(r["kept_groups"] for r in split["records"]) > 0
    assert any(r["loss"] != 0 for r in split["records"])
    trainer_devices = {d for x in jax.tree.leaves(split["state"].params) for d in x.devices()}
    assert len(trainer_devices) == 4 and trainer_devices.isdisjoint(jax.devices()[4:])
    for a, b in zip(jax.tree.leaves(colocated["state"].params),
                    jax.tree.leaves(split["state"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    # The evaluation's figures: per level over 3 prompts (x 2 samples) of reward 0 / 1, their
    # mean; the last is evaluate() on the saved final weights (greedy, and sampling with the
    # same seed: the same completions).
    for r in evals:
        per_level = [r["eval/reward/add1"], r["eval/reward/add2"]]
        assert r["eval/reward"] == np.mean(per_level)
        assert all(x in (0, 1 / 3, 2 / 3, 1) for x in per_level)
        sampled = [r["eval/sampled_reward/add1"], r["eval/sampled_reward/add2"]]
        assert r["eval/sampled_reward"] == np.mean(sampled)
        assert all(6 * x == round(6 * x) for x in sampled)
    cfg = _config(**EVAL)
    tokenizer = load_chat_tokenizer(None)
    prompts = evaluation.held_out_prompts(("add1", "add2"), 3, seed=cfg.rl.seed,
                                          thinking=False, tokenizer=tokenizer)
    again = evaluation.evaluate(
        load_checkpoint(str(tmp_path / "colocated")), prompts, reward_fn=parity_reward,
        rollout_fn=rollout, tokenizer=tokenizer, max_new_tokens=cfg.rl.max_new_tokens,
        eos_ids=levels.stop_ids(tokenizer), pad_id=tokenizer.pad_id,
        samples=cfg.rl.eval_samples, temperature=cfg.rl.eval_temperature, seed=cfg.rl.seed)
    assert {f"eval/{k}": v for k, v in again.items()} == {
        k: v for k, v in evals[-1].items() if k.startswith("eval/")}
    # Fixed prompts, none of them a training round's (those draw with step, round >= 0).
    trained = levels.draw_prompts("add1", 3, seed=cfg.rl.seed, step=0, round_=0,
                                  thinking=False, tokenizer=tokenizer)
    assert [p.ids for p in prompts["add1"]] != [p.ids for p in trained]


def test_weight_sync_every_k_steps_lags_the_rollout(tmp_path):
    out = _run(tmp_path, "every2", **{"rl.rollout_devices": 4, "rl.weight_sync_every": 2})
    records = out["records"]
    assert [r["rollout_policy_version"] for r in records] == [0, 2, 2]
    # Step 2 trains (at version 1) on what version 0 sampled; step 3 on version 2's.
    assert [r["staleness_max"] for r in records] == [
        0, 1 if records[1]["kept_groups"] else 0, 0]


def test_async_trains_only_on_samples_within_the_staleness_bound(tmp_path):
    out = _run(tmp_path, "async", **{"rl.mode": "async", "rl.rollout_devices": 4,
                                     "rl.max_staleness": 1, "rl.rollout_chunk_tokens": 3,
                                     "train.steps": 5})
    records = out["records"]
    assert [r["policy_version"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:
        # The batch of step s is trained at version s - 1 (policy_version counts updates).
        assert 0 <= r["staleness_max"] <= 1, r
        assert r["trained_samples"] + r["stale_samples"] <= 8
    assert sum(r["trained_samples"] for r in records) > 0


def _group_round(versions: list[list[int]], width: int = 6, prompt: int = 2) -> ScoredRound:
    """One round of len(versions) // 2 prompts x 2 samples whose completion tokens carry the
    given versions (row r: versions[r], one per completion token)."""
    n = len(versions)
    ver = np.full((n, width), -1, np.int32)
    lengths = np.array([len(v) for v in versions], np.int32)
    for r, v in enumerate(versions):
        ver[r, prompt:prompt + len(v)] = v
    t = np.arange(width)[None]
    mask = (t >= prompt) & (t < prompt + lengths[:, None])
    r = types.SimpleNamespace(policy_version=ver, completion_mask=mask)
    results = [RewardResult(float(i % 2), "x") for i in range(n)]
    return ScoredRound(r, [None] * (n // 2), results, 0.0, 0.0)


def test_drop_stale_drops_whole_groups_older_than_the_bound():
    rounds = [_group_round([[5, 5], [5, 6, 6],  # group 0: oldest 5
                            [6, 7], [7],  # group 1: oldest 6
                            [7, 7], [7, 7, 7]]),  # group 2: oldest 7
              _group_round([[4, 7], [7, 7]])]  # round 1, group 0: oldest 4
    collected = Collected(rounds, kept=[(0, 0), (0, 1), (0, 2), (1, 0)], padded=[(0, 9)],
                          stats=CollectStats(padded_groups=1))
    out, stats = drop_stale(collected, samples=2, version=7, max_staleness=1)
    assert out.kept == [(0, 1), (0, 2)] and out.padded == [(0, 9), (0, 0), (1, 0)]
    assert (stats.groups, stats.samples, stats.max_trained) == (2, 4, 1)
    assert out.stats.padded_groups == 3
    np.testing.assert_allclose(stats.mean_trained, 1 / 8)  # one 6 among 8 tokens
    same, none = drop_stale(collected, samples=2, version=7, max_staleness=3)
    assert same.kept == collected.kept and none.groups == 0 and none.max_trained == 3
    with pytest.raises(ValueError, match="max_staleness=-1"):
        drop_stale(collected, samples=2, version=7, max_staleness=-1)


@pytest.fixture(scope="module")
def two_versions():
    """Versions 0 and 1 of a policy: v1 is v0 after a "step" (a sharper head, moved
    routers; made by arithmetic, as one model init costs seconds)."""
    v0 = GlmForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    v1 = _copy(v0)
    v1.lm_head.kernel[...] = 1.5 * v1.lm_head.kernel[...]
    router = v1.moe_layers.layers.mlp.router_kernel
    router[...] = router[...] + 0.05 * jax.random.normal(jax.random.key(1), router[...].shape)
    return v0, v1


def test_partial_rollout_continues_with_new_weights_and_stamps_versions(two_versions):
    m0, m1 = two_versions
    current = [(m0, 0)]

    def publish_between_chunks(chunk: int) -> None:
        if chunk == 0:
            current[0] = (m1, 1)

    r = chunked_rollout(lambda: current[0], PROMPTS, samples_per_prompt=2, max_new_tokens=8,
                        chunk_tokens=3, temperature=[0.0, 0.9], eos_ids=(), seed=1, pad_id=0,
                        on_chunk=publish_between_chunks)
    completion = r.completion_mask
    np.testing.assert_array_equal(r.completion_lengths, 8)  # no EOS: every row runs out
    for row in range(4):
        start = r.prompt_lengths[row]
        np.testing.assert_array_equal(r.policy_version[row, start:start + 8],
                                      [0, 0, 0, 1, 1, 1, 1, 1])
    assert (r.policy_version[~completion] == -1).all()
    # Each token's recorded log-probability is that of the version that drew it.
    logp0, ids0 = score(m0, r, replay=False)
    logp1, ids1 = score(m1, r, replay=False)
    old, new = completion & (r.policy_version == 0), completion & (r.policy_version == 1)
    np.testing.assert_allclose(r.logprobs[old], logp0[old], atol=1e-5, rtol=0)
    np.testing.assert_allclose(r.logprobs[new], logp1[new], atol=1e-5, rtol=0)
    assert np.abs(logp0[new] - logp1[new]).max() > 1e-2  # the versions do differ
    # The routing kept for replay is the last chunk's: the newest weights' for every token.
    np.testing.assert_array_equal(r.routed_experts[real_tokens(r)], ids1[real_tokens(r)])
    assert (ids0[real_tokens(r)] != ids1[real_tokens(r)]).any()  # and v0's is not that


def test_one_chunk_is_the_one_shot_rollout(two_versions):
    m0, _ = two_versions
    kw = dict(samples_per_prompt=2, max_new_tokens=8, temperature=[0.0, 0.9], eos_ids=(11,),
              pad_id=0)
    whole = chunked_rollout(lambda: (m0, 4), PROMPTS, chunk_tokens=8, seed=3, **kw)
    plain = rollout(m0, PROMPTS, seed=chunk_seed(3, 0), policy_version=4, **kw)
    for field in ("tokens", "completion_lengths", "policy_version", "routed_experts"):
        np.testing.assert_array_equal(getattr(whole, field), getattr(plain, field))
    np.testing.assert_allclose(whole.logprobs, plain.logprobs, atol=1e-6, rtol=0)


def test_sync_across_two_processes_matches_one_process(tmp_path):
    """`python -m glm_jax.rl` as 2 processes of 4 CPU devices (jax.distributed on
    localhost), each giving 2 devices to the trainer and 2 to the rollout, so every weight
    publish crosses the two-step move of ReshardedWeights; against one process of 8 devices
    split 4 / 4: the same batches, rewards and losses."""
    from test_rl_run import _cmd, _metrics
    from test_train_run import _free_port

    steps = {"train.steps": 2, "rl.rollout_devices": 4}
    cache = str(tmp_path / "xla")

    def env(devices: int) -> dict:
        return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                    JAX_COMPILATION_CACHE_DIR=cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

    port = _free_port()
    two = str(tmp_path / "two")
    procs = [subprocess.Popen(
        _cmd(two, **steps) + ["--coordinator_address", f"localhost:{port}",
                              "--num_processes", "2", "--process_id", str(i)],
        env=env(4), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    one = str(tmp_path / "one")
    single = subprocess.run(_cmd(one, **steps), env=env(8), cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    got, want = _metrics(two), _metrics(one)
    assert [r["step"] for r in got] == [1, 2] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in ("batch_digest", "reward", "policy_version", "rollout_policy_version"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-7)


def test_resharded_weights_are_a_copy_on_the_rollout_mesh():
    from glm_jax.rl.roles import ReshardedWeights, split_devices
    from glm_jax.train.trainer import make_trainer
    from sharding.mesh import make_mesh

    trainer_devices, rollout_devices = split_devices(jax.devices(), 4)
    assert trainer_devices == jax.devices()[:4] and rollout_devices == jax.devices()[4:]
    assert split_devices(jax.devices(), 0) == (jax.devices(), jax.devices())
    with pytest.raises(ValueError, match="rollout_devices=8"):
        split_devices(jax.devices(), 8)
    trainer = make_trainer(_config(), make_mesh({"fsdp": 4}, trainer_devices))
    rollout_mesh = make_mesh({"data": 2, "tensor": 2}, rollout_devices)
    seen = []

    def prepare(model):  # the seam a quantized rollout copy plugs into
        seen.append(model)
        return model

    weights = ReshardedWeights(trainer, rollout_mesh, prepare)
    state = trainer.init()
    want = jax.tree.map(np.asarray, state.params)
    weights.publish(state, 7)
    model, version = weights.latest()
    assert version == 7 and seen == [model] and model.mesh is rollout_mesh
    assert model.moe_layers.layers.mlp.mesh is rollout_mesh  # the MoE runs on the rollout mesh
    jax.tree.map(lambda x: x.delete(), (state.params, state.biases))  # as a donating step would
    _, got, _ = nnx.split(model, nnx.Param, ...)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(b), a)
        assert b.sharding.mesh == rollout_mesh


@pytest.mark.parametrize("field, value, message", [
    ("mode", "overlap", "config.rl.mode='overlap': must be 'sync'"),
    ("chat_mode", "sync", "config.rl.chat_mode='sync': must be 'thinking'"),
    ("weight_sync_every", 2, "config.rl.weight_sync_every=2: colocated"),
    ("max_staleness", -1, "config.rl.max_staleness=-1"),
    ("rollout_mesh", "data=x", "config.rl.rollout_mesh='data=x'"),
])
def test_bad_mode_fields_name_the_field(field, value, message):
    from glm_jax.cli_errors import ConfigError
    from glm_jax.rl.loop import check

    cfg = _config(**{f"rl.{field}": value})
    with pytest.raises(ConfigError) as e:
        check(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)
    async_colocated = _config(**{"rl.mode": "async"})
    with pytest.raises(ConfigError, match="config.rl.rollout_devices=0: async mode needs"):
        check(async_colocated)
