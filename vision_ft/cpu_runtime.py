"""Settings for running XLA on the CPU: the host allocator and per-compilation options.

Host memory. XLA allocates every large CPU buffer with ``posix_memalign``. glibc serves requests above 32 MB
(and any request from a thread's arena larger than its 64 MB heaps) with a fresh ``mmap`` and
returns it with ``munmap`` on free, so each train step page-faults its whole working set again:
6 GB and 1.5 million faults per ResNet-50 step at batch 32, about a fifth of the step's CPU time
spent in the kernel. With one arena, no mmap and no trimming, freed buffers stay in the process
and the next step reuses them.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

import jax

from vision_ft.allocator import other_malloc_in_use, tcmalloc_in_use

# YNNPACK library fusions XLA's CPU backend may use: reductions only, not dots or convolutions (its
# defaults add both). Eigen's GEMM ran the matmuls of ViT-S at 165-179 GFLOP/s on two cores where
# YNNPACK's reached 85-162. Train steps, alternated in one process (best of 4): ViT-S 7.38 -> 6.98 s,
# ResNet-50 8.52 -> 7.63 s (convolutions too on Eigen; 8.00 s with YNNPACK's), lite0 unchanged.
# The option came with jaxlib 0.8.1, hence pyproject's lower bound: older ones refuse a compilation
# that names an option they do not know ("No such compile option"), so every CPU step would fail.
YNN_FUSIONS = ("LIBRARY_FUSION_TYPE_REDUCE",)


def compiler_options() -> dict | None:
    """Options for ``jax.jit(..., compiler_options=...)`` of the hot steps on the current backend."""
    if jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": ",".join(YNN_FUSIONS)}


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# What keep_freed_host_memory sets, and the glibc tunables by which a user may have set the same
# thing (GLIBC_TUNABLES=glibc.malloc.NAME=..., or the older variable). An mmap threshold counts for
# mmap_max: no mmap at all would quietly void the threshold the user chose.
_SETTINGS = (
    # thread arenas cannot grow past 64 MB heaps and fall back to mmap
    ("arena_max", _M_ARENA_MAX, 1, {"arena_max"}),
    ("mmap_max", _M_MMAP_MAX, 0, {"mmap_max", "mmap_threshold"}),
    # -1 becomes SIZE_MAX: never trim the heap's top on free
    ("trim_threshold", _M_TRIM_THRESHOLD, -1, {"trim_threshold"}),
)
_VARIABLES = {
    "arena_max": "MALLOC_ARENA_MAX",
    "mmap_max": "MALLOC_MMAP_MAX_",
    "mmap_threshold": "MALLOC_MMAP_THRESHOLD_",
    "trim_threshold": "MALLOC_TRIM_THRESHOLD_",
}


def _malloc_tunables_set(environ: Mapping[str, str]) -> set[str]:
    """The glibc.malloc tunables the environment sets, by either spelling."""
    tunables = {tunable for tunable, variable in _VARIABLES.items() if environ.get(variable)}
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name.startswith("glibc.malloc.") and value:
            tunables.add(name.removeprefix("glibc.malloc."))
    return tunables


TCMALLOC, GLIBC_KEPT, UNCHANGED = "tcmalloc", "glibc, freed memory kept", "system allocator, unchanged"
PRELOADED = "the allocator in LD_PRELOAD, unchanged (no tcmalloc)"


def keep_freed_host_memory() -> str:
    """Configure glibc's allocator to keep and reuse freed memory; call it before JAX starts its
    threads (before the first JAX computation). Returns which allocator now serves the process:
    ``TCMALLOC`` (``allocator.py``; it keeps freed memory itself, nothing to configure),
    ``GLIBC_KEPT`` (naming the settings the environment chose, which are left as they are:
    ``MALLOC_ARENA_MAX``, ``GLIBC_TUNABLES=glibc.malloc.arena_max=...`` and the like),
    ``PRELOADED`` (the user's ``LD_PRELOAD`` brings its own ``malloc``), or ``UNCHANGED`` (not
    glibc on Linux, or glibc refused a setting).
    The process keeps its peak memory for its lifetime; ``malloc_trim(0)`` gives it back."""
    if tcmalloc_in_use():
        return TCMALLOC
    if not sys.platform.startswith("linux"):
        return UNCHANGED
    if other_malloc_in_use():  # glibc's settings would tune an allocator nothing uses
        return PRELOADED
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return UNCHANGED
    users = _malloc_tunables_set(os.environ)
    left = [name for name, _, _, tunables in _SETTINGS if users & tunables]
    for name, param, value, _ in _SETTINGS:
        if name not in left and mallopt(param, value) != 1:
            return UNCHANGED
    return f"{GLIBC_KEPT}, but {', '.join(left)} as the environment sets it" if left else GLIBC_KEPT
