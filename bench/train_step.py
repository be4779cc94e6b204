"""One training step (forward + backward + AdamW) of the `bench` config: glm-jax against
transformers' Glm4MoeForCausalLM (torch CPU, `grouped_mm` and `eager` experts), same shapes,
same machine, alternated in one run. Run as `python -m bench.train_step`.

Each implementation runs in a process of its own, as its users run it, and this process
gives them turns of --steps-per-turn consecutive steps; the first step of a turn is not
timed. Why: on this VM, memory a process frees is handed back (to the host) while the
other implementation runs, so the first step after a switch page-faults its temporaries in
again at several times the cost: glm-jax's step took 19-23 s with 12-16 s of system time
when strictly alternated with a torch process, and 14.6-15.2 s with 2 s back to back, as
in training (measured with a torch worker alternating and not). In one shared process the
two runtimes slowed each other in the same way.

glm-jax runs its real train step (glm_jax.train.make_trainer: loss with masks, AdamW, clipping, bias
update); transformers runs loss.backward() + torch AdamW + clipping, sdpa attention."""

from __future__ import annotations

import argparse
import multiprocessing
import time

import jax
import numpy as np
import torch
import transformers

from bench.common import append_section, jax_train_step, load_config
from glm_jax import GlmConfig
from glm_jax.train.metrics import flops_per_token, measure_matmul_peak


def jax_step(config: GlmConfig, batch: int, seq: int):
    trainer, state, data = jax_train_step(config, batch, seq)
    box = {"state": state}

    def run():
        box["state"], metrics = trainer.step(box["state"], data)
        jax.block_until_ready(metrics["loss"])

    return run


def torch_step(config: GlmConfig, batch: int, seq: int, experts: str):
    hf_config = transformers.Glm4MoeConfig(**config.to_hf())
    torch.manual_seed(0)
    model = transformers.Glm4MoeForCausalLM(hf_config).float().train()
    model.set_attn_implementation("sdpa")
    model.set_experts_implementation(experts)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95))
    ids = torch.tensor(np.random.RandomState(0).randint(0, config.vocab_size, (batch, seq)))

    def run():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def _worker(name: str, args: argparse.Namespace, conn) -> None:
    """Build one implementation's step, warm it up, then run and time turns of steps."""
    torch.set_num_threads(2)
    config = load_config(args.config, capacity_factor=args.capacity_factor,
                         remat_policy=args.remat)
    run = (jax_step(config, args.batch, args.seq) if name == "glm-jax" else
           torch_step(config, args.batch, args.seq, name.removeprefix("transformers ")))
    run()  # compile / warm up
    conn.send("ready")
    while (msg := conn.recv()) != "stop":
        if msg == "peak":
            conn.send(measure_matmul_peak())
            continue
        seconds = []
        for _ in range(msg):  # msg: steps in this turn
            t = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - t)
        conn.send(seconds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="bench")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2, help="turns of each implementation")
    p.add_argument("--steps-per-turn", type=int, default=3,
                   help="consecutive steps per turn; all but the first are timed")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="glm-jax expert capacity (default dropless)")
    p.add_argument("--remat", default="none")
    p.add_argument("--torch-experts", default="grouped_mm,eager")
    args = p.parse_args()
    config = load_config(args.config, capacity_factor=args.capacity_factor,
                         remat_policy=args.remat)

    names = ["glm-jax"] + [f"transformers {e}" for e in args.torch_experts.split(",")]
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no shared runtime
    workers = {}
    for name in names:  # one at a time, so compilation and warm-up are not timed against
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(name, args, child), daemon=True)
        proc.start()
        try:
            parent.recv()  # "ready"
        except EOFError:
            proc.join()
            raise RuntimeError(f"the {name} worker died while building its step "
                               f"(exit code {proc.exitcode})") from None
        workers[name] = (proc, parent)
    times = {name: [] for name in names}
    peaks = []
    for _ in range(args.rounds):
        workers["glm-jax"][1].send("peak")
        peaks.append(workers["glm-jax"][1].recv())
        for name, (_, conn) in workers.items():
            conn.send(args.steps_per_turn)
            times[name].extend(conn.recv()[1:])
    for proc, conn in workers.values():
        conn.send("stop")
        proc.join()
    peak = float(np.median(peaks))
    tokens = args.batch * args.seq
    flops = flops_per_token(config, args.seq)
    anchor = float(np.median(times["transformers grouped_mm"])) if "transformers grouped_mm" in times else None
    rows = []
    for name, ts in times.items():
        sec = float(np.median(ts))
        ratio = f"{anchor / sec:.2f}x" if anchor else "-"
        rows.append(f"| {name} | {sec:.2f} | {tokens / sec:.0f} | {ratio} | "
                    f"{tokens / sec * flops / peak:.0%} |")
        print(rows[-1], flush=True)
    cap = "dropless" if args.capacity_factor is None else f"capacity factor {args.capacity_factor}"
    append_section(
        f"Train step of `{args.config}`: glm-jax against transformers (issue 7)",
        "| implementation | s/step (median) | tokens/s | vs transformers grouped_mm | CPU-MFU |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows),
        f"batch {args.batch}x{args.seq}, float32, glm-jax experts `{config.moe_backend}` {cap}, "
        f"remat {args.remat}; torch {torch.__version__} with 2 threads, sdpa attention. Each "
        f"implementation in its own process; {args.rounds} turns each of "
        f"{args.steps_per_turn} consecutive steps, alternated; median of the steps after the "
        f"first of each turn. Model FLOPs "
        f"{flops / 1e6:.0f} MFLOP/token (glm_jax.train.metrics.flops_per_token); float32 "
        f"matmul peak measured between rounds: {peak / 1e9:.0f} GFLOP/s.")


if __name__ == "__main__":
    main()
