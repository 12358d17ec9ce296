"""The click type of the file and directory options."""

from __future__ import annotations

from pathlib import Path

import click


class UserPath(click.Path):
    """A ``pathlib.Path`` with ``~`` expanded: in ``--output=~/run`` the shell leaves it as it is, and
    the command would otherwise write into a directory named "~"."""

    def __init__(self, **kwargs) -> None:
        super().__init__(path_type=Path, **kwargs)

    def convert(self, value, param, ctx) -> Path:
        return Path(super().convert(value, param, ctx)).expanduser()
