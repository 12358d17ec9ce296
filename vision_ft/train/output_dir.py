"""Whether ``fit`` may write into its ``--output``: a new run, a resume, or a preempted run's rerun.

Nothing in the directory is written before these checks pass, so a refused command leaves an
earlier run exactly as it was.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from etils import epath

from vision_ft.data.sources import Dataset
from vision_ft.data.splitting import matches_split_file
from vision_ft.output_dirs import absent_directories, make_directory, remove_empty
from vision_ft.train.checkpoint import check_checkpoint_storage, checkpoint_location, holds_checkpoint
from vision_ft.train.config import FitConfig, resume_conflicts
from vision_ft.train.distributed import check_shared_directory, is_primary, process_zero_says, stop_together
from vision_ft.train.preemption import MARKER, was_preempted
from vision_ft.train.report import MetricsLog
from vision_ft.train.resume_notes import NOTES_FILE
from vision_ft.train.run_dir import RunDirError, read_run_config

log = logging.getLogger("vision_ft.fit")


# What fit writes at the top of --output. A new run may reuse a directory that holds only these (a
# run that failed before its first checkpoint), never one holding anything else: that is the user's.
RUN_ENTRIES = frozenset({
    "config.json", "metrics.jsonl", "metrics.jsonl.tmp", "config.json.tmp", "final.json", "final.json.tmp",
    "splits.csv", "splits.csv.tmp", "checkpoints", "tensorboard", "learning_curves.png",
    "confusion_matrix.png", "roc.png", "test_reliability.png", "test_misclassified.csv",
    "test_mistakes.csv", MARKER, NOTES_FILE, f"{NOTES_FILE}.tmp",
})  # fmt: skip
RUN_FOLDERS = frozenset({"checkpoints", "tensorboard"})  # the entries above that are folders
# In the checkpoint directory: the id of the run whose checkpoints these are (config.json has it too),
# so that a resume pointed at another run's --checkpoint-dir is refused rather than taking it over.
OWNER_FILE = "run_id.json"


@dataclass(frozen=True)
class OutputDir:
    cfg: FitConfig  # with ``resume`` set where the directory holds a preempted run
    checkpoint_dir: epath.Path
    saved: dict | None  # the run's config.json where it resumes one
    saved_by_release: str | None  # the release that last wrote the run; None for a new run
    made: tuple[Path, ...] = ()  # the directories the claim created, for a refused set-up to remove
    lock: OutputLock | None = None  # held until the run ends (``OutputLock.release``)


def claim_output_dir(cfg: FitConfig) -> OutputDir:
    """Check ``cfg.output`` against ``cfg.resume`` and create it; raises ``RunDirError`` naming the
    directory where the two disagree or a resume would change the run's settings.

    In a multi-process run each process claims its own --output (hosts may keep their own run
    directories), process 0's preemption marker decides a rerun's resume for all, a refusal on one
    process stops every one, and the checkpoint directory must be one they all share."""
    try:
        marked = was_preempted(Path(cfg.output))
    except OSError:  # an unreadable --output: _claim names it below, on this process
        marked = False
    preempted = process_zero_says(marked)
    claimed, error = None, None
    try:
        claimed = _claim(cfg, preempted=preempted)
    except Exception as e:  # re-raised below, on this process and the others
        error = e
    try:
        stop_together(error, "--output")
        check_shared_directory(claimed.checkpoint_dir, "the checkpoint directory")
    except BaseException:  # another host refused: this one's lock and new, empty folders go too
        if claimed is not None:
            if claimed.lock is not None:
                claimed.lock.release()
            remove_empty(claimed.made)
        raise
    return claimed


def _claim(cfg: FitConfig, *, preempted: bool) -> OutputDir:
    """The checks and the directories, under the lock on an existing --output: a running fit's
    half-written files would otherwise be judged. Process 0 alone locks, as it alone writes the run's
    files; hosts that share one --output would otherwise lock each other out."""
    out = Path(cfg.output)
    lock = OutputLock(out) if is_primary() and out.is_dir() else None
    try:
        claimed = _checked_claim(cfg, preempted=preempted)
        if is_primary() and lock is None:  # a directory the claim made
            lock = OutputLock(out)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return dataclasses.replace(claimed, lock=lock)


def _checked_claim(cfg: FitConfig, *, preempted: bool) -> OutputDir:
    out = Path(cfg.output)
    checkpoint_dir = checkpoint_location(cfg.checkpoint_dir or out / "checkpoints")
    check_checkpoint_storage(checkpoint_dir)
    if cfg.checkpoint_dir:
        # config.json records where the checkpoints are: eval, predict and run:DIR read it from
        # whatever directory they start in, where a relative path would name another place
        cfg = dataclasses.replace(cfg, checkpoint_dir=str(checkpoint_dir))
    refuse_misplaced_entries(out)
    # not the folders' existence: a fit that failed before its first save (a --freeze group out
    # of range) left them empty, and then neither a new run nor --resume could use the directory;
    # nor an empty metrics.jsonl: one that failed before its first evaluation (out of memory) left it
    metrics = out / "metrics.jsonl"
    has_run = holds_checkpoint(checkpoint_dir) or (metrics.is_file() and metrics.stat().st_size > 0)
    if has_run and preempted and not cfg.resume:
        # rerunning the command of a preempted run continues it
        log.info("resuming the preempted run in %s", out)
        cfg = dataclasses.replace(cfg, resume=True)
    if has_run and not cfg.resume:
        if cfg.checkpoint_dir and not (out / "config.json").is_file() and holds_checkpoint(checkpoint_dir):
            raise RunDirError(
                f"--checkpoint-dir {checkpoint_dir} already holds a run's checkpoints; choose another "
                "directory (or resume that run from its own --output)"
            )
        raise RunDirError(f"--output {out} already holds a run; pass --resume or choose another directory")
    if cfg.resume and not has_run:
        raise RunDirError(f"--resume: {out} holds no run to resume")
    if not cfg.resume:
        refuse_foreign_entries(out)
        refuse_foreign_checkpoint_entries(checkpoint_dir)
    else:
        MetricsLog.read(metrics)  # a damaged log or the user's own file is named before anything is made
    saved, saved_by_release = None, None
    if cfg.resume and (out / "config.json").is_file():
        saved = read_run_config(out)
        saved_by_release = saved.get("vision_ft_version")  # absent in runs saved before it was kept
        check_checkpoint_owner(checkpoint_dir, saved.get("run_id"))
        conflicts = resume_conflicts(saved, cfg)
        if conflicts:
            raise RunDirError(
                f"--resume: {out} was started with other settings: {'; '.join(conflicts)}. "
                "Resume with the run's own (leave them out), or fit into a new --output"
            )
    elif cfg.resume and is_primary():  # other hosts may keep run directories of their own
        log.warning(
            "--resume: %s holds no config.json, so this resume cannot check its settings against the "
            "run's; it continues with the command's",
            out,
        )
    made = [*absent_directories(out)]
    try:
        if cfg.checkpoint_dir and "://" not in cfg.checkpoint_dir:  # Orbax would fail on a traceback
            made += absent_directories(Path(cfg.checkpoint_dir))
            make_directory(Path(cfg.checkpoint_dir), "--checkpoint-dir")
        make_directory(out)
    except BaseException:  # an --output that is a file: the checkpoint folders made for it go again
        remove_empty(made)
        raise
    return OutputDir(cfg, checkpoint_dir, saved, saved_by_release, tuple(made))


class OutputLock:
    """An exclusive ``flock`` on the ``--output`` directory itself: a second fit into a running one's
    directory (a job relaunched while the first still runs, a ``--resume`` typed in another
    terminal) is refused instead of writing the same checkpoints and logs. No lock file is left
    behind, and the system drops the lock when the process ends, even by SIGKILL."""

    def __init__(self, out: Path):
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        # closed by release(), or when a FitRun set up and never run (a notebook, a test) is dropped
        self._close = weakref.finalize(self, os.close, fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.release()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # a file system without directory locks (NFS, some cluster mounts): unguarded
                log.info("--output %s is not locked (%s): start no second fit into it meanwhile", out, e)
                return
            raise RunDirError(
                f"--output {out} is in use by another fit that is still running (or, in this process, "
                "one set up and not yet run); wait for it to end, or fit into another directory"
            ) from None

    def release(self) -> None:
        self._close()  # closing drops the lock; a second call does nothing


def new_run_id() -> str:
    return uuid.uuid4().hex


def write_checkpoint_owner(checkpoint_dir: epath.Path, run_id: str, out: Path) -> None:
    """Mark ``checkpoint_dir`` as the checkpoints of run ``run_id`` (whose --output is ``out``)."""
    marker = {"run_id": run_id, "output": str(Path(out).absolute())}
    # whole or not at all: a half-written mark would stop every resume of the run as unreadable
    partial = checkpoint_dir / f"{OWNER_FILE}.tmp"
    partial.write_text(json.dumps(marker) + "\n")
    partial.replace(checkpoint_dir / OWNER_FILE)


def check_checkpoint_owner(checkpoint_dir: epath.Path, run_id: str | None) -> None:
    """Raise ``RunDirError`` where ``checkpoint_dir`` is marked as another run's than ``run_id``.
    Runs and checkpoints from before the mark carry none, and pass."""
    path = checkpoint_dir / OWNER_FILE
    if run_id is None or not path.exists():
        return
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        raise RunDirError(f"--checkpoint-dir {checkpoint_dir}: {OWNER_FILE} is unreadable") from None
    if not isinstance(owner, dict) or owner.get("run_id") != run_id:
        started_in = owner.get("output") if isinstance(owner, dict) else None
        raise RunDirError(
            f"--checkpoint-dir {checkpoint_dir} holds the checkpoints of another run"
            + (f" (started in {started_in})" if started_in else "")
            + "; resume with the run's own checkpoint directory"
        )


def refuse_foreign_entries(out: Path) -> None:
    """Raise ``RunDirError`` where ``out`` holds anything a fit does not write, or files with a fit's
    names but no run's ``config.json`` (a fit writes it first): names alone would let a new run
    overwrite a user's own splits.csv or config.json."""
    if not out.is_dir():
        return  # absent, or a file that make_directory names
    names = sorted(entry.name for entry in out.iterdir())
    foreign = [name for name in names if name not in RUN_ENTRIES]
    if foreign:
        raise RunDirError(
            f"--output {out} holds files a fit does not write ({_listed(foreign)}); not writing into it: "
            "choose an empty or new directory"
        )
    if not names:
        return
    try:
        read_run_config(out)
    except RunDirError:
        raise RunDirError(
            f"--output {out} holds {_listed(names)} but no run's config.json; not writing into it: choose "
            "an empty or new directory"
        ) from None


CHECKPOINT_ENTRIES = frozenset({"latest", "best", OWNER_FILE, f"{OWNER_FILE}.tmp"})


def refuse_foreign_checkpoint_entries(checkpoint_dir: epath.Path) -> None:
    """Raise ``RunDirError`` where a new run's checkpoint directory holds anything its checkpoints
    do not (a user's folder named as --checkpoint-dir), or a run_id.json that is not a run's."""
    if "://" in str(checkpoint_dir) or not checkpoint_dir.is_dir():
        return  # buckets hold what their owners put there; an absent folder is made
    names = sorted(entry.name for entry in checkpoint_dir.iterdir())
    foreign = [name for name in names if name not in CHECKPOINT_ENTRIES]
    if foreign:
        raise RunDirError(
            f"the checkpoint directory {checkpoint_dir} holds files a fit does not write "
            f"({_listed(foreign)}); not writing into it: choose an empty or new directory"
        )
    if OWNER_FILE in names:
        try:
            owner = json.loads((checkpoint_dir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = None
        if not isinstance(owner, dict) or not isinstance(owner.get("run_id"), str):
            raise RunDirError(
                f"the checkpoint directory {checkpoint_dir} holds a {OWNER_FILE} that is not a run's; not "
                "overwriting it: choose an empty or new directory"
            )


def refuse_misplaced_entries(out: Path) -> None:
    """Raise ``RunDirError`` where a fit's file is a folder in ``out``, or its folder a file."""
    if not out.is_dir():
        return
    for entry in sorted(out.iterdir()):
        if entry.name in RUN_ENTRIES and entry.is_dir() != (entry.name in RUN_FOLDERS):
            kind, expected = ("a folder", "file") if entry.is_dir() else ("a file", "folder")
            raise RunDirError(
                f"--output {out}: {entry.name} is {kind}, where a fit keeps its {expected}; not writing "
                "into it: choose an empty or new directory"
            )


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_resumed_data(saved: dict, data: Dataset, spec: str, out: Path) -> None:
    """Raise ``RunDirError`` where a resume reads other data than the run was started on (a
    folder that gained images, renamed classes): its split, order and labels would change."""
    names = saved.get("class_names")
    if names is not None and list(names) != list(data.class_names):
        raise RunDirError(
            f"--resume: {spec} has classes {list(data.class_names)}, the run in {out} was started on "
            f"{list(names)}"
        )
    sizes = {name: len(split) for name, split in data.splits.items()}
    if saved.get("split_sizes") not in (None, sizes):
        raise RunDirError(
            f"--resume: {spec} splits into {sizes} images, the run in {out} was started on "
            f"{saved['split_sizes']}; resume with the same data, or fit into a new --output"
        )
    recorded = out / "splits.csv"
    if data.index is not None and recorded.is_file():
        if not matches_split_file(recorded, data.index.splits, data.class_names):
            raise RunDirError(
                f"--resume: {spec} no longer splits as the run's {recorded} records (images added, "
                "removed or moved); resume with the same data, or fit into a new --output"
            )
    if saved.get("labels_digest") not in (None, labels_digest(data)):
        raise RunDirError(
            f"--resume: {spec} has other labels than the run in {out} was started on (same split sizes: "
            "another file, or relabelled); resume with the same data, or fit into a new --output"
        )


def labels_digest(data: Dataset) -> str:
    """A fingerprint of every split's labels in order, which a run records: split sizes alone let a
    resume continue on another file of the same sizes, or on relabelled data."""
    digest = hashlib.sha256()
    for name in sorted(data.splits):
        labels = np.ascontiguousarray(data.splits[name].labels, dtype=np.int64)
        digest.update(f"{name} {labels.shape};".encode())
        digest.update(labels.tobytes())
    return digest.hexdigest()[:16]
