"""convert_hf.py: hub folder <-> orbax checkpoint, bit-exact, streaming, and bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import nnx
from hf_reference import hf_model

import convert_hf
from glm_jax.convert import load_checkpoint
from glm_jax.safetensors_io import HubFolder

# vocab 96 so that the vocabulary splits over a tensor axis of 2 in the mesh test.
OVERRIDES = dict(vocab_size=96)
N = 3  # num_hidden_layers of hf_reference.BASE: the MTP layer is model.layers.3


def _add_mtp(folder: Path, dtype: torch.dtype, seed: int) -> None:
    """Add the MTP layer as the hub stores it (transformers' model does not create it): a
    copy of MoE layer 1's tensor names under layer N with fresh values, enorm / hnorm /
    eh_proj / shared_head.norm, and copies of the embedding and head."""
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    hub = HubFolder(folder)
    gen = torch.Generator().manual_seed(seed)
    hidden = hub["model.norm.weight"].shape[0]

    def rand(shape):
        return (0.08 * torch.randn(shape, generator=gen)).to(dtype)

    mtp = {}
    for name in hub:
        if name.startswith("model.layers.1."):
            t = torch.from_numpy(np.array(hub[name], dtype=np.float32))
            mtp[name.replace("model.layers.1.", f"model.layers.{N}.")] = (
                1.0 + rand(t.shape) if "norm" in name else rand(t.shape)).to(
                torch.float32 if "e_score_correction_bias" in name else dtype)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        mtp[f"model.layers.{N}.{norm}.weight"] = 1.0 + rand((hidden,))
    mtp[f"model.layers.{N}.eh_proj.weight"] = rand((hidden, 2 * hidden))
    for copy, main in (("embed_tokens.weight", "model.embed_tokens.weight"),
                       ("shared_head.head.weight", "lm_head.weight")):
        t = torch.from_numpy(np.array(hub[main]).view(np.uint16 if dtype == torch.bfloat16
                                                       else np.float32).copy())
        mtp[f"model.layers.{N}.{copy}"] = t.view(dtype) if dtype == torch.bfloat16 else t
    safetensors.torch.save_file({k: v.contiguous() for k, v in mtp.items()},
                                folder / "model-mtp.safetensors", metadata={"format": "pt"})
    index["weight_map"].update({k: "model-mtp.safetensors" for k in mtp})
    index_file.write_text(json.dumps(index))


def _hub(tmp_path_factory, dtype: torch.dtype) -> Path:
    folder = tmp_path_factory.mktemp("hub") / "model"
    model = hf_model(0, **OVERRIDES).to(dtype)
    model.save_pretrained(folder, max_shard_size="100KB")  # several shards
    _add_mtp(folder, dtype, seed=1)
    return folder


@pytest.fixture(scope="module")
def hub_f32(tmp_path_factory) -> Path:
    return _hub(tmp_path_factory, torch.float32)


@pytest.fixture(scope="module")
def ckpt_f32(hub_f32, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "f32"
    assert convert_hf.main(["to-jax", "--hf", str(hub_f32), "--out", str(out),
                            "--no-progress"]) == 0
    return out


def _all_tensors(folder: Path) -> dict[str, tuple[str, tuple, bytes]]:
    hub = HubFolder(folder)
    return {n: (t.dtype, t.shape, np.asarray(hub[n]).tobytes()) for n, t in hub.tensors.items()}


def _round_trip(hub: Path, tmp_path: Path) -> None:
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert convert_hf.main(["to-jax", "--hf", str(hub), "--out", str(ckpt), "--no-progress"]) == 0
    assert convert_hf.main(["to-hf", "--ckpt", str(ckpt), "--out", str(back),
                            "--max-shard-size", "150KB", "--no-progress"]) == 0
    assert len(list(back.glob("*.safetensors"))) > 2
    src, out = _all_tensors(hub), _all_tensors(back)
    assert sorted(src) == sorted(out)
    for name in src:
        assert src[name] == out[name], name
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (hub / "config.json").read_text())


def test_round_trip_float32_bit_identical(hub_f32, tmp_path):
    _round_trip(hub_f32, tmp_path)


def test_round_trip_bfloat16_bit_identical(tmp_path_factory, tmp_path):
    hub = _hub(tmp_path_factory, torch.bfloat16)
    assert HubFolder(hub).tensors["model.layers.1.mlp.experts.0.up_proj.weight"].dtype == "BF16"
    _round_trip(hub, tmp_path)


def test_cast_to_bfloat16(hub_f32, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert convert_hf.main(["to-jax", "--hf", str(hub_f32), "--out", str(ckpt), "--dtype",
                            "bfloat16", "--no-progress"]) == 0
    # Reported: the bytes written in bfloat16 (router weight and bias stay float32), about
    # half of the float32 bytes read (which include the MTP layer's embedding/head copies).
    report = capsys.readouterr().out
    written = sum(np.asarray(x).nbytes for x in jax.tree.leaves(
        nnx.to_pure_dict(nnx.state(load_checkpoint(ckpt)))))
    assert f"wrote {ckpt}: {written / 1e6:.1f} MB in the output dtypes, from " \
        f"{HubFolder(hub_f32).nbytes / 1e6:.1f} MB read" in report, report
    model = load_checkpoint(ckpt)
    assert model.embed[...].dtype == jnp.bfloat16
    assert model.moe_layers.layers.mlp.router_kernel[...].dtype == jnp.float32
    assert model.moe_layers.layers.mlp.correction_bias[...].dtype == jnp.float32
    want = np.asarray(HubFolder(hub_f32)["model.embed_tokens.weight"]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(model.embed[...]), want)


def test_export_loads_in_transformers_with_equal_logits(hub_f32, ckpt_f32, tmp_path):
    out = tmp_path / "export"
    assert convert_hf.main(["to-hf", "--ckpt", str(ckpt_f32), "--out", str(out),
                            "--no-progress"]) == 0
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert all(k.startswith(f"model.layers.{N}.") for k in info["unexpected_keys"])
    hf.eval().set_attn_implementation("eager")
    hf.set_experts_implementation("eager")
    ids = np.random.default_rng(0).integers(0, OVERRIDES["vocab_size"], (2, 11))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(load_checkpoint(ckpt_f32)(jnp.asarray(ids)).logits)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_restore_on_mesh_shards_and_trains(ckpt_f32):
    mesh = jax.make_mesh((2, 2, 2), ("fsdp", "expert", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model = load_checkpoint(ckpt_f32, mesh)
    ref = load_checkpoint(ckpt_f32)
    w = model.moe_layers.layers.mlp.w_gate[...]
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
    assert w.addressable_shards[0].data.shape == (w.shape[0], w.shape[1] // 2,
                                                  w.shape[2] // 2, w.shape[3] // 2)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(ref.moe_layers.layers.mlp.w_gate[...]))
    bias = model.moe_layers.layers.mlp.correction_bias[...]
    np.testing.assert_array_equal(np.asarray(bias),
                                  np.asarray(ref.moe_layers.layers.mlp.correction_bias[...]))

    ids = jnp.asarray(np.random.default_rng(1).integers(0, OVERRIDES["vocab_size"], (4, 16)))

    def loss_fn(m):
        logits = m(ids[:, :-1]).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss, grads

    # The model knows the mesh it was restored onto (expert=2: expert-parallel MoE), and
    # runs under it.
    assert model.moe_layers.layers.mlp.mesh is mesh
    with jax.set_mesh(mesh):
        loss0, grads = step(model, optimizer)
        assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
        assert float(jnp.abs(grads["moe_layers"]["layers"]["mlp"]["w_gate"][...]).max()) > 0
        loss1 = nnx.jit(loss_fn)(model)
    assert float(loss1) < float(loss0)


# ---------------------------------------------------------------------------- bad input

def _edit_shard(folder: Path, name: str, edit) -> None:
    """Rewrite the shard holding `name` (float32 hub) after `edit(tensors)` changed it."""
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = folder / index["weight_map"][name]
    tensors = safetensors.numpy.load_file(shard)
    edit(tensors)
    safetensors.numpy.save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    index_file.write_text(json.dumps(index))


EXPERT = "model.layers.2.mlp.experts.5.down_proj.weight"


def _missing(folder):
    _edit_shard(folder, EXPERT, lambda t: t.pop(EXPERT))
    return EXPERT


def _unexpected(folder):
    name = "model.layers.1.mlp.experts.9.gate_proj.weight"
    _edit_shard(folder, EXPERT, lambda t: t.update({name: t[EXPERT].copy()}))
    return name


def _wrong_shape(folder):
    _edit_shard(folder, EXPERT, lambda t: t.update({EXPERT: t[EXPERT][:, :-1].copy()}))
    return EXPERT


def _wrong_dtype(folder):
    _edit_shard(folder, EXPERT, lambda t: t.update({EXPERT: t[EXPERT].astype(np.float16)}))
    return EXPERT


def _integer_dtype(folder):
    _edit_shard(folder, EXPERT, lambda t: t.update({EXPERT: t[EXPERT].astype(np.int32)}))
    return EXPERT


def _truncated(folder):
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())[
        "weight_map"][EXPERT]
    os.truncate(shard, shard.stat().st_size - 10)
    return shard.name


def _config_disagrees(folder):
    config = json.loads((folder / "config.json").read_text())
    config["moe_intermediate_size"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    return "config.json"


def _mtp_copy_differs(folder):
    name = f"model.layers.{N}.shared_head.head.weight"
    _edit_shard(folder, name, lambda t: t.update({name: t[name] + 1.0}))
    return name


def _index_lists_missing_shard(folder):
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.norm.weight"] = "model-09999-of-09999.safetensors"
    index_file.write_text(json.dumps(index))
    return "model-09999-of-09999.safetensors"


@pytest.mark.parametrize("corrupt", [_missing, _unexpected, _wrong_shape, _wrong_dtype,
                                     _integer_dtype, _truncated, _config_disagrees,
                                     _mtp_copy_differs, _index_lists_missing_shard])
def test_bad_hub_input(hub_f32, tmp_path, capsys, corrupt):
    folder = tmp_path / "hub"
    shutil.copytree(hub_f32, folder)
    named = corrupt(folder)
    out = tmp_path / "out" / "ckpt"
    assert convert_hf.main(["to-jax", "--hf", str(folder), "--out", str(out),
                            "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glm-jax-convert: error:") and named in err, err
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no partial output


def test_existing_output_is_refused(hub_f32, ckpt_f32, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep").write_text("x")
    assert convert_hf.main(["to-jax", "--hf", str(hub_f32), "--out", str(out),
                            "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert_hf.main(["to-hf", "--ckpt", str(ckpt_f32), "--out", str(out),
                            "--no-progress"]) == 2
    assert str(out) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_bad_checkpoint_for_to_hf(ckpt_f32, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpt_f32, ckpt)
    config = json.loads((ckpt / "config" / "metadata").read_text())
    config["n_routed_experts"] = 16
    (ckpt / "config" / "metadata").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert convert_hf.main(["to-hf", "--ckpt", str(ckpt), "--out", str(out),
                            "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "moe_layers.layers.mlp.w_gate" in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert convert_hf.main(["to-hf", "--ckpt", str(tmp_path / "nothing"), "--out", str(out),
                            "--no-progress"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_relative_paths(hub_f32, tmp_path, monkeypatch):
    """Orbax's OCDBT specs want absolute paths; every command takes relative ones."""
    hub = os.path.relpath(hub_f32, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert convert_hf.main(["to-jax", "--hf", hub, "--out", "ckpt", "--no-progress"]) == 0
    assert convert_hf.main(["to-hf", "--ckpt", "ckpt", "--out", "back", "--no-progress"]) == 0
    assert _all_tensors(Path("back")) == _all_tensors(hub_f32)
    model = load_checkpoint("ckpt")
    want = np.asarray(HubFolder(hub_f32)["model.norm.weight"])
    np.testing.assert_array_equal(np.asarray(model.final_norm.scale[...]), want)


# ------------------------------------------------- a transformers save_pretrained folder
@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory):
    """What `save_pretrained` writes: config.json says num_nextn_predict_layers=1, but the
    folder has no layer-N (MTP) tensors. Returns (folder, the transformers model)."""
    folder = tmp_path_factory.mktemp("hub") / "saved"
    model = hf_model(0, **OVERRIDES)
    model.save_pretrained(folder, max_shard_size="100KB")
    assert not any(n.startswith(f"model.layers.{N}.") for n in HubFolder(folder))
    return folder, model


def _same_main_weights(model, reference) -> None:
    """Every leaf but the MTP layer's is bit-identical. The saved folder holds the same
    main-model weights as hub_f32 (hf_model(0)), whose conversion test_export... checks
    against transformers' logits."""
    ours, ref = (nnx.to_pure_dict(nnx.state(m)) for m in (model, reference))
    ours.pop("mtp_layers", None)
    ref.pop("mtp_layers")
    jax.tree.map(np.testing.assert_array_equal, ours, ref)


def test_missing_mtp_is_one_line_with_both_ways_out(saved_by_transformers, tmp_path, capsys):
    folder, _ = saved_by_transformers
    out = tmp_path / "ckpt"
    assert convert_hf.main(["to-jax", "--hf", str(folder), "--out", str(out),
                            "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"model.layers.{N}." in err and "--drop-mtp" in err and "--init-mtp" in err, err
    assert not out.exists()


def test_missing_mtp_dropped(saved_by_transformers, ckpt_f32, tmp_path, capsys):
    folder, _ = saved_by_transformers
    out = tmp_path / "ckpt"
    assert convert_hf.main(["to-jax", "--hf", str(folder), "--out", str(out), "--drop-mtp",
                            "--no-progress"]) == 0
    assert "converted without it" in capsys.readouterr().out
    assert json.loads((out / "config" / "metadata").read_text())[
        "num_nextn_predict_layers"] == 0
    model = load_checkpoint(out)
    assert model.config.num_mtp_layers == 0
    _same_main_weights(model, load_checkpoint(ckpt_f32))


def test_missing_mtp_initialised(saved_by_transformers, ckpt_f32, tmp_path):
    folder, hf = saved_by_transformers
    out = tmp_path / "ckpt"
    assert convert_hf.main(["to-jax", "--hf", str(folder), "--out", str(out), "--init-mtp",
                            "--seed", "3", "--no-progress"]) == 0
    model = load_checkpoint(out)
    std = model.config.initializer_range
    layer = model.mtp_layers[0]
    np.testing.assert_array_equal(np.asarray(layer.embed_norm.scale[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(layer.block.mlp.correction_bias[...]), 0.0)
    for w in (layer.eh_proj.kernel[...], layer.block.mlp.w_gate[...],
              layer.block.attn.q_proj.kernel[...]):
        assert abs(float(np.std(np.asarray(w))) / std - 1) < 0.1
    # Different leaves and different expert blocks get different draws.
    w_up = np.asarray(layer.block.mlp.w_up[...])
    assert not np.array_equal(w_up[0], w_up[1])
    _same_main_weights(model, load_checkpoint(ckpt_f32))
    # It runs: main logits as transformers', MTP logits finite (batch shaped as in the
    # export test, so the eager ops are compiled once).
    ids = np.random.default_rng(0).integers(0, OVERRIDES["vocab_size"], (2, 11))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    output = model(jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(output.logits), want, atol=1e-4, rtol=0)
    assert all(bool(jnp.isfinite(x).all()) for x in output.mtp_logits)
    # The same seed gives the same layer (deterministic).
    again = tmp_path / "again"
    assert convert_hf.main(["to-jax", "--hf", str(folder), "--out", str(again), "--init-mtp",
                            "--seed", "3", "--no-progress"]) == 0
    np.testing.assert_array_equal(
        np.asarray(load_checkpoint(again).mtp_layers[0].block.mlp.w_up[...]), w_up)
