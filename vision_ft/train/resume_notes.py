"""What a resume needs beside the latest checkpoint: the train losses of the epoch it stopped in and
the unusable training images met so far (``--output/resume_notes.json``).

The notes are written just before each latest checkpoint and keyed by its step. A process that dies
before the checkpoint is complete leaves notes a step ahead of the checkpoint a resume finds, so the
notes of the last few steps are kept and a resume reads those of its own step.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vision_ft.train.report import write_json

log = logging.getLogger("vision_ft.fit")

NOTES_FILE = "resume_notes.json"
_KEPT_STEPS = 3


@dataclass(frozen=True)
class ResumeNotes:
    epoch_losses: list[np.float32] | None  # None: not recorded at this step (an older run)
    bad_examples: dict[str, str] = field(default_factory=dict)


def _read(out: Path) -> dict:
    try:
        notes = json.loads((out / NOTES_FILE).read_text())
    except (OSError, ValueError):  # absent (a run saved before notes were kept) or damaged
        return {}
    return notes if isinstance(notes, dict) else {}


def write_resume_notes(out: Path, step: int, epoch_losses: list[float], bad_examples: dict[str, str]) -> None:
    """Record the losses of the current epoch's steps so far and the unusable images, at ``step``."""
    notes = _read(out)
    notes[str(step)] = {"epoch_losses": [float(v) for v in epoch_losses], "bad_examples": bad_examples}
    kept = sorted(notes, key=lambda s: int(s) if s.isdigit() else -1)[-_KEPT_STEPS:]
    write_json(out / NOTES_FILE, {s: notes[s] for s in kept})


def read_resume_notes(out: Path, step: int) -> ResumeNotes:
    """The notes of ``step``. The epoch's losses come back as the float32 values the steps gave, so
    that the epoch's mean is the one an uninterrupted run logs."""
    notes = _read(out).get(str(step))
    if not isinstance(notes, dict):
        return ResumeNotes(None)
    losses = notes.get("epoch_losses")
    bad = notes.get("bad_examples")
    return ResumeNotes(
        [np.float32(v) for v in losses] if isinstance(losses, list) else None,
        {str(k): str(v) for k, v in bad.items()} if isinstance(bad, dict) else {},
    )
