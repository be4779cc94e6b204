"""glm_jax/orbax_stream.py streams leaves through orbax's private `_src` modules (orbax has
no public API for writing one leaf block by block). This test pins what it uses, so that an
orbax upgrade fails here, by name, instead of deep inside a conversion: on failure, check
orbax_stream.py against the new orbax (tests/test_convert.py round-trips it) and update
TESTED_VERSIONS."""

from __future__ import annotations

import inspect

import orbax.checkpoint as ocp

from glm_jax import orbax_stream

TESTED_VERSIONS = ("0.12.8",)


def test_orbax_version_is_one_orbax_stream_was_tested_with():
    assert ocp.__version__ in TESTED_VERSIONS, (
        f"orbax-checkpoint {ocp.__version__} is not one of {TESTED_VERSIONS}: "
        "glm_jax/orbax_stream.py uses orbax private modules; re-check it (see this file)")


def test_the_private_names_orbax_stream_uses_still_exist():
    def params(fn) -> set[str]:
        return set(inspect.signature(fn).parameters)

    ts_utils, ocdbt_utils = orbax_stream.ts_utils, orbax_stream.ocdbt_utils
    assert {"info", "arg", "global_shape", "local_shape", "dtype", "use_ocdbt",
            "process_index", "metadata_key"} <= params(ts_utils.build_array_write_spec)
    assert {"use_ocdbt"} <= params(ocdbt_utils.get_process_index_for_subdir)
    assert {"use_ocdbt"} <= params(ts_utils.get_ts_context)
    assert {"use_ocdbt"} <= params(ts_utils.ArrayReadSpec)
    assert {"name"} <= params(orbax_stream.future.CommitFutureAwaitingContractedSignals)
    info = orbax_stream.ocp_types.ParamInfo
    assert {"name", "is_ocdbt_checkpoint", "ts_context"} <= params(info)
    assert hasattr(info, "await_path_creation")
    orbax_stream.ocp_types.SaveArgs()
