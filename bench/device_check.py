"""Device check, for the day a GPU or TPU host is lent: is glm-jax right and how fast is it on
this accelerator? One table, in a few minutes; exit code 1 on a parity failure.

    python -m bench.device_check                      # the `bench` config on the first accelerator
    python -m bench.device_check --config tiny --layers 2 --batch 1 --seq 32 --new-tokens 3  # CPU

1. float32 parity: the same weights (random, seed 0) and tokens on the host's CPU device and
   on the accelerator, every grouped-matmul backend: logits, loss and the gradient norm of
   the next-token loss, against the CPU result of the config's own backend. Matmuls run at
   `precision="highest"` (TPUs otherwise multiply float32 in bf16 passes).
2. bf16 train step (the training loop's own, glm_jax.train.make_trainer): median seconds,
   tokens/s and MFU with each backend. MFU = model FLOPs (6 x active parameters + attention,
   glm_jax.train.metrics.flops_per_token) / time / peak, the peak being the chip's published
   bf16 figure on a TPU (sharding.topology.CHIPS) or a measured bf16 matmul elsewhere.
3. Decode tokens/s (bf16, greedy) without and with MTP speculation (one MTP layer; random
   weights, so the acceptance rate is only what chance gives).

With no accelerator it runs everything on the CPU (the accelerator column is then the CPU
itself): the smoke test that the script works (tests/test_device_check.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

# A parity failure is a maximum |difference| above ATOL + RTOL x max |CPU value|.
ATOL, RTOL = 1e-4, 1e-4
BACKENDS = ("ragged_dot", "buckets", "dense")  # moe.py's backends (dense = reference)


def _accelerator(platform: str | None):
    import jax

    if platform:
        return jax.devices(platform)[0]
    for name in ("tpu", "gpu"):
        try:
            return jax.devices(name)[0]
        except RuntimeError:
            continue
    return jax.devices("cpu")[0]


def _mesh(device):
    from sharding.mesh import make_mesh

    return make_mesh({"data": 1}, [device])


def _forward_loss_grad(cfg, state_cpu, device, ids):
    """(logits, loss, gradient global norm) on `device`, float32 at full matmul precision."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from glm_jax import GlmForCausalLM

    mesh = _mesh(device)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: GlmForCausalLM(cfg, rngs=nnx.Rngs(0),
                                                                    mesh=mesh)))
    place = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.device_put(state_cpu, place)
    tokens = jax.device_put(ids, place)

    def loss_fn(state, tokens):
        out = nnx.merge(graphdef, state)(tokens)
        logits = out.logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                               tokens[:, 1:]).mean()
        return loss, logits

    @jax.jit
    def run(state, tokens):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state, tokens)
        return logits, loss, optax.tree.norm(grads)

    with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
        return tuple(np.asarray(x) for x in run(state, tokens))


def parity(cfg, device, ids, backends=BACKENDS) -> tuple[list[dict], bool]:
    """Rows {backend, logits diff, loss diff, grad-norm diff, ok}; all ok?"""
    import jax
    from flax import nnx

    from glm_jax import GlmForCausalLM

    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        _, state = nnx.split(GlmForCausalLM(cfg, rngs=nnx.Rngs(0), mesh=_mesh(cpu)))
    ref_logits, ref_loss, ref_norm = _forward_loss_grad(cfg, state, cpu, ids)
    rows, all_ok = [], True
    for backend in backends:
        logits, loss, norm = _forward_loss_grad(cfg.replace(moe_backend=backend), state,
                                                device, ids)
        diffs = {"logits": float(np.abs(logits - ref_logits).max()),
                 "loss": float(abs(loss - ref_loss)), "grad norm": float(abs(norm - ref_norm))}
        scale = {"logits": float(np.abs(ref_logits).max()), "loss": float(abs(ref_loss)),
                 "grad norm": float(ref_norm)}
        ok = all(diffs[k] <= ATOL + RTOL * scale[k] for k in diffs)
        all_ok &= ok
        rows.append({"backend": backend, **diffs, "ok": ok})
    return rows, all_ok


def _peak(device) -> tuple[float, str]:
    """bf16 FLOP/s of `device`: the published figure for a TPU, else a measured matmul."""
    import jax
    import jax.numpy as jnp

    from sharding.topology import CHIPS

    kind = device.device_kind.lower()
    for gen, chip in CHIPS.items():  # device kinds: "TPU v5p", "TPU v6 lite", "TPU v5 lite"
        if device.platform == "tpu" and (gen in kind.replace(" ", "") or
                                         (gen == "v6e" and "v6" in kind) or
                                         (gen == "v5e" and "v5 lite" in kind)):
            return chip.peak_bf16_flops, f"{chip.generation} published bf16 peak"
    n = 2048 if device.platform != "cpu" else 512
    a = jax.device_put(jnp.ones((n, n), jnp.bfloat16), device)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best, f"measured {n}x{n} bf16 matmul"


def train_step_times(cfg, device, batch: int, seq: int, repeats: int,
                     backends=BACKENDS) -> list[dict]:
    """Median bf16 train-step seconds per backend on `device` (the step's first call
    compiles and is not timed)."""
    import jax
    import ml_collections

    from configs.training import add_training_sections
    from glm_jax.train.trainer import make_trainer

    rng = np.random.RandomState(0)
    tokens = rng.randint(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    rows = []
    for backend in backends:
        c = ml_collections.ConfigDict({"model": cfg.replace(
            moe_backend=backend, dtype="bfloat16").to_dict()})
        add_training_sections(c, steps=1000, batch_size=batch, seq_len=seq,
                              learning_rate=3e-4, warmup_steps=0, checkpoint_every=0,
                              log_every=1)
        trainer = make_trainer(c, _mesh(device))
        data = jax.device_put({"tokens": tokens, "segment_ids": np.ones_like(tokens),
                               "positions": np.broadcast_to(np.arange(seq, dtype=np.int32),
                                                            tokens.shape)},
                              trainer.batch_sharding)
        state = trainer.init()
        seconds = []
        for i in range(repeats + 1):
            t = time.perf_counter()
            state, metrics = trainer.step(state, data)
            jax.block_until_ready(metrics["loss"])
            if i:
                seconds.append(time.perf_counter() - t)
        rows.append({"backend": backend, "seconds": float(np.median(seconds)),
                     "loss": float(metrics["loss"])})
        del state
    return rows


def decode_rates(cfg, device, prompt_len: int, new_tokens: int) -> dict:
    """Greedy decode tokens/s (batch 1, bf16) without and with MTP speculation."""
    import jax
    from flax import nnx

    from glm_jax import GlmForCausalLM, generate

    c = cfg.replace(dtype="bfloat16", num_nextn_predict_layers=1)
    with jax.default_device(device):  # built for a mesh on `device`: its kernels follow it
        model = GlmForCausalLM(c, rngs=nnx.Rngs(0), mesh=_mesh(device))
        prompt = np.random.RandomState(1).randint(0, c.vocab_size, (1, prompt_len))
        out = {}
        for mode in ("none", "mtp"):
            generate(model, prompt, max_new_tokens=new_tokens, speculative=mode)  # compile
            run = generate(model, prompt, max_new_tokens=new_tokens, speculative=mode)
            out[mode] = (run.decode_tokens_per_second(skip=0), run)
    same = np.array_equal(out["none"][1].tokens, out["mtp"][1].tokens)
    return {"plain": out["none"][0], "mtp": out["mtp"][0],
            "acceptance": out["mtp"][1].acceptance_rate, "same_tokens": same}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="bench", help="configs/<name>.py")
    p.add_argument("--platform", default=None, help="tpu, gpu or cpu (default: the first "
                   "accelerator, else cpu)")
    p.add_argument("--batch", type=int, default=4, help="train-step rows")
    p.add_argument("--seq", type=int, default=1024, help="train-step sequence length")
    p.add_argument("--parity-batch", type=int, default=2)
    p.add_argument("--parity-seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--layers", type=int, default=None,
                   help="num_hidden_layers instead of the config's (a quicker check)")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated moe_backend values to check")
    args = p.parse_args(argv)
    backends = tuple(filter(None, args.backends.split(",")))
    if not backends or set(backends) - set(BACKENDS):
        print(f"device_check: error: --backends {args.backends!r}: choose from "
              f"{','.join(BACKENDS)}", file=sys.stderr)
        return 2

    import jax

    from bench.common import load_config
    from glm_jax.train.metrics import flops_per_token

    try:
        cfg = load_config(args.config, capacity_factor=None)
    except ModuleNotFoundError:
        print(f"device_check: error: --config {args.config}: no configs/{args.config}.py",
              file=sys.stderr)
        return 2
    cfg = cfg.replace(dtype="float32", param_dtype="float32")
    if args.layers is not None:
        cfg = cfg.replace(num_hidden_layers=args.layers)
    device = _accelerator(args.platform)
    t0 = time.perf_counter()
    print(f"{args.config} on {device.platform} ({device.device_kind}); jax {jax.__version__}",
          flush=True)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size,
                                           (args.parity_batch, args.parity_seq)).astype(np.int32)
    par, ok = parity(cfg, device, ids, backends)
    steps = train_step_times(cfg, device, args.batch, args.seq, args.repeats, backends)
    peak, peak_from = _peak(device)
    dec = decode_rates(cfg, device, args.prompt_len, args.new_tokens)
    tokens = args.batch * args.seq
    flops = flops_per_token(cfg, args.seq) * tokens
    lines = [f"| backend | f32 max abs diff vs CPU: logits / loss / grad norm | parity | "
             f"bf16 train step s | tokens/s | MFU |", "|---|---|---|---|---|---|"]
    for pr, st in zip(par, steps):
        lines.append(f"| {pr['backend']} | {pr['logits']:.2e} / {pr['loss']:.2e} / "
                     f"{pr['grad norm']:.2e} | {'ok' if pr['ok'] else 'FAIL'} | "
                     f"{st['seconds']:.4f} | {tokens / st['seconds']:.0f} | "
                     f"{flops / st['seconds'] / peak:.1%} |")
    acc = dec["acceptance"]
    lines.append(f"\ndecode (bf16, batch 1, greedy, {args.new_tokens} new tokens): "
                 f"{dec['plain']:.1f} tokens/s plain, {dec['mtp']:.1f} with MTP (acceptance "
                 f"{'-' if acc is None else f'{acc:.0%}'}, random weights; same tokens as "
                 f"plain: {'yes' if dec['same_tokens'] else 'no'})")
    lines.append(f"train step: batch {args.batch} x {args.seq}, MFU against {peak / 1e12:.1f} "
                 f"TFLOP/s ({peak_from}); parity: batch {args.parity_batch} x "
                 f"{args.parity_seq}, tolerance {ATOL:g} + {RTOL:g} x |CPU value|; "
                 f"{time.perf_counter() - t0:.0f} s in all")
    print("\n".join(lines), flush=True)
    if not ok:
        print("device_check: PARITY FAILURE (see the table)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    raise SystemExit(main())
