"""Rollout engine (glm_jax.rl.rollout): tokens/s with and without MTP speculation, and the
train/rollout mismatch with and without routing replay.

    python -m bench.rollout --config tiny --prompts 8 --samples 4 --new-tokens 64
    python -m bench.rollout --ckpt runs/tiny --prompts 8 --samples 4 --new-tokens 64 --append

Speed: each setting runs once to compile, then `--repeats` times with new seeds; the rate is
completion tokens per second of the whole rollout call (prefill, decode, log-probabilities,
routing record), the median over the repeats.

Mismatch: the plain rollout's tokens are scored again by a trainer-side full forward
(GlmForCausalLM over prompt + completion, no KV cache), at each row's temperature:
  - "f32": the same weights and precision, so only the cached-decoding vs full-forward
    numerics differ;
  - "bf16": the same weights with bfloat16 activations (a trainer in another precision);
  - "router noise": float32, the router weights plus Gaussian noise of `--router-noise`
    times their std (a stand-in for a trainer whose router logits differ slightly).
For each, without and with replaying the rollout's expert ids: the routing mismatch rate
(the fraction of (token, MoE layer) pairs, prompt and completion tokens, whose expert set
differs from the rollout's) and the largest and mean |log-prob gap| over completion tokens.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.common import append_section, load_config
from glm_jax import GlmForCausalLM
from glm_jax.rl.rollout import Rollout, rollout


@nnx.jit
def _score(model, tokens, temperature, routed_experts):
    out = model(tokens, routed_experts=routed_experts)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None, None]
    logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32) / t, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0))), out.routed_experts


def mismatch(trainer: GlmForCausalLM, r: Rollout, replay: bool) -> dict[str, float]:
    logp, ids = _score(trainer, jnp.asarray(r.tokens), jnp.asarray(r.temperature),
                       jnp.asarray(r.routed_experts) if replay else None)
    logp, ids = np.asarray(logp), np.asarray(ids)
    t = np.arange(r.tokens.shape[1])[None]
    real = t < (r.prompt_lengths + r.completion_lengths)[:, None]
    differs = (np.sort(ids, -1) != np.sort(r.routed_experts, -1)).any(-1)[real]
    gap = np.abs(logp - r.logprobs)[r.completion_mask]
    return {"routing_mismatch": float(differs.mean()), "max_gap": float(gap.max()),
            "mean_gap": float(gap.mean())}


def _with(model: GlmForCausalLM, **config_changes) -> GlmForCausalLM:
    """The model's weights in a model built with changed compute options."""
    other = nnx.eval_shape(lambda: GlmForCausalLM(model.config.replace(**config_changes),
                                                  rngs=nnx.Rngs(0)))
    nnx.update(other, jax.tree.map(jnp.array, nnx.state(model)))
    return other


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="configs/<name>.py, random weights")
    p.add_argument("--ckpt", help="a checkpoint (train.py workdir or converted); prompts "
                   "from the embedded stdlib data")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (G)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--router-noise", type=float, default=0.01)
    p.add_argument("--append", action="store_true", help="append to docs/benchmarks.md")
    args = p.parse_args()

    if args.ckpt:
        from bench.generate import _stdlib_prompts
        from glm_jax.convert import load_checkpoint

        model = load_checkpoint(args.ckpt)
        prompts = [x.tolist() for x in _stdlib_prompts(args.prompts, args.prompt_len, 0)]
        what = f"checkpoint {args.ckpt}, stdlib prompts"
    else:
        model = GlmForCausalLM(load_config(args.config), rngs=nnx.Rngs(0))
        prompts = np.random.default_rng(0).integers(
            0, 256, (args.prompts, args.prompt_len)).tolist()
        what = f"configs/{args.config}.py, random weights"
    cfg = model.config
    eos = (cfg.eos_token_id,) if isinstance(cfg.eos_token_id, int) else tuple(
        cfg.eos_token_id or ())
    kw = dict(samples_per_prompt=args.samples, max_new_tokens=args.new_tokens,
              temperature=args.temperature, eos_ids=eos, pad_id=cfg.pad_token_id or 0)

    speed = {}
    rollouts = {}
    for speculative in ("none", "mtp"):
        rollout(model, prompts, seed=1000, speculative=speculative, **kw)  # compile
        runs = [rollout(model, prompts, seed=i, speculative=speculative, **kw)
                for i in range(args.repeats)]
        rollouts[speculative] = runs[0]
        speed[speculative] = {
            "tokens_per_s": float(np.median([r.tokens_per_second for r in runs])),
            "seconds": float(np.median([r.seconds for r in runs])),
            "generated_tokens": runs[0].generated_tokens,
            "acceptance_rate": runs[0].acceptance_rate}
    r = rollouts["none"]

    router_std = float(np.std(np.asarray(model.moe_layers.layers.mlp.router_kernel[...])))
    noisy = _with(model)
    kernel = noisy.moe_layers.layers.mlp.router_kernel
    kernel[...] = kernel[...] + args.router_noise * router_std * jax.random.normal(
        jax.random.key(1), kernel[...].shape)
    trainers = {"f32": model, "bf16": _with(model, dtype="bfloat16"),
                f"router noise {args.router_noise:g} std": noisy}
    gaps = {name: {replay: mismatch(t, r, replay) for replay in (False, True)}
            for name, t in trainers.items()}
    print(json.dumps({"speed": speed, "mismatch": {
        k: {("replay" if rp else "no replay"): v for rp, v in d.items()}
        for k, d in gaps.items()}}, indent=1))

    if args.append:
        n = args.prompts * args.samples
        def accepted(v) -> str:
            return "-" if v["acceptance_rate"] is None else f"{v['acceptance_rate']:.1%}"

        rows = [f"| {'MTP speculative' if s == 'mtp' else 'plain'} | "
                f"{v['tokens_per_s']:.0f} | {v['seconds']:.2f} | {v['generated_tokens']} | "
                f"{accepted(v)} |" for s, v in speed.items()]
        table = ("| rollout | tokens/s | seconds | completion tokens | MTP acceptance |\n"
                 "|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
                 "| trainer forward | replay | routing mismatch | max \\|log-prob gap\\| | "
                 "mean \\|gap\\| |\n|---|---|---|---|---|\n" + "\n".join(
                     f"| {name} | {'yes' if rp else 'no'} | {v['routing_mismatch']:.2%} | "
                     f"{v['max_gap']:.2e} | {v['mean_gap']:.2e} |"
                     for name, d in gaps.items() for rp, v in d.items()))
        append_section(
            "Rollout engine (issue 16, `glm_jax.rl.rollout`): tokens/s, routing replay",
            table, f"{what}; {n} rows ({args.prompts} prompts x {args.samples} samples), "
            f"prompt {args.prompt_len}, up to {args.new_tokens} new tokens, temperature "
            f"{args.temperature}.")


if __name__ == "__main__":
    main()
