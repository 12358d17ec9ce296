"""The directories that fit, eval and probe write into: never over anything the user already has,
and a one-line error (exit code 2) where the path cannot be one."""

from __future__ import annotations

import os
from collections.abc import Iterable
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


def make_directory(path: Path, option: str = "--output") -> None:
    """``mkdir -p path``, with the reason in one line where it fails, naming ``option``."""
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{option} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on the way, no permission, a read-only file system
        raise OutputDirError(f"{option} {path} cannot be created: {e.strerror}") from None


def absent_directories(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet: what ``make_directory`` would create."""
    absent = []
    while not path.exists() and path != path.parent:
        absent.append(path)
        path = path.parent
    return absent


def remove_empty(directories: Iterable[Path]) -> None:
    """Remove those of ``directories`` that are still empty, deepest first: a refused command takes
    back the directories it made, never one that has come to hold anything."""
    for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
        try:
            directory.rmdir()
        except OSError:  # not empty, or already gone
            pass


def refuse_unwritable_file(path: Path) -> None:
    """Raise unless ``path`` is a new file whose folder exists or can be made: checked before the
    work that fills it (an embedding of a whole split), not after."""
    if path.exists():
        raise OutputDirError(f"--output {path} exists; not overwriting it")
    if path.is_symlink():  # a link to nothing: the exclusive create at the end would fail on it
        raise OutputDirError(f"--output {path} is a link to {os.readlink(path)}, which does not exist")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputDirError(f"--output {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputDirError(f"--output {path}: {ancestor} is not writable")
