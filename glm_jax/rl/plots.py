"""rl_curves.png: the RL run's curves from metrics.jsonl (the whole run across resumes,
resume points marked): reward (sampled, and the held-out greedy evaluation's), pass rate
per curriculum level, response length, clipped fractions with the clip range, entropy,
and the sampling temperature."""

from __future__ import annotations

import os
from collections.abc import Sequence

from glm_jax.train.metrics import read_metrics, save_figure


def plot_rl(workdir: str, level_names: Sequence[str]) -> str | None:
    """Writes WORKDIR/rl_curves.png (a temporary file, then renamed); returns its path, or
    None before the first step."""
    everything = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    records = [r for r in everything if "reward" in r]
    evals = [r for r in everything if "eval/reward" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]

    def series(key):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return ([p[0] for p in pts], [p[1] for p in pts])

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    (reward, passes, length), (clip, entropy, temp) = axes
    xs, ys = series("reward")
    reward.plot(xs, ys, alpha=0.5, label="mean reward (all samples)")
    if len(ys) >= 5:  # the trend under the sampling noise
        import numpy as np

        smooth = np.convolve(ys, np.ones(5) / 5, mode="valid")
        reward.plot(xs[4:], smooth, lw=2, label="5-step moving average")
    if evals:
        reward.plot([r["step"] for r in evals], [r["eval/reward"] for r in evals], "s-",
                    color="black", label="held-out, greedy (all levels)")
        sampled = [(r["step"], r["eval/sampled_reward"]) for r in evals
                   if "eval/sampled_reward" in r]
        if sampled:
            reward.plot(*zip(*sampled), "^-", color="dimgray",
                        label="held-out, sampled at the eval temperature")
    reward.set_title("reward")
    for name in level_names:
        xs, ys = series(f"pass_rate/{name}")
        if xs:
            passes.plot(xs, ys, "o-", ms=3, label=name)
    passes.set_title("pass rate per level (the level trained on)")
    passes.set_ylim(-0.02, 1.02)
    length.plot(*series("response_length"), label="mean")
    length.plot(*series("response_length_max"), label="max", alpha=0.6)
    length.set_title("response length (tokens)")
    clip.plot(*series("clip_frac_low"), label="clipped, A<0 (low)")
    clip.plot(*series("clip_frac_high"), label="clipped, A>0 (high)")
    twin = clip.twinx()
    twin.plot(*series("eps_low"), "--", color="gray", label="eps_low")
    twin.plot(*series("eps_high"), ":", color="gray", label="eps_high")
    twin.set_ylabel("clip range eps")
    twin.legend(loc="upper right", fontsize="small")
    clip.set_title("clip fraction")
    # A step whose batch had no group with signal trained no token: no entropy to show.
    trained = [(r["step"], r["entropy"]) for r in records if r.get("trained_tokens")]
    entropy.plot([p[0] for p in trained], [p[1] for p in trained])
    entropy.set_title("policy entropy on trained tokens (nats)")
    temp.plot(*series("temperature"))
    temp.set_title("sampling temperature")
    resumes = [r["step"] - 1 for r in records if r.get("run_start") and r["step"] > 1]
    for ax in axes.flat:
        for i, s in enumerate(resumes):
            ax.axvline(s, color="gray", ls="--", lw=1, label="resumed" if i == 0 else None)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="upper left")
    fig.suptitle(f"{os.path.basename(os.path.normpath(workdir))}: RL (step {steps[-1]})")
    fig.tight_layout()
    path = save_figure(fig, os.path.join(workdir, "rl_curves.png"), dpi=90)
    plt.close(fig)
    return path
