"""The directories that fit, eval and probe write into: never over anything the user already has,
and a one-line error (exit code 2) where the path cannot be one."""

from __future__ import annotations

from pathlib import Path

from vision_ft.data.errors import DataError


class OutputDirError(DataError):
    """An ``--output`` that is a file, holds other files, or cannot be created."""


def refuse_used_directory(path: Path) -> None:
    """Raise unless ``path`` is absent or an empty directory."""
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--output {path} is a file, not a directory; not overwriting it")
    if path.exists() and any(path.iterdir()):
        raise OutputDirError(f"--output {path} exists and is not empty; not overwriting it")


def make_directory(path: Path) -> None:
    """``mkdir -p path``, with the reason in one line where it fails."""
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"--output {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on the way, no permission, a read-only file system
        raise OutputDirError(f"--output {path} cannot be created: {e.strerror}") from None
