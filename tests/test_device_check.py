"""bench/device_check.py, the check for a lent accelerator, runs end to end on this CPU host
(the "accelerator" is then the CPU itself): every stage runs, the backends agree with the
config's own in float32, and the table has a row per backend."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.device_check import main  # noqa: E402


def test_device_check_smoke_on_cpu(capsys):
    code = main(["--config", "tiny", "--layers", "2", "--platform", "cpu", "--batch", "1",
                 "--seq", "32", "--parity-batch", "1", "--parity-seq", "16", "--repeats", "1",
                 "--prompt-len", "8", "--new-tokens", "3", "--backends", "ragged_dot"])
    out = capsys.readouterr().out
    assert code == 0, out
    # One backend keeps the test short; it is checked against the config's own (buckets).
    rows = [line for line in out.splitlines() if line.startswith("| ragged_dot |")]
    assert len(rows) == 1 and "| ok |" in rows[0], out
    assert "tokens/s plain" in out and "with MTP" in out


def test_device_check_bad_backend_is_one_line(capsys):
    assert main(["--config", "tiny", "--backends", "cuda"]) == 2
    assert "--backends" in capsys.readouterr().err
