"""FP8 rollouts against the float32 trainer: the log-probability gap per rollout precision,
what truncated importance sampling does with it, rollout tokens/s, and the rollout copy's
bytes.

    python -m bench.fp8_rollout --ckpt /work/runs/sft1d [--prompts 24 --samples 8] [--append]

One trained checkpoint (an SFT demo run or train.py workdir), the RL levels' chat prompts
(`--levels`, an equal share each), `--samples` samples per prompt at `--temperature`. For
each rollout precision (glm_jax.rl.rollout_weights: the trainer's own float32 weights,
bfloat16, FP8 per channel, FP8 in 128 x 128 blocks, and both FP8 layouts with float32
activations, which isolates the FP8 weights' own error) the rollout engine samples the
batch, and the float32 trainer rescores the same tokens with the rollout's expert choices
replayed (the RL loop's `recompute_logprobs` forward). Per completion token:
|train_lp - rollout_lp| (mean, max) and the importance ratio r = exp(train_lp - rollout_lp)
(mean, max, min) with the fraction of tokens above the TIS cap. The TIS effect on the
update: the policy-gradient estimate sum_t A * w_t * grad log p_t / tokens of the float32
trainer, uncorrected (w = 1) against TIS (w = min(r, cap)), on the same batch: their cosine
and relative difference. The advantages are fixed random +-1 per sample (the SFT model's
rewards on these levels are mostly all-fail groups, which would zero the estimate).

Each precision samples its own tokens, so the first columns compare different batches. The
"same tokens" columns compare the precisions on one batch (the float32 rollout's): each
rollout model scores it with a full forward and its own routing, the trainer rescores it
with that routing replayed, and |difference| is taken over the completion tokens.

Tokens/s: completion tokens per second of the whole rollout call (median of `--repeats`
after a compiling call, the variants
timed in turn). On CPU this is NOT an FP8 speed-up measurement: XLA:CPU has no
FP8 (or bf16) matmul; it converts e4m3 and bf16 dot operands to float32 and runs a float32
dot (printed from the compiled HLO below), so the FP8 rows show the dequantization's
overhead. "publish s" is the time to make the rollout copy from the trainer's state (the
quantization at every weight update).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import append_section
from configs import rl_tiny
from glm_jax.chat.tokens import load_chat_tokenizer
from glm_jax.rl import levels as levels_mod
from glm_jax.rl.loop import make_logprobs
from glm_jax.rl.policy_loss import PolicyGradientLoss, token_logprobs
from glm_jax.rl.rollout import rollout
from glm_jax.rl.rollout_weights import RolloutWeights, param_bytes
from glm_jax.train import checkpoint, run_config
from glm_jax.train.trainer import make_trainer
from sharding.mesh import make_mesh

VARIANTS = [  # (row name, rollout_dtype, fp8_layout, compute dtype for fp8)
    ("float32 (trainer's weights)", "model", "channel", None),
    ("bfloat16", "bfloat16", "channel", None),
    ("fp8 channel", "fp8", "channel", None),
    ("fp8 block 128", "fp8", "block", None),
    ("fp8 channel, f32 activations", "fp8", "channel", "float32"),
    ("fp8 block 128, f32 activations", "fp8", "block", "float32"),
]


def xla_cpu_dot_note() -> str:
    """What XLA compiles an e4m3 x e4m3 dot into on this backend (from the optimized HLO)."""
    x = jnp.ones((8, 256), jnp.float8_e4m3fn)
    hlo = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)).lower(
        x, x.T).compile().as_text()
    converts = "f32[8,256]{1,0} convert(" in hlo
    return (f"XLA:{jax.default_backend()} e4m3 dot: operands converted to float32 before the "
            f"dot: {converts}")


def pg_gradient_fn(trainer):
    """Jitted: the float32 trainer's policy-gradient estimate sum A w_t grad log p_t / n."""
    def surrogate(params, biases, batch, weights):
        model = nnx.merge(trainer.graphdef, params, biases)
        out = model(batch["tokens"], routed_experts=batch["routed_experts"])
        logp = token_logprobs(out.logits, batch["tokens"], batch["temperature"])[0]
        terms = batch["advantages"][:, None] * weights * logp * batch["mask"]
        return terms.sum() / batch["mask"].sum()

    # nnx wants the biases traced at the params' level: differentiate both, keep the params'.
    grad = jax.jit(lambda *a: jax.grad(surrogate, argnums=(0, 1))(*a)[0])

    def flat_grad(state, batch, weights) -> np.ndarray:
        g = grad(state.params, state.biases, batch, weights)
        return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(g)])

    return flat_grad


@nnx.jit
def own_scores(model, tokens, temperature):
    """A rollout model's log-probabilities of given tokens with its own routing (a full
    forward, as its sampler would have scored them), and that routing."""
    out = model(tokens)
    return token_logprobs(out.logits, tokens, temperature)[0], out.routed_experts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="/work/runs/sft1d")
    p.add_argument("--levels", default="add,sub,mul")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--tis-cap", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--append", action="store_true", help="append to docs/benchmarks.md")
    args = p.parse_args(argv)

    cfg = rl_tiny.get_config()
    cfg.init_from = args.ckpt
    cfg.train.batch_size = args.prompts * args.samples
    with tempfile.TemporaryDirectory() as tmp:
        cfg, _ = run_config.resolve(cfg, tmp)  # the checkpoint's model
    trainer = make_trainer(cfg, make_mesh({"data": 1}, jax.devices()[:1]),
                           PolicyGradientLoss(tis_cap=args.tis_cap))
    state = checkpoint.load_params(args.ckpt, trainer.init())
    tokenizer = load_chat_tokenizer(None)
    names = args.levels.split(",")
    prompts = [p for i, name in enumerate(names) for p in levels_mod.draw_prompts(
        name, args.prompts // len(names) + (i < args.prompts % len(names)), seed=0, step=0,
        round_=0, thinking=False, tokenizer=tokenizer)]
    advantages = np.where(np.random.default_rng(0).random(len(prompts) * args.samples) < 0.5,
                          -1.0, 1.0).astype(np.float32)
    logprobs_fn = make_logprobs(trainer)
    pg_grad = pg_gradient_fn(trainer)

    def roll(model):
        return rollout(model, [p.ids for p in prompts], samples_per_prompt=args.samples,
                       max_new_tokens=args.new_tokens, temperature=args.temperature,
                       eos_ids=levels_mod.stop_ids(tokenizer), seed=0, pad_id=tokenizer.pad_id)

    variants = []  # (name, RolloutWeights, model, first rollout), everything compiled
    for name, dtype, layout, compute in VARIANTS:
        weights = RolloutWeights(trainer, dtype, fp8_layout=layout, compute_dtype=compute)
        model = weights.model(state)
        variants.append((name, weights, model, roll(model)))
    # Timed round-robin, one call of each variant in turn, so that the load of the shared
    # machine falls on all of them alike.
    publish = {name: [] for name, *_ in variants}
    speed = {name: [] for name, *_ in variants}
    for _ in range(args.repeats):
        for name, weights, model, _ in variants:
            start = time.perf_counter()
            jax.block_until_ready(weights.model(state))
            publish[name].append(time.perf_counter() - start)
            speed[name].append(roll(model).tokens_per_second)

    rows = []
    shared = None  # the first variant's (float32) tokens, scored by every variant
    for name, weights, model, r in variants:
        tok_s = float(np.median(speed[name]))
        batch = {"tokens": r.tokens, "temperature": r.temperature,
                 "routed_experts": r.routed_experts}
        train_lp = np.asarray(logprobs_fn(state, batch))
        mask = r.completion_mask
        diff = (train_lp - r.logprobs)[mask]
        ratio = np.exp(diff)
        shared = shared or (r.tokens, r.temperature, r.completion_mask)
        own_lp, own_routing = own_scores(model, jnp.asarray(shared[0]), jnp.asarray(shared[1]))
        paired_train = np.asarray(logprobs_fn(state, {
            "tokens": shared[0], "temperature": shared[1], "routed_experts": own_routing}))
        paired = np.abs(paired_train - np.asarray(own_lp))[shared[2]]
        gbatch = dict(batch, advantages=advantages, mask=mask.astype(np.float32))
        tis = np.where(mask, np.minimum(np.exp(train_lp - r.logprobs), args.tis_cap), 0)
        g_plain = pg_grad(state, gbatch, np.ones_like(tis, np.float32))
        g_tis = pg_grad(state, gbatch, tis.astype(np.float32))
        cos = float(g_plain @ g_tis / (np.linalg.norm(g_plain) * np.linalg.norm(g_tis)))
        rel = float(np.linalg.norm(g_tis - g_plain) / np.linalg.norm(g_plain))
        rows.append((name, float(np.abs(diff).mean()), float(np.abs(diff).max()),
                     float(ratio.mean()), float(ratio.max()), float(ratio.min()),
                     float((ratio > args.tis_cap).mean()), cos, rel, tok_s,
                     float(np.median(publish[name])), param_bytes(model) / 2**20,
                     int(mask.sum()), float(paired.mean()), float(paired.max())))
        print(rows[-1], flush=True)

    header = ("| rollout | mean \\|dlogp\\| | max \\|dlogp\\| | ratio mean | ratio max | "
              "ratio min | > cap | cos(g_TIS, g) | \\|g_TIS - g\\| / \\|g\\| | tokens/s | "
              "publish s | weights MiB | tokens | same tokens: mean \\|dlogp\\| | max |\n|"
              + "---|" * 15)
    table = header + "".join(
        f"\n| {n} | {a:.2e} | {b:.2e} | {c:.4f} | {d:.3f} | {e:.3f} | {f:.2%} | {g:.6f} | "
        f"{h:.2e} | {i:.0f} | {j:.3f} | {k:.2f} | {m} | {o:.2e} | {q:.2e} |"
        for n, a, b, c, d, e, f, g, h, i, j, k, m, o, q in rows)
    notes = (f"checkpoint {args.ckpt}; levels {args.levels}; {len(prompts)} prompts x "
             f"{args.samples} samples, up to {args.new_tokens} new tokens, temperature "
             f"{args.temperature}; trainer float32 with routing replay; TIS cap "
             f"{args.tis_cap}. {xla_cpu_dot_note()}.")
    print(table + "\n\n" + notes)
    if args.append:
        append_section("FP8 rollouts (issue 17, `config.rl.rollout_dtype`): log-probability "
                       "gap to the float32 trainer, TIS, tokens/s", table, notes)


if __name__ == "__main__":
    main()
