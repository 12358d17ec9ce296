"""Errors for unusable data; every message names the file or spec at fault."""

from __future__ import annotations


class DataError(ValueError):
    """Unusable data: the message names the file and what is wrong with it."""


class BadImageError(DataError):
    """One example that cannot be used (unreadable, corrupted, wrong band count, missing file...).

    A run either skips it (counted and reported) or stops on it, per ``--on-bad-image``.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_utf8(path: str) -> bool:
    """Whether ``path`` can be written to the UTF-8 files that record it (splits.csv, reports, run
    configs): a file name in another encoding reaches Python as lone surrogates, which cannot."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
