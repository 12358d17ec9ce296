"""The progress bar of ``fit`` and ``embed``: rich, on stderr, with ETA and images/s."""

from __future__ import annotations

import logging
import time


class ProgressBar:
    """Counts ``total`` units of ``images_per_unit`` images (fit's steps, embed's images); a no-op
    that logs its notes when disabled. ``fields`` are extra columns, set through :meth:`update`."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        enabled: bool,
        images_per_unit: int = 1,
        fields: tuple[str, ...] = (),
    ):
        self.enabled, self.images_per_unit = enabled, images_per_unit
        self._log = logging.getLogger(f"vision_ft.{label}")
        self.completed = self._start = 0
        self._started_at = time.time()
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        extra = "".join(f"  {name} {{task.fields[{name}]}}" for name in fields)
        self.bar = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[rate]} img/s" + extra),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task(label, total=total, rate="-", **dict.fromkeys(fields, "-"))
        self.bar.start()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_at(self, completed: int) -> None:
        """Where a resumed run begins; the rate counts only what this process does."""
        self.completed = self._start = completed
        self._started_at = time.time()
        if self.enabled:
            self.bar.update(self.task, completed=completed)

    def update(self, completed: int, **fields: str) -> None:
        self.completed = completed
        if not self.enabled:
            return
        elapsed = max(time.time() - self._started_at, 1e-9)
        rate = (completed - self._start) * self.images_per_unit / elapsed
        self.bar.update(self.task, completed=completed, rate=f"{rate:.0f}", **fields)

    def advance(self, n: int) -> None:
        self.update(self.completed + n)

    def note(self, message: str) -> None:
        if self.enabled:
            self.bar.console.log(message)
        else:
            self._log.info(message)

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
