"""The pretraining loop: `python train.py [--config configs/tiny.py] [--workdir DIR]`.

Order of work: validate the whole config and the data (clear errors, nothing compiled
yet) -> mesh, model, optimizer -> resume from the latest checkpoint in the workdir, or
start from `init_from` weights, or from scratch -> steps (metrics, async checkpoints,
SIGTERM/SIGINT -> save and stop) -> final checkpoint and plots.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from glm_jax import heap
from glm_jax.cli_errors import ConfigError
from glm_jax.config import GlmConfig
from glm_jax.train import checkpoint, data, evaluation, metrics, optimizer, run_config
from glm_jax.train.progress import TrainProgress
from glm_jax.train.trainer import make_trainer
from sharding import rules
from sharding.mesh import make_mesh


def _fail(field: str, value: Any, why: str) -> None:
    raise ConfigError(f"config.{field}={value!r}: {why}")


def validate(cfg: ml_collections.ConfigDict) -> GlmConfig:
    """Every check that can fail on the config alone. Returns the model config."""
    for section in ("model", "train", "optimizer", "data", "checkpoint"):
        if section not in cfg:
            raise ConfigError(f"config has no {section!r} section (see configs/tiny.py)")
    try:
        model_cfg = GlmConfig.from_dict(cfg.model.to_dict())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from None
    t = cfg.train
    if not isinstance(t.eval_every, int) or t.eval_every < 0:
        _fail("train.eval_every", t.eval_every, "must be >= 0 (0 = no held-out evaluation)")
    for name in ("steps", "batch_size", "seq_len", "log_every", "micro_batches",
                 "eval_batches"):
        if not isinstance(t[name], int) or t[name] < 1:
            _fail(f"train.{name}", t[name], "must be a positive integer")
    if t.seq_len < 2 + model_cfg.num_mtp_layers:
        _fail("train.seq_len", t.seq_len, "leaves no valid target for the MTP depths")
    if t.mtp_loss_weight < 0 or t.z_loss_weight < 0 or t.bias_update_rate < 0:
        _fail("train", "mtp_loss_weight / z_loss_weight / bias_update_rate", "must be >= 0")
    if t.seq_aux_loss_weight != 0:
        _fail("train.seq_aux_loss_weight", t.seq_aux_loss_weight,
              "the sequence-wise aux loss needs per-token router probabilities, which "
              "GlmForCausalLM does not return (only expert counts); only 0 is supported")
    run_config.mesh_axes(t.mesh, None)  # the spelling; the device count is checked in run
    optimizer.validate(cfg.optimizer, t.steps)
    c = cfg.checkpoint
    if c.every < 0 or c.keep < 1:
        _fail("checkpoint", f"every={c.every}, keep={c.keep}", "need every >= 0, keep >= 1")
    if cfg.data.num_workers < 0:
        _fail("data.num_workers", cfg.data.num_workers, "must be >= 0")
    if cfg.data.path and not os.path.isdir(cfg.data.path):
        _fail("data.path", cfg.data.path, "no such folder (leave empty for the embedded "
              "stdlib default)")
    return model_cfg


def maybe_initialize_distributed(coordinator: str | None, num_processes: int | None,
                                 process_id: int | None) -> None:
    """Multi-process runs: from flags, or from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, or auto-detected on TPU pods / SLURM / Open MPI (GLM_JAX_DISTRIBUTED=1)."""
    if coordinator or (num_processes or 0) > 1:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("GLM_JAX_DISTRIBUTED"):
        jax.distributed.initialize()


class StopFlag:
    """SIGTERM / SIGINT: finish the current step, save, exit.

    Why not orbax's `CheckpointManager.reached_preemption`: it relies on JAX's preemption
    sync manager, which exists only in multi-process runs started by
    `jax.distributed.initialize` and listens for SIGTERM only; a single-process run (and
    Ctrl-C) would never stop cleanly. One int32 all-gathered per step agrees on a stop in
    every setting."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self) -> bool:
        """All processes stop at the same step: one stop request stops every process."""
        mine = self.signal is not None
        if jax.process_count() == 1:
            return mine
        from jax.experimental import multihost_utils
        return bool(np.asarray(multihost_utils.process_allgather(np.int32(mine))).any())


Evaluate = Callable[[Any, int], dict[str, float]]  # (GlmForCausalLM, step) -> metrics


def run(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
        stop_at: int | None = None, overrides: tuple[str, ...] = (),
        corpus: data.Corpus | None = None, whole_documents: bool = False,
        pad_id: int = data.BYTE_PAD, loss_fn: Any = None, evaluate: Evaluate | None = None,
        evaluate_every: int = 0, evaluate_at_start: bool = False,
        batch_transform: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None,
        ) -> dict[str, Any]:
    """Train to `cfg.train.steps` (resuming from `workdir` if it holds a checkpoint), or
    only up to step `stop_at` (then save and return, as on SIGTERM). `overrides`: the
    config fields set on the command line (see run_config.resolve).

    Post-training reuses this loop through its hooks: `corpus` instead of `cfg.data`'s
    (with `whole_documents` / `pad_id` for make_dataset), `loss_fn` for make_trainer, and
    `evaluate(model, step)`, called every `evaluate_every` steps (0 = never), at the end,
    and before the first step of a fresh run if `evaluate_at_start`; its metrics go to
    metrics.jsonl / TensorBoard under "eval/". `batch_transform(batch) -> batch` sees each
    global batch (sharded, before the step) and may add arrays with a leading row axis, e.g.
    distillation's teacher logits (glm_jax.sft.teachers); it must be deterministic for a
    resumed run to repeat the uninterrupted one.
    Returns {"losses": {step: loss} of the steps run now, "stopped_by": signal or None,
    "state": the final train state (None when there was nothing to do), "step",
    "eval": {step: evaluate's metrics}}."""
    # The model of init_from, and the resume guard: before anything is built.
    cfg, resume_step = run_config.resolve(cfg, workdir, overrides)
    model_cfg = validate(cfg)
    if resume_step is not None and resume_step >= cfg.train.steps:
        if jax.process_index() == 0:
            print(f"{workdir} is already trained to step {resume_step} (config.train.steps="
                  f"{cfg.train.steps}); nothing to do. Raise --config.train.steps to train "
                  "further.", flush=True)
        return {"losses": {}, "stopped_by": None, "state": None, "step": resume_step}
    t = cfg.train
    held_out = None
    if corpus is None:
        corpus = data.make_corpus(cfg.data)  # missing files fail here, before compiling
        if t.eval_every:
            corpus, held_out = evaluation.split_corpus(corpus, cfg.data.eval_fraction)
    if corpus.vocab_size > model_cfg.vocab_size:
        _fail("model.vocab_size", model_cfg.vocab_size,
              f"smaller than the data's vocabulary ({corpus.vocab_size}, {corpus.description})")
    mesh_axes = run_config.mesh_axes(t.mesh, jax.devices())
    batch_shards = mesh_axes["data"] * mesh_axes["fsdp"] * mesh_axes["expert"]
    if t.batch_size % batch_shards or t.batch_size % jax.process_count():
        _fail("train.batch_size", t.batch_size, f"must divide over the {batch_shards} batch "
              f"shards of the mesh {mesh_axes} and the {jax.process_count()} processes")
    shard_rows = t.batch_size // batch_shards
    if shard_rows % t.micro_batches:
        _fail("train.micro_batches", t.micro_batches, f"must divide the {shard_rows} rows "
              f"each of the {batch_shards} batch shards holds (train.batch_size="
              f"{t.batch_size}, mesh {mesh_axes})")
    mesh = make_mesh(mesh_axes)
    lead = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)

    trainer = make_trainer(cfg, mesh, loss_fn)
    schedule = trainer.schedule
    state = trainer.init()

    dataset = data.make_dataset(
        corpus, seq_len=t.seq_len, global_batch=t.batch_size, seed=cfg.data.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_workers=cfg.data.num_workers, worker_buffer_size=cfg.data.worker_buffer_size,
        whole_documents=whole_documents, pad_id=pad_id)
    data_iter = iter(dataset)

    manager = checkpoint.make_manager(os.path.join(workdir, "checkpoints"),
                                      every=cfg.checkpoint.every or t.steps,
                                      keep=cfg.checkpoint.keep,
                                      async_save=cfg.checkpoint.async_save,
                                      initial_save=cfg.checkpoint.get("initial_save", False))
    latest = manager.latest_step()
    if latest is not None:
        state = checkpoint.restore(manager, latest, state, data_iter)
        start, source = int(state.step), f"resumed from step {latest}"
    elif cfg.init_from:
        state = checkpoint.load_params(cfg.init_from, state)
        start, source = 0, f"initialized from {cfg.init_from}"
    else:
        start, source = 0, "from scratch"

    evaluator = None
    if t.eval_every and held_out is not None:
        evaluator = evaluation.Evaluator(
            trainer.graphdef, held_out, seq_len=t.seq_len, global_batch=t.batch_size,
            num_batches=t.eval_batches, mtp_loss_weight=t.mtp_loss_weight,
            batch_sharding=trainer.batch_sharding)

    tokens_per_step = t.batch_size * t.seq_len
    flops_tok = metrics.flops_per_token(model_cfg, t.seq_len)
    if t.peak_flops:
        peak, peak_source = t.peak_flops * jax.device_count(), "config.train.peak_flops"
    else:
        peak, peak_source = metrics.cached_matmul_peak()
        peak *= jax.process_count()
    pairs_per_step = tokens_per_step * model_cfg.num_experts_per_tok * (
        model_cfg.num_moe_layers + model_cfg.num_mtp_layers)
    layer_names = metrics.moe_layer_names(model_cfg.num_dense_layers,
                                          model_cfg.num_moe_layers, model_cfg.num_mtp_layers)
    writer = metrics.MetricsWriter(workdir, enabled=lead, layer_names=layer_names)
    plots = metrics.RunPlots(workdir, layer_names, enabled=lead)
    config_json = cfg.to_dict()
    if lead:
        print(run_config.describe(cfg), flush=True)
        print(f"glm-jax train: {source}; data {corpus.description}; mesh {mesh_axes}; "
              f"{sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.2f}M params; "
              f"{flops_tok / 1e6:.1f} MFLOP/token; matmul peak {peak / 1e9:.0f} GFLOP/s "
              f"({peak_source}); workdir {workdir}; config written to "
              f"{run_config.write_resolved(cfg, workdir)}"
              # XLA:CPU is where malloc's page faults cost step time.
              + (f"; heap {heap.describe()}" if mesh.devices.flat[0].platform == "cpu" else ""),
              flush=True)

    losses: dict[int, float] = {}
    evals: dict[int, dict[str, float]] = {}

    def run_evaluation(step: int) -> None:
        evals[step] = evaluate(trainer.model(state), step)
        writer.write(step, {f"eval/{k}": v for k, v in evals[step].items()})

    if evaluate is not None and evaluate_at_start and start == 0:
        run_evaluation(0)
    last_counts = None
    stopped_by = None
    report = TrainProgress(total=t.steps, start=start, enabled=lead and progress)
    report.compiling()
    clock, clock_step = time.perf_counter(), start
    step = start
    with StopFlag() as stop:
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        while step < end:
            batch = rules.global_batch(next(data_iter), trainer.batch_sharding)
            if batch_transform is not None:
                batch = batch_transform(batch)
            state, m = trainer.step(state, batch)
            step += 1
            record = None
            eval_loss_now = evaluator is not None and (step % t.eval_every == 0 or step == end)
            if (step % t.log_every == 0 or step == t.steps or step == start + 1
                    or eval_loss_now):
                m = jax.device_get(m)
                now = time.perf_counter()
                # The first step of a run includes compilation: not a throughput sample.
                tps = (tokens_per_step * (step - clock_step) / (now - clock)
                       if step > start + 1 else float("nan"))
                losses[step] = float(m["loss"])
                last_counts = np.asarray(m["expert_counts"])
                record = {
                    "loss": float(m["loss"]), "ce": float(m["ce"]),
                    "mtp_loss": float(m["mtp_loss"]), "z_loss": float(m["z_loss"]),
                    "grad_norm": float(m["grad_norm"]), "lr": float(schedule(step - 1)),
                    "tokens_per_sec": tps, "mfu": tps * flops_tok / peak,
                    "load_imbalance": m["load_imbalance"],
                    "max_load_imbalance": float(np.max(m["load_imbalance"], initial=1.0)),
                    "dropped_fraction": float(m["dropped"]) / max(pairs_per_step, 1),
                    "finite": bool(m["finite"]), "skipped_steps": int(state.skipped),
                }
                if eval_loss_now:
                    record.update(evaluator(state))
                # What post-training losses add: the targets counted (SFT: trained tokens),
                # distillation's KL (overall and per teacher) and its (teacher, token) pairs.
                record.update({k: float(v) for k, v in m.items()
                               if k in ("valid_tokens", "kl", "distilled_tokens")
                               or k.startswith("kl/")})
                # No throughput before the first timed window: None, not nan.
                record = {k: (None if isinstance(v, float) and np.isnan(v) else v)
                          for k, v in record.items()}
                record["run_start"] = step == start + 1  # resume points on the plot
                writer.write(step, record)
                plots.update(last_counts)
                # The next window starts here: logging work is not step time.
                clock, clock_step = time.perf_counter(), step
            report.step(step, record)
            checkpoint.save(manager, step, state, data_iter, config_json)
            if (evaluate is not None and evaluate_every and step % evaluate_every == 0
                    and step < end):
                run_evaluation(step)
            if stop.agreed():
                stopped_by = signal.Signals(stop.signal or signal.SIGTERM).name
                break
        report.close()
        # Always leave the last step on disk (a no-op if the interval already saved it).
        if manager.latest_step() != step:
            checkpoint.save(manager, step, state, data_iter, config_json, force=True)
        manager.wait_until_finished()
    if evaluate is not None and not stopped_by and step == t.steps and step not in evals:
        run_evaluation(step)
    manager.close()
    writer.close()
    if lead:
        if stopped_by:
            print(f"stopped by {stopped_by} after step {step}; checkpoint saved in "
                  f"{workdir}/checkpoints, run again to resume", flush=True)
        else:
            for path in plots.update(last_counts, force=True):
                print(f"wrote {path}", flush=True)
    return {"losses": losses, "stopped_by": stopped_by, "state": state, "step": step,
            "eval": evals}


def main(argv: list[str] | None = None) -> None:
    """absl entry point (train.py defines the flags)."""
    from absl import flags, logging

    from glm_jax.train.cli import overrides

    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                 FLAGS.process_id)
    cfg = FLAGS.config
    workdir = FLAGS.workdir or os.path.join(
        "runs", os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0])
    run(cfg, workdir, overrides=overrides())
