"""FP8 weights: e4m3 quantization error, reading FP8 hub folders, writing them (to-hf --fp8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx
from test_convert import N, OVERRIDES, _hub

import convert_hf
from glm_jax import fp8
from glm_jax import fp8_hub as fp8_hub_module
from glm_jax.convert import load_checkpoint
from glm_jax.safetensors_io import HubFolder

# A block size that does not divide the tiny model's dimensions (64, 96, 24, 128): every
# weight of the block folder has partial edge blocks in both directions.
ODD_BLOCK = [32, 48]
E4M3_VALUES = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
E4M3_VALUES = np.unique(E4M3_VALUES[np.isfinite(E4M3_VALUES)])


def _weights(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Rows spanning six decades, an all-zero row and tiny entries (e4m3's subnormals)."""
    w = rng.standard_normal(shape).astype(np.float32)
    w *= (10.0 ** rng.uniform(-3, 3, (shape[0], 1))).astype(np.float32)
    w[5] = 0
    w[7, ::3] *= 1e-4
    return w


def _per_element_scale(layout: fp8.Fp8Layout, scale: np.ndarray, shape) -> np.ndarray:
    if layout.block_size is None:
        return np.broadcast_to(scale, shape)
    b0, b1 = layout.block_size
    return np.repeat(np.repeat(scale, b0, 0), b1, 1)[: shape[0], : shape[1]]


@pytest.mark.parametrize("layout", [fp8.CHANNEL, fp8.BLOCK], ids=["channel", "block"])
def test_quantize_dequantize_within_e4m3_bound(layout):
    shape = (300, 200)  # 128-blocks: 3 x 2 with partial edge blocks (44 rows, 72 columns)
    w = _weights(np.random.default_rng(0), shape)
    codes, scale = layout.quantize(w)
    assert codes.dtype == fp8.E4M3 and scale.dtype == np.float32
    assert scale.shape == ((300, 1) if layout.block_size is None else (3, 2))
    s = _per_element_scale(layout, scale, shape)
    back = layout.dequantize(codes, scale)
    err = np.abs(back - w)
    bound = fp8.error_bound(w, s)
    assert (err <= bound).all(), float((err / bound).max())
    assert (err / bound).max() > 0.5  # the bound is not loose
    # Each row / block's largest element maps to +-448 (no saturation, full range used).
    groups = np.abs(codes.astype(np.float32))
    if layout.block_size is None:
        peak = groups.max(axis=1)
        assert (peak[np.abs(w).max(axis=1) > 0] == fp8.E4M3_MAX).all()
    else:
        for r in range(3):
            for c in range(2):
                block = groups[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128]
                assert block.max() == fp8.E4M3_MAX, (r, c)
                # The edge block's scale is its own absmax (not the padded neighbour's).
                want = np.abs(w[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128]).max() / 448
                np.testing.assert_allclose(scale[r, c], want, rtol=1e-7)
    assert not back[5].any() and (scale > 0).all()  # a zero row stays exactly zero
    # Round to nearest: no finite e4m3 value is closer to w / s than the chosen code.
    scaled = (w / s).reshape(-1)[::7]
    chosen = codes.astype(np.float32).reshape(-1)[::7]
    nearest = np.abs(scaled[:, None] - E4M3_VALUES[None, :]).min(axis=1)
    np.testing.assert_allclose(np.abs(scaled - chosen), nearest, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", [fp8.CHANNEL, fp8.BLOCK], ids=["channel", "block"])
def test_dequantize_in_row_chunks_equals_whole(layout):
    """Dequantization runs 1024 rows at a time; 2100 rows span three chunks, the last one
    partial and ending in a partial block."""
    w = _weights(np.random.default_rng(1), (2100, 300))
    codes, scale = layout.quantize(w)
    whole = codes.astype(np.float32) * _per_element_scale(layout, scale, w.shape)
    np.testing.assert_array_equal(layout.dequantize(codes, scale), whole)
    np.testing.assert_array_equal(layout.dequantize(codes, scale, ml_dtypes.bfloat16),
                                  whole.astype(ml_dtypes.bfloat16))


def test_layout_from_config():
    assert fp8.layout_from_config({"quant_method": "fp8", "fmt": "e4m3",
                                   "weight_block_size": [128, 128]}) == fp8.BLOCK
    assert fp8.layout_from_config(fp8.CHANNEL.quantization_config([])) == fp8.CHANNEL
    block_ct = fp8.Fp8Layout("weight_scale", (128, 128))
    assert fp8.layout_from_config(block_ct.quantization_config([])) == block_ct
    with pytest.raises(ValueError, match="quant_method"):
        fp8.layout_from_config({"quant_method": "gptq"})
    with pytest.raises(ValueError, match="weight_block_size"):
        fp8.layout_from_config({"quant_method": "fp8"})


# ------------------------------------------------------------------ hub folders

def _is_linear(name: str) -> bool:
    """The test's own rule for what the hub quantizes: 2-D projections of the decoder layers
    except the MTP layer's eh_proj (routers `mlp.gate`, head, embedding, norms stay)."""
    return "_proj.weight" in name and "eh_proj" not in name


def _dequantize_torch(codes: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """Independent of glm_jax.fp8: torch's e4m3 -> float32, scales broadcast or tiled."""
    if block is not None:
        scale = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        scale = scale[: codes.shape[0], : codes.shape[1]]
    return codes.float() * scale


def _quantize_folder(src: Path, dst: Path, layout: fp8.Fp8Layout, qconfig: dict) -> None:
    """An FP8 hub folder from a float32 one: same shards, Linear weights as e4m3 + scale,
    written by safetensors.torch (not by glm-jax's writer)."""
    dst.mkdir()
    index = json.loads((src / "model.safetensors.index.json").read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        out = {}
        for name, t in safetensors.torch.load_file(src / shard).items():
            if _is_linear(name):
                codes, scale = layout.quantize(t.numpy())
                out[name] = torch.from_numpy(codes.view(np.uint8)).view(torch.float8_e4m3fn)
                out[layout.scale_name(name)] = torch.from_numpy(scale)
            else:
                out[name] = t
        safetensors.torch.save_file(out, dst / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig}))


def _dequantized_folder(src: Path, dst: Path, layout: fp8.Fp8Layout) -> None:
    """The float32 hub folder an FP8 folder stands for, computed with torch."""
    dst.mkdir()
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(safetensors.torch.load_file(shard))
    out = {}
    for name, t in tensors.items():
        if t.dtype == torch.float8_e4m3fn:
            out[name] = _dequantize_torch(t, tensors[layout.scale_name(name)], layout.block_size)
        elif not name.endswith(layout.scale_suffix):
            out[name] = t
    safetensors.torch.save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config))


LAYOUTS = {"channel": (fp8.CHANNEL, fp8.CHANNEL.quantization_config(["lm_head"])),
           "block": (fp8.Fp8Layout("weight_scale_inv", tuple(ODD_BLOCK)),
                     {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                      "weight_block_size": ODD_BLOCK})}


@pytest.fixture(scope="module")
def hub_f32(tmp_path_factory) -> Path:
    return _hub(tmp_path_factory, torch.float32)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def fp8_hub(request, hub_f32, tmp_path_factory) -> tuple[str, Path]:
    layout, qconfig = LAYOUTS[request.param]
    folder = tmp_path_factory.mktemp(f"fp8_{request.param}") / "model"
    _quantize_folder(hub_f32, folder, layout, qconfig)
    return request.param, folder


def _leaves(model) -> dict:
    return dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model))))


def test_to_jax_reads_fp8_folder_logits_match(fp8_hub, tmp_path):
    kind, folder = fp8_hub
    layout = LAYOUTS[kind][0]
    expert = "model.layers.2.mlp.experts.5.up_proj.weight"
    assert HubFolder(folder).tensors[expert].dtype == "F8_E4M3"
    ckpt, ref_hub, ref_ckpt = tmp_path / "ckpt", tmp_path / "dequantized", tmp_path / "ref"
    assert convert_hf.main(["to-jax", "--hf", str(folder), "--out", str(ckpt), "--dtype",
                            "float32", "--no-progress"]) == 0
    _dequantized_folder(folder, ref_hub, layout)
    # The same parameters, bit for bit, as converting the torch-dequantized float32 folder.
    assert convert_hf.main(["to-jax", "--hf", str(ref_hub), "--out", str(ref_ckpt),
                            "--no-progress"]) == 0
    model = load_checkpoint(ckpt)
    got, want = _leaves(model), _leaves(load_checkpoint(ref_ckpt))
    assert got.keys() == want.keys()
    for path in got:
        assert got[path].dtype == jnp.float32, path
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), str(path))
    # And the logits of transformers' model of the dequantized weights.
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref_hub, dtype=torch.float32).eval()
    hf.set_attn_implementation("eager")
    hf.set_experts_implementation("eager")
    ids = np.random.default_rng(0).integers(0, OVERRIDES["vocab_size"], (2, 11))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    logits = np.asarray(nnx.jit(lambda m, x: m(x).logits)(model, jnp.asarray(ids)))
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    # Another dtype dequantizes straight to it (one rounding from the float32 product).
    bf16 = fp8_hub_module.dequantizing(HubFolder(folder), "bfloat16")
    assert bf16.tensors[expert].dtype == "BF16"
    f32 = fp8_hub_module.dequantizing(HubFolder(folder), "float32")[expert]
    np.testing.assert_array_equal(bf16[expert], f32.astype(ml_dtypes.bfloat16))


SCALE = "model.layers.2.mlp.experts.5.down_proj."


def _rewrite(folder: Path, edit) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight_name = SCALE + "weight"
    shard = folder / index["weight_map"][weight_name]
    tensors = safetensors.torch.load_file(shard)
    edit(tensors)
    safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("fault", ["shape", "dtype", "missing"])
def test_bad_scale_names_the_tensor(fp8_hub, tmp_path, capsys, fault):
    kind, src = fp8_hub
    layout = LAYOUTS[kind][0]
    folder = tmp_path / "hub"
    shutil.copytree(src, folder)
    scale = layout.scale_name(SCALE + "weight")

    def edit(t):
        if fault == "shape":
            t[scale] = torch.cat([t[scale], t[scale]])  # one row of scales too many
        elif fault == "dtype":
            t[scale] = t[scale].to(torch.int32)
        else:
            del t[scale]
    _rewrite(folder, edit)
    out = tmp_path / "out" / "ckpt"
    assert convert_hf.main(["to-jax", "--hf", str(folder), "--out", str(out),
                            "--no-progress"]) == 2  # a user error
    err = capsys.readouterr().err.strip()
    assert err.startswith("glm-jax-convert: error:") and scale in err and "\n" not in err, err
    assert not out.exists() and not out.parent.exists()


# ------------------------------------------------------------------ to-hf --fp8

@pytest.mark.parametrize("kind", ["channel", "block"])
def test_to_hf_fp8_round_trip(hub_f32, tmp_path, kind):
    ckpt, export, back = tmp_path / "ckpt", tmp_path / "export", tmp_path / "back"
    assert convert_hf.main(["to-jax", "--hf", str(hub_f32), "--out", str(ckpt),
                            "--no-progress"]) == 0
    assert convert_hf.main(["to-hf", "--ckpt", str(ckpt), "--out", str(export), "--fp8", kind,
                            "--max-shard-size", "150KB", "--no-progress"]) == 0
    layout = fp8.LAYOUTS[kind]
    config = json.loads((export / "config.json").read_text())
    assert fp8.layout_from_config(config["quantization_config"]) == layout
    if kind == "channel":
        ignore = config["quantization_config"]["ignore"]
        assert "lm_head" in ignore and "model.layers.1.mlp.gate" in ignore
        assert f"model.layers.{N}.eh_proj" in ignore
    src, hub = HubFolder(hub_f32), HubFolder(export)
    assert len(list(export.glob("*.safetensors"))) > 2
    quantized = {n for n in src.tensors if _is_linear(n)}
    assert quantized and set(hub.tensors) == set(src.tensors) | {
        layout.scale_name(n) for n in quantized}
    for name, info in src.tensors.items():
        if name in quantized:
            assert hub.tensors[name].dtype == "F8_E4M3", name
            assert hub.tensors[layout.scale_name(name)].dtype == "F32"
        else:  # everything else exactly as the float export writes it
            assert hub.tensors[name].dtype == info.dtype, name
            np.testing.assert_array_equal(np.asarray(hub[name]), np.asarray(src[name]), name)
    # Read back: each weight is the original within e4m3's bound.
    assert convert_hf.main(["to-jax", "--hf", str(export), "--out", str(back), "--dtype",
                            "float32", "--no-progress"]) == 0
    model = load_checkpoint(back)
    got = np.asarray(model.moe_layers.layers.mlp.w_down[...])  # [L, E, moe_inter, hidden]
    for e in range(got.shape[1]):
        w = np.asarray(src[f"model.layers.1.mlp.experts.{e}.down_proj.weight"])
        codes, scale = layout.quantize(w)
        np.testing.assert_array_equal(got[0, e].T, layout.dequantize(codes, scale))
        bound = fp8.error_bound(w, _per_element_scale(layout, scale, w.shape))
        assert (np.abs(got[0, e].T - w) <= bound).all()


@pytest.mark.parametrize("kind", ["channel", "block"])
def test_fp8_export_loads_in_transformers(hub_f32, tmp_path, kind):
    """transformers reads the export with dequantize=True (on CPU, FP8 matmuls need a GPU):
    `channel` through the compressed-tensors package, `block` through its fine-grained FP8
    quantizer (which needs accelerate). Skipped where those packages are not installed."""
    if kind == "channel":
        pytest.importorskip("compressed_tensors")
        qconfig = transformers.CompressedTensorsConfig(dequantize=True)
    else:
        pytest.importorskip("accelerate")
        qconfig = transformers.FineGrainedFP8Config(dequantize=True)
    ckpt, export, back = tmp_path / "ckpt", tmp_path / "export", tmp_path / "back"
    assert convert_hf.main(["to-jax", "--hf", str(hub_f32), "--out", str(ckpt),
                            "--no-progress"]) == 0
    assert convert_hf.main(["to-hf", "--ckpt", str(ckpt), "--out", str(export), "--fp8", kind,
                            "--no-progress"]) == 0
    assert convert_hf.main(["to-jax", "--hf", str(export), "--out", str(back), "--dtype",
                            "float32", "--no-progress"]) == 0
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        export, dtype=torch.float32, quantization_config=qconfig, output_loading_info=True)
    assert not info["missing_keys"]
    assert all(k.startswith(f"model.layers.{N}.") for k in info["unexpected_keys"])
    hf.eval().set_attn_implementation("eager")
    hf.set_experts_implementation("eager")
    ids = np.random.default_rng(0).integers(0, OVERRIDES["vocab_size"], (2, 11))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    model = load_checkpoint(back)
    got = np.asarray(nnx.jit(lambda m, x: m(x).logits)(model, jnp.asarray(ids)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
