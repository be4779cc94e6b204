"""Benchmark convert_hf.py on generated multi-GB checkpoints: throughput against `cp` and
peak RSS (/usr/bin/time -v) at two depths.

    python bench/convert.py --workdir /work/bench_convert --layers 24 48

For each depth: write a random bf16 hub folder (safetensors written directly, one shard per
layer, MTP layer with its embedding / head copies), `cp -r` it, run to-jax and to-hf under
/usr/bin/time -v, check the exported folder is byte-identical tensor by tensor (against
digests taken before the hub folder is deleted, so that at most two copies of the checkpoint
are on disk at once), print a table row and delete everything. All reads come from a warm
page cache (cp runs first).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glm_jax.config import GlmConfig  # noqa: E402
from glm_jax.hf_io import abstract_model, get_path, hf_shape  # noqa: E402
from glm_jax.hf_names import leaf_map, mtp_copy_names  # noqa: E402
from glm_jax.safetensors_io import HubFolder, ShardWriter  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def bench_config(layers: int) -> dict:
    """A GLM-4.5-shaped model, narrow but with many experts: ~200 MB of bf16 per MoE layer."""
    return dict(
        model_type="glm4_moe", architectures=["Glm4MoeForCausalLM"], vocab_size=32768,
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, head_dim=128,
        moe_intermediate_size=512, n_routed_experts=64, num_experts_per_tok=8,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, use_qk_norm=False, attention_bias=True,
        rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False,
        num_nextn_predict_layers=1, dtype="bfloat16",
        rope_parameters={"rope_theta": 1e6, "partial_rotary_factor": 0.5, "rope_type": "default"})


def generate(folder: Path, layers: int, seed: int = 0) -> int:
    """Random hub folder: bf16 weights (router bias float32), one shard per layer."""
    hf = bench_config(layers)
    config = GlmConfig.from_hf(hf)
    shapes = {}
    from flax import nnx
    pure = nnx.to_pure_dict(nnx.state(abstract_model(config)))
    for leaf in leaf_map(config):
        shape = hf_shape(leaf, tuple(get_path(pure, leaf.path).shape))
        dt = np.dtype(np.float32) if leaf.path[-1] == "correction_bias" else BF16
        for name in leaf.names.reshape(-1):
            shapes[name] = (dt, shape)
    copies = mtp_copy_names(config)
    for copy, main in copies.items():
        shapes[copy] = shapes[main]
    by_shard: dict[str, list[str]] = {}
    for name in shapes:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        by_shard.setdefault(f"layer-{int(m.group(1)):03d}" if m else "main", []).append(name)
    files = {k: f"model-{i + 1:05d}-of-{len(by_shard):05d}.safetensors"
             for i, k in enumerate(sorted(by_shard))}
    rng = np.random.default_rng(seed)
    pool = (0.02 * rng.standard_normal(2**25, dtype=np.float32)).astype(BF16)  # 64 MB
    folder.mkdir(parents=True)
    total = 0
    for key, names in sorted(by_shard.items()):
        w = ShardWriter(folder / files[key], [(n, *shapes[n]) for n in names])
        for n in names:
            dt, shape = shapes[n]
            size = int(np.prod(shape))
            src = copies.get(n, n)  # the copies get the bytes of their main tensor
            offset = zlib.crc32(src.encode()) % (pool.size - size) if size < pool.size else 0
            value = np.resize(pool[offset:offset + size], size).reshape(shape).astype(dt)
            w.write(n, value)
            total += value.nbytes
        w.close()
    index = {"metadata": {"total_size": total},
             "weight_map": {n: files[k] for k, names in by_shard.items() for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    return total


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a command under /usr/bin/time -v."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return seconds, rss * 1024


def tensor_digests(folder: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """(dtype, shape, blake2b of the bytes) of every tensor of a hub folder."""
    hub = HubFolder(folder)
    return {n: (t.dtype, t.shape, hashlib.blake2b(np.ascontiguousarray(hub[n]).view(np.uint8),
                                                  digest_size=16).hexdigest())
            for n, t in hub.tensors.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/work/bench_convert")
    parser.add_argument("--layers", type=int, nargs="+", default=[24, 48])
    args = parser.parse_args()
    work = Path(args.workdir)
    print(f"load average {os.getloadavg()}, {os.cpu_count()} cores", flush=True)
    rows = []
    for layers in args.layers:
        shutil.rmtree(work, ignore_errors=True)
        hub, copy, ckpt, back = (work / n for n in ("hub", "hub_cp", "ckpt", "back"))
        size = generate(hub, layers)
        cp_s, cp_rss = timed(["cp", "-r", str(hub), str(copy)])
        shutil.rmtree(copy)
        cli = [sys.executable, str(ROOT / "convert_hf.py")]
        jax_s, jax_rss = timed(cli + ["to-jax", "--hf", str(hub), "--out", str(ckpt), "--no-progress"])
        digests = tensor_digests(hub)
        shutil.rmtree(hub)
        hf_s, hf_rss = timed(cli + ["to-hf", "--ckpt", str(ckpt), "--out", str(back),
                                    "--no-progress"])
        ok = tensor_digests(back) == digests
        rows.append((layers, size, cp_s, jax_s, jax_rss, hf_s, hf_rss, ok))
        print(f"layers={layers} size={size / 1e9:.2f} GB cp={size / 1e6 / cp_s:.0f} MB/s "
              f"to-jax={size / 1e6 / jax_s:.0f} MB/s rss={jax_rss / 2**20:.0f} MiB "
              f"to-hf={size / 1e6 / hf_s:.0f} MB/s rss={hf_rss / 2**20:.0f} MiB "
              f"identical={ok} load={os.getloadavg()[0]:.1f}", flush=True)
        shutil.rmtree(work)
    print("\n| layers | checkpoint | cp | to-jax | to-jax peak RSS | to-hf | to-hf peak RSS "
          "| round trip |\n|---|---|---|---|---|---|---|---|")
    for layers, size, cp_s, jax_s, jax_rss, hf_s, hf_rss, ok in rows:
        print(f"| {layers} | {size / 1e9:.2f} GB | {size / 1e6 / cp_s:.0f} MB/s "
              f"| {size / 1e6 / jax_s:.0f} MB/s ({jax_s:.1f} s) | {jax_rss / 2**20:.0f} MiB "
              f"({jax_rss / size:.1%}) | {size / 1e6 / hf_s:.0f} MB/s ({hf_s:.1f} s) "
              f"| {hf_rss / 2**20:.0f} MiB ({hf_rss / size:.1%}) "
              f"| {'bit-identical' if ok else 'DIFFERS'} |")


if __name__ == "__main__":
    main()
