"""FP8 weights: how far an e4m3 copy of a trained model drifts, per layout, and what the
converter's memory does on FP8 folders.

    python -m bench.fp8 quality [--steps 300]
    python -m bench.fp8 rss --workdir /work/bench_fp8 --layers 8

quality: trains configs/tiny.py's model (byte-level, on the embedded stdlib corpus) for
`--steps` Adam steps in float32, then evaluates on held-out sequences the float32 model
and three copies computed in float32 from other weights: every weight in bf16; the
decoder Linears in e4m3 per output channel (the rest bf16, as the hub's FP8 checkpoints);
the same with 128 x 128 blocks. Printed per copy: weight error of the quantized Linears
(relative RMS), log-probability gap to the float32 model on the next token (mean and max
|delta log p|, and its mean when sampling from the model matters: KL(f32 || copy)), and
max |delta logit|.

rss: writes a random bf16 hub folder with bench/convert.py's GLM-4.5-shaped layers,
converts it to an orbax checkpoint, exports it with to-hf --fp8 channel and block, and
measures peak RSS (/usr/bin/time -v) of to-jax --dtype bfloat16 on the bf16 folder and on
each FP8 folder, and of the three to-hf runs, side by side.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import nnx

from glm_jax import fp8
from glm_jax.config import GlmConfig
from glm_jax.hf_io import from_hf_state_dict, to_hf_state_dict
from glm_jax.model.transformer import GlmForCausalLM
from glm_jax.train.data import stdlib_corpus

ROOT = Path(__file__).resolve().parent.parent


def train_tiny(steps: int, seq_len: int = 128, batch: int = 8, seed: int = 0):
    """configs/tiny.py's model trained on stdlib bytes; returns (model, held-out [B, T])."""
    from configs.tiny import get_config
    config = GlmConfig.from_dict(get_config().model.to_dict())
    corpus = stdlib_corpus(4_000_000)
    tokens = np.asarray(corpus.tokens, np.int32)
    held_out = tokens[-(16 * (seq_len + 1)):].reshape(16, seq_len + 1)
    train = tokens[: -held_out.size]
    rng = np.random.default_rng(seed)
    model = GlmForCausalLM(config, rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, steps, 3e-4)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.0), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt, ids):
        def loss_fn(m):
            logits = m(ids[:, :-1]).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    for i in range(steps):
        starts = rng.integers(0, train.size - seq_len - 1, batch)
        ids = jnp.asarray(np.stack([train[s:s + seq_len + 1] for s in starts]))
        loss = float(step(model, optimizer, ids))
        if i % 50 == 0 or i == steps - 1:
            print(f"step {i} loss {loss:.3f}", flush=True)
    return model, held_out


def variant(hub: dict[str, np.ndarray], config: GlmConfig, kind: str):
    """(model computing in float32 from `kind` weights, relative RMS error of the Linears)."""
    out, num, den = {}, 0.0, 0.0
    for name, w in hub.items():
        w = np.asarray(w, np.float32)
        if kind in fp8.LAYOUTS and fp8.is_quantized_weight(name):
            layout = fp8.LAYOUTS[kind]
            q = layout.dequantize(*layout.quantize(w))
            num, den = num + float(((q - w) ** 2).sum()), den + float((w ** 2).sum())
            out[name] = q
        elif kind == "float32":
            out[name] = w
        else:  # bf16 storage, as the hub's FP8 checkpoints keep the rest
            b = w.astype(ml_dtypes.bfloat16).astype(np.float32)
            if kind == "bfloat16" and fp8.is_quantized_weight(name):
                num, den = num + float(((b - w) ** 2).sum()), den + float((w ** 2).sum())
            out[name] = b
    return from_hf_state_dict(out, config), (num / den) ** 0.5 if den else 0.0


def quality(args) -> None:
    model, held_out = train_tiny(args.steps)
    config = model.config
    hub = to_hf_state_dict(model)
    ids = jnp.asarray(held_out)
    forward = nnx.jit(lambda m, x: jax.nn.log_softmax(m(x).logits.astype(jnp.float32)))
    ref = np.asarray(forward(model, ids[:, :-1]))
    targets = held_out[:, 1:]
    ref_tok = np.take_along_axis(ref, targets[..., None], -1)[..., 0]
    print(f"held-out next-token NLL of the float32 model: {-ref_tok.mean():.4f} nats "
          f"({held_out.shape[0]} x {held_out.shape[1] - 1} tokens)")
    print("\n| weights | Linear weight rel. RMS error | mean abs dlogp (target) | max abs dlogp "
          "| mean KL(f32 ‖ copy) | max abs dlogit | NLL |\n|---|---|---|---|---|---|---|")
    for kind in ("float32", "bfloat16", "channel", "block"):
        m, werr = variant(hub, config, kind)
        lp = np.asarray(forward(m, ids[:, :-1]))
        tok = np.take_along_axis(lp, targets[..., None], -1)[..., 0]
        gap = np.abs(tok - ref_tok)
        kl = (np.exp(ref) * (ref - lp)).sum(-1).mean()
        dlogit = np.abs((lp - lp.mean(-1, keepdims=True)) - (ref - ref.mean(-1, keepdims=True)))
        label = {"channel": "fp8 e4m3 per channel (+bf16 rest)",
                 "block": "fp8 e4m3 128x128 blocks (+bf16 rest)"}.get(kind, kind)
        print(f"| {label} | {werr:.2e} | {gap.mean():.2e} | {gap.max():.2e} | {kl:.2e} "
              f"| {dlogit.max():.2e} | {-tok.mean():.4f} |", flush=True)


def rss(args) -> None:
    from bench.convert import generate, timed
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    hub, ckpt = work / "hub", work / "ckpt"
    size = generate(hub, args.layers)
    cli = [sys.executable, str(ROOT / "convert_hf.py")]
    rows = []
    s, r = timed(cli + ["to-jax", "--hf", str(hub), "--out", str(ckpt), "--no-progress"])
    rows.append(("to-jax bf16 folder -> bf16", size, s, r))
    for kind in ("channel", "block"):
        folder = work / f"fp8_{kind}"
        s, r = timed(cli + ["to-hf", "--ckpt", str(ckpt), "--out", str(folder), "--fp8", kind,
                            "--no-progress"])
        fsize = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        rows.append((f"to-hf --fp8 {kind}", fsize, s, r))
        out = work / f"ckpt_{kind}"
        s, r = timed(cli + ["to-jax", "--hf", str(folder), "--out", str(out), "--dtype",
                            "bfloat16", "--no-progress"])
        rows.append((f"to-jax fp8 {kind} folder -> bf16", fsize, s, r))
        shutil.rmtree(out)
    print(f"\n{args.layers} layers, bf16 folder {size / 1e9:.2f} GB\n")
    print("| run | folder | wall | peak RSS |\n|---|---|---|---|")
    for name, fsize, s, r in rows:
        print(f"| {name} | {fsize / 1e9:.2f} GB | {s:.1f} s | {r / 2**20:.0f} MiB |")
    shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--steps", type=int, default=300)
    r = sub.add_parser("rss")
    r.add_argument("--workdir", default="/work/bench_fp8")
    r.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    quality(args) if args.command == "quality" else rss(args)


if __name__ == "__main__":
    main()
