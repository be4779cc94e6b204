"""Supervised fine-tuning on the pretraining loop (glm_jax.train.loop.run): the same
checkpoints, exact resume, metrics.jsonl, TensorBoard, plots and progress bar, with the
conversation corpus packed whole (`loss_mask` on what the assistant writes), the trainer's
`NextTokenLoss` (which reads that mask for the main head and the MTP depths) and
evaluation by generation on the held-out split.

`run_sft(cfg, workdir)` is the whole command; `python -m glm_jax.sft` parses the flags.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import ml_collections

from glm_jax.chat.tokens import ChatTokenizer, load_chat_tokenizer
from glm_jax.train import data, loop


def check(cfg: ml_collections.ConfigDict) -> None:
    """The SFT section's checks (the loop checks the rest). Raises ValueError."""
    s = cfg.sft
    for name in ("train_problems", "eval_problems", "eval_max_new_tokens", "eval_batch_size"):
        if not isinstance(s[name], int) or s[name] < 1:
            raise ValueError(f"config.sft.{name}={s[name]!r}: must be a positive integer")
    if s.eval_every < 0:
        raise ValueError(f"config.sft.eval_every={s.eval_every!r}: must be >= 0 (0 = only "
                         "before and after training)")
    if cfg.data.path:
        raise ValueError(f"config.data.path={cfg.data.path!r}: SFT reads conversations from "
                         "config.sft.data (JSONL files), not a token folder")
    from glm_jax.sft.tasks import TASKS

    unknown = sorted(set(s.tasks.split(",")) - set(TASKS))
    if unknown or not s.tasks:
        raise ValueError(f"config.sft.tasks={s.tasks!r}: unknown task(s) {unknown}; choose "
                         f"from {','.join(TASKS)}")
    if s.get("max_digits", 0) < 0:
        raise ValueError(f"config.sft.max_digits={s.max_digits!r}: must be >= 0 (0 = each "
                         "task's own range)")
    if not s.get("distill_temperature", 1.0) > 0:
        raise ValueError(f"config.sft.distill_temperature={s.distill_temperature!r}: must "
                         "be > 0")
    if not 0.0 <= s.get("ce_weight", 0.0) <= 1.0:
        raise ValueError(f"config.sft.ce_weight={s.ce_weight!r}: must be in [0, 1] (0 = "
                         "distillation only, 1 = next-token loss only)")
    if s.tokenizer and not os.path.isfile(s.tokenizer):
        raise ValueError(f"config.sft.tokenizer={s.tokenizer!r}: no such file (a hub "
                         "tokenizer.json, or '' for the byte-level default)")


def held_out_records(paths: list[str]) -> list[dict[str, Any]]:
    """User held-out records: conversations whose final answer is checked against their
    "answer" field; "thinking" (default true) picks the mode."""
    from glm_jax.sft.data import read_conversations

    records = []
    for path in paths:
        for where, record in read_conversations(path):
            if "answer" not in record:
                raise ValueError(f"{where}: a held-out record needs an \"answer\" (the "
                                 "verifier compares the final answer's last integer to it)")
            records.append({"task": "user", "thinking": True, **record})
    return records


def load_data(cfg: ml_collections.ConfigDict, tokenizer: ChatTokenizer
              ) -> tuple[data.Corpus, list[dict[str, Any]]]:
    """(training corpus with loss_mask, held-out records). Raises ValueError /
    FileNotFoundError naming the file and line of a bad record."""
    from glm_jax.sft.data import embedded_corpus, load_conversations

    s = cfg.sft
    if s.data:
        corpus = load_conversations([p for p in s.data.split(",") if p], tokenizer)
        held_out = held_out_records([p for p in s.eval_data.split(",") if p])
    else:
        corpus, held_out = embedded_corpus(tokenizer, seed=s.seed,
                                           train_problems=s.train_problems,
                                           eval_problems=s.eval_problems,
                                           tasks=tuple(s.tasks.split(",")),
                                           max_digits=s.get("max_digits", 0) or None)
        if s.eval_data:
            held_out = held_out_records([p for p in s.eval_data.split(",") if p])
    return corpus, held_out


def _write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=os.path.dirname(path))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def make_evaluate(cfg: ml_collections.ConfigDict, tokenizer: ChatTokenizer,
                  held_out: list[dict[str, Any]], workdir: str, *, lead: bool = True):
    """The loop's evaluate hook: greedy generation on the held-out records (calculator
    calls answered), accuracy overall / per mode / per task as "accuracy/...", plus the
    share of finished answers; the played conversations go to workdir/eval/step_N.jsonl."""
    from glm_jax.sft.evaluate import accuracy, model_policy, run_episodes

    def evaluate(model, step: int) -> dict[str, float]:
        policy = model_policy(model, tokenizer, max_new_tokens=cfg.sft.eval_max_new_tokens)
        results = run_episodes(held_out, policy, tokenizer,
                               batch_size=cfg.sft.eval_batch_size)
        metrics = {f"accuracy/{k}": v for k, v in accuracy(results).items()}
        if lead:
            _write_jsonl(os.path.join(workdir, "eval", f"step_{step}.jsonl"), results)
            modes = ", ".join(f"{m.replace('_', '-')} {metrics[f'accuracy/{m}']:.1%}"
                              for m in ("thinking", "non_thinking")
                              if f"accuracy/{m}" in metrics)
            tasks = ", ".join(f"{k[len('accuracy/task/'):]} {v:.0%}"
                              for k, v in metrics.items() if k.startswith("accuracy/task/"))
            print(f"eval step {step}: held-out accuracy {metrics['accuracy/all']:.1%} "
                  f"({modes}; {len(results)} conversations; {tasks})", flush=True)
        return metrics

    return evaluate


def plot_accuracy(workdir: str) -> str | None:
    """eval_accuracy.png: held-out accuracy per mode over the steps evaluated."""
    from glm_jax.train.metrics import read_metrics, save_figure

    records = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
               if "eval/accuracy/all" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    for key, label in (("all", "all"), ("thinking", "thinking"),
                       ("non_thinking", "non-thinking")):
        if all(f"eval/accuracy/{key}" in r for r in records):
            ax.plot(steps, [r[f"eval/accuracy/{key}"] for r in records], "o-", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = save_figure(fig, os.path.join(workdir, "eval_accuracy.png"))
    plt.close(fig)
    return path


def teacher_paths(cfg: ml_collections.ConfigDict) -> list[str]:
    """config.sft.teachers as a list ([] = no distillation)."""
    return [p for p in cfg.sft.get("teachers", "").split(",") if p]


def student_vocab_size(cfg: ml_collections.ConfigDict) -> int:
    """The vocabulary the student trains with: init_from's (which fixes the architecture)
    or config.model's. Reads only JSON."""
    from glm_jax.checkpoint_source import resolve_checkpoint

    if cfg.get("init_from"):
        return resolve_checkpoint(cfg.init_from, what="config.init_from").config.vocab_size
    return cfg.model.vocab_size


def prepare(cfg: ml_collections.ConfigDict):
    """Every check and the data, before anything compiles: (tokenizer, corpus, held-out
    records, conversations cut to train.seq_len). Raises ValueError / FileNotFoundError."""
    check(cfg)
    loop.validate(cfg)
    if teacher_paths(cfg):
        from glm_jax.sft.teachers import check_teachers

        check_teachers(teacher_paths(cfg), student_vocab_size(cfg))
    tokenizer = load_chat_tokenizer(cfg.sft.tokenizer or None)
    corpus, held_out = load_data(cfg, tokenizer)
    truncated = data.DocumentRows(corpus, cfg.train.seq_len, tokenizer.pad_id).truncated
    return tokenizer, corpus, held_out, truncated


def distillation(cfg: ml_collections.ConfigDict, workdir: str, overrides: tuple[str, ...]):
    """(DistillationLoss, Teachers) of config.sft: the teachers are loaded on the mesh the
    loop builds from config.train.mesh, and checked against the student's resolved model."""
    import jax

    from glm_jax.config import GlmConfig
    from glm_jax.sft.distill import DistillationLoss
    from glm_jax.sft.teachers import Teachers
    from glm_jax.train import run_config
    from sharding.mesh import make_mesh

    resolved, _ = run_config.resolve(cfg, workdir, overrides)
    model_cfg = GlmConfig.from_dict(resolved.model.to_dict())
    t = resolved.train
    loss_fn = DistillationLoss(cfg.sft.get("distill_temperature", 1.0),
                               cfg.sft.get("ce_weight", 0.0), t.mtp_loss_weight,
                               t.z_loss_weight, model_cfg.num_mtp_layers)
    mesh = make_mesh(run_config.mesh_axes(t.mesh, jax.devices()))
    return loss_fn, Teachers(teacher_paths(cfg), mesh, vocab_size=model_cfg.vocab_size)


def run_sft(cfg: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
            stop_at: int | None = None, prepared=None,
            overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Fine-tune to cfg.train.steps (resuming `workdir`), evaluating on the held-out split
    before (fresh runs, sft.eval_at_start), every sft.eval_every steps and at the end.
    Returns loop.run's result."""
    import jax

    tokenizer, corpus, held_out, truncated = prepared or prepare(cfg)
    lead = jax.process_index() == 0
    n_docs = corpus.doc_starts.size
    if lead:
        print(f"glm-jax sft: {corpus.description}; {truncated} of {n_docs} conversations "
              f"longer than train.seq_len={cfg.train.seq_len} are cut (their tail is not "
              f"trained); {len(held_out)} held-out conversations", flush=True)
    from glm_jax.config import GlmConfig
    from glm_jax.train.loss import NextTokenLoss

    t = cfg.train
    # The pretraining loss: it reads the batch's loss_mask for the main head and every MTP
    # depth, and normalizes over the whole batch (micro-batches add up to it).
    loss_fn = NextTokenLoss(t.mtp_loss_weight, t.z_loss_weight,
                            GlmConfig.from_dict(cfg.model.to_dict()).num_mtp_layers)
    teachers = None
    if teacher_paths(cfg):
        loss_fn, teachers = distillation(cfg, workdir, overrides)
        if lead:
            print(f"glm-jax sft: distilling from {len(teachers)} teacher(s) "
                  f"({', '.join(str(s.path) for s in teachers.sources)}) at temperature "
                  f"{loss_fn.temperature}, ce_weight {loss_fn.ce_weight}", flush=True)
    evaluate = (make_evaluate(cfg, tokenizer, held_out, workdir, lead=lead)
                if held_out else None)
    result = loop.run(cfg, workdir, progress=progress, stop_at=stop_at, overrides=overrides,
                      corpus=corpus, whole_documents=True, pad_id=tokenizer.pad_id,
                      loss_fn=loss_fn,
                      evaluate=evaluate, evaluate_every=cfg.sft.eval_every,
                      evaluate_at_start=cfg.sft.eval_at_start, batch_transform=teachers)
    if lead and evaluate is not None:
        path = plot_accuracy(workdir)
        if path:
            print(f"wrote {path}", flush=True)
    result["truncated"] = truncated
    return result
