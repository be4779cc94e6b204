"""Throughput accounting (model FLOPs, MFU) and the run's metric sinks: a progress bar,
DIR/metrics.jsonl, TensorBoard events, and PNG plots at the end.

Why not clu's metric writers / periodic actions: `clu.metric_writers` (and
`clu.periodic_actions`, which imports it) imports TensorFlow for its SummaryWriter
(clu 0.0.12), a dependency far heavier than the whole training stack here; tensorboardX
writes the same event files, and a JSON-lines file plus tqdm cover the rest."""

from __future__ import annotations

import json
import os
import platform
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


def peak_cache_path() -> str:
    """Where measured matmul peaks are kept: $GLM_JAX_CACHE, else ~/.cache/glm-jax."""
    root = os.environ.get("GLM_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "glm-jax")
    return os.path.join(root, "matmul_peak.json")


def cached_matmul_peak() -> tuple[float, str]:
    """`measure_matmul_peak` once per machine and device kind, then read from the cache
    file, so that MFU is comparable between runs (a measurement taken while other work
    shares the machine would move every later MFU). Returns (FLOP/s, where it came from).
    train.peak_flops replaces it altogether."""
    device = jax.local_devices()[0]
    key = f"{platform.node()}|{device.platform}|{device.device_kind}|{os.cpu_count()} cpus"
    path = peak_cache_path()
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key]), f"cached in {path}"
    peak = measure_matmul_peak()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({**cache, key: peak}, f, indent=1)
        os.replace(tmp, path)
        return peak, f"measured now, cached in {path}"
    except OSError:  # a read-only home: measure every run
        return peak, "measured now (not cached)"


class MetricsWriter:
    """JSON lines + TensorBoard, written by process 0 only. metrics.jsonl is appended to,
    so a resumed run continues the same file."""

    def __init__(self, workdir: str, *, enabled: bool, layer_names: list[str] | None = None):
        self.enabled = enabled
        self.layer_names = layer_names  # TensorBoard tags of the per-layer load imbalance
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
            if key not in ("step", "run_start") and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
            elif isinstance(value, list) and key == "load_imbalance":
                for row, v in enumerate(value):
                    name = (self.layer_names[row] if self.layer_names else f"row {row}")
                    self._tb.add_scalar(f"load_imbalance/{name}", v, step)

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


def moe_layer_names(first_moe_layer: int, num_moe_layers: int, num_mtp_layers: int
                    ) -> list[str]:
    """Model layer numbers of the rows of expert_counts (the MoE layers, then MTP)."""
    last = first_moe_layer + num_moe_layers
    return ([f"layer {i}" for i in range(first_moe_layer, last)]
            + [f"MTP (layer {last + d})" for d in range(num_mtp_layers)])


def plot_run(workdir: str, expert_counts: np.ndarray | None,
             layer_names: list[str] | None = None) -> list[str]:
    """loss_curve.png from metrics.jsonl (the whole run across resumes, resume points
    marked, the held-out loss as points) and expert_load.png (top: the last logged step's
    load per layer and expert relative to the layer's mean, on a scale up to the worst
    expert; bottom: max / mean load per layer over the run). Rows are named by
    `layer_names` (moe_layer_names). Written to temporary files, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    run = os.path.basename(os.path.normpath(workdir))
    written = []
    # Evaluation records (keys "eval/...") share the file; the loss curve skips them.
    records = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
    if records:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["loss"] for r in records], label="loss (total)")
        ax.plot(steps, [r["ce"] for r in records], label="next-token CE")
        if any(r.get("mtp_loss") for r in records):
            ax.plot(steps, [r["mtp_loss"] for r in records], label="MTP CE")
        held = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None]
        if held:
            ax.plot(*zip(*held), "o-", ms=4, label="held-out loss (total)")
        resumes = [r["step"] - 1 for r in records if r.get("run_start") and r["step"] > 1]
        for i, step in enumerate(resumes):
            ax.axvline(step, color="gray", ls="--", lw=1,
                       label="resumed" if i == 0 else None)
        ax.set_title(f"{run}: training loss (step {steps[-1]})")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(save_figure(fig, os.path.join(workdir, "loss_curve.png")))
        plt.close(fig)
    if expert_counts is not None and expert_counts.size:
        load = expert_counts / np.maximum(expert_counts.mean(axis=-1, keepdims=True), 1e-9)
        names = layer_names or [f"MoE row {i}" for i in range(load.shape[0])]
        history = [(r["step"], r["load_imbalance"]) for r in records
                   if isinstance(r.get("load_imbalance"), list)]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 3 + 0.4 * load.shape[0] + 3),
                                          height_ratios=[1 + 0.4 * load.shape[0], 3])
        worst = max(float(load.max()), 1.01)
        im = top.imshow(load, aspect="auto", cmap="coolwarm",
                        norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=worst))
        top.set_yticks(range(len(names)), names)
        top.xaxis.set_major_locator(MaxNLocator(integer=True))
        top.set_xlabel("expert")
        top.set_title(f"{run}: expert load / mean load at the last logged step "
                      f"(worst {worst:.2f})")
        fig.colorbar(im, ax=top)
        for row, name in enumerate(names):
            if history and row < len(history[0][1]):
                bottom.plot([h[0] for h in history], [h[1][row] for h in history], label=name)
        bottom.axhline(1.0, color="gray", lw=1)
        bottom.set_xlabel("step")
        bottom.set_ylabel("max / mean load")
        bottom.set_title("load imbalance per layer over the run")
        bottom.grid(alpha=0.3)
        if history:
            bottom.legend(fontsize="small")
        fig.tight_layout()
        written.append(save_figure(fig, os.path.join(workdir, "expert_load.png")))
        plt.close(fig)
    return written


class RunPlots:
    """The run's plots, regenerated at log steps while it trains (at most every
    `min_seconds`: a plot costs a fraction of a second) and always at the end."""

    def __init__(self, workdir: str, layer_names: list[str], *, enabled: bool,
                 min_seconds: float = 30.0):
        self.workdir, self.layer_names, self.enabled = workdir, layer_names, enabled
        self.min_seconds = min_seconds
        self._last = time.perf_counter()  # the first plot waits for some history

    def update(self, expert_counts: np.ndarray | None, *, force: bool = False) -> list[str]:
        if not self.enabled or not (force or time.perf_counter() - self._last
                                    >= self.min_seconds):
            return []
        self._last = time.perf_counter()
        return plot_run(self.workdir, expert_counts, self.layer_names)


def save_figure(fig, path: str, dpi: int = 100) -> str:
    """Write a matplotlib figure to the PNG `path` through a temporary file and a rename, so
    a viewer (or a run stopped mid-write) never sees half a file. Returns `path`."""
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)
    return path
