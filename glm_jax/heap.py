"""Back XLA:CPU's large temporaries with transparent huge pages, so the kernel faults them in
512x less often.

Why: XLA:CPU allocates each execution's temporaries with malloc (about 7 GB for the `bench`
train step), and glibc serves every block over 32 MiB with a fresh mmap that it unmaps on
free, so every step faults and zeroes all of it again in 4 KiB pages: 1.7 million minor
faults and 5-6 CPU-s of system time per `bench` step. With glibc's `hugetlb=1` tunable malloc
asks for transparent huge pages on those mappings (madvise), and the same step takes ~4,000
faults and ~2 CPU-s (docs/benchmarks.md, "Issue 7 status, session 3"). glibc reads its tunables only when a
process starts, so the entry points (train.py, bench/) re-execute themselves once with it.

Not adopted: keeping the freed blocks in the heap (one arena, no mmap, no trim) removes the
faults of the bench step too, but XLA's aligned allocations fragment that heap: a small
donated train step grew from 0.8 to 2.4 GB resident. Huge pages change only the page size,
not what is kept. They need the kernel's transparent_hugepage mode `madvise` or `always`;
with `never` the tunable does nothing. Set GLM_JAX_SYSTEM_MALLOC=1 to keep glibc's defaults."""

from __future__ import annotations

import os
import platform
import sys

HUGE_PAGE_TUNABLES = "glibc.malloc.hugetlb=1"
OPT_OUT = "GLM_JAX_SYSTEM_MALLOC"


def huge_pages_active() -> bool:
    """True when this process started with the huge-page tunable."""
    return HUGE_PAGE_TUNABLES in os.environ.get("GLIBC_TUNABLES", "")


def reexec_with_huge_pages() -> None:
    """Re-execute this Python process with glibc's huge-page tunable, once.

    Call it first thing in a program's entry point (never from a library or a test: it
    replaces the process). Does nothing off glibc Linux, when already active, or when
    GLM_JAX_SYSTEM_MALLOC=1."""
    if (huge_pages_active() or os.environ.get(OPT_OUT) == "1"
            or sys.platform != "linux" or platform.libc_ver()[0] != "glibc"):
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(
        t for t in (env.get("GLIBC_TUNABLES"), HUGE_PAGE_TUNABLES) if t)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
