"""A user's main workflow, end to end on one tiny trained workdir: export it to the hub
layout from each form of checkpoint path (transformers loads it with equal logits),
fine-tune from it with `init_from` and no model flags, a resume with a changed
architecture refused, and every CLI's answer to a wrong flag: one line, exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import convert_hf
from glm_jax.convert import load_checkpoint
from glm_jax.safetensors_io import HubFolder
from glm_jax.checkpoint_source import CheckpointPathError
from glm_jax.train import loop, run_config
from train_config import flag_args, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = {"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 3,
         "train.log_every": 2, "train.eval_every": 2, "train.eval_batches": 1}


def _env(cache: str) -> dict:
    """One simulated device (compiles faster than the 8 of conftest), and a shared
    persistent compilation cache: the fine-tune compiles the very train step of the
    fixture's run, so it loads it from there."""
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                XLA_FLAGS="--xla_force_host_platform_device_count=1",
                JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _train(workdir: str, cache: str, flags: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--workdir",
                           workdir, *flags], env=_env(cache), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[str, str, str]:
    """`train.py` on the tiny test model, held-out loss every 2 steps. Returns (workdir,
    compilation cache, its stdout)."""
    base = tmp_path_factory.mktemp("run")
    workdir, cache = str(base / "tiny"), str(base / "xla")
    done = _train(workdir, cache, flag_args(**STEPS))
    assert done.returncode == 0, done.stdout + done.stderr
    return workdir, cache, done.stdout


def test_the_run_reports_what_a_user_needs(run):
    """Checkpoints at 2 and 4 (none at step 1, though keep=3 would keep it); the resolved
    config on disk; plain progress lines (stdout is a pipe) with the compile time and no
    nan; held-out losses in metrics.jsonl; both plots."""
    workdir, _, stdout = run
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    resolved = json.load(open(os.path.join(workdir, "run_config.json")))
    stored = json.load(open(os.path.join(workdir, "checkpoints", "4", "config", "metadata")))
    assert resolved == stored and resolved["model"]["hidden_size"] == 32
    assert "compiling the train step...\ncompiled and ran the first step in " in stdout
    assert "nan" not in stdout and "\r" not in stdout, stdout
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 1/4", "step 2/4", "step 4/4"]
    assert "eval loss" in lines[-1] and "tokens/s" in lines[-1] and "tokens/s" not in lines[0]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records if r.get("eval_loss")] == [2, 4]
    assert records[0]["tokens_per_sec"] is None and records[-1]["tokens_per_sec"] > 0
    for name in ("loss_curve.png", "expert_load.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 1000


@pytest.fixture
def workdir(run) -> str:
    return run[0]


def _tensors(folder) -> dict[str, bytes]:
    hub = HubFolder(folder)
    return {n: np.asarray(hub[n]).tobytes() for n in hub}


def test_to_hf_from_a_workdir_a_step_folder_and_a_converted_checkpoint(workdir, tmp_path):
    def to_hf(ckpt, out):
        assert convert_hf.main(["to-hf", "--ckpt", str(ckpt), "--out", str(out),
                                "--no-progress"]) == 0
        return out

    latest = to_hf(workdir, tmp_path / "latest")
    step2 = to_hf(os.path.join(workdir, "checkpoints", "2"), tmp_path / "step2")
    assert convert_hf.main(["to-jax", "--hf", str(latest), "--out", str(tmp_path / "ckpt"),
                            "--no-progress"]) == 0
    again = to_hf(tmp_path / "ckpt", tmp_path / "again")
    assert _tensors(again) == _tensors(latest)  # the round trip is bit-exact
    assert _tensors(step2) != _tensors(latest)  # the workdir means its latest step
    config = json.loads((latest / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["num_nextn_predict_layers"] == 1
    generation = transformers.GenerationConfig.from_pretrained(latest)
    assert (generation.eos_token_id, generation.bos_token_id) == (256, 257)

    hf = transformers.AutoModelForCausalLM.from_pretrained(latest, dtype=torch.float32)
    hf.eval().set_attn_implementation("eager")
    hf.set_experts_implementation("eager")
    ids = np.random.default_rng(0).integers(0, 256, (2, 12))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(load_checkpoint(workdir)(jnp.asarray(ids)).logits)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_init_from_needs_no_model_flags(run, tmp_path):
    """train.py with configs/tiny.py's own model (hidden 128, 4 layers) and init_from: the
    run takes the checkpoint's model (hidden 32, 2 layers) and starts from its weights."""
    workdir, cache, _ = run
    not_model = [f for f in flag_args(**STEPS) if not f.startswith("--config.model.")]
    ft = str(tmp_path / "ft")
    done = _train(ft, cache, [*not_model, f"--config.init_from={workdir}"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"initialized from {workdir}" in done.stdout
    stored = json.loads(open(os.path.join(ft, "checkpoints", "4", "config", "metadata")).read())
    assert stored["model"]["hidden_size"] == 32 and stored["model"]["num_hidden_layers"] == 2
    first = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    tuned = [json.loads(line) for line in open(os.path.join(ft, "metrics.jsonl"))]
    # The fine-tune's step 1 sees the trained weights: on the same first batch (same data
    # order), its loss is far below the fresh model's at the first run's step 1.
    assert tuned[0]["loss"] < first[0]["loss"] - 0.5, (first, tuned)


def test_resume_refuses_a_changed_architecture(workdir, capsys):
    for changed, named in (({"model.hidden_size": 64}, "model.hidden_size=32 (requested 64)"),
                           ({"model.num_experts_per_tok": 1}, "model.num_experts_per_tok"),
                           ({"optimizer.name": "muon"}, "optimizer.name='adamw'")):
        with pytest.raises(run_config.RunConfigError, match=r"\(step 4\)") as e:
            loop.run(small_config(**{**STEPS, "train.steps": 8, **changed}), workdir,
                     progress=False)
        assert named in str(e.value) and "--workdir" in str(e.value), e.value
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    # Past train.steps: nothing to do, said so.
    out = loop.run(small_config(**STEPS), workdir, progress=False)
    assert out["state"] is None and out["step"] == 4
    assert "already trained to step 4" in capsys.readouterr().out


def test_every_cli_answers_a_mistake_in_one_line(run, tmp_path):
    """Real subprocesses, started together (each is mostly Python and jax start-up)."""
    workdir, cache, _ = run
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (hub / "model.safetensors").write_bytes(b"")
    py = sys.executable
    train = [py, os.path.join(ROOT, "train.py"), "--workdir", workdir]
    cases = {
        "typo'd config field": ([*train, "--config.train.stepz=3"],
                                "did you mean --config.train.steps?"),
        "convert: unknown flag": ([py, "-m", "convert_hf", "to-hf", "--ckpt", workdir,
                                   "--out", str(tmp_path / "x"), "--bogus"],
                                  "unrecognized arguments: --bogus"),
        "generate: hub folder": ([py, "-m", "glm_jax.generate", "--ckpt", str(hub),
                                  "--prompt", "x"], "glm-jax-convert to-jax"),
        "prepare: unknown flag": ([py, "-m", "glm_jax.train.data", "prepare", "a.jsonl",
                                   "--output", str(tmp_path / "z"), "--byte-level",
                                   "--bogus"],
                                  "unrecognized arguments: --bogus"),
        "plan: bad mesh": ([py, "-m", "sharding.plan", "--config", "configs/tiny.py", "--mesh",
                            "expert=3", "--seq-len", "32", "--global-batch", "8"],
                           "does not divide n_routed_experts=16"),
    }
    procs = {name: subprocess.Popen(cmd, env=_env(cache), cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, (cmd, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, proc.returncode, out, err)
        assert len(lines) == 1 and "Traceback" not in err, (name, err)
        assert cases[name][1] in lines[0], (name, lines[0])
    # A run already at train.steps: said so, exit code 0, nothing trained.
    done = subprocess.run([*train, *flag_args(**STEPS)], env=_env(cache), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "already trained to step 4" in done.stdout, done


def test_bad_paths_name_the_fix(workdir, tmp_path, capsys):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (hub / "model.safetensors").write_bytes(b"")
    cfg = small_config(**STEPS)
    cfg.init_from = str(hub)
    with pytest.raises(CheckpointPathError, match="convert it first: glm-jax-convert to-jax"):
        loop.run(cfg, str(tmp_path / "new"), progress=False)
    cfg.init_from = str(tmp_path / "none")
    with pytest.raises(CheckpointPathError, match="init_from .*: no such folder"):
        loop.run(cfg, str(tmp_path / "new"), progress=False)
    assert convert_hf.main(["to-jax", "--hf", str(hub), "--out", str(tmp_path / "y")]) == 2
    assert "model_type='llama'" in capsys.readouterr().err
