"""Write and read an orbax PyTree checkpoint a block at a time.

Orbax saves a tree of in-memory arrays; a GLM-4.5 leaf such as the stacked `w_gate`
([89 layers, 160 experts, 5120, 1536], 224 GB in bf16) cannot be materialised. So the tree
handed to orbax holds `StreamedArray`s instead: shape, dtype and a generator of blocks.
`StreamingHandler` (an orbax `TypeHandler`, registered for `StreamedArray` in a private
registry) opens the leaf's TensorStore exactly as orbax's own numpy handler does (same
spec builder, OCDBT process subdirectory, zarr3) but with the zarr shard shape equal to the
block shape, and writes the blocks one by one, with a bounded number of bytes in flight.
It records the leaf as 'np.ndarray', so the result is an ordinary orbax checkpoint:
`PyTreeRestore` reads it back, onto a mesh if asked, without knowing about this module.

`LeafReader` reads regions of the leaves of a saved checkpoint (the to-hf direction).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
# Private orbax modules: orbax has no public API for writing a leaf block by block.
# tests/test_orbax_internals.py pins the version and the names used here, so an orbax
# upgrade fails there first.
from orbax.checkpoint._src.futures import future
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from orbax.checkpoint._src.serialization import types as ocp_types

# Bytes of blocks handed to TensorStore and not yet committed: overlaps reading the next
# block with writing the previous ones without letting memory grow. 128 MiB measured no
# faster and ~125 MiB more peak RSS (with 64 MiB blocks).
MAX_IN_FLIGHT_BYTES = 64 * 2**20
# Orbax's TensorStore context lets the OCDBT b-tree node cache grow to 100 MB, and it fills
# as chunks are committed: measured +26 MB of live heap over an 8 GB to-jax (739 chunks), +5
# MB at a third of the depth, none with this limit. The writer and reader only need the
# newest nodes.
OCDBT_CACHE_BYTES = 8 * 2**20


def _bounded_context(parent: ts.Context) -> ts.Context:
    """`parent` (orbax's context) with the OCDBT node cache limited to OCDBT_CACHE_BYTES."""
    return ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": OCDBT_CACHE_BYTES}},
                      parent=parent)

Block = tuple[tuple[int, ...], np.ndarray]  # (start index along every axis, data)


@dataclasses.dataclass
class StreamedArray:
    """A leaf that is produced block by block. Every block has shape `block_shape` and
    starts at a multiple of it, so each is one zarr shard (written without read-modify-write)."""
    shape: tuple[int, ...]
    dtype: np.dtype
    block_shape: tuple[int, ...]
    blocks: Callable[[], Iterator[Block]]
    on_block: Callable[[int], None] = lambda nbytes: None  # progress hook

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize


class StreamingHandler(ocp.type_handlers.NumpyHandler):
    """Saves `StreamedArray`s; restores never come here (the leaf is recorded as np.ndarray)."""

    def __init__(self):
        super().__init__()
        self._contexts: dict[int, tuple[ts.Context, ts.Context]] = {}

    def typestr(self) -> str:
        return "np.ndarray"

    def _context(self, parent: ts.Context) -> ts.Context:
        """One bounded context per orbax context, so that every leaf of a save still goes
        through one OCDBT writer (two writers on one database would race on its manifest)."""
        if id(parent) not in self._contexts:
            self._contexts[id(parent)] = (parent, _bounded_context(parent))  # keeps id valid
        return self._contexts[id(parent)][1]

    async def serialize(self, values: Sequence[StreamedArray],
                        infos: Sequence[ocp_types.ParamInfo],
                        args: Sequence[ocp_types.SaveArgs] | None = None
                        ) -> list[future.Future]:
        args = args or [ocp_types.SaveArgs()] * len(values)
        return [future.CommitFutureAwaitingContractedSignals(
            self._write_all(list(values), list(infos), list(args)), name="glm_jax_stream")]

    async def _write_all(self, values: list[StreamedArray], infos: list[ocp_types.ParamInfo],
                         args: list[ocp_types.SaveArgs]) -> None:
        in_flight: collections.deque = collections.deque()
        in_flight_bytes = 0
        for value, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            spec = ts_utils.build_array_write_spec(
                info=info, arg=arg, global_shape=value.shape, local_shape=value.block_shape,
                dtype=value.dtype, use_ocdbt=info.is_ocdbt_checkpoint,
                process_index=ocdbt_utils.get_process_index_for_subdir(
                    use_ocdbt=info.is_ocdbt_checkpoint),
                metadata_key=self._metadata_key)
            store = await ts.open(ts.Spec(spec.json), create=True, open=True,
                                  context=self._context(info.ts_context))
            for start, block in value.blocks():
                if block.shape != value.block_shape or block.dtype != value.dtype:
                    raise AssertionError(f"{info.name}: block {block.dtype}{block.shape} at "
                                         f"{start}, expected {value.dtype}{value.block_shape}")
                region = tuple(slice(s, s + n) for s, n in zip(start, block.shape))
                # Blocks are fresh arrays never touched again: TensorStore may keep a
                # reference instead of a copy, which halves the bytes held in flight.
                write = store[region].write(block, can_reference_source_data_indefinitely=True)
                in_flight.append((write, block.nbytes))
                in_flight_bytes += block.nbytes
                value.on_block(block.nbytes)
                while in_flight_bytes > MAX_IN_FLIGHT_BYTES:
                    fut, nbytes = in_flight.popleft()
                    await fut
                    in_flight_bytes -= nbytes
        while in_flight:
            await in_flight.popleft()[0]


def save(path: Path, tree: Any, config_json: dict) -> None:
    """Write an orbax composite checkpoint at `path`: item 'params' (the tree, every leaf a
    StreamedArray) and item 'config' (the HF config.json dict). `path` must not exist."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (StreamedArray, StreamingHandler()))
    params = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_zarr3=True,
                                         use_compression=False)
    handler = ocp.CompositeCheckpointHandler(params=params, config=ocp.JsonCheckpointHandler())
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(path, args=ocp.args.Composite(params=ocp.args.PyTreeSave(tree),
                                                 config=ocp.args.JsonSave(config_json)))


def read_config(path: Path) -> dict:
    """The 'config' item (HF config.json dict) of a checkpoint written by `save`."""
    file = Path(path) / "config" / "metadata"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not a glm-jax checkpoint (no config item at {file})")
    with open(file) as f:
        return json.load(f)


def params_metadata(path: Path) -> Any:
    """Tree of orbax ArrayMetadata (shape, dtype) of the 'params' item."""
    params = Path(path) / "params"
    if not params.is_dir():
        raise FileNotFoundError(f"{path}: not a glm-jax checkpoint (no params item)")
    return ocp.PyTreeCheckpointHandler().metadata(params).tree


def _uses_zarr3(params: Path) -> bool:
    with open(params / "_METADATA") as f:
        return bool(json.load(f).get("use_zarr3", False))


class LeafReader:
    """Region reads from the leaves of a saved checkpoint's 'params' item. Every leaf is
    opened once, all in one TensorStore context: a context per leaf would keep one OCDBT
    b-tree/manifest cache per leaf (measured +50 MiB resident over an 8 GB to-hf)."""

    def __init__(self, path: Path):
        self._params = Path(path).absolute() / "params"  # orbax's OCDBT specs need absolute
        self._ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(self._params)
        self._zarr3 = _uses_zarr3(self._params)
        self._context = _bounded_context(ts_utils.get_ts_context(use_ocdbt=self._ocdbt))
        self._stores: dict[tuple, ts.TensorStore] = {}

    def read(self, keys: Sequence[str | int], region: tuple[slice, ...]) -> ts.Future:
        """Start reading `region` of leaf `keys`; `.result()` is the numpy array."""
        keys = tuple(keys)
        if keys not in self._stores:
            spec = ts_utils.ArrayReadSpec(self._params.as_posix(), ".".join(map(str, keys)),
                                          self._zarr3, use_ocdbt=self._ocdbt)
            self._stores[keys] = ts.open(ts.Spec(spec.json), open=True,
                                         context=self._context).result()
        return self._stores[keys][region].read()
