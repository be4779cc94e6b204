"""FP8 (float8_e4m3fn) weight quantization in the two layouts the hub uses for GLM-4.5.

A quantized Linear weight W [out, in] is stored as e4m3 codes Q [out, in] and float32
scales S, with W ~= Q * S (S broadcast over the weight):

    channel  one scale per output row, S [out, 1]; llm-compressor's compressed-tensors
             format (`quant_method: compressed-tensors`, `strategy: channel`), stored as
             `<module>.weight_scale`. This is the layout of zai-org/GLM-4.5-FP8 and
             GLM-4.5-Air-FP8 (every Linear of the decoder layers in e4m3; the embedding,
             norms, routers `mlp.gate` and `lm_head` left in bf16).
    block    one scale per 128 x 128 block, S [ceil(out/128), ceil(in/128)]; the DeepSeek-V3
             layout (`quant_method: fp8`, `weight_block_size: [128, 128]`), stored as
             `<module>.weight_scale_inv`. The name says "inverse" because quantization
             divided by it; dequantization multiplies, as in both formats. Edge blocks of a
             dimension that is not a multiple of 128 are partial and get their own scale.
             compressed-tensors' `strategy: block` is the same layout under `weight_scale`.

Scales are absmax / 448 (448 is e4m3's largest finite value), so the largest element of
each row or block maps to +-448 and nothing saturates; an all-zero row or block gets scale
1. Rounding is numpy's (ml_dtypes') round-to-nearest-even cast. Per element the error is
at most half a unit in the last place of e4m3 (3 fraction bits): |W - Q*S| <= 2^-4 |W| for
scaled values in the normal range (|W/S| >= 2^-6), and <= 2^-10 * S below it, where e4m3 is
subnormal with spacing 2^-9 (`error_bound`).

Why numpy and not qwix: qwix (`qwix.quantize(x, jnp.float8_e4m3fn, channelwise_axes=...,
tiled_axes=...)`) computes the same absmax / qmax scales, but its tiled (block) mode
requires every tiled axis to be a multiple of the tile ("cannot be tiled"), while the hub's
block layout has partial edge blocks, and its QArray keeps scales in its own
[tiles, 1, tiles, 1] shape rather than the hub's. The converter also runs on the host a
hub tensor at a time, where numpy needs no device transfer; qwix is the right tool for
quantizing the model's computation in JAX, not for reading and writing these files.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import ml_dtypes
import numpy as np

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
BLOCK_SIZE = (128, 128)

# The hub's FP8 checkpoints quantize every Linear of the decoder layers: attention q/k/v/o,
# dense MLP, shared and routed experts. The router `mlp.gate`, `lm_head`, the embedding and
# the norms stay in high precision (they are a small fraction of the bytes and the router
# and head are the most precision-sensitive). The MTP layer's `eh_proj` and its head copy
# are kept in high precision too.
_QUANTIZED_WEIGHT = re.compile(
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|"
    r"mlp\.(shared_experts\.|experts\.\d+\.)?(gate|up|down)_proj)\.weight")


def is_quantized_weight(name: str) -> bool:
    """Whether the FP8 export stores hub tensor `name` in e4m3 (see `_QUANTIZED_WEIGHT`)."""
    return _QUANTIZED_WEIGHT.fullmatch(name) is not None


@dataclasses.dataclass(frozen=True)
class Fp8Layout:
    """Where a weight's scales live and what they cover.

    scale_suffix: the scale tensor's name is the weight's with `weight` replaced by this.
    block_size: (rows, cols) covered by one scale; None is one scale per output row."""
    scale_suffix: str
    block_size: tuple[int, int] | None

    @property
    def name(self) -> str:
        return "channel" if self.block_size is None else "block"

    def scale_name(self, weight_name: str) -> str:
        return weight_name[: -len("weight")] + self.scale_suffix

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The scale shape for a weight of `shape` [out, in]."""
        out, inp = shape
        if self.block_size is None:
            return (out, 1)
        return (math.ceil(out / self.block_size[0]), math.ceil(inp / self.block_size[1]))

    def quantize(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[out, in] float weight -> (e4m3 codes [out, in], float32 scales `scale_shape`)."""
        if self.block_size is None:
            return quantize_channel(weight)
        return quantize_block(weight, self.block_size)

    def dequantize(self, codes: np.ndarray, scale: np.ndarray,
                   dtype: np.dtype | str = np.float32) -> np.ndarray:
        """(e4m3 codes [out, in], scales) -> weight [out, in] in `dtype`, computed in float32."""
        if self.block_size is None:
            return dequantize_channel(codes, scale, dtype)
        return dequantize_block(codes, scale, self.block_size, dtype)

    def quantization_config(self, ignore: list[str]) -> dict[str, Any]:
        """config.json's `quantization_config` for a checkpoint in this layout. `ignore`: the
        module names left unquantized (compressed-tensors lists them; the DeepSeek `fp8`
        format quantizes what has a scale and needs no list)."""
        if self.scale_suffix == "weight_scale_inv":
            return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": list(self.block_size)}
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                   "strategy": "channel" if self.block_size is None else "block",
                   "group_size": None, "actorder": None, "observer": "minmax",
                   "observer_kwargs": {},
                   "block_structure": None if self.block_size is None else list(self.block_size)}
        activations = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                       "strategy": "token" if self.block_size is None else "group",
                       "group_size": None if self.block_size is None else self.block_size[1],
                       "actorder": None, "observer": None, "observer_kwargs": {},
                       "block_structure": None}
        return {"quant_method": "compressed-tensors", "format": "float-quantized",
                "quantization_status": "compressed", "kv_cache_scheme": None,
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                              "input_activations": activations,
                                              "output_activations": None}},
                "ignore": list(ignore)}


CHANNEL = Fp8Layout("weight_scale", None)
BLOCK = Fp8Layout("weight_scale_inv", BLOCK_SIZE)
LAYOUTS = {"channel": CHANNEL, "block": BLOCK}


def layout_from_config(quantization_config: dict[str, Any]) -> Fp8Layout:
    """The layout a config.json `quantization_config` describes. Raises ValueError naming the
    field when it is not FP8 e4m3 weights in one of the layouts above."""
    q = quantization_config
    method = q.get("quant_method")
    if method == "fp8":
        if q.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"quantization_config.fmt is {q.get('fmt')!r}; only e4m3 is supported")
        block = q.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(
                isinstance(b, int) and b > 0 for b in block)):
            raise ValueError(f"quantization_config.weight_block_size is {block!r}; expected "
                             "[rows, cols], e.g. [128, 128]")
        return Fp8Layout("weight_scale_inv", (block[0], block[1]))
    if method == "compressed-tensors":
        if q.get("format") != "float-quantized":
            raise ValueError(f"quantization_config.format is {q.get('format')!r}; only "
                             "'float-quantized' (FP8 e4m3) is supported")
        groups = q.get("config_groups") or {}
        weights = [g.get("weights") or {} for g in groups.values()]
        kinds = {(w.get("type"), w.get("num_bits"), w.get("strategy"),
                  tuple(w.get("block_structure") or ())) for w in weights}
        if len(kinds) != 1:
            raise ValueError("quantization_config.config_groups: expected one weight scheme, "
                             f"found {sorted(map(str, kinds)) or 'none'}")
        kind, bits, strategy, block = kinds.pop()
        if (kind, bits) != ("float", 8):
            raise ValueError(f"quantization_config.config_groups weights are {kind} "
                             f"{bits}-bit; only float 8-bit (e4m3) is supported")
        if strategy == "channel":
            return CHANNEL
        if strategy == "block" and len(block) == 2:
            return Fp8Layout("weight_scale", (int(block[0]), int(block[1])))
        raise ValueError(f"quantization_config.config_groups weights strategy is {strategy!r}"
                         f" (block_structure {list(block)}); supported: 'channel', 'block'")
    raise ValueError(f"quantization_config.quant_method is {method!r}; supported: "
                     "'compressed-tensors' (FP8 per channel or block), 'fp8' (block)")


def _scales(absmax: np.ndarray) -> np.ndarray:
    scale = absmax.astype(np.float32) / np.float32(E4M3_MAX)
    return np.where(scale > 0, scale, np.float32(1.0))


def _to_e4m3(scaled: np.ndarray) -> np.ndarray:
    # The clip only guards float32 rounding of w / s just above 448 (e4m3fn has no inf:
    # an out-of-range cast would give NaN).
    return np.clip(scaled, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def _check_matrix(weight: np.ndarray) -> None:
    if weight.ndim != 2:
        raise ValueError(f"expected a [out, in] weight, got shape {list(weight.shape)}")


def quantize_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] -> (e4m3 codes [out, in], float32 scales [out, 1]), one scale per row."""
    _check_matrix(weight)
    w = np.asarray(weight, np.float32)
    scale = _scales(np.abs(w).max(axis=1, keepdims=True))
    return _to_e4m3(w / scale), scale


# Dequantization runs over this many rows at a time, so that its float32 temporaries stay
# small next to the output (a 12288 x 5120 attention weight is 250 MB in float32).
_ROWS_PER_CHUNK = 1024


def dequantize_channel(codes: np.ndarray, scale: np.ndarray,
                       dtype: np.dtype | str = np.float32) -> np.ndarray:
    """(e4m3 [out, in], scales [out, 1]) -> [out, in] in `dtype` (product in float32)."""
    out = np.empty(codes.shape, dtype)
    for r in range(0, codes.shape[0], _ROWS_PER_CHUNK):
        rows = slice(r, r + _ROWS_PER_CHUNK)
        out[rows] = codes[rows].astype(np.float32) * scale[rows].astype(np.float32)
    return out


def _blocks(w: np.ndarray, block_size: tuple[int, int]) -> np.ndarray:
    """[out, in] zero-padded to whole blocks and viewed as [rows, b0, cols, b1]."""
    (out, inp), (b0, b1) = w.shape, block_size
    rows, cols = math.ceil(out / b0), math.ceil(inp / b1)
    if (rows * b0, cols * b1) != (out, inp):
        w = np.pad(w, ((0, rows * b0 - out), (0, cols * b1 - inp)))
    return w.reshape(rows, b0, cols, b1)


def _expand(scale: np.ndarray, shape: tuple[int, int], block_size: tuple[int, int]) -> np.ndarray:
    """Block scales [rows, cols] -> one per element [out, in] (edge blocks cropped)."""
    full = np.repeat(np.repeat(scale.astype(np.float32), block_size[0], axis=0),
                     block_size[1], axis=1)
    return full[: shape[0], : shape[1]]


def quantize_block(weight: np.ndarray, block_size: tuple[int, int] = BLOCK_SIZE
                   ) -> tuple[np.ndarray, np.ndarray]:
    """[out, in] -> (e4m3 codes [out, in], float32 scales [ceil(out/b0), ceil(in/b1)])."""
    _check_matrix(weight)
    w = np.asarray(weight, np.float32)
    scale = _scales(np.abs(_blocks(w, block_size)).max(axis=(1, 3)))
    return _to_e4m3(w / _expand(scale, w.shape, block_size)), scale


def dequantize_block(codes: np.ndarray, scale: np.ndarray,
                     block_size: tuple[int, int] = BLOCK_SIZE,
                     dtype: np.dtype | str = np.float32) -> np.ndarray:
    """(e4m3 [out, in], block scales) -> [out, in] in `dtype` (product in float32)."""
    out = np.empty(codes.shape, dtype)
    step = block_size[0] * max(1, _ROWS_PER_CHUNK // block_size[0])  # whole block rows
    for r in range(0, codes.shape[0], step):
        chunk = codes[r:r + step]
        s = scale[r // block_size[0]:(r + step) // block_size[0] + 1]
        out[r:r + step] = chunk.astype(np.float32) * _expand(s, chunk.shape, block_size)
    return out


def error_bound(weight: np.ndarray, scale_per_element: np.ndarray) -> np.ndarray:
    """The largest |W - dequantize(quantize(W))| e4m3 rounding allows, per element: half a
    unit in the last place, 2^-4 |W| for normal scaled values and 2^-10 * S in e4m3's
    subnormal range, plus float32 rounding of the division and the product."""
    w = np.abs(np.asarray(weight, np.float32))
    return 2.0**-4 * w + 2.0**-10 * scale_per_element + 2.0**-22 * w
