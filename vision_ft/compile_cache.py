"""A persistent XLA compilation cache for the command line, one directory per kind of host CPU.

Compiling fit's train, eval and EMA steps costs more than the first epochs of a small fine-tune: on
a 2-core VM, a one-epoch BreastMNIST fit took 199 s with an empty cache and 127 s with a filled one.
CPU executables are compiled for the instruction set of the host that built them (AVX-512 or not),
so the default directory is named after the CPU's model and flags: a home directory shared by a
cluster's mixed machines never hands one kind's code to another.

``VISION_FT_COMPILE_CACHE`` chooses: unset for the default directory, a path for another, or
``off``. A ``JAX_COMPILATION_CACHE_DIR`` the user set takes precedence over all three.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import jax

ENV_VAR = "VISION_FT_COMPILE_CACHE"
_OFF = {"off", "0", "false", "no", "none"}
# least recently used entries go beyond this; the default fit's five programs take 2.2 MB
MAX_CACHE_BYTES = 2 * 2**30

log = logging.getLogger(__name__)


def host_fingerprint(cpuinfo: str | None = None) -> str:
    """A short hash of the machine architecture and the first CPU's model name and feature flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    wanted = ("model name", "flags", "features", "cpu model")  # x86 / ARM and others
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in wanted and key not in fields:
            fields[key] = " ".join(sorted(value.split()))
    lines = [platform.machine(), platform.processor()] + [f"{k}={fields[k]}" for k in sorted(fields)]
    text = "\n".join(lines)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    base = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vision-ft" / "xla" / host_fingerprint()


def chosen_cache_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """The directory ``VISION_FT_COMPILE_CACHE`` asks for; None when it is turned off."""
    environ = os.environ if environ is None else environ
    setting = environ.get(ENV_VAR, "").strip()
    if setting.lower() in _OFF:
        return None
    return Path(setting).expanduser() if setting else default_cache_dir(environ)


def use_persistent_compile_cache() -> Path | None:
    """Point JAX's compilation cache at :func:`chosen_cache_dir`; call before the first compilation.
    Returns the directory, or None when nothing was set (off, the user's own setting, no home
    directory to put it in, or a directory that cannot be created or written: compiling then
    simply is not cached)."""
    if jax.config.jax_compilation_cache_dir:  # the user's own (JAX_COMPILATION_CACHE_DIR): JAX uses it
        return None
    try:
        directory = chosen_cache_dir()
    except RuntimeError as e:
        # Path.home() and expanduser() raise this without HOME for a uid that has no passwd entry
        # (containers run as an arbitrary uid); this runs before every command, so it must not fail.
        log.debug("compilation cache off: %s", e)
        return None
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.debug("compilation cache off: %s", e)
        return None
    # mkdir accepts a directory that exists but is not ours to write (another user's, read-only).
    # JAX has no read-only mode: every compilation would warn that it cannot take the size bound's
    # lock or store its program, so such a directory is not used at all.
    if not os.access(directory, os.W_OK | os.X_OK):
        log.debug("compilation cache off: %s is not writable", directory)
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Only our own directory is bounded: JAX's eviction needs an access-time file beside every
    # entry, and a directory JAX filled without a bound has none, which makes every write fail.
    is_default = not os.environ.get(ENV_VAR, "").strip()
    if is_default and jax.config.jax_compilation_cache_max_size < 0:
        jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)
    return directory


def environ_without_cache(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A child process's environment in which nothing loads or stores compiled programs, for
    first-run timings: ours turned off, and JAX's own directory dropped."""
    env = dict(os.environ if environ is None else environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env[ENV_VAR] = "off"
    return env
