"""Hub folders of safetensors shards, read lazily and written in a stream.

`HubFolder` validates a folder (config.json, the index, every shard's header, truncation)
before anything is converted, and then behaves as a read-only mapping from tensor name to a
memory-mapped numpy array: a tensor is only read when it is indexed, and its pages are
released when the array is dropped. `ShardWriter` writes one safetensors file whose header
is known in advance, a tensor at a time, so the writer never holds more than one tensor.

The safetensors format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}} padded with spaces to 8 bytes, then the
raw little-endian bytes. `safetensors.safe_open` is used to validate each file (it rejects
truncated or malformed files); the byte offsets come from the header itself because the
numpy frontend of safetensors cannot return bfloat16.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from glm_jax.cli_errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Hub dtype code -> numpy dtype. Only floating weights are model weights.
FLOAT_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16),
                "F16": np.dtype(np.float16)}
DTYPE_CODES = {v: k for k, v in FLOAT_DTYPES.items()}
DTYPE_CODES[np.dtype(ml_dtypes.float8_e4m3fn)] = "F8_E4M3"  # written by to-hf --fp8


class ConversionError(UserError, ValueError):
    """Bad input to the converter: the message names the tensor or file."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # hub code: F32, BF16, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def parse_size(text: str | int) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20 (the units transformers uses)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB, 2GiB")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    return int(float(m.group(1)) * base ** power)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file, after checking the file is complete."""
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"shard {path}: not a valid safetensors file ({e}); "
                              "is it truncated or still downloading?") from e
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    out = {}
    for name, h in header.items():
        begin, end = h["data_offsets"]
        out[name] = TensorInfo(name, path, h["dtype"], tuple(h["shape"]), 8 + n + begin,
                               end - begin)
    if out and max(t.offset + t.nbytes for t in out.values()) != size:
        raise ConversionError(f"shard {path}: file is {size} bytes but its header describes "
                              "a different length (truncated?)")
    return out


class HubFolder(Mapping):
    """A hub-layout model folder, validated on opening; indexing reads a tensor lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"{self.path}: no such directory")
        if not (self.path / CONFIG_FILE).is_file():
            raise ConversionError(f"{self.path}: no {CONFIG_FILE}")
        with open(self.path / CONFIG_FILE) as f:
            self.config_json = json.load(f)
        index = self.path / INDEX_FILE
        if index.is_file():
            with open(index) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif (self.path / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise ConversionError(f"{self.path}: neither {INDEX_FILE} nor {SINGLE_FILE}")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            shard = self.path / fname
            if not shard.is_file():
                raise ConversionError(f"shard {shard} is listed in {INDEX_FILE} but missing")
            for name, info in read_header(shard).items():
                if weight_map is not None and weight_map.get(name) != fname:
                    raise ConversionError(f"tensor {name!r} is in {shard} but {INDEX_FILE} "
                                          f"maps it to {weight_map.get(name)!r}")
                if name in self.tensors:
                    raise ConversionError(f"tensor {name!r} is in both {self.tensors[name].file}"
                                          f" and {shard}")
                self.tensors[name] = info
        for name, fname in (weight_map or {}).items():
            if name not in self.tensors:
                raise ConversionError(f"tensor {name!r} is listed in {INDEX_FILE} but missing "
                                      f"from {self.path / fname}")

    def __getitem__(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if info.dtype not in FLOAT_DTYPES:
            raise ConversionError(f"tensor {name!r} in {info.file} has dtype {info.dtype}")
        if info.nbytes == 0:
            return np.zeros(info.shape, FLOAT_DTYPES[info.dtype])
        return np.memmap(info.file, FLOAT_DTYPES[info.dtype], "r", info.offset, info.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class ShardWriter:
    """Writes one safetensors file; the tensors (name, dtype, shape) are declared up front and
    then written in that order, one at a time."""

    def __init__(self, path: Path, entries: Sequence[tuple[str, np.dtype, tuple[int, ...]]]):
        header, offset = {}, 0
        self._order = []
        for name, dtype, shape in entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": DTYPE_CODES[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, np.dtype(dtype), tuple(shape)))
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = path
        self._file = open(path, "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    def write(self, name: str, value: np.ndarray) -> None:
        want = self._order[self._next]
        if (name, value.dtype, value.shape) != want:
            raise AssertionError(f"{self.path}: got {name} {value.dtype} {value.shape}, "
                                 f"declared {want}")
        self._file.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self._order):
            raise AssertionError(f"{self.path}: {len(self._order) - self._next} tensors unwritten")


def plan_shards(entries: Sequence[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Greedy split of (name, nbytes) in order into shards of at most max_shard_size bytes
    (a larger single tensor gets a shard of its own, as transformers does).

    Not huggingface_hub's `split_state_dict_into_shards_factory`: it puts an oversized
    tensor in a shard of its own *ahead of* the shard being filled, so a shard's tensors are
    not contiguous in output order, and the converter streams the shards one after another
    in that order (one open file, one tensor in memory)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in entries:
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
