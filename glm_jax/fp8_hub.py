"""Hub folders with FP8 weights: read them dequantized, write them quantized.

Reading: `dequantizing(hub, dtype)` wraps a `HubFolder` whose config.json has an FP8
`quantization_config` (see `fp8.layout_from_config`) in a view that the converter reads
like any hub folder: every e4m3 weight appears as a float tensor of `dtype` (default: the
config's `torch_dtype` / `dtype`, else bfloat16), its scale tensor disappears, and indexing
it reads the codes and the scale (memory-mapped) and returns codes * scale, computed in
float32. Every weight's scale (present, float, right shape) is checked from the headers
when the view is made, before anything is converted; a problem names the tensor.
Activation scales (`input_scale`, written for static activation quantization) are dropped:
glm-jax computes with the dequantized weights.

Writing: `Fp8Writer(layout)` tells the streaming to-hf which hub tensors become e4m3 plus a
scale (`fp8.is_quantized_weight`), and quantizes them one tensor at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np

from glm_jax import fp8
from glm_jax.safetensors_io import FLOAT_DTYPES, ConversionError, HubFolder, TensorInfo

FP8_CODE = "F8_E4M3"
_ACTIVATION_SCALE = ".input_scale"
_TORCH_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class DequantizedHub(Mapping):
    """A `HubFolder` of FP8 weights seen as float weights of one dtype (module docstring).

    Has the attributes the converter reads from a `HubFolder`: path, config_json (without
    `quantization_config`), tensors (name -> TensorInfo as dequantized), nbytes (bytes on
    disk)."""

    def __init__(self, hub: HubFolder, layout: fp8.Fp8Layout, dtype_code: str):
        self.path, self.layout, self._hub = hub.path, layout, hub
        self.config_json = {k: v for k, v in hub.config_json.items()
                            if k != "quantization_config"}
        self._dtype = FLOAT_DTYPES[dtype_code]
        self._scales: dict[str, str] = {}  # weight name -> scale name
        self.tensors: dict[str, TensorInfo] = {}
        problems = []
        where = lambda n: f"{n!r} in {hub.tensors[n].file.name}"  # noqa: E731
        scale_names = {n for n in hub.tensors if n.endswith("." + layout.scale_suffix)}
        for name, info in hub.tensors.items():
            if name in scale_names or name.endswith(_ACTIVATION_SCALE):
                continue
            if info.dtype != FP8_CODE:
                self.tensors[name] = info
                continue
            scale = layout.scale_name(name) if name.endswith(".weight") else None
            s = hub.tensors.get(scale) if scale else None
            if s is None or len(info.shape) != 2:
                problems.append(f"tensor {where(name)} is {FP8_CODE}{list(info.shape)} but has "
                                f"no {layout.scale_suffix} tensor {scale!r}; config.json's "
                                f"quantization_config describes the {layout.name} layout")
                continue
            want = layout.scale_shape(info.shape)
            if s.dtype not in FLOAT_DTYPES:
                problems.append(f"scale {where(scale)} has dtype {s.dtype}; expected F32 "
                                f"(a float)")
            elif s.shape != want:
                problems.append(f"scale {where(scale)} has shape {list(s.shape)}; the "
                                f"{layout.name} layout of {name!r} {list(info.shape)} needs "
                                f"{list(want)}")
            else:
                self._scales[name] = scale
                self.tensors[name] = dataclasses.replace(
                    info, dtype=dtype_code, nbytes=int(np.prod(info.shape)) * self._dtype.itemsize)
        used = set(self._scales.values())
        for name in sorted(scale_names - used):
            weight = name[: -len(layout.scale_suffix)] + "weight"
            if weight not in hub.tensors or hub.tensors[weight].dtype != FP8_CODE:
                what = hub.tensors[weight].dtype if weight in hub.tensors else "missing"
                problems.append(f"scale {where(name)} belongs to no {FP8_CODE} weight "
                                f"({weight!r} is {what})")
        if problems:  # one line: the first problem, and how many more there are
            more = f" (and {len(problems) - 1} more FP8 problems)" if len(problems) > 1 else ""
            raise ConversionError(f"{hub.path}: {problems[0]}{more}")

    @property
    def nbytes(self) -> int:
        return self._hub.nbytes

    def __getitem__(self, name: str) -> np.ndarray:
        scale = self._scales.get(name)
        if scale is None:
            return self._hub[name]
        info = self._hub.tensors[name]
        codes = np.memmap(info.file, fp8.E4M3, "r", info.offset, info.shape)
        return self.layout.dequantize(codes, np.asarray(self._hub[scale]), self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def dequantizing(hub: HubFolder, dtype: str | None = None) -> HubFolder | DequantizedHub:
    """`hub` itself if its config.json has no `quantization_config`, else the dequantizing
    view. dtype: 'float32' / 'bfloat16' / 'float16' for the dequantized weights; None takes
    config.json's `torch_dtype` (or `dtype`), else bfloat16."""
    q = hub.config_json.get("quantization_config")
    if q is None:
        return hub
    try:
        layout = fp8.layout_from_config(q)
    except ValueError as e:
        raise ConversionError(f"{hub.path / 'config.json'}: {e}") from e
    name = dtype or hub.config_json.get("torch_dtype") or hub.config_json.get("dtype")
    return DequantizedHub(hub, layout, _TORCH_DTYPES.get(name, "BF16"))


class Fp8Writer:
    """What the FP8 export of a hub tensor is: the weights `fp8.is_quantized_weight` selects
    become e4m3 codes followed by their float32 scale; everything else is written as is."""

    def __init__(self, layout: fp8.Fp8Layout):
        self.layout = layout

    def entries(self, name: str, dtype: np.dtype, shape: tuple[int, ...]
                ) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """The (name, dtype, shape) of the tensors written for hub tensor `name`."""
        if not fp8.is_quantized_weight(name):
            return [(name, dtype, shape)]
        scale = (self.layout.scale_name(name), np.dtype(np.float32), self.layout.scale_shape(shape))
        return [(name, fp8.E4M3, shape), scale]

    def encode(self, name: str, tensor: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """The tensors written for hub tensor `name`, in `entries` order."""
        if not fp8.is_quantized_weight(name):
            return [(name, tensor)]
        codes, scale = self.layout.quantize(tensor)
        return [(name, codes), (self.layout.scale_name(name), scale)]

    def quantization_config(self, names: list[str]) -> dict:
        """config.json's `quantization_config`; `names`: every hub tensor of the export."""
        modules = {n[: -len(".weight")] for n in names if n.endswith(".weight")}
        # The Linears left unquantized: routers, head, and the MTP layer's projection and head.
        ignore = sorted(m for m in modules if m == "lm_head" or m.endswith(
            (".mlp.gate", ".eh_proj", ".shared_head.head")))
        return self.layout.quantization_config(ignore)
