"""The click type of the file and directory options."""

from __future__ import annotations

from pathlib import Path

import click

from vision_ft.data.errors import is_utf8


class UserPath(click.Path):
    """A ``pathlib.Path`` with ``~`` expanded: in ``--output=~/run`` the shell leaves it as it is, and
    the command would otherwise write into a directory named "~"."""

    def __init__(self, **kwargs) -> None:
        super().__init__(path_type=Path, **kwargs)

    def convert(self, value, param, ctx) -> Path:
        path = Path(super().convert(value, param, ctx))
        if not is_utf8(str(path)):  # run files, reports and Orbax's metadata record paths as UTF-8
            self.fail(f"{str(path)!r} is not valid UTF-8; rename it or choose another path", param, ctx)
        try:
            return path.expanduser()
        except RuntimeError:  # "~name" where no user has that name (or no HOME for "~")
            self.fail(f"{path.parts[0]} names no home directory here ({value})", param, ctx)
