"""Held-out evaluation: the loss on documents the run never trains on.

`split_corpus` keeps the last `data.eval_fraction` of the corpus's documents apart (whole
documents, so no text is shared with training). Every `train.eval_every` steps the loop
runs the current weights, forward only, over the first `train.eval_batches` batches of that
split: the same rows every time, so the curve moves only because the model does. The
result goes into metrics.jsonl and TensorBoard as eval_loss / eval_ce / eval_mtp_loss, and
onto the loss plot.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from glm_jax.cli_errors import ConfigError
from glm_jax.train.data import Corpus, PackedRows
from glm_jax.train.loss import lm_loss
from glm_jax.train.trainer import TrainState
from sharding import rules


def split_corpus(corpus: Corpus, eval_fraction: float) -> tuple[Corpus, Corpus | None]:
    """(train, held-out): the held-out part is the documents that start after (1 -
    eval_fraction) of the tokens, or the last document if none does. eval_fraction 0:
    (corpus, None)."""
    if not eval_fraction:
        return corpus, None
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"config.data.eval_fraction={eval_fraction}: must be in [0, 1)")
    cut_at = int(corpus.num_tokens * (1 - eval_fraction))
    d = min(int(np.searchsorted(corpus.doc_starts, cut_at, side="left")),
            corpus.doc_starts.size - 1)
    if d == 0:
        raise ConfigError(f"config.data.eval_fraction={eval_fraction}: the corpus "
                          f"({corpus.doc_starts.size} documents) has no document boundary to "
                          "split at; use more data or eval_fraction 0")
    cut = int(corpus.doc_starts[d])
    train = dataclasses.replace(
        corpus, tokens=corpus.tokens[:cut], doc_starts=corpus.doc_starts[:d],
        description=f"{corpus.description}; the last {corpus.doc_starts.size - d} documents "
        f"({corpus.num_tokens - cut} tokens) held out for evaluation")
    held = dataclasses.replace(corpus, tokens=corpus.tokens[cut:],
                               doc_starts=corpus.doc_starts[d:] - cut,
                               description=f"held out: {corpus.doc_starts.size - d} documents,"
                               f" {corpus.num_tokens - cut} tokens")
    return train, held


class Evaluator:
    """Forward-only loss of the run's weights on fixed held-out batches."""

    def __init__(self, graphdef: nnx.GraphDef, held_out: Corpus, *, seq_len: int,
                 global_batch: int, num_batches: int, mtp_loss_weight: float,
                 batch_sharding: NamedSharding):
        rows = PackedRows(held_out, seq_len)
        available = len(rows) // global_batch
        if available < 1:
            raise ConfigError(f"config.data.eval_fraction: the held-out part ({held_out.num_tokens}"
                              f" tokens) is smaller than one batch of {global_batch} x {seq_len};"
                              " raise data.eval_fraction or set train.eval_every=0")
        local, me = global_batch // jax.process_count(), jax.process_index()
        self.batches = []
        for b in range(min(num_batches, available)):
            first = b * global_batch + me * local  # this process's rows of global batch b
            items = [rows[i] for i in range(first, first + local)]
            self.batches.append({k: np.stack([it[k] for it in items]) for k in items[0]})
        self.sharding = batch_sharding

        def loss(params, biases, batch):
            model = nnx.merge(graphdef, params, biases)
            out = model(batch["tokens"], positions=batch["positions"],
                        segment_ids=batch["segment_ids"])
            total, m = lm_loss(out.logits, out.mtp_logits, batch,
                               mtp_loss_weight=mtp_loss_weight)
            return {"loss": total, "ce": m["ce"], "mtp_loss": m["mtp_loss"],
                    "tokens": m["valid_tokens"]}

        self._loss = jax.jit(loss)

    def __call__(self, state: TrainState) -> dict[str, float]:
        """{"eval_loss", "eval_ce", "eval_mtp_loss"}: means over the batches weighted by
        their valid target tokens."""
        sums = {"loss": 0.0, "ce": 0.0, "mtp_loss": 0.0}
        tokens = 0.0
        with jax.set_mesh(self.sharding.mesh):
            for local in self.batches:
                batch = rules.global_batch(local, self.sharding)
                m = jax.device_get(self._loss(state.params, state.biases, batch))
                n = float(m["tokens"])
                tokens += n
                for k in sums:
                    sums[k] += float(m[k]) * n
        return {f"eval_{k}": v / max(tokens, 1.0) for k, v in sums.items()}

