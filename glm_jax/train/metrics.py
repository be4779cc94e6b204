"""Throughput accounting (model FLOPs, MFU) and the run's metric sinks: a progress bar,
DIR/metrics.jsonl, TensorBoard events, and PNG plots at the end.

Why not clu's metric writers / periodic actions: `clu.metric_writers` (and
`clu.periodic_actions`, which imports it) imports TensorFlow for its SummaryWriter
(clu 0.0.12), a dependency far heavier than the whole training stack here; tensorboardX
writes the same event files, and a JSON-lines file plus tqdm cover the rest."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from glm_jax.config import GlmConfig


def active_matmul_params(cfg: GlmConfig) -> int:
    """Matmul parameters one token passes through (forward): attention, dense MLPs, router,
    top-k routed experts + shared experts, lm_head, and the MTP layers (which also run the
    lm_head). The embedding lookup is not a matmul."""
    h = cfg.hidden_size
    attn = h * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    dense_mlp = 3 * h * cfg.intermediate_size
    moe_mlp = (h * cfg.n_routed_experts
               + 3 * h * cfg.moe_intermediate_size * cfg.num_experts_per_tok
               + 3 * h * cfg.shared_intermediate_size)
    head = h * cfg.vocab_size
    main = cfg.num_dense_layers * (attn + dense_mlp) + cfg.num_moe_layers * (attn + moe_mlp)
    mtp = cfg.num_mtp_layers * (2 * h * h + attn + moe_mlp + head)
    return main + head + mtp


def flops_per_token(cfg: GlmConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul params + attention scores and values,
    12 * layers * seq_len * heads * head_dim (the PaLM accounting, no causal discount;
    the same accounting as docs' CPU baselines)."""
    layers = cfg.num_hidden_layers + cfg.num_mtp_layers
    attn = 12 * layers * seq_len * cfg.num_attention_heads * cfg.head_dim
    return 6.0 * active_matmul_params(cfg) + attn


def measure_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a jitted float32 n x n matmul on the first local device: the CPU peak
    that CPU-MFU is measured against."""
    a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.local_devices()[0])
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


class MetricsWriter:
    """JSON lines + TensorBoard, written by process 0 only. metrics.jsonl is appended to,
    so a resumed run continues the same file."""

    def __init__(self, workdir: str, *, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._file = open(self.path, "a")
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
            elif isinstance(value, list) and key == "load_imbalance":
                for layer, v in enumerate(value):
                    self._tb.add_scalar(f"load_imbalance/layer{layer}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tb.close()
            self._file = self._tb = None


def _plain(v: Any) -> Any:
    if isinstance(v, (np.ndarray, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.ndim == 0 else v.tolist()
    return v


def read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(workdir: str, expert_counts: np.ndarray | None) -> list[str]:
    """loss_curve.png from metrics.jsonl (the whole run, across resumes), and
    expert_load.png (the last step's load per layer and expert, relative to the mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # Evaluation records (keys "eval/...") share the file; the loss curve skips them.
    records = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
    if records:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["loss"] for r in records], label="loss (total)")
        ax.plot(steps, [r["ce"] for r in records], label="next-token CE")
        if any(r.get("mtp_loss") for r in records):
            ax.plot(steps, [r["mtp_loss"] for r in records], label="MTP CE")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, os.path.join(workdir, "loss_curve.png")))
        plt.close(fig)
    if expert_counts is not None and expert_counts.size:
        load = expert_counts / np.maximum(expert_counts.mean(axis=-1, keepdims=True), 1e-9)
        fig, ax = plt.subplots(figsize=(7, 1 + 0.5 * load.shape[0]))
        im = ax.imshow(load, aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer (MTP last)")
        ax.set_title("expert load / mean load, last step")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        written.append(_save(fig, os.path.join(workdir, "expert_load.png")))
        plt.close(fig)
    return written


def _save(fig, path: str) -> str:
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path
