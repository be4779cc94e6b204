"""Streaming conversion between hub safetensors folders and glm-jax orbax checkpoints.

Checkpoint layout (an orbax composite checkpoint, readable with plain orbax):
    CKPT/params   PyTree item: `nnx.to_pure_dict(nnx.state(model))`, i.e. every Param and
                  the RouterBias `correction_bias`; each leaf keeps the hub dtype (or --dtype)
    CKPT/config   JSON item: `GlmConfig.to_hf()`, the hub config.json (round-trips exactly)

Both directions walk the one mapping table, `hf_names.leaf_map`, in *units*: one hub tensor,
one layer of a layer stack, or a block of experts of one layer (at most UNIT_BYTES). A unit
is read, stacked or split, written and dropped, so peak memory is a few units whatever the
depth. Everything that can be checked from headers and metadata (names, shapes, dtypes,
truncation, the MTP copies) is checked before any output is written, and output goes to a
temporary directory that is renamed into place only when complete.

Dropping a unit is not enough on glibc: what a unit frees (its blocks, TensorStore's shard
buffers, allocated and freed on several threads) stays in malloc's arenas, fragmented.
Measured on an 8 GB to-jax: heap in use stayed at 50-200 MB while free-but-retained heap
grew to ~580 MB, and peak RSS grew ~8 MiB per layer. So the converter calls
`malloc_trim(0)`, which hands free heap pages back to the kernel, after every unit; resident
memory then follows the live units. The price is refaulting those pages (to-jax, 8 GB:
~1.7M more minor faults, a few CPU-seconds); trimming every 256 MiB instead let peak RSS
grow with depth again (+55 MiB from 12 to 36 layers).

MTP: the MTP layer is stored by the hub at index num_hidden_layers. GLM-4.5 / Air also store
copies of the embedding and head in it (`embed_tokens.weight`, `shared_head.head.weight`):
to-jax checks them equal to the main tensors and keeps one copy; to-hf writes them back by
default (vLLM's and SGLang's GLM-4.5 MTP loaders read them; transformers ignores the whole
MTP layer), `mtp_copies=False` leaves them out (the GLM-4.6 layout).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from glm_jax import fp8, fp8_hub, hub_mtp, orbax_stream
from glm_jax.checkpoint_source import resolve_checkpoint
from glm_jax.config import GlmConfig
from glm_jax.hf_io import abstract_model, check_copies, get_path, hf_shape, leaf_from_hf, set_path
from glm_jax.hf_names import LeafMap, leaf_map, mtp_copy_names, tied_copy_names
from glm_jax.model.transformer import GlmForCausalLM
from glm_jax.safetensors_io import (CONFIG_FILE, FLOAT_DTYPES, INDEX_FILE, ConversionError, HubFolder,
                                    ShardWriter, parse_size, plan_shards, shard_names)

# Target size of an expert block: 64 MiB measured ~50 MiB more peak RSS in to-jax, no faster.
UNIT_BYTES = 32 * 2**20
_FLOAT32_LEAVES = ("router_kernel", "correction_bias")  # kept float32 under --dtype, as hf_io


def _find_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl and macOS have none
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_freed_memory() -> None:
    """Hand free malloc heap pages back to the kernel (a no-op without glibc); called between
    units, see the module docstring."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclasses.dataclass(frozen=True)
class Unit:
    """A block of one leaf: `leaf.names` restricted to the block, starting at `start` along
    the leaf's stacking axes."""
    leaf: LeafMap
    start: tuple[int, ...]
    block: tuple[int, ...]  # block extent along the stacking axes

    @property
    def region(self) -> tuple[slice, ...]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.block))

    @property
    def names(self) -> np.ndarray:
        return self.leaf.names[self.region] if self.block else self.leaf.names

    def layer(self, num_layers: int) -> float:
        """Hub order: embedding, layers, final norm and head, then the MTP layer(s)."""
        name = self.names.reshape(-1)[0]
        m = re.match(r"model\.layers\.(\d+)\.", name)
        return int(m.group(1)) if m else (-1 if "embed" in name else num_layers - 0.5)


def units(leaf: LeafMap, shape: tuple[int, ...], itemsize: int) -> list[Unit]:
    """Split a leaf into units: one step along every stacking axis but an experts axis,
    which is taken in blocks of experts of at most UNIT_BYTES (dividing the expert count)."""
    stack = leaf.names.shape
    if not stack:
        return [Unit(leaf, (), ())]
    block = [1] * len(stack)
    if ".experts." in leaf.names.reshape(-1)[0]:
        per = int(np.prod(shape[len(stack):])) * itemsize
        n = stack[-1]
        block[-1] = max([d for d in range(1, n + 1) if n % d == 0 and d * per <= UNIT_BYTES],
                        default=1)
    starts = np.ndindex(*(s // b for s, b in zip(stack, block)))
    return [Unit(leaf, tuple(i * b for i, b in zip(idx, block)), tuple(block)) for idx in starts]


def _expected_shapes(config: GlmConfig) -> dict:
    return nnx.to_pure_dict(nnx.state(abstract_model(config)))


def _problems(problems: list[str], what: str) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConversionError(f"{what}:\n  " + "\n  ".join(problems[:20]) + more)


@dataclasses.dataclass(frozen=True)
class _LeafPlan:
    leaf: LeafMap
    shape: tuple[int, ...]
    src_dtype: np.dtype
    dtype: np.dtype
    fresh: bool = False  # not in the hub folder: initialised (hub_mtp)


def _out_dtype(leaf: LeafMap, src: np.dtype, dtype: str | None) -> np.dtype:
    return src if dtype is None else np.dtype(
        "float32" if leaf.path[-1] in _FLOAT32_LEAVES else jax.numpy.dtype(dtype))


def plan_to_jax(hub: HubFolder, config: GlmConfig, dtype: str | None, *,
                fresh_mtp: bool = False) -> list[_LeafPlan]:
    """Check every hub tensor against the config (names, shapes, dtypes) from headers only.
    fresh_mtp: the MTP leaves are initialised, not read (in the embedding's dtype)."""
    shapes = _expected_shapes(config)
    problems, plans, used = [], [], set()
    where = lambda n: f"{n!r} in {hub.tensors[n].file.name}"  # noqa: E731
    embed = hub.tensors.get("model.embed_tokens.weight")
    fresh_src = FLOAT_DTYPES.get(embed.dtype, np.dtype(np.float32)) if embed else np.dtype(
        np.float32)
    for leaf in leaf_map(config):
        shape = tuple(get_path(shapes, leaf.path).shape)
        if fresh_mtp and hub_mtp.is_mtp_leaf(leaf.path):
            src = np.dtype("float32") if leaf.path[-1] in _FLOAT32_LEAVES else fresh_src
            plans.append(_LeafPlan(leaf, shape, src, _out_dtype(leaf, src, dtype), fresh=True))
            continue
        want, first = hf_shape(leaf, shape), None
        param = ".".join(map(str, leaf.path))
        for name in leaf.names.reshape(-1):
            info = hub.tensors.get(name)
            used.add(name)
            if info is None:
                problems.append(f"missing tensor {name!r} (parameter {param})")
            elif info.dtype not in FLOAT_DTYPES:
                problems.append(f"tensor {where(name)} has dtype {info.dtype}; expected one of "
                                f"{sorted(FLOAT_DTYPES)} (quantized checkpoints are not supported)")
            elif info.shape != want:
                problems.append(f"tensor {where(name)} has shape {list(info.shape)}; config.json "
                                f"implies {list(want)}")
            elif first is None:
                first = name
            elif info.dtype != hub.tensors[first].dtype:
                problems.append(f"tensor {where(name)} has dtype {info.dtype} but {first!r} has "
                                f"{hub.tensors[first].dtype}; parameter {param} needs one dtype")
        if first is not None:
            src = FLOAT_DTYPES[hub.tensors[first].dtype]
            plans.append(_LeafPlan(leaf, shape, src, _out_dtype(leaf, src, dtype)))
    for copy, main in {**mtp_copy_names(config), **tied_copy_names(config)}.items():
        if copy in hub.tensors and main in hub.tensors:
            used.add(copy)
            a, b = hub.tensors[copy], hub.tensors[main]
            if (a.shape, a.dtype) != (b.shape, b.dtype):
                problems.append(f"tensor {where(copy)} is {a.dtype}{list(a.shape)} but the main "
                                f"{main!r} is {b.dtype}{list(b.shape)}; they must be equal")
    for name in sorted(set(hub.tensors) - used):
        problems.append(f"unexpected tensor {where(name)}: not part of a glm4_moe model with "
                        f"config.json's num_hidden_layers={config.num_hidden_layers}, "
                        f"num_nextn_predict_layers={config.num_nextn_predict_layers}, "
                        f"n_routed_experts={config.n_routed_experts}, "
                        f"first_k_dense_replace={config.first_k_dense_replace}")
    _problems(problems, f"{hub.path}: the tensors do not match {hub.path / CONFIG_FILE}")
    return plans


def _temp_dir_for(out: Path) -> Path:
    if out.exists():
        raise FileExistsError(f"output {out} already exists; remove it or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not enabled, smoothing=0.1)


def convert_to_jax(hf_dir: str | os.PathLike, out: str | os.PathLike, *,
                   dtype: str | None = None, progress: bool = True,
                   missing_mtp: str | None = None, seed: int = 0) -> dict:
    """Convert a hub folder to an orbax checkpoint at `out` (must not exist). `dtype` None
    keeps every tensor's dtype; otherwise floating weights are cast to it (the router weight
    and correction bias to float32). missing_mtp: what to do when config.json has MTP layers
    but the folder none (a transformers save_pretrained): None raises ConversionError,
    "drop" converts without MTP, "init" initialises them from `seed` (glm_jax.hub_mtp).
    Returns {'bytes', 'seconds', 'mtp'} of the conversion ('mtp': "dropped" /
    "initialised" / None). FP8 folders (config.json `quantization_config`, see
    glm_jax/fp8_hub.py) are read dequantized to `dtype` (None: the config's dtype)."""
    out = Path(out).absolute()  # orbax's OCDBT specs reject relative paths
    if out.exists():
        raise FileExistsError(f"output {out} already exists; remove it or choose another path")
    if missing_mtp not in (None, *hub_mtp.MISSING_MTP_CHOICES):
        raise ValueError(f"missing_mtp={missing_mtp!r}: expected None, 'drop' or 'init'")
    config_file = Path(hf_dir) / CONFIG_FILE
    if config_file.is_file():  # first: another model's folder fails on its config.json
        try:
            GlmConfig.from_hf(config_file)
        except (TypeError, ValueError) as e:
            raise ConversionError(f"{config_file}: {e}; glm-jax converts GLM-4.5 "
                                  "(glm4_moe) checkpoints") from None
    hub = fp8_hub.dequantizing(HubFolder(hf_dir), dtype)  # FP8 weights read dequantized
    config = GlmConfig.from_hf(hub.config_json)
    mtp = None
    if hub_mtp.mtp_missing(hub.tensors, config):
        if missing_mtp is None:
            raise ConversionError(hub_mtp.missing_mtp_message(hub.path, config))
        if missing_mtp == "drop":
            config, mtp = config.replace(num_nextn_predict_layers=0), "dropped"
        else:
            mtp = "initialised"
    plans = plan_to_jax(hub, config, dtype, fresh_mtp=mtp == "initialised")
    try:
        check_copies(hub, config)  # reads the copies (memory-mapped) and compares
    except ValueError as e:
        raise ConversionError(f"{hub.path}: {e}") from e
    total = sum(int(np.prod(p.shape)) * p.src_dtype.itemsize for p in plans)
    tree = _expected_shapes(config)
    bar = _progress(total, "to-jax", progress)

    def leaf_blocks(plan: _LeafPlan, index: int) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        rest = len(plan.leaf.names.shape)
        for unit in units(plan.leaf, plan.shape, plan.src_dtype.itemsize):
            sub = dataclasses.replace(unit.leaf, names=unit.names)
            # Pulled after the previous block is handed over and finished writes are awaited.
            release_freed_memory()
            shape = unit.block + plan.shape[rest:]
            value = (hub_mtp.fresh_block(plan.leaf.path, shape, plan.src_dtype, config, seed,
                                         index, unit.start) if plan.fresh
                     else leaf_from_hf(sub, hub, shape))
            yield unit.start + (0,) * (len(plan.shape) - rest), value.astype(plan.dtype, copy=False)

    for index, plan in enumerate(plans):
        block = units(plan.leaf, plan.shape, plan.src_dtype.itemsize)[0].block
        set_path(tree, plan.leaf.path, orbax_stream.StreamedArray(
            plan.shape, plan.dtype, block + plan.shape[len(block):],
            (lambda p=plan, i=index: leaf_blocks(p, i)),
            on_block=lambda n, p=plan: bar.update(n * p.src_dtype.itemsize // p.dtype.itemsize)))
    tmp = _temp_dir_for(out)
    start = time.perf_counter()
    try:
        orbax_stream.save(tmp / "ckpt", tree, config.to_hf())
        os.rename(tmp / "ckpt", out)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    # 'read_bytes' counts every byte read, the MTP copies included (as `cp` would copy
    # them); 'bytes' is what was written, in the output dtypes.
    written = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in plans)
    return {"bytes": written, "read_bytes": hub.nbytes,
            "seconds": time.perf_counter() - start, "mtp": mtp}


def _checkpoint_leaves(ckpt: Path, config: GlmConfig) -> dict[tuple, np.dtype]:
    """The dtype of every leaf of a checkpoint, after checking its leaves and shapes against
    the config."""
    meta = orbax_stream.params_metadata(ckpt)
    shapes = _expected_shapes(config)
    problems, dtypes = [], {}
    for leaf in leaf_map(config):
        want = tuple(get_path(shapes, leaf.path).shape)
        param = ".".join(map(str, leaf.path))
        try:
            m = get_path(meta, tuple(str(k) for k in leaf.path))
        except (KeyError, TypeError):
            problems.append(f"parameter {param} is missing from {ckpt}/params")
            continue
        if tuple(m.shape) != want:
            problems.append(f"parameter {param} has shape {list(m.shape)}; the checkpoint's "
                            f"config implies {list(want)}")
        elif np.dtype(m.dtype) not in FLOAT_DTYPES.values():
            problems.append(f"parameter {param} has dtype {m.dtype}")
        dtypes[leaf.path] = np.dtype(m.dtype)
    _problems(problems, f"{ckpt}: the parameters do not match its config")
    return dtypes


GENERATION_CONFIG_FILE = "generation_config.json"


def generation_config(config: GlmConfig) -> dict:
    """generation_config.json: the special token ids, so that transformers' `generate`
    stops at the eos tokens as glm_jax.generate does (without the file it stops at none)."""
    ids = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ids.items() if v is not None}


def convert_to_hf(ckpt: str | os.PathLike, out: str | os.PathLike, *,
                  max_shard_size: str | int = "5GB", mtp_copies: bool = True,
                  fp8_layout: str | None = None, progress: bool = True) -> dict:
    """Write a hub folder at `out` (must not exist) from a checkpoint: config.json,
    model-0000k-of-0000n.safetensors shards of at most `max_shard_size`, and
    model.safetensors.index.json, generation_config.json (the eos ids). `ckpt`: a train.py
    workdir (latest step), one of its step folders, or a converted checkpoint
    (glm_jax.checkpoint_source). fp8_layout 'channel' (GLM-4.5-FP8's compressed-tensors
    layout) or 'block' (DeepSeek-V3's 128 x 128 `weight_scale_inv`) writes the decoder
    Linears in float8_e4m3fn with their scales (see glm_jax/fp8.py). Returns {'bytes',
    'seconds', 'shards'}."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"output {out} already exists; remove it or choose another path")
    try:
        limit = parse_size(max_shard_size)
    except ValueError as e:
        raise ConversionError(f"--max-shard-size: {e}") from None
    quantizer = fp8_hub.Fp8Writer(fp8.LAYOUTS[fp8_layout]) if fp8_layout else None
    source = resolve_checkpoint(ckpt, what="--ckpt")
    ckpt, config = source.path, source.config
    dtypes = _checkpoint_leaves(ckpt, config)
    shapes = _expected_shapes(config)
    all_units = []
    for leaf in leaf_map(config):
        shape = tuple(get_path(shapes, leaf.path).shape)
        all_units += [(u, shape) for u in units(leaf, shape, dtypes[leaf.path].itemsize)]
    if mtp_copies:  # the copies read the main leaf under the MTP layer's names
        by_name = {str(leaf.names): leaf for leaf in leaf_map(config) if not leaf.names.shape}
        for copy, main in mtp_copy_names(config).items():
            leaf = dataclasses.replace(by_name[main], names=np.array(copy, dtype=object))
            all_units.append((Unit(leaf, (), ()), tuple(get_path(shapes, leaf.path).shape)))
    all_units.sort(key=lambda us: us[0].layer(config.num_hidden_layers))  # stable

    # Every hub tensor in output order: (name, dtype, hub shape, nbytes).
    entries = []
    for unit, shape in all_units:
        dt = dtypes[unit.leaf.path]
        hs = hf_shape(unit.leaf, shape)
        for name in unit.names.reshape(-1):
            for n, d, s in (quantizer.entries(name, dt, hs) if quantizer else [(name, dt, hs)]):
                entries.append((n, d, s, int(np.prod(s)) * np.dtype(d).itemsize))
    shards = plan_shards([(e[0], e[3]) for e in entries], limit)
    files = shard_names(len(shards))
    shard_of = {n: i for i, names in enumerate(shards) for n in names}
    total = sum(e[3] for e in entries)

    tmp = _temp_dir_for(out)
    bar = _progress(total, "to-hf", progress)
    start = time.perf_counter()
    try:
        reader = orbax_stream.LeafReader(ckpt)
        pending = reader.read(all_units[0][0].leaf.path, all_units[0][0].region)
        writer, current = None, -1
        for i, (unit, _) in enumerate(all_units):
            value = np.asarray(pending.result())
            if i + 1 < len(all_units):  # read the next unit while this one is written
                nxt = all_units[i + 1][0]
                pending = reader.read(nxt.leaf.path, nxt.region)
            # Split into hub tensors one at a time ([in, out] views back to [out, in]): the
            # writer copies one tensor, not the whole unit.
            for idx in np.ndindex(unit.names.shape):
                name, tensor = unit.names[idx], value[idx]
                if unit.leaf.transpose:
                    tensor = tensor.T
                for name, tensor in (quantizer.encode(name, tensor) if quantizer
                                     else [(name, tensor)]):
                    if shard_of[name] != current:  # entries are in output order: shards in turn
                        if writer is not None:
                            writer.close()
                        current = shard_of[name]
                        writer = ShardWriter(tmp / files[current], [
                            e[:3] for e in entries if shard_of[e[0]] == current])
                    writer.write(name, tensor)
                    bar.update(tensor.nbytes)
            value = tensor = None  # drop the unit (tensor is a view of it), then trim
            release_freed_memory()
        writer.close()
        index = {"metadata": {"total_size": total},
                 "weight_map": {e[0]: files[shard_of[e[0]]] for e in entries}}
        with open(tmp / INDEX_FILE, "w") as f:
            json.dump(index, f, indent=2)
        hf_config = config.to_hf()
        if quantizer:
            hf_config["quantization_config"] = quantizer.quantization_config(
                [e[0] for e in entries])
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(hf_config, f, indent=2)
        with open(tmp / GENERATION_CONFIG_FILE, "w") as f:
            json.dump(generation_config(config), f, indent=2)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return {"bytes": total, "seconds": time.perf_counter() - start, "shards": len(files)}


def load_checkpoint(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
                    **compute_options) -> GlmForCausalLM:
    """Load a checkpoint as a GlmForCausalLM.

    path: a train.py workdir (latest step), one of its step folders, or a checkpoint written
    by `convert_hf.py to-jax` (glm_jax.checkpoint_source). The model config is the one
    stored with the weights: a run's glm-jax model config, or the hub config.json. mesh: None puts every array on the default device; with a
    mesh, each parameter is sharded by `sharding.rules` from its logical axes and every
    device restores only its own shards. compute_options: GlmConfig compute fields (dtype,
    moe_backend, capacity_factor, remat_policy, ...). `param_dtype` defaults to the stored
    dtype of the embedding; a given `param_dtype` casts every weight on restore, except the
    router weight and correction bias, which are always float32.

        model = load_checkpoint("ckpt/glm45_air", mesh, moe_backend="ragged_dot")
    """
    import orbax.checkpoint as ocp
    from jax.sharding import SingleDeviceSharding

    from sharding.rules import bind_mesh, variable_sharding

    source = resolve_checkpoint(path)
    path = source.path
    meta = orbax_stream.params_metadata(path)
    stored = np.dtype(meta["embed"].dtype)
    config = source.config.replace(**{"param_dtype": stored.name, **compute_options})
    _checkpoint_leaves(path, config)
    graphdef, state = nnx.split(abstract_model(config))
    cast = "param_dtype" in compute_options

    abstract = nnx.to_pure_dict(state)
    for leaf in leaf_map(config):
        var = get_path(state, leaf.path)
        value = var.get_value()
        if mesh is None:
            sharding = SingleDeviceSharding(jax.devices()[0])
        else:
            sharding = variable_sharding(var, mesh)
        dt = value.dtype  # the config's param_dtype (router leaves: float32) ...
        if not cast and leaf.path[-1] not in _FLOAT32_LEAVES:  # ... or the stored dtype
            dt = get_path(meta, tuple(map(str, leaf.path))).dtype
        set_path(abstract, leaf.path, jax.ShapeDtypeStruct(value.shape, dt, sharding=sharding))
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(path, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))
    nnx.replace_by_pure_dict(state, restored["params"])
    return bind_mesh(nnx.merge(graphdef, state), mesh)
