"""SIGTERM as TPU VM maintenance and spot instances send it, or a Ctrl-C: finish the step,
checkpoint, exit.

Every process must stop after the same step (a checkpoint is a collective), so in a multi-process
run the "stop" flags are combined across processes after each step.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import jax
import numpy as np

# EX_TEMPFAIL from sysexits.h: "try again later", distinct from errors (1) and bad input (2)
EXIT_PREEMPTED = 75
MARKER = "PREEMPTED"

log = logging.getLogger("vision_ft.fit")


class Preempted(Exception):
    """Raised after the checkpoint of a preempted run is written."""

    def __init__(self, step: int, output: Path):
        super().__init__(f"preempted at step {step}; checkpoint saved in {output}; rerun the same command")
        self.step = step


class Interrupted(Preempted):
    """Raised after the checkpoint of a run stopped by Ctrl-C (SIGINT) is written."""

    def __init__(self, step: int, output: Path):
        Exception.__init__(
            self, f"interrupted at step {step}; checkpoint saved in {output}; continue with --resume"
        )
        self.step = step


class PreemptionWatch:
    """Remembers a SIGTERM or a first Ctrl-C; ``requested()`` says whether every process should stop
    (or fail) now, ``interrupted`` whether the stop is a Ctrl-C's."""

    def __init__(self) -> None:
        self._flag = False
        self.interrupted = False
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        # a KeyboardInterrupt raised mid-step loses the steps since the last checkpoint, and one
        # raised inside a callback (JAX's garbage-collection hook) is printed and dropped; an
        # ignored SIGINT (a job started in the background) stays ignored
        self._watches_interrupts = signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if self._watches_interrupts:
            signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_signal(self, signum, frame) -> None:
        self._flag = True

    def _on_interrupt(self, signum, frame) -> None:
        self._flag = self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        log.warning("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once)")

    def requested(self, *, failed: bool = False) -> tuple[bool, bool]:
        """(stop requested, this step failed) on any process: every process asks after every step,
        so all stop, or fail, after the same one. ``failed``: this process's own step failed (an
        unusable image with on_bad_image: fail), which it must not raise alone: the others would
        wait for it in their next collective."""
        flags = np.asarray([self._flag, failed, self.interrupted])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = np.any(multihost_utils.process_allgather(flags), axis=0)
        self.interrupted = bool(flags[2])
        return bool(flags[0]), bool(flags[1])

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
        if self._watches_interrupts:  # another owner's handler (a notebook's, or none) stays as it is
            signal.signal(signal.SIGINT, signal.default_int_handler)


def mark_preempted(output: Path, step: int) -> None:
    if jax.process_index() == 0:
        (output / MARKER).write_text(f"{step}\n")


def was_preempted(output: Path) -> bool:
    return (output / MARKER).exists()


def clear_marker(output: Path) -> None:
    if jax.process_index() == 0:
        (output / MARKER).unlink(missing_ok=True)
