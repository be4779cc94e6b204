"""Test set-up: 8 simulated CPU devices for the multi-device tests. XLA reads the flag when
jax first initialises its backend, so it is set here, before any test imports jax."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# tests/ helpers (hf_reference) are imported as plain modules.
sys.path.insert(0, os.path.dirname(__file__))
