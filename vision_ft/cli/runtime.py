"""What every command's body needs before its first JAX computation: the host allocator's settings
and the persistent compilation cache. Set when the body starts, not when the group's options are
read, so that ``--help`` and a mistyped option answer without importing JAX (seconds on a 2-core VM).
"""

from __future__ import annotations

import functools
import logging

from vision_ft.allocator import OPT_OUT
from vision_ft.cli.errors import user_errors_exit_2

log = logging.getLogger("vision_ft")


def prepare_runtime() -> None:
    """``cpu_runtime.keep_freed_host_memory`` before JAX starts its threads,
    then ``compile_cache.use_persistent_compile_cache`` before the first compilation."""
    from vision_ft.compile_cache import use_persistent_compile_cache
    from vision_ft.cpu_runtime import keep_freed_host_memory

    allocator = keep_freed_host_memory()
    log.debug("host memory: %s (%s=system keeps the system's allocator)", allocator, OPT_OUT)
    use_persistent_compile_cache()


def command_body(command):
    """A command's body, run on the prepared runtime with user-input errors as one line, exit 2."""

    @functools.wraps(command)
    def prepared(*args, **kwargs):
        prepare_runtime()
        return command(*args, **kwargs)

    return user_errors_exit_2(prepared)
