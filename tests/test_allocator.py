"""The `vision-ft` executable restarts itself once with tcmalloc where the system has it."""

import os
import subprocess
import sys

import pytest

from vision_ft.allocator import APPLIED, OPT_OUT, QUIET, find_tcmalloc, preload_environment

LIB = "libtcmalloc_minimal.so.4"


def test_restart_environment_preloads_tcmalloc_once_and_keeps_the_user_s_settings():
    env = preload_environment({"PATH": "/bin", "LD_PRELOAD": "libmine.so"}, LIB)
    assert env["LD_PRELOAD"] == f"{LIB}:libmine.so" and env["PATH"] == "/bin"
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
        [sys.executable, "-m", "vision_ft.cli", "-v", "models", "--help"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert ("host memory: tcmalloc" in out.stderr) != opt_out
