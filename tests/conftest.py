"""Test set-up: 8 simulated CPU devices, exact fp32 matmuls, and a persistent compilation cache.

XLA_FLAGS must be set before jax is first imported, which is why this lives at the top of conftest.
"""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_cache = Path(os.environ.get("VISION_FT_TEST_CACHE", Path(__file__).resolve().parents[1] / ".jax_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_cache))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import ctypes  # noqa: E402
import gc  # noqa: E402

import pytest  # noqa: E402

# the `fitted` run, one per test module that asks for it (eval, predict and embed tests)
pytest_plugins = ["tests.infer_fixtures"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_module():
    """Two xdist workers share 24 GiB with the models' parity tests (ViT-L is 1.2 GB a copy).
    Compiled programs, dead models and freed malloc arenas would otherwise pile up per worker."""
    yield
    before = _rss_mib()
    gc.collect()
    jax.clear_caches()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    log = os.environ.get("VISION_FT_TEST_MEMLOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {before:.0f} -> {_rss_mib():.0f} MiB\n")
