"""The `vision-ft` executable restarts itself once with tcmalloc where the system has it; otherwise
glibc's malloc keeps freed memory (cpu_runtime), which also holds XLA's CPU compiler options."""

import ctypes.util
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from vision_ft import cpu_runtime
from vision_ft.allocator import APPLIED, OPT_OUT, QUIET, find_tcmalloc, preload_environment

LIB = "libtcmalloc_minimal.so.4"


def test_restart_environment_preloads_tcmalloc_once_and_keeps_the_user_s_settings():
    env = preload_environment({"PATH": "/bin", "LD_PRELOAD": ""}, LIB)
    assert env["LD_PRELOAD"] == LIB and env["PATH"] == "/bin"
    assert env[APPLIED] == LIB
    assert preload_environment(env, LIB) is None  # the restarted process goes on
    assert preload_environment({}, LIB)["LD_PRELOAD"] == LIB
    quiet_key = next(iter(QUIET))
    assert preload_environment({}, LIB)[quiet_key] == QUIET[quiet_key]
    assert preload_environment({quiet_key: "1000"}, LIB)[quiet_key] == "1000"


@pytest.mark.parametrize(
    "environ, library", [({}, None), ({OPT_OUT: "system"}, LIB), ({OPT_OUT: "System"}, LIB)]
)
def test_no_restart_without_tcmalloc_or_when_the_user_opts_out(environ, library):
    assert preload_environment(environ, library) is None


@pytest.mark.parametrize(
    "preload", ["/usr/lib/libjemalloc.so.2", "libasan.so.8", "libfaketime.so.1:libmine.so"]
)
def test_a_user_s_own_ld_preload_is_left_alone(preload):
    """tcmalloc was put before the user's libraries: it took over their allocator (jemalloc), and
    AddressSanitizer aborts unless its runtime comes first."""
    assert preload_environment({"PATH": "/bin", "LD_PRELOAD": preload}, LIB) is None


def _other_malloc_in_use(env: dict) -> str:
    code = "from vision_ft.allocator import other_malloc_in_use; print(other_malloc_in_use())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(ctypes.util.find_library("asan") is None, reason="no AddressSanitizer runtime here")
def test_an_allocator_the_user_preloads_is_recognised():
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    assert _other_malloc_in_use(env) == "False"
    asan = {**env, "LD_PRELOAD": ctypes.util.find_library("asan"), "ASAN_OPTIONS": "detect_leaks=0"}
    assert _other_malloc_in_use(asan) == "True"


class FakeLibc:
    """Records mallopt calls instead of changing this process's allocator."""

    def __init__(self, *args):
        self.calls = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_the_cli_reports_the_user_s_allocator_and_leaves_it_untouched(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(cpu_runtime.ctypes, "CDLL", lambda *args: libc)
    monkeypatch.setattr(cpu_runtime, "tcmalloc_in_use", lambda: False)
    monkeypatch.setattr(cpu_runtime, "other_malloc_in_use", lambda: True)
    assert cpu_runtime.keep_freed_host_memory() == cpu_runtime.PRELOADED
    assert libc.calls == []
    monkeypatch.setattr(cpu_runtime, "other_malloc_in_use", lambda: False)  # glibc's own malloc
    assert cpu_runtime.keep_freed_host_memory() == cpu_runtime.GLIBC_KEPT
    assert len(libc.calls) == 3


def test_the_executable_s_entry_imports_nothing_heavy_before_it_restarts():
    code = (
        "import sys, vision_ft.entry; print(sorted(m for m in ('jax', 'flax', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc is not installed on this machine")
@pytest.mark.parametrize("opt_out", [False, True])
def test_cli_runs_on_tcmalloc_where_installed(opt_out):
    env = {k: v for k, v in os.environ.items() if k not in (APPLIED, OPT_OUT, "LD_PRELOAD")}
    if opt_out:
        env[OPT_OUT] = "system"
    out = subprocess.run(
        [sys.executable, "-m", "vision_ft.cli", "-v", "models", "no_such_model*"],  # a body, not --help
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert out.returncode == 2 and "no model matches" in out.stderr, out.stderr
    assert ("host memory: tcmalloc" in out.stderr) != opt_out


# mallopt(param, value) as malloc.h numbers the parameters
ARENA, MMAP, TRIM = (-8, 1), (-4, 0), (-1, -1)


@pytest.mark.parametrize(
    "environ, applied",
    [
        ({}, [ARENA, MMAP, TRIM]),
        ({"MALLOC_ARENA_MAX": "4"}, [MMAP, TRIM]),
        ({"MALLOC_MMAP_MAX_": "65536"}, [ARENA, TRIM]),
        ({"MALLOC_MMAP_THRESHOLD_": "131072"}, [ARENA, TRIM]),  # no mmap at all would void it
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, [ARENA, MMAP]),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=1"}, [MMAP]),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.pthread.rseq=0"}, [ARENA, TRIM]),
        ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "MALLOC_ARENA_MAX": ""}, [ARENA, MMAP, TRIM]),
    ],
)
def test_glibc_settings_the_user_made_in_the_environment_are_kept(monkeypatch, environ, applied):
    """mallopt overrode a user's MALLOC_ARENA_MAX / MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_ /
    GLIBC_TUNABLES=glibc.malloc.*: only the parameters the environment leaves unset are set."""
    for name in ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                 "MALLOC_TRIM_THRESHOLD_"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    libc = FakeLibc()
    monkeypatch.setattr(cpu_runtime.ctypes, "CDLL", lambda *args: libc)
    monkeypatch.setattr(cpu_runtime, "tcmalloc_in_use", lambda: False)
    monkeypatch.setattr(cpu_runtime, "other_malloc_in_use", lambda: False)
    allocator = cpu_runtime.keep_freed_host_memory()
    assert libc.calls == applied
    assert allocator.startswith(cpu_runtime.GLIBC_KEPT)
    assert (allocator == cpu_runtime.GLIBC_KEPT) == (len(applied) == 3), allocator


def test_the_lowest_jax_allowed_knows_the_cpu_compiler_options():
    """xla_cpu_experimental_ynn_fusion_type came with jaxlib 0.8.1 (jaxlib 0.8.0 refuses it: 'No
    such compile option'), yet pyproject allowed jax>=0.5, whose every CPU fit step would fail."""
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    bound = re.search(r'"jax>=([0-9.]+)"', pyproject).group(1)
    assert tuple(int(part) for part in bound.split(".")) >= (0, 8, 1), bound
    # and the jax installed here takes them: a later one that drops the experimental option fails here
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU compiler options apply where JAX computes on the CPU")
    options = cpu_runtime.compiler_options()
    assert options and "xla_cpu_experimental_ynn_fusion_type" in options
    assert float(jax.jit(lambda x: x.sum(), compiler_options=options)(jnp.ones(4))) == 4.0
