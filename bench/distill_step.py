"""SFT step time with and without distillation from one teacher, configs/sft_tiny.py, on
the embedded task set's packed rows: `python -m bench.distill_step [--batch 2] [--seq 1024]
[--repeats 5]`.

Both trainers run in this process on one CPU device, strictly alternated (plain SFT step,
then teacher forward + distillation step), after one untimed compiling step each. The
teacher is a checkpoint of the tiny model saved to a temporary folder (the student's own
initial weights: the cost of a teacher does not depend on its values) and loaded by
`Teachers`, as `python -m glm_jax.sft --config.sft.teachers=...` does. The distillation
step is timed whole (teacher forward + train step) and by part.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import orbax.checkpoint as ocp
from flax import nnx

from bench.common import append_section
from configs import sft_tiny
from glm_jax.chat.tokens import load_chat_tokenizer
from glm_jax.config import GlmConfig
from glm_jax.sft.data import embedded_corpus
from glm_jax.sft.distill import DistillationLoss
from glm_jax.sft.teachers import Teachers
from glm_jax.train import data
from glm_jax.train.loss import NextTokenLoss
from glm_jax.train.trainer import make_trainer
from sharding.mesh import make_mesh


def save_teacher(path: str, state, model: dict) -> None:
    pure = jax.device_get(nnx.to_pure_dict(nnx.merge_state(state.params, state.biases)))
    handler = ocp.CompositeCheckpointHandler(params=ocp.PyTreeCheckpointHandler(),
                                             config=ocp.JsonCheckpointHandler())
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(path, args=ocp.args.Composite(params=ocp.args.PyTreeSave(pure),
                                                 config=ocp.args.JsonSave({"model": model})))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    cfg = sft_tiny.get_config()
    cfg.train.batch_size, cfg.train.seq_len = args.batch, args.seq
    model_cfg = GlmConfig.from_dict(cfg.model.to_dict())
    t = cfg.train
    tokenizer = load_chat_tokenizer(None)
    corpus, _ = embedded_corpus(tokenizer, seed=0, train_problems=200, eval_problems=1)
    stream = iter(data.make_dataset(corpus, seq_len=args.seq, global_batch=args.batch,
                                    seed=0, whole_documents=True, pad_id=tokenizer.pad_id))
    batches = [{k: jax.numpy.asarray(v) for k, v in next(stream).items()}
               for _ in range(args.repeats + 1)]

    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    depths = model_cfg.num_mtp_layers
    plain = make_trainer(cfg, mesh, NextTokenLoss(t.mtp_loss_weight, t.z_loss_weight, depths))
    distill = make_trainer(cfg, mesh, DistillationLoss(1.0, 0.0, t.mtp_loss_weight,
                                                       t.z_loss_weight, depths))
    plain_state, distill_state = plain.init(), distill.init()
    with tempfile.TemporaryDirectory() as tmp:
        save_teacher(f"{tmp}/teacher", plain_state, cfg.model.to_dict())
        teachers = Teachers([f"{tmp}/teacher"], mesh, vocab_size=model_cfg.vocab_size)

    times = {"plain": [], "distill": [], "teacher": [], "student": []}
    for i, batch in enumerate(batches):  # batch 0 compiles both: not timed
        start = time.perf_counter()
        plain_state, m = plain.step(plain_state, batch)
        jax.block_until_ready(m["loss"])
        mid = time.perf_counter()
        with_logits = teachers(batch)
        jax.block_until_ready(with_logits["teacher_logits"])
        forward = time.perf_counter()
        distill_state, m = distill.step(distill_state, with_logits)
        jax.block_until_ready(m["loss"])
        end = time.perf_counter()
        if i:
            times["plain"].append(mid - start)
            times["distill"].append(end - mid)
            times["teacher"].append(forward - mid)
            times["student"].append(end - forward)
        print(f"step {i}: plain {mid - start:.2f} s, distill {end - mid:.2f} s "
              f"(teacher forward {forward - mid:.2f} s)", flush=True)

    def cell(name: str) -> str:
        xs = times[name]
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

    ratio = statistics.median(times["distill"]) / statistics.median(times["plain"])
    logits_mb = args.batch * args.seq * model_cfg.vocab_size * 4 / 1e6
    table = "\n".join([
        "| step (s), median (min-max) | SFT (NextTokenLoss) | SFT + 1 teacher (DistillationLoss) |",
        "|---|---|---|",
        f"| whole step | {cell('plain')} | {cell('distill')} ({ratio:.2f}x) |",
        f"| teacher forward | - | {cell('teacher')} |",
        f"| train step | {cell('plain')} | {cell('student')} |",
    ])
    notes = (f"configs/sft_tiny.py model (vocab {model_cfg.vocab_size}), batch {args.batch} x "
             f"{args.seq} packed embedded-task rows, AdamW, one CPU device, float32; "
             f"{args.repeats} timed steps each after one compiling step, strictly alternated. "
             f"The teacher logits held per step: {logits_mb:.1f} MB (B x T x V float32).")
    append_section("Distillation (issue 15): SFT step with and without one teacher, "
                   "configs/sft_tiny.py", table, notes)


if __name__ == "__main__":
    main()
