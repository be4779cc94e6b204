"""The RL run: `run_rl(cfg, workdir)`; `python -m glm_jax.rl` parses the flags
(configs/rl_tiny.py documents the fields).

Roles and modes (glm_jax.rl.roles, glm_jax.rl.async_rollout):
  rl.mode=sync, rl.rollout_devices=0   colocated: rollout and trainer take turns on all
                                        devices, the rollout using the trainer's arrays
  rl.mode=sync, rl.rollout_devices=R   the rollout on its own mesh of the last R devices,
                                        the weights resharded to it every
                                        rl.weight_sync_every steps; still turn by turn
  rl.mode=async (rollout_devices=R>0)  the rollout generates continuously in a background
                                        thread on its mesh, in chunks that pick up newly
                                        published weights (partial rollouts); the trainer
                                        takes batches from a bounded queue and drops groups
                                        older than rl.max_staleness versions

One RL step:
  prompts of the curriculum's current level (glm_jax.rl.levels)
  -> rollout: G samples per prompt at the step's temperature (glm_jax.rl.rollout)
  -> reward of every sample (glm_jax.rl.rewards) -> dynamic sampling: groups without signal
     are dropped and more prompts sampled, within a budget (glm_jax.rl.sampling)
  -> the trainer batch: group-relative advantages, the trainer's own log-probabilities of the
     sampled tokens (old_logprobs, with the rollout's expert choices replayed), the rollout's
     (for truncated importance sampling), the row temperature and the clip range
  -> `updates_per_rollout` optimizer steps of PolicyGradientLoss through make_trainer
  -> the new weights to the rollout side (roles.ColocatedWeights / ReshardedWeights)
  -> the curriculum sees the pass rate, the temperature rule the mean reward, the adaptive
     clip the clipped fractions.

A checkpoint holds the policy and optimizer state plus an `extra` JSON item with the RL
state (step, curriculum, temperature, clip range, policy version, seed). The rollout's
randomness (prompts and sampling seeds) is a pure function of (rl.seed, step, round), so a
resumed run continues exactly: same level, same prompts, same samples (in sync mode; in
async mode the overlap of the two threads decides which weights sample what, so a resume
continues the state, not the same samples). SIGTERM / SIGINT finish the step, save and
exit, as in pretraining.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from glm_jax.chat.tokens import load_chat_tokenizer
from glm_jax.cli_errors import ConfigError
from glm_jax.rl import evaluation
from glm_jax.rl import levels as levels_mod
from glm_jax.rl import rewards as rewards_mod
from glm_jax.rl.async_rollout import RolloutWorker, drop_stale
from glm_jax.rl.config_check import check
from glm_jax.rl.curriculum import Curriculum, CurriculumState
from glm_jax.rl.objective import AdaptiveClip, ClipRange
from glm_jax.rl.plots import plot_rl
from glm_jax.rl.partial_rollout import chunked_rollout
from glm_jax.rl.policy_loss import PolicyGradientLoss, token_logprobs
from glm_jax.rl.progress import RLProgress
from glm_jax.rl.roles import (ColocatedWeights, PrepareRolloutModel, ReshardedWeights,
                              rollout_mesh_axes, split_devices)
from glm_jax.rl.rollout_weights import RolloutWeights
from glm_jax.rl.sampling import ScoredRound, build_batch, collect
from glm_jax.rl.temperature import PlateauTemperature, TemperatureState
from glm_jax.train import checkpoint, loop, metrics, run_config
from glm_jax.train.trainer import Trainer, TrainState, make_trainer
from sharding import rules
from sharding.mesh import make_mesh


@dataclasses.dataclass(frozen=True)
class RLState:
    """What an RL run adds to the train state; JSON-plain through to_dict / from_dict."""

    step: int  # RL steps done
    curriculum: CurriculumState
    temperature: TemperatureState
    clip: ClipRange
    policy_version: int  # weight updates published to the rollout side
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "curriculum": self.curriculum.to_dict(),
                "temperature": self.temperature.to_dict(), "clip": self.clip.to_dict(),
                "policy_version": self.policy_version, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RLState:
        return cls(int(d["step"]), CurriculumState.from_dict(d["curriculum"]),
                   TemperatureState.from_dict(d["temperature"]), ClipRange.from_dict(d["clip"]),
                   int(d["policy_version"]), int(d["seed"]))


def rollout_seed(seed: int, step: int, round_: int) -> int:
    """The sampling seed of (run seed, RL step, refill round): no state to checkpoint."""
    return int(np.random.SeedSequence([seed, step, round_]).generate_state(1)[0] >> 1)


def batch_digest(batch: dict[str, np.ndarray]) -> str:
    """A short hash of the tokens and advantages a step trains on (resume checks compare it)."""
    h = hashlib.sha1()
    for key in ("tokens", "advantages", "loss_mask"):
        h.update(np.ascontiguousarray(batch[key]).tobytes())
    return h.hexdigest()[:16]


def make_logprobs(trainer: Trainer) -> Callable[[TrainState, dict], jax.Array]:
    """Jitted: the trainer's log p(token t | tokens < t) of a batch under `state`'s weights,
    at each row's temperature, with the rollout's expert choices when the batch has them
    (the same forward as the train step's)."""

    def fn(params, biases, batch):
        model = nnx.merge(trainer.graphdef, params, biases)
        kw = {"routed_experts": batch["routed_experts"]} if "routed_experts" in batch else {}
        out = model(batch["tokens"], **kw)
        return token_logprobs(out.logits, batch["tokens"], batch["temperature"])[0]

    # Replicated out: every process reads the whole result (the batch is built on each).
    jitted = jax.jit(fn, out_shardings=NamedSharding(trainer.mesh, PartitionSpec()))

    def logprobs(state: TrainState, batch: dict) -> jax.Array:
        with jax.set_mesh(trainer.mesh):
            return jitted(state.params, state.biases, batch)

    return logprobs


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> float | None:
    return float((x * mask).sum() / mask.sum()) if mask.sum() else None


def run_rl(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
           stop_at: int | None = None, overrides: tuple[str, ...] = (),
           reward_fn: rewards_mod.RewardFn | None = None,
           rollout_fn: Callable[..., Any] | None = None,
           prepare_rollout_model: PrepareRolloutModel | None = None) -> dict[str, Any]:
    """RL to cfg.train.steps RL steps (resuming `workdir` if it holds a checkpoint), or only
    up to step `stop_at` (then save and return, as on SIGTERM). `reward_fn` replaces the
    config's built-in reward; `rollout_fn` the rollout engine of the sync mode
    (glm_jax.rl.rollout.rollout's signature); `prepare_rollout_model` turns every published
    model into the one the rollout generates with (glm_jax.rl.roles). Returns {"step",
    "stopped_by", "records": the metrics of the steps run now, "state", "rl_state"}.
    Raises ConfigError (and the other UserErrors) before anything compiles."""
    level_names = check(cfg)
    if (cfg.init_from and run_config.latest_checkpoint(workdir) is None
            and not os.path.exists(cfg.init_from)):
        raise ConfigError(f"config.init_from={cfg.init_from}: no such folder; train the SFT "
                          "demo first (python -m glm_jax.sft writes runs/sft_tiny), or pass "
                          "--config.init_from=WORKDIR (--config.init_from= starts from random "
                          "weights)")
    cfg, resume_step = run_config.resolve(cfg, workdir, overrides)
    loop.validate(cfg)
    r, t = cfg.rl, cfg.train
    if resume_step is not None and resume_step >= t.steps:
        print(f"{workdir} is already trained to RL step {resume_step} (config.train.steps="
              f"{t.steps}); nothing to do. Raise --config.train.steps to train further.",
              flush=True)
        return {"step": resume_step, "stopped_by": None, "records": [], "state": None}
    tokenizer = load_chat_tokenizer(r.tokenizer or None)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"config.model.vocab_size={cfg.model.vocab_size}: smaller than the "
                          f"chat tokenizer's {tokenizer.vocab_size} ids")
    longest = max(len(p.ids) for name in level_names for p in levels_mod.draw_prompts(
        name, 64, seed=r.seed, step=-1, round_=0, thinking=r.chat_mode == "thinking",
        tokenizer=tokenizer))
    if longest + r.max_new_tokens > t.seq_len:
        raise ConfigError(f"config.train.seq_len={t.seq_len}: the levels' prompts reach "
                          f"{longest} tokens, + rl.max_new_tokens={r.max_new_tokens}; set "
                          f"--config.train.seq_len={longest + r.max_new_tokens + 16} or "
                          "fewer levels")
    if reward_fn is None:
        reward_fn = rewards_mod.BUILTIN_REWARDS[r.reward]
    if rollout_fn is not None and r.mode == "async":
        raise ValueError("rollout_fn: the async mode generates with "
                         "glm_jax.rl.partial_rollout.chunked_rollout; pass rollout_fn in "
                         "sync mode only")
    if rollout_fn is None:
        from glm_jax.rl.rollout import rollout as rollout_fn
    if r.mode == "async" and jax.process_count() > 1:
        raise ConfigError("config.rl.mode='async': runs in one process (the processes would "
                          "have to agree which weights each rollout chunk uses); use "
                          "--config.rl.mode=sync across processes")
    try:
        trainer_devices, rollout_devices = split_devices(jax.devices(), r.rollout_devices)
    except ValueError as e:
        devices = jax.devices()
        hint = ""
        if devices[0].platform == "cpu" and r.rollout_devices >= len(devices):
            wanted = 2 * r.rollout_devices
            hint = (f"; on CPU, simulate {wanted} devices with XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={wanted} (set before python "
                    "starts)")
        raise ConfigError(f"config.rl.{e}{hint}") from None
    mesh_axes = run_config.mesh_axes(t.mesh, trainer_devices)
    rows = t.batch_size // r.updates_per_rollout  # per optimizer step
    shards = mesh_axes["data"] * mesh_axes["fsdp"] * mesh_axes["expert"]
    if rows % shards or (rows // shards) % t.micro_batches:
        raise ConfigError(f"config.train.micro_batches={t.micro_batches}: the {rows} rows of "
                          f"an update must split over the mesh's {shards} batch shards and "
                          "then into the micro-batches")
    mesh = make_mesh(mesh_axes, trainer_devices)
    rollout_axes = (rollout_mesh_axes(r.rollout_mesh, rollout_devices)
                    if r.rollout_devices else None)
    os.makedirs(workdir, exist_ok=True)

    # The optimizer's schedule counts optimizer steps: updates_per_rollout per RL step.
    trainer_cfg = ml_collections.ConfigDict(cfg.to_dict())
    trainer_cfg.train.steps = t.steps * r.updates_per_rollout
    loss_fn = PolicyGradientLoss(eps_low=r.eps_low, eps_high=r.eps_high, loss_agg=r.loss_agg,
                                 tis_cap=r.tis_cap or None)
    trainer = make_trainer(trainer_cfg, mesh, loss_fn)
    state = trainer.init()
    curriculum = Curriculum(len(level_names), r.curriculum_threshold, r.curriculum_window,
                            r.curriculum_min_attempts)
    temperature_rule = PlateauTemperature(r.temperature, r.max_temperature, r.temperature_step,
                                          r.temperature_patience, r.temperature_min_delta)
    adaptive = AdaptiveClip(r.clip_band_low, r.clip_band_high, r.clip_factor, r.eps_min,
                            r.eps_max)
    manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"),
                                      every=cfg.checkpoint.every or t.steps,
                                      keep=cfg.checkpoint.keep,
                                      async_save=cfg.checkpoint.async_save)
    latest = manager.latest_step()
    if latest is not None:
        state = checkpoint.restore(manager, latest, state, None)
        rl = RLState.from_dict(checkpoint.restore_extra(manager, latest))
        source = f"resumed from step {latest}"
    else:
        rl = RLState(0, curriculum.init(), temperature_rule.init(),
                     adaptive.init(r.eps_low, r.eps_high), 0, r.seed)
        if cfg.init_from:
            state = checkpoint.load_params(cfg.init_from, state)
            source = f"initialized from {cfg.init_from}"
        else:
            source = "from scratch (no config.init_from: rewards start near 0)"
    lead = jax.process_index() == 0
    config_json = cfg.to_dict()
    if lead:
        print(run_config.describe(cfg), flush=True)
        print(f"glm-jax rl: {source}; levels {','.join(level_names)} (now "
              f"{level_names[rl.curriculum.level]}); {r.prompts_per_step} prompts x "
              f"{r.samples_per_prompt} samples per step, reward {r.reward}; {r.mode} mode, "
              f"trainer mesh {mesh_axes} on {len(trainer_devices)} devices, rollout "
              + (f"mesh {rollout_axes} on {len(rollout_devices)} devices; " if rollout_axes
                 else "colocated; ") +
              f"workdir {workdir}; config written to "
              f"{run_config.write_resolved(cfg, workdir)}", flush=True)

    rollout_weights = RolloutWeights(trainer, r.rollout_dtype, fp8_layout=r.rollout_fp8_layout)

    def prepare(model):  # the rollout's precision (rl.rollout_dtype), then the caller's hook
        model = rollout_weights.prepare(model)
        return prepare_rollout_model(model) if prepare_rollout_model is not None else model

    if rollout_axes:
        weights = ReshardedWeights(trainer, make_mesh(rollout_axes, rollout_devices), prepare)
    else:
        weights = ColocatedWeights(trainer, prepare)
    weights.publish(state, rl.policy_version)
    logprobs_fn = make_logprobs(trainer)
    stops = levels_mod.stop_ids(tokenizer)
    writer = metrics.MetricsWriter(workdir, enabled=lead)
    report = RLProgress(total=t.steps, start=rl.step, enabled=lead and progress)

    def run_round(step: int, round_: int, count: int) -> ScoredRound:
        # The level and temperature are the trainer's latest (async: read from the other
        # thread; a rebinding of `rl` is atomic).
        current = rl
        level = level_names[current.curriculum.level]
        prompts = levels_mod.draw_prompts(level, count, seed=current.seed, step=step,
                                          round_=round_, thinking=r.chat_mode == "thinking",
                                          tokenizer=tokenizer)
        start = time.perf_counter()
        kw = dict(samples_per_prompt=r.samples_per_prompt, max_new_tokens=r.max_new_tokens,
                  temperature=current.temperature.temperature, eos_ids=stops,
                  seed=rollout_seed(current.seed, step, round_), pad_id=tokenizer.pad_id,
                  speculative=r.speculative, record_routing=r.routing_replay)
        if r.mode == "async":
            out = chunked_rollout(weights.latest, [p.ids for p in prompts],
                                  chunk_tokens=r.rollout_chunk_tokens, **kw)
        else:
            model, version = weights.latest()
            out = rollout_fn(model, [p.ids for p in prompts], policy_version=version, **kw)
        rollout_seconds = time.perf_counter() - start
        start = time.perf_counter()
        results = rewards_mod.score(reward_fn, *levels_mod.rollout_completions(
            prompts, out, r.samples_per_prompt, tokenizer))
        return ScoredRound(out, prompts, results, rollout_seconds, time.perf_counter() - start)

    def make_batch(step: int):
        return collect(lambda round_, count: run_round(step, round_, count),
                       prompts=r.prompts_per_step,
                       over_sampling_prompts=r.over_sampling_prompts,
                       max_extra_prompts=r.max_extra_prompts)

    held_out = (evaluation.held_out_prompts(level_names, r.eval_prompts, seed=r.seed,
                                            thinking=r.chat_mode == "thinking",
                                            tokenizer=tokenizer) if r.eval_every else None)

    def run_evaluation(step: int) -> None:  # the trainer's own weights, not the rollout copy
        from glm_jax.rl.rollout import rollout

        m = evaluation.evaluate(trainer.model(state), held_out, reward_fn=reward_fn,
                                rollout_fn=rollout, tokenizer=tokenizer,
                                max_new_tokens=r.max_new_tokens, eos_ids=stops,
                                pad_id=tokenizer.pad_id, samples=r.eval_samples,
                                temperature=r.eval_temperature, seed=r.seed)
        writer.write(step, {f"eval/{k}": v for k, v in m.items()})
        if lead:
            sampled = (f"; sampled reward {m['sampled_reward']:.3f} ({r.eval_samples} per "
                       f"prompt at T={r.eval_temperature})" if r.eval_samples else "")
            print(f"eval step {step}: held-out greedy reward {m['reward']:.3f} ("
                  + ", ".join(f"{n} {m[f'reward/{n}']:.3f}" for n in level_names)
                  + f"; {r.eval_prompts} prompts per level){sampled}", flush=True)

    if held_out and rl.step == 0:
        run_evaluation(0)
    records: list[dict[str, Any]] = []
    stopped_by = None
    first = rl.step
    last_plot = time.perf_counter()
    end = t.steps if stop_at is None else min(stop_at, t.steps)
    worker = (RolloutWorker(make_batch, queue_size=r.queue_size, start=rl.step).start()
              if r.mode == "async" and rl.step < end else None)
    # The worker stops (after its current chunk) however the loop ends.
    with (loop.StopFlag() as stop,
          contextlib.closing(worker) if worker else contextlib.nullcontext()):
        while rl.step < end:
            step_start = time.perf_counter()
            collected = make_batch(rl.step) if worker is None else worker.get()
            wait_seconds = time.perf_counter() - step_start if worker else 0.0  # idle
            # Sync mode drops nothing (a sub-mesh rollout k steps behind is what the user
            # asked for with weight_sync_every=k) but reports the staleness all the same.
            collected, stale = drop_stale(
                collected, samples=r.samples_per_prompt, version=rl.policy_version,
                max_staleness=r.max_staleness if worker else np.iinfo(np.int32).max)
            level = rl.curriculum.level
            batch = build_batch(collected, samples=r.samples_per_prompt, seq_len=t.seq_len,
                                pad_id=tokenizer.pad_id, eps_low=float(rl.clip.eps_low),
                                eps_high=float(rl.clip.eps_high),
                                normalize_std=r.normalize_std)
            if not r.routing_replay:
                batch.pop("routed_experts", None)
            digest = batch_digest(batch)
            train_start = time.perf_counter()
            if r.recompute_logprobs:
                batch["old_logprobs"] = np.asarray(logprobs_fn(
                    state, rules.global_batch_from_whole(batch, trainer.batch_sharding)))
            else:
                batch["old_logprobs"] = batch["rollout_logprobs"]
            logprob_seconds = time.perf_counter() - train_start
            clip = rl.clip
            step_metrics = []
            for u in range(r.updates_per_rollout):
                part = {k: v[u * rows:(u + 1) * rows] for k, v in batch.items()}
                part["eps_low"] = np.full(rows, float(clip.eps_low), np.float32)
                part["eps_high"] = np.full(rows, float(clip.eps_high), np.float32)
                state, m = trainer.step(
                    state, rules.global_batch_from_whole(part, trainer.batch_sharding))
                m = jax.device_get(m)
                step_metrics.append(m)
                clip = adaptive.update(clip, m["clip_frac_low"], m["clip_frac_high"])
            train_seconds = time.perf_counter() - train_start
            sync_start = time.perf_counter()
            if (rl.step + 1) % r.weight_sync_every == 0 or not r.rollout_devices:
                weights.publish(state, rl.policy_version + 1)
            sync_seconds = time.perf_counter() - sync_start

            all_rewards = collected.all_rewards()
            passes = int((all_rewards >= 1.0).sum())
            new_curriculum = curriculum.update(rl.curriculum, passes, all_rewards.size)
            temperature = temperature_rule.update(rl.temperature, float(all_rewards.mean()))
            if new_curriculum.level != level:  # a harder task's drop is not a plateau
                temperature = PlateauTemperature.restart(temperature)
            rl = RLState(rl.step + 1, new_curriculum, temperature, ClipRange(*clip),
                         rl.policy_version + 1, rl.seed)

            s = collected.stats
            wall = time.perf_counter() - step_start
            mask = batch["loss_mask"].astype(np.float32)
            lengths = collected.completion_lengths()
            timed = rl.step > first + 1  # the first step of a process compiles
            mean = {k: float(np.mean([m[k] for m in step_metrics]))
                    for k in ("loss", "grad_norm", "clip_frac_low", "clip_frac_high",
                              "entropy", "approx_kl", "ratio", "pg_loss")}
            record = {
                **mean,
                "reward": float(all_rewards.mean()), "pass_rate": passes / all_rewards.size,
                "level": level, "level_name": level_names[level],
                f"pass_rate/{level_names[level]}": passes / all_rewards.size,
                "curriculum_level_after": new_curriculum.level,
                "curriculum_window_pass_rate": rl.curriculum.pass_rate,
                "temperature": float(batch["temperature"][0]),
                "next_temperature": temperature.temperature,
                "eps_low": float(batch["eps_low"][0]), "eps_high": float(batch["eps_high"][0]),
                "response_length": float(lengths.mean()),
                "response_length_max": int(lengths.max()),
                "truncated_fraction": float((lengths >= r.max_new_tokens).mean()),
                "rounds": s.rounds, "prompts_sampled": s.prompts_sampled,
                "filtered_groups": s.filtered_groups,
                "filtered_all_pass": s.filtered_all_pass,
                "filtered_all_fail": s.filtered_all_fail,
                "padded_groups": s.padded_groups, "surplus_groups": s.surplus_groups,
                "kept_groups": len(collected.kept),
                "reward_reasons": rewards_mod.count_reasons(collected.all_results()),
                "logprob_mismatch": _masked_mean(
                    np.abs(batch["old_logprobs"] - batch["rollout_logprobs"]), mask),
                "trained_tokens": int(mask.sum()),
                "rollout_seconds": s.rollout_seconds, "reward_seconds": s.reward_seconds,
                "train_seconds": train_seconds, "logprob_seconds": logprob_seconds,
                "step_seconds": wall,
                "rollout_share": s.rollout_seconds / wall, "reward_share": s.reward_seconds / wall,
                "train_share": train_seconds / wall,
                "rollout_tokens_per_sec": (s.generated_tokens / s.rollout_seconds
                                           if timed else None),
                "trainer_tokens_per_sec": (t.batch_size * t.seq_len / (train_seconds
                                                                        - logprob_seconds)
                                           if timed else None),
                "policy_version": rl.policy_version, "batch_digest": digest,
                "rollout_policy_version": weights.version,
                "stale_groups": stale.groups, "stale_samples": stale.samples,
                "staleness_max": stale.max_trained, "staleness_mean": stale.mean_trained,
                "trained_samples": int((batch["loss_mask"].sum(1) > 0).sum()),
                "queue_wait_seconds": wait_seconds, "weight_sync_seconds": sync_seconds,
                "run_start": rl.step == first + 1,
            }
            writer.write(rl.step, record)  # TensorBoard takes the numbers
            records.append({"step": rl.step, **record})
            report.step(rl.step, record)
            checkpoint.save(manager, rl.step, state, None, config_json, extra=rl.to_dict())
            if held_out and rl.step % r.eval_every == 0:
                run_evaluation(rl.step)
            if lead and time.perf_counter() - last_plot > 30:  # a plot costs ~1 s
                plot_rl(workdir, level_names)
                last_plot = time.perf_counter()
            if stop.agreed():
                stopped_by = signal.Signals(stop.signal or signal.SIGTERM).name
                break
        report.close()
        if manager.latest_step() != rl.step:
            checkpoint.save(manager, rl.step, state, None, config_json, force=True,
                            extra=rl.to_dict())
        manager.wait_until_finished()
    # The last step, unless the loop's every-k evaluation has just run on it.
    if held_out and not stopped_by and rl.step == t.steps and rl.step % r.eval_every:
        run_evaluation(rl.step)
    manager.close()
    writer.close()
    if lead:
        if stopped_by:
            print(f"stopped by {stopped_by} after step {rl.step}; checkpoint saved in "
                  f"{workdir}/checkpoints, run again to resume", flush=True)
        else:
            path = plot_rl(workdir, level_names)
            if path:
                print(f"wrote {path}", flush=True)
    return {"step": rl.step, "stopped_by": stopped_by, "records": records, "state": state,
            "rl_state": rl}
