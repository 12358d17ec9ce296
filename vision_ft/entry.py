"""The ``vision-ft`` executable: the host allocator first (``allocator.py``), then the commands."""

from __future__ import annotations

from vision_ft.allocator import restart_with_tcmalloc


def main() -> None:
    restart_with_tcmalloc()
    from vision_ft.cli import main as commands

    commands()
