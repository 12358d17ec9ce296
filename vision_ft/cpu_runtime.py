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
import sys

import jax

from vision_ft.allocator import other_malloc_in_use, tcmalloc_in_use

# YNNPACK library fusions XLA's CPU backend may use: reductions only, not dots or convolutions (its
# defaults add both). Eigen's GEMM ran the matmuls of ViT-S at 165-179 GFLOP/s on two cores where
# YNNPACK's reached 85-162. Train steps, alternated in one process (best of 4): ViT-S 7.38 -> 6.98 s,
# ResNet-50 8.52 -> 7.63 s (convolutions too on Eigen; 8.00 s with YNNPACK's), lite0 unchanged.
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


TCMALLOC, GLIBC_KEPT, UNCHANGED = "tcmalloc", "glibc, freed memory kept", "system allocator, unchanged"
PRELOADED = "the allocator in LD_PRELOAD, unchanged (no tcmalloc)"


def keep_freed_host_memory() -> str:
    """Configure glibc's allocator to keep and reuse freed memory; call it before JAX starts its
    threads (before the first JAX computation). Returns which allocator now serves the process:
    ``TCMALLOC`` (``allocator.py``; it keeps freed memory itself, nothing to configure),
    ``GLIBC_KEPT``, ``PRELOADED`` (the user's ``LD_PRELOAD`` brings its own ``malloc``), or
    ``UNCHANGED`` (not glibc on Linux, or glibc refused a setting).
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
    settings = (
        (_M_ARENA_MAX, 1),  # thread arenas cannot grow past 64 MB heaps and fall back to mmap
        (_M_MMAP_MAX, 0),
        (_M_TRIM_THRESHOLD, -1),  # -1 becomes SIZE_MAX: never trim the heap's top on free
    )
    return GLIBC_KEPT if all(mallopt(param, value) == 1 for param, value in settings) else UNCHANGED
