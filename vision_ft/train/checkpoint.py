"""Run checkpoints with Orbax: the latest state for ``--resume`` and the best by a validation metric.

Orbax writes each checkpoint to a temporary directory and renames it into place when complete, and
deletes an older one only after the newer one is final, so a process killed mid-write leaves the
previous checkpoint intact. Restoring goes against an abstract target and first checks every key
and shape of the saved tree, so a checkpoint from another model or config fails with one message
listing the differences instead of loading partially.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint._src.metadata import array_metadata_store

from vision_ft.weights.mapping import mismatch_summary


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tree does not match what this run expects."""


class CheckpointUnreadableError(ValueError):
    """A checkpoint whose files cannot be read: damaged, truncated or partly deleted. Its message
    names the checkpoint's directory, which names the run."""


@contextlib.contextmanager
def reading(where: str):
    """Errors of Orbax and tensorstore while reading ``where`` as one line naming it. (A write that
    died midway leaves no finished checkpoint to read: this is damage after the fact.)"""
    _hush_abandoned_reads()  # before: the first of them can fail before the error reaches here
    try:
        yield
    except CheckpointMismatchError:
        raise
    except Exception as e:  # noqa: BLE001  Orbax wraps tensorstore's errors in a bare Exception
        cause = e.__cause__ or e
        first_line = (str(cause).strip().splitlines() or [""])[0]
        if isinstance(cause, MemoryError) or "RESOURCE_EXHAUSTED" in f"{e} {cause}":
            raise CheckpointUnreadableError(
                f"checkpoint {where} does not fit in memory here: {type(cause).__name__}: {first_line}"
            ) from None
        raise CheckpointUnreadableError(
            f"checkpoint {where} could not be read (damaged?): {type(cause).__name__}: {first_line}"
        ) from None


_ORBAX_READ = "_read_array_index_and_device_put"  # Orbax's coroutine that reads one array
_ORBAX_READ_ERROR = "Encountered error while reading array index"  # and the error it raises


class _AbandonedReadRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _ORBAX_READ_ERROR in message:
            return False
        # an abandoned open of an array's metadata (its .zarray, in the same damaged data file),
        # left as a future nobody awaits: asyncio logs it, with tensorstore's spec in its repr. A
        # read only: a write's failure (a full disk during a later save) must still be heard
        abandoned = "exception was never retrieved" in message and "tensorstore_spec" in message
        return not (abandoned and "Error reading" in message)


def _hush_abandoned_reads() -> None:
    """When one read of a restore fails, Orbax closes its event loop and leaves the other reads
    running. Each would later print a traceback, long after the one error that names the
    checkpoint: as garbage ("Exception ignored in <coroutine ...>"), through asyncio's logger
    ("exception was never retrieved"), or from tensorstore's threads, whose callbacks find the loop
    closed ("RuntimeError: Event loop is closed", reported as unraisable). Those reports, and only
    those, are dropped from the first checkpoint read on; a read that succeeds makes none."""
    previous = sys.unraisablehook
    if getattr(previous, "hushes_orbax_reads", False):
        return

    def unraisable_hook(unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        loop_closed = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == (
            "Event loop is closed"
        )
        if getattr(code, "co_name", "") != _ORBAX_READ and not loop_closed:
            previous(unraisable)

    unraisable_hook.hushes_orbax_reads = True
    sys.unraisablehook = unraisable_hook
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReadRecords) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedReadRecords())


def _key_str(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_str(path) -> str:
    return ".".join(_key_str(k) for k in path)


def _shapes(tree) -> dict[str, tuple]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_str(path): tuple(getattr(leaf, "shape", ())) for path, leaf in flat}


def with_averaged_weights(weights: dict, ema) -> dict:
    """``weights`` ({"params", "stats", ...}) with every array the EMA ``(trainable, stats)`` averages
    replaced by its average: what fit evaluates and keeps as best. Frozen parameters stay as they are.
    Matched by path, since the EMA holds only the trainable subset of the parameters."""
    averaged = {
        _path_str(path): leaf for part in ema for path, leaf in jax.tree_util.tree_flatten_with_path(part)[0]
    }

    def pick(path, leaf):
        return averaged.get(_path_str(path), leaf)

    return {**weights, **{k: jax.tree_util.tree_map_with_path(pick, weights[k]) for k in ("params", "stats")}}


def _replicated_like(abstract) -> jax.sharding.Sharding:
    """Replicated over the devices of ``abstract``'s first placed leaf (else this process's first)."""
    for leaf in jax.tree.leaves(abstract):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
        if isinstance(sharding, jax.sharding.SingleDeviceSharding):
            return sharding
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _placed_as(value, target):
    sharding = getattr(target, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else value


def check_compatible(saved_metadata, abstract, where: str) -> None:
    saved, wanted = _shapes(saved_metadata), _shapes(abstract)
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    mismatched = [
        f"{k}: saved {saved[k]} vs expected {wanted[k]}"
        for k in sorted(set(saved) & set(wanted))
        if saved[k] != wanted[k]
    ]
    if missing or unexpected or mismatched:
        headline = f"checkpoint {where} does not match this run"
        raise CheckpointMismatchError(mismatch_summary(headline, missing, unexpected, mismatched))


def abstract_like(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def checkpoint_location(directory: str | Path) -> epath.Path:
    """A local directory made absolute, or a URL (``gs://bucket/run``) kept as it is: Orbax and
    tensorstore write to cloud storage themselves, from every host of a multi-host run."""
    text = str(directory)
    if "://" not in text:
        return epath.Path(Path(text).expanduser().absolute())
    try:
        return epath.Path(text)
    except KeyError:  # a scheme etils knows no storage for
        raise CheckpointLocationError(
            f"{text}: no storage for {text.split('://')[0]}:// (gs:// and s3:// are, with gcsfs or s3fs)"
        ) from None


def check_checkpoint_storage(path: epath.Path, *, hint: str = "or use a local directory") -> None:
    """Raise ``CheckpointLocationError`` where this installation cannot reach ``path``'s storage
    (gs:// without gcsfs): before a fit starts, not at its first save, and before a run's
    checkpoints are read."""
    try:
        path.exists()
    except ImportError as e:
        raise CheckpointLocationError(f"{path}: {e} ({hint})") from None


class CheckpointLocationError(ValueError):
    """A checkpoint URL this installation cannot write to."""


def holds_checkpoint(directory: epath.Path, kinds: tuple[str, ...] = ("latest", "best")) -> bool:
    """Whether ``directory`` holds a finished checkpoint of one of ``kinds``. The empty folders of a
    run that stopped before its first save, or a write that never finished, hold nothing to resume."""
    return any((directory / kind).exists() and ocp.utils.checkpoint_steps(directory / kind) for kind in kinds)


def write_replicated_arrays_whole_on_cpu() -> None:
    """Orbax splits the write of a replicated array among its replicas by default, which pays where
    each device has its own link to the host. CPU devices share one memory, and the split costs one
    compiled slice per array shape and device: on 8 CPU devices it made a ResNet-18 state's save
    2-6x slower (2.8-7.4 s against 1.2-1.4 s). Orbax makes the same choice on GPUs."""
    if jax.default_backend() != "cpu" or jax.local_device_count() == 1:
        return
    handler = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()
    )
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class RunCheckpoints:
    """``DIR/latest`` keeps the newest state; ``DIR/best`` keeps the best by a scalar metric."""

    def __init__(self, directory: str | Path, *, best_mode: str = "max", create: bool = True):
        write_replicated_arrays_whole_on_cpu()
        self.directory = checkpoint_location(directory)
        common = dict(create=create, enable_async_checkpointing=False)
        # Naming the handler lets a fresh process read a checkpoint's metadata before any save.
        self.latest = ocp.CheckpointManager(
            self.directory / "latest",
            options=ocp.CheckpointManagerOptions(max_to_keep=1, **common),
            item_handlers=ocp.StandardCheckpointHandler(),
        )
        self.best = ocp.CheckpointManager(
            self.directory / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: m["score"], best_mode=best_mode, **common
            ),
            item_handlers=ocp.StandardCheckpointHandler(),
        )

    def save_latest(self, step: int, state) -> None:
        self.latest.save(step, args=ocp.args.StandardSave(state), force=True)
        self.latest.wait_until_finished()

    def save_best(self, step: int, state, score: float) -> None:
        if step in self.best.all_steps():
            # a run killed between this save and the latest's resumes from before it and replays to
            # the same state; Orbax would refuse the step, and a finished write is already complete
            return
        self.best.save(step, args=ocp.args.StandardSave(state), metrics={"score": float(score)}, force=True)
        self.best.wait_until_finished()

    def discard_best(self) -> None:
        """Delete the best checkpoints: those of an attempt that died before its first latest save,
        which a run started again would otherwise have to beat, and could not replace at their step."""
        for step in self.best.all_steps():
            self.best.delete(step)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def best_step(self) -> int | None:
        return self.best.best_step()

    def _restore(self, manager: ocp.CheckpointManager, step: int, abstract):
        where = str(manager.directory / str(step))
        with reading(where):
            check_compatible(manager.item_metadata(step), abstract, where)
            return manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_latest(self, abstract):
        step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.directory / 'latest'}")
        return step, self._restore(self.latest, step, abstract)

    def restore_latest_weights(self, abstract, *, averaged: bool = True):
        """Only the top-level entries of ``abstract`` (the weights) from the latest full state; with
        ``averaged``, the EMA's weights where the run keeps one, as the best checkpoint holds them."""
        step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory / 'latest'}")
        where = str(self.latest.directory / str(step))
        with reading(where):
            metadata = self.latest.item_metadata(step)
            check_compatible({k: metadata[k] for k in abstract if k in metadata}, abstract, where)
            # the other entries laid out as the caller's own: left to Orbax, they would go to the
            # devices they were saved from, which a run saved on 8 devices and read on 1 lacks
            placed = _replicated_like(abstract)
            everything = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=placed), dict(metadata)
            )
            everything.update(abstract)
            restored = self.latest.restore(step, args=ocp.args.StandardRestore(everything))
        weights = {k: restored[k] for k in abstract}
        if averaged and "ema" in restored:
            averaged_weights = with_averaged_weights(weights, restored["ema"])
            weights = jax.tree.map(_placed_as, averaged_weights, abstract)
        return step, weights

    def restore_best(self, abstract):
        step = self.best_step()
        if step is None:
            raise FileNotFoundError(f"no best checkpoint in {self.directory / 'best'}")
        return step, self._restore(self.best, step, abstract)

    def close(self) -> None:
        self.latest.close()
        self.best.close()
