"""The command line's persistent compilation cache: where it goes, when it is off, and that a
second run loads fit's compiled steps from it instead of compiling them again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax

from tests.train_fixtures import write_synthetic_npz
from vision_ft.compile_cache import (
    MAX_CACHE_BYTES,
    chosen_cache_dir,
    environ_without_cache,
    host_fingerprint,
    use_persistent_compile_cache,
)

REPO = Path(__file__).resolve().parents[1]

AVX2 = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_the_fingerprint_follows_the_cpu_model_and_flags_not_their_order():
    assert host_fingerprint(AVX2) == host_fingerprint(AVX2.replace("avx avx2", "avx2 avx"))
    assert host_fingerprint(AVX2) != host_fingerprint(AVX2.replace("fma", "fma avx512f"))
    assert host_fingerprint(AVX2) != host_fingerprint(AVX2.replace("AMD EPYC", "Intel Xeon"))
    # only the first processor counts: a second, different block must not change the hash
    assert host_fingerprint(AVX2) == host_fingerprint(AVX2 + "\nflags\t: sse2\n")


def test_the_environment_variable_chooses_the_directory(tmp_path):
    default = chosen_cache_dir({"XDG_CACHE_HOME": str(tmp_path)})
    assert default == tmp_path / "vision-ft" / "xla" / host_fingerprint()
    assert chosen_cache_dir({"VISION_FT_COMPILE_CACHE": str(tmp_path / "mine")}) == tmp_path / "mine"
    for off in ("off", "OFF", "0", "false", "none"):
        assert chosen_cache_dir({"VISION_FT_COMPILE_CACHE": off}) is None


def test_benchmark_children_run_without_any_cache():
    env = environ_without_cache(
        {"JAX_COMPILATION_CACHE_DIR": "/x", "VISION_FT_COMPILE_CACHE": "/y", "HOME": "/h"}
    )
    assert env == {"VISION_FT_COMPILE_CACHE": "off", "HOME": "/h"}
    assert chosen_cache_dir(env) is None


def test_a_cache_directory_the_user_gave_jax_is_kept():
    # conftest sets JAX_COMPILATION_CACHE_DIR for the test session, as a user may
    before = jax.config.jax_compilation_cache_dir
    assert before
    assert use_persistent_compile_cache() is None
    assert jax.config.jax_compilation_cache_dir == before


def test_off_leaves_compilations_uncached(monkeypatch):
    monkeypatch.setenv("VISION_FT_COMPILE_CACHE", "off")
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)  # as in a process without JAX's variable
    try:
        assert use_persistent_compile_cache() is None
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_only_the_default_directory_gets_a_size_bound(monkeypatch, tmp_path):
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        for setting, bounded in (("", True), (str(tmp_path / "mine"), False)):
            monkeypatch.setenv("VISION_FT_COMPILE_CACHE", setting)
            jax.config.update("jax_compilation_cache_dir", None)
            jax.config.update("jax_compilation_cache_max_size", -1)
            directory = use_persistent_compile_cache()
            assert directory == chosen_cache_dir() and directory.is_dir()
            assert jax.config.jax_compilation_cache_dir == str(directory)
            assert jax.config.jax_compilation_cache_max_size == (MAX_CACHE_BYTES if bounded else -1)
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_compilation_cache_max_size", before[1])


def _fit(data: Path, output: Path, env: dict, *options: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vision_ft.cli", "fit", "--no-progress", "--model", "test_resnet"]
    cmd += ["--pretrained", "false", "--data", f"npz:{data}", "--img-size", "32", "--epochs", "1"]
    cmd += ["--batch-size", "16", "--output", str(output), *options]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=True)


def test_a_second_fit_loads_its_compiled_steps_from_the_default_cache(tmp_path):
    data = write_synthetic_npz(tmp_path / "data.npz", sizes=(32, 16, 16))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env |= {"PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(tmp_path / "home_cache"), "JAX_LOG_COMPILES": "1"}
    env.pop("VISION_FT_COMPILE_CACHE", None)
    cache = tmp_path / "home_cache" / "vision-ft" / "xla" / host_fingerprint()

    first = _fit(data, tmp_path / "run1", env)
    entries = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_train_step-") for name in entries), entries
    assert any(name.endswith("-atime") for name in entries)  # the default directory is size-bounded (LRU)
    assert "cache hit for 'jit_train_step'" not in first.stderr

    second = _fit(data, tmp_path / "run2", env)
    assert "Persistent compilation cache hit for 'jit_train_step'" in second.stderr
    assert sorted(p.name for p in cache.iterdir()) == entries  # nothing compiled anew
    # the cached executable computes what the fresh compilation did
    results = [json.loads((tmp_path / run / "final.json").read_text()) for run in ("run1", "run2")]
    assert results[0]["test"] == results[1]["test"]
    assert results[0]["best_val"] == results[1]["best_val"]

    # the schedule is an argument of the step, not compiled into it: another peak rate and length
    # (so another warmup and cosine) reuse the compiled step
    third = _fit(data, tmp_path / "run3", env, "--epochs", "2", "--lr", "3e-3")
    assert "Persistent compilation cache hit for 'jit_train_step'" in third.stderr
    # the one new program computes the new schedule's table of rates
    programs_before = {name.rsplit("-", 1)[0] for name in entries}
    new_programs = {p.name.rsplit("-", 1)[0] for p in cache.iterdir()} - programs_before
    assert [name.split("-")[0] for name in new_programs] == ["jit_learning_rate_table"], new_programs
    assert json.loads((tmp_path / "run3" / "final.json").read_text())["test"] != results[0]["test"]


def test_no_home_directory_leaves_compilations_uncached(monkeypatch):
    """Without HOME or XDG_CACHE_HOME, for a uid with no passwd entry (a container's arbitrary
    uid), Path.home() raises RuntimeError: it escaped the group callback and every command died."""
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("VISION_FT_COMPILE_CACHE", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert use_persistent_compile_cache() is None
        assert jax.config.jax_compilation_cache_dir is None
        # the same for a directory the user names from the home directory that is not there
        monkeypatch.setenv("VISION_FT_COMPILE_CACHE", "~/xla")
        monkeypatch.delenv("HOME", raising=False)
        monkeypatch.setattr("os.path.expanduser", lambda path: path)  # what it does without a home
        assert use_persistent_compile_cache() is None
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_a_directory_that_cannot_be_written_is_not_used(monkeypatch, tmp_path):
    """An existing directory we cannot write passed mkdir(exist_ok=True); JAX then warned on every
    compilation that it could not take the size bound's lock file there. (The tests run as root,
    who may write anywhere, hence os.access stands in for a chmod 555 directory.)"""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("VISION_FT_COMPILE_CACHE", raising=False)
    readonly = chosen_cache_dir()
    readonly.mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != readonly and real_access(path, mode))
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_compilation_cache_max_size", -1)
    try:
        assert use_persistent_compile_cache() is None
        assert jax.config.jax_compilation_cache_dir is None
        assert jax.config.jax_compilation_cache_max_size == -1
        # one we can write, named by the user, is still used
        monkeypatch.setenv("VISION_FT_COMPILE_CACHE", str(tmp_path / "mine"))
        assert use_persistent_compile_cache() == tmp_path / "mine"
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_compilation_cache_max_size", before[1])
