"""Decode speed with and without MTP speculation, and the MTP acceptance rate.

Random weights of a config (speed only: a random MTP layer is never right):
    python bench/generate.py --config configs/bench.py --mtp-layers 1 --batch 1 \
        --prompt-len 64 --new-tokens 64 --repeats 3
A checkpoint (train.py / convert_hf.py) on prompts cut from the embedded stdlib data:
    python bench/generate.py --ckpt /tmp/gen_run --prompts 8 --prompt-len 96 --new-tokens 128

Each setting is run once to compile, then `--repeats` times; the decode rate is tokens kept
per second of decoding (prefill excluded), the median over the repeats; the acceptance
rate is that of the first timed repeat. Speculative greedy output is checked equal to plain
greedy output. "projected" is the speculative rate a
drafter with the checkpoint's acceptance rate `a` would reach at the measured step time:
(1 + a) tokens per speculative step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glm_jax import GlmConfig, GlmForCausalLM, generate  # noqa: E402


def _config(path: str, mtp_layers: int | None) -> GlmConfig:
    spec = importlib.util.spec_from_file_location("bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    d = mod.get_config().model.to_dict()
    if mtp_layers is not None:
        d["num_nextn_predict_layers"] = mtp_layers
    return GlmConfig.from_dict(d)


def _stdlib_prompts(n: int, length: int, seed: int) -> list[np.ndarray]:
    """n windows of `length` byte tokens from the embedded corpus, each ending at a line end
    inside one document, at random places."""
    from glm_jax.train.data import stdlib_corpus

    corpus = stdlib_corpus(0)
    tokens, starts = np.asarray(corpus.tokens), corpus.doc_starts
    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        doc = rng.integers(len(starts) - 1)
        lo, hi = starts[doc] + 1 + length, starts[doc + 1] - 1
        if hi - lo < 256:
            continue
        end = int(rng.integers(lo, hi))
        newline = np.flatnonzero(tokens[end:hi] == ord("\n"))
        if newline.size:
            end += int(newline[0]) + 1
            out.append(tokens[end - length:end].astype(np.int32))
    return out


def _run(model, prompts, new_tokens: int, speculative: str, repeats: int, **sampling):
    kw = dict(max_new_tokens=new_tokens, speculative=speculative, **sampling)
    generate(model, prompts, **kw)  # compile
    runs = [generate(model, prompts, seed=i, **kw) for i in range(repeats)]
    rates = [r.decode_tokens_per_second(skip=0) for r in runs]
    step_ms = [1e3 * np.median(r.step_seconds) for r in runs]
    return runs[0], float(np.median(rates)), float(np.median(step_ms))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a configs/*.py file: random weights")
    p.add_argument("--mtp-layers", type=int, default=None)
    p.add_argument("--ckpt", help="a checkpoint; prompts from the embedded stdlib data")
    p.add_argument("--prompts", type=int, default=1, help="batch size (--ckpt)")
    p.add_argument("--batch", type=int, default=1, help="batch size (--config)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="> 0: sampled (then MTP output is not compared token for token)")
    p.add_argument("--moe-backend", default=None, help="override the config's moe_backend")
    p.add_argument("--assume-acceptance", type=float, default=None,
                   help="also report the projected MTP rate at this acceptance rate")
    args = p.parse_args()
    if bool(args.config) == bool(args.ckpt):
        p.error("give exactly one of --config, --ckpt")
    backend = {"moe_backend": args.moe_backend} if args.moe_backend else {}

    if args.ckpt:
        from glm_jax.convert import load_checkpoint

        model = load_checkpoint(args.ckpt, **backend)
        prompts = _stdlib_prompts(args.prompts, args.prompt_len, args.seed)
        what = f"checkpoint {args.ckpt}, {args.prompts} stdlib prompts"
    else:
        model = GlmForCausalLM(_config(args.config, args.mtp_layers).replace(**backend),
                               rngs=nnx.Rngs(args.seed))
        rng = np.random.default_rng(args.seed)
        prompts = rng.integers(0, model.config.vocab_size, (args.batch, args.prompt_len),
                               dtype=np.int32)
        what = f"{args.config} (random weights), batch {args.batch}"
    cfg = model.config
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"{what}; {params / 1e6:.1f}M params, {cfg.num_mtp_layers} MTP layer(s), "
          f"moe_backend {cfg.moe_backend}; prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, {jax.devices()[0].platform}",
          flush=True)

    sampling = {"temperature": args.temperature}
    plain, plain_rate, plain_ms = _run(model, prompts, args.new_tokens, "none", args.repeats,
                                       **sampling)
    result = {"plain_tokens_per_s": plain_rate, "plain_step_ms": plain_ms}
    if cfg.num_mtp_layers:
        spec, spec_rate, spec_ms = _run(model, prompts, args.new_tokens, "mtp", args.repeats,
                                        **sampling)
        if args.temperature == 0 and not np.array_equal(spec.tokens, plain.tokens):
            raise AssertionError("speculative greedy output differs from plain greedy output")
        result.update(mtp_tokens_per_s=spec_rate, mtp_step_ms=spec_ms,
                      acceptance_rate=spec.acceptance_rate, drafted=spec.drafted,
                      accepted=spec.accepted, tokens_per_mtp_step=float(
                          spec.step_tokens.sum() / spec.steps / len(prompts)))
        if args.assume_acceptance is not None:
            result["projected_mtp_tokens_per_s"] = (
                (1 + args.assume_acceptance) * len(prompts) / (spec_ms / 1e3))
    print(json.dumps(result, indent=1))
    if args.ckpt:
        def text(ids) -> str:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

        for b in range(min(2, len(prompts))):
            print(f"--- prompt {b}:\n{text(prompts[b].tolist())}\n--- continuation:\n"
                  f"{text(plain.row(b))}")


if __name__ == "__main__":
    main()
