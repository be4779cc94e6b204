"""bin/glm-jax-python (the launcher that sets glibc's huge-page tunable) backs XLA:CPU's
large buffers with transparent huge pages, so a repeated computation faults its 256 MB output in with ~128 faults
instead of 65,536; the opt-out keeps glibc's defaults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run by the launcher: reports whether the tunables are active and how many minor page
# faults the third call of a jitted x + 1 over 256 MB costs.
SCRIPT = """
import resource
from glm_jax.heap import huge_pages_active
import jax, jax.numpy as jnp
x = jnp.zeros((64 << 20,), jnp.float32)
f = jax.jit(lambda x: x + 1)
for _ in range(2):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(huge_pages_active(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(**env) -> tuple[bool, int]:
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "GLIBC_TUNABLES"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHON"] = sys.executable
    out = subprocess.run([os.path.join(ROOT, "bin", "glm-jax-python"), "-c", SCRIPT],
                         env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[-2] == "True", int(out[-1])


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "absent"


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"),
                    reason="needs a Linux kernel with transparent huge pages")
def test_huge_pages_cut_the_faults_of_step_buffers():
    active, faults = _run()
    assert active
    assert faults < 2000, faults  # 256 MB = 128 huge pages, or 65536 pages of 4 KiB
    active, faults = _run(GLM_JAX_SYSTEM_MALLOC="1")
    assert not active
    assert faults > 30000, faults
