"""Whether this process runs with glibc's huge-page malloc tunable, which backs XLA:CPU's
large temporaries with transparent huge pages so the kernel faults them in 512x less often.

Why: XLA:CPU allocates each execution's temporaries with malloc (about 7 GB for the `bench`
train step), and glibc serves every block over 32 MiB with a fresh mmap that it unmaps on
free, so every step faults and zeroes all of it again in 4 KiB pages: 1.7 million minor
faults and 5-6 CPU-s of system time per `bench` step. With `GLIBC_TUNABLES=
glibc.malloc.hugetlb=1` malloc asks for transparent huge pages on those mappings (madvise),
and the same step takes ~4,000 faults and ~2 CPU-s (docs/benchmarks.md, "Issue 7 status,
session 3").

glibc reads its tunables only when a process starts, so the variable is set before: by the
launcher `bin/glm-jax-python` (which `GLM_JAX_SYSTEM_MALLOC=1` turns off) or by the user's
shell / job script. Nothing in glm-jax replaces its own process.

Not adopted: keeping the freed blocks in the heap (one arena, no mmap, no trim) removes the
faults of the bench step too, but XLA's aligned allocations fragment that heap: a small
donated train step grew from 0.8 to 2.4 GB resident. Huge pages change only the page size,
not what is kept. They need the kernel's transparent_hugepage mode `madvise` or `always`;
with `never` the tunable does nothing."""

from __future__ import annotations

import os

HUGE_PAGE_TUNABLES = "glibc.malloc.hugetlb=1"
LAUNCHER = "bin/glm-jax-python"


def huge_pages_active() -> bool:
    """True when this process started with the huge-page tunable."""
    return HUGE_PAGE_TUNABLES in os.environ.get("GLIBC_TUNABLES", "").split(":")


def describe() -> str:
    """One phrase for logs and benchmark records: which heap this process runs with."""
    if huge_pages_active():
        return f"huge pages (GLIBC_TUNABLES={HUGE_PAGE_TUNABLES})"
    return f"glibc defaults ({LAUNCHER} or GLIBC_TUNABLES={HUGE_PAGE_TUNABLES} for huge pages)"
