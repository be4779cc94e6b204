"""The sandbox, with real subprocesses: each misbehaving program ends with reward 0, the
right reason, and within its wall-time limit; a correct one passes."""

import socket

import pytest

from glm_jax.rl import rewards, sandbox
from glm_jax.rl.sandbox import Limits, SandboxReason

LIMITS = Limits(wall_seconds=2.0, cpu_seconds=2, memory_bytes=256 << 20, output_bytes=64 << 10,
                file_bytes=1 << 20, processes=16)
# The wall-time limit plus what the sandbox allows itself after a kill and for start-up.
DEADLINE = LIMITS.wall_seconds + 2.0
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"

CASES = {
    "correct": ("def add(a, b):\n    return a + b\n", SandboxReason.PASSED),
    "wrong": ("def add(a, b):\n    return a - b\n", SandboxReason.FAILED),
    "infinite_loop": ("while True:\n    pass\n", SandboxReason.TIMEOUT),
    "sleeps_forever": ("import time\ntime.sleep(1000)\n", SandboxReason.TIMEOUT),
    "memory_bomb": ("hog = []\nwhile True:\n    hog.append(bytearray(10**8))\n",
                    SandboxReason.MEMORY),
    "sys_exit": ("import sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n", SandboxReason.EXIT),
    "os_exit": ("import os\nos._exit(0)\n", SandboxReason.EXIT),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()\n", SandboxReason.PROCESS_LIMIT),
    "missing_module": ("import no_such_module_xyz\n", SandboxReason.IMPORT_ERROR),
    "syntax": ("def add(a, b)\n    return a + b\n", SandboxReason.SYNTAX_ERROR),
    "raises": ("def add(a, b):\n    return {}[a]\n", SandboxReason.CRASH),
    "output_flood": ("while True:\n    print('x' * 1000)\n", SandboxReason.OUTPUT_LIMIT),
    "big_file": ("open('f', 'w').write('x' * (4 << 20))\n", SandboxReason.OUTPUT_LIMIT),
    "segfault": ("import ctypes\nctypes.string_at(0)\n", SandboxReason.CRASH),
    # Leaves a thread and a detached child behind after passing: the run still ends at once.
    "leftovers": ("import os, threading, time\n"
                  "threading.Thread(target=time.sleep, args=(1000,)).start()\n"
                  "if os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n"
                  "def add(a, b):\n    return a + b\n", SandboxReason.PASSED),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sandbox_reason_and_time(name):
    source, expected = CASES[name]
    result = sandbox.run_python(source, TESTS, LIMITS)
    assert result.reason == expected, (result.detail, result.stderr[-300:])
    assert result.wall_seconds < DEADLINE
    if expected != SandboxReason.TIMEOUT:
        assert result.wall_seconds < LIMITS.wall_seconds, result.detail


@pytest.mark.parametrize("name", ["correct", "infinite_loop", "memory_bomb", "sys_exit",
                                  "fork_bomb", "missing_module"])
def test_code_reward_through_sandbox(name):
    source, expected = CASES[name]
    completion = (f"<think>I will write it.</think>\nHere:\n```python\n{source}```\n"
                  "<|endoftext|>")
    result = rewards.UnitTests(LIMITS)({"tests": TESTS}, completion)
    assert result.reason == expected
    assert result.reward == (1.0 if expected == SandboxReason.PASSED else 0.0)


def test_fresh_directory_minimal_environment_and_no_network():
    probe = ("import os, socket\n"
             "print(sorted(os.listdir('.')), sorted(os.environ))\n"
             "open('left_behind', 'w').write('x')\n"
             "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
             "    print('NETWORK')\nexcept OSError:\n    print('NO NETWORK')\n")
    first = sandbox.run_python(probe, "pass\n", LIMITS)
    second = sandbox.run_python(probe, "pass\n", LIMITS)
    assert first.passed and second.passed, first.detail
    # Each run starts in an empty directory (the two files are the sandbox's own).
    assert first.stdout.splitlines()[0] == second.stdout.splitlines()[0]
    assert first.stdout.startswith("['solution.py', 'tests.py'] ['HOME', 'LANG', 'PATH', 'PWD']")
    if first.isolation["network"]:
        assert "NO NETWORK" in first.stdout
    else:  # without network isolation the program's view is the host's
        with pytest.raises(OSError):
            socket.create_connection(("1.1.1.1", 53), timeout=1)


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="Limits.wall_seconds"):
        sandbox.run_python("pass", "pass", Limits(wall_seconds=0))


def test_cpu_time_limit_ends_a_busy_loop_before_the_wall_limit():
    # Two busy threads: the process's CPU clock runs up to twice as fast as the wall clock.
    busy = ("import threading\n"
            "def spin():\n    while True:\n        pass\n"
            "threading.Thread(target=spin, daemon=True).start()\nspin()\n")
    result = sandbox.run_python(busy, "pass\n", Limits(wall_seconds=30, cpu_seconds=1))
    assert result.reason == SandboxReason.TIMEOUT
    assert result.detail.startswith("CPU time over"), result.detail


def test_concurrent_runs_do_not_interfere():
    # Each concurrent run has its own cgroup and user id: a fork bomb next to correct
    # solutions uses up only its own process budget.
    names = ["correct", "fork_bomb", "wrong", "correct", "memory_bomb", "correct"]
    completions = [f"<think></think>\n```python\n{CASES[n][0]}```" for n in names]
    results = rewards.score(rewards.UnitTests(LIMITS), [{"tests": TESTS}] * len(names),
                            completions, max_workers=3)
    assert [r.reason for r in results] == [CASES[n][1] for n in names]
    assert [r.reward for r in results] == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
