"""SIGTERM as TPU VM maintenance and spot instances send it: finish the step, checkpoint, exit.

Every process must stop after the same step (a checkpoint is a collective), so in a multi-process
run the "stop" flags are combined across processes after each step.
"""

from __future__ import annotations

import signal
from pathlib import Path

import jax
import numpy as np

# EX_TEMPFAIL from sysexits.h: "try again later", distinct from errors (1) and bad input (2)
EXIT_PREEMPTED = 75
MARKER = "PREEMPTED"


class Preempted(Exception):
    """Raised after the checkpoint of a preempted run is written."""

    def __init__(self, step: int, output: Path):
        super().__init__(f"preempted at step {step}; checkpoint saved in {output}; rerun the same command")
        self.step = step


class PreemptionWatch:
    """Remembers a SIGTERM; ``requested()`` says whether every process should stop (or fail) now."""

    def __init__(self) -> None:
        self._flag = False
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._flag = True

    def requested(self, *, failed: bool = False) -> tuple[bool, bool]:
        """(stop requested, this step failed) on any process: every process asks after every step,
        so all stop, or fail, after the same one. ``failed``: this process's own step failed (an
        unusable image with on_bad_image: fail), which it must not raise alone: the others would
        wait for it in their next collective."""
        flags = np.asarray([self._flag, failed])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = np.any(multihost_utils.process_allgather(flags), axis=0)
        return bool(flags[0]), bool(flags[1])

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def mark_preempted(output: Path, step: int) -> None:
    if jax.process_index() == 0:
        (output / MARKER).write_text(f"{step}\n")


def was_preempted(output: Path) -> bool:
    return (output / MARKER).exists()


def clear_marker(output: Path) -> None:
    if jax.process_index() == 0:
        (output / MARKER).unlink(missing_ok=True)
