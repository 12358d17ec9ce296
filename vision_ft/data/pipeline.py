"""The input pipeline: grain datasets in which every element is a pure function of (seed, position).

The train stream is a ``grain.MapDataset`` over global example positions: position ``p`` of step
``s`` maps through the seeded permutation of epoch ``s // steps_per_epoch`` to one source example,
decoded, cropped and resized with a generator seeded by ``(seed, p)``. Its iterator state is the
step itself, which run checkpoints hold, so ``--resume`` continues mid-epoch on exactly the examples
(and crops) the interrupted run would have read. In a multi-process run each process reads only
its own contiguous slice of every global batch. Decoding runs on grain's threads, or in worker
processes with ``workers > 0``.

Unreadable examples never stop the stream: they come out as zero images with ``mask`` 0 and
``bad`` 1, so the step ignores them and the loop counts (or, with ``on_bad_image="fail"``, reports)
them.
"""

from __future__ import annotations

import atexit
import functools
import gc
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import grain
import numpy as np

from vision_ft.data.errors import BadImageError, DataError
from vision_ft.data.transforms import (
    border_fill,
    border_size,
    center_resize_size,
    check_crop_mode,
    crop_or_pad,
    random_resized_crop_box,
    resize_box,
    to_unit_range,
)
from vision_ft.models.registry import PretrainedCfg


class ExampleSplit(Protocol):
    """A random-access split: labels up front, images decoded on demand."""

    labels: np.ndarray

    def __len__(self) -> int: ...

    def load(self, index: int) -> np.ndarray:
        """The image as HWC (any dtype); raises BadImageError for an unusable example."""
        ...

    def example_id(self, index: int) -> str: ...


@dataclass(frozen=True)
class Geometry:
    """How examples become model inputs: timm's eval resize/crop, and train-time random crops."""

    img_size: int
    interpolation: str = "bicubic"
    eval_crop_pct: float = 1.0
    train_scale: tuple[float, float] | None = None  # RandomResizedCrop area range; None: eval geometry
    train_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    channels: int | None = None  # expected band count; others are bad examples
    eval_crop_mode: str = "center"  # timm's crop_mode: center, squash or border
    border_mean: tuple[float, ...] = (0.0,)  # crop_mode border pads with it, per band in [0, 1]

    def __post_init__(self):
        check_crop_mode(self.eval_crop_mode)


def eval_geometry(cfg: PretrainedCfg, img_size: int, crop_pct: float | None, channels: int) -> Geometry:
    """Eval geometry at ``crop_pct`` (center-cropped), or where None the model's own: timm's eval
    transform at its crop_pct and crop_mode."""
    if crop_pct is not None:
        return Geometry(img_size, cfg.interpolation, crop_pct, channels=channels)
    return Geometry(
        img_size, cfg.interpolation, cfg.crop_pct, channels=channels,
        eval_crop_mode=cfg.crop_mode or "center", border_mean=tuple(cfg.mean),
    )  # fmt: skip


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


# ITU-R 601-2 luma weights, as Pillow's convert("L") applies them to RGB
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def bands_convertible(data_bands: int, model_bands: int) -> bool:
    """Whether data of ``data_bands`` can feed a model of ``model_bands``: the same count, or grey and
    RGB, which ``matched_bands`` converts between."""
    return data_bands == model_bands or {data_bands, model_bands} == {1, 3}


def matched_bands(image: np.ndarray, channels: int) -> np.ndarray:
    """``image`` (HWC) with ``channels`` bands: a grey photo in a colour dataset repeated to RGB and a
    colour one in a grey dataset reduced to luma, as timm's loader reads every photo as RGB (a few
    greyscale JPEGs sit in most photo collections). Other counts measure different bands: a
    ValueError, which marks the example unusable."""
    bands = image.shape[-1]
    if bands == channels:
        return image
    if (bands, channels) == (1, 3):
        return np.repeat(image, 3, axis=-1)
    if (bands, channels) == (3, 1):
        luma = image.astype(np.float32) @ _LUMA
        if np.issubdtype(image.dtype, np.integer):
            luma = np.rint(luma).astype(image.dtype)
        return luma[..., None]
    raise ValueError(f"has {bands} bands, expected {channels}")


def eval_image(image: np.ndarray, geometry: Geometry) -> np.ndarray:
    """One decoded image as validation prepares it: float32 HWC in [0, 1], not yet normalized."""
    return _prepare(image, geometry, None)


def _prepare(image: np.ndarray, geometry: Geometry, rng: np.random.Generator | None) -> np.ndarray:
    if image.ndim == 2:
        image = image[..., None]
    if geometry.channels is not None:
        image = matched_bands(image, geometry.channels)
    h, w, _ = image.shape
    size = geometry.img_size
    if rng is not None and geometry.train_scale is not None:
        box = random_resized_crop_box(rng, h, w, geometry.train_scale, geometry.train_ratio)
    elif geometry.eval_crop_mode == "border":
        new_h, new_w = border_size(h, w, math.floor(size / geometry.eval_crop_pct))
        resized = to_unit_range(resize_box(image, new_h, new_w, geometry.interpolation))
        # timm pads 8-bit pixels with the mean rounded to one, as 8-bit arrays and files do here;
        # other data (16-bit, float, DICOM) takes the mean itself
        fill = np.asarray(
            border_fill(geometry.border_mean) if image.dtype == np.uint8 else geometry.border_mean
        )
        return crop_or_pad(resized, size, fill if fill.size == resized.shape[-1] else fill.mean())
    else:
        new_h, new_w = center_resize_size(h, w, size, geometry.eval_crop_pct, geometry.eval_crop_mode)
        resized = to_unit_range(resize_box(image, new_h, new_w, geometry.interpolation))
        return crop_or_pad(resized, size, 0.0)  # never pads: both sides are at least size
    if box == (0, 0, w, h):
        box = None
    return to_unit_range(resize_box(image, size, size, geometry.interpolation, box))


def may_be_unusable(split: ExampleSplit) -> bool:
    """Whether ``split`` can yield unusable examples (files that fail to decode), which the train
    step must then leave out of BatchNorm's statistics; arrays in memory cannot."""
    return not getattr(split, "always_usable", False)


def unusable_reason(split: ExampleSplit, row: int, geometry: Geometry) -> str:
    """Why the pipeline flagged example ``row`` as unusable: read and prepared again here, since the
    pipeline keeps only the flag (e.g. "has 3 bands, expected 1" for a photo given to a grayscale
    model, "cannot identify image file" for a truncated JPEG)."""
    try:
        _prepare(split.load(row), geometry, None)
    except BadImageError as e:
        return e.reason
    except (ValueError, OSError) as e:
        return str(e) or type(e).__name__
    return "failed to read once, then read on a second try"


def unusable_examples(split: ExampleSplit, batch: dict, geometry: Geometry) -> dict[str, str]:
    """id -> reason for every example of ``batch`` the pipeline flagged as unusable."""
    rows = batch["row"][batch["bad"] > 0]
    return {split.example_id(int(r)): unusable_reason(split, int(r), geometry) for r in rows}


class _ReadExample:
    """Position -> example dict; picklable, so grain can run it in worker processes."""

    def __init__(
        self,
        split: ExampleSplit,
        geometry: Geometry,
        *,
        seed: int,
        batch_size: int,
        local_batch: int,
        process_index: int,
        train: bool,
    ):
        self.split, self.geometry, self.seed, self.train = split, geometry, seed, train
        self.batch_size, self.local_batch, self.process_index = batch_size, local_batch, process_index
        self.steps_per_epoch = max(len(split) // batch_size, 1)

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one order per epoch, the object lives per run
    def _order(self, epoch: int) -> np.ndarray:
        return epoch_order(len(self.split), self.seed, epoch)

    def _row(self, position: int) -> tuple[int, int]:
        """(source row or -1 for padding, global position) of a process-local position."""
        step, k = divmod(position, self.local_batch)
        global_position = step * self.batch_size + self.process_index * self.local_batch + k
        if not self.train:
            return (global_position if global_position < len(self.split) else -1), global_position
        epoch, index = divmod(step, self.steps_per_epoch)
        return int(self._order(epoch)[index * self.batch_size + global_position % self.batch_size]), (
            global_position
        )

    def __call__(self, position: int) -> dict:
        row, global_position = self._row(position)
        size, c = self.geometry.img_size, self.geometry.channels or 1
        labels = self.split.labels
        example = {
            "image": np.zeros((size, size, c), np.float32),
            # a class index, or a multi-hot row for multi-label data
            "label": np.zeros(labels.shape[1:], np.int32),
            "mask": np.float32(0.0),
            "row": np.int32(row),
            "bad": np.int8(0),
        }
        if row < 0:
            return example
        rng = np.random.default_rng([self.seed, global_position]) if self.train else None
        try:
            image = _prepare(self.split.load(row), self.geometry, rng)
        except (BadImageError, ValueError, OSError) as e:
            if isinstance(e, DataError) and not isinstance(e, BadImageError):
                raise  # about every such file (a codec not installed), not this one: stop the run
            example["bad"] = np.int8(1)
            example["label"] = np.asarray(labels[row], np.int32)
            return example
        example.update(image=image, label=np.asarray(labels[row], np.int32), mask=np.float32(1.0))
        return example


def _stack(examples: list[dict]) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _batched(ds: grain.MapDataset, local_batch: int, *, threads: int, workers: int) -> Iterator[dict]:
    ds = ds.batch(local_batch, drop_remainder=True, batch_fn=_stack)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1), prefetch_buffer_size=2 * threads))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its absl flags in workers; we have no absl.app
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_leave_interrupts_to_the_main
        )
        _finish_shared_memory_unlinks_at_exit()
    iterator = iter(it)
    try:
        yield from iterator
    finally:  # exhausted, or closed early: the workers' in-flight batches in shared memory are freed
        _close_if_closable(iterator)


def _close_if_closable(source: object) -> None:
    """Closing a generator runs its ``finally``; closing grain's multiprocess iterator stops its workers."""
    close = getattr(source, "close", None)
    if close is not None:
        close()


@functools.cache
def _finish_shared_memory_unlinks_at_exit() -> None:
    atexit.register(_finish_shared_memory_unlinks)


def _finish_shared_memory_unlinks() -> None:
    """Batches from worker processes arrive in shared memory, which grain unlinks on a thread of its
    own once a batch is dropped; at exit the last few were still queued, and Python's resource
    tracker warned of "leaked shared_memory objects". Its one thread works first in, first out: a
    no-op sent to it returns once the queued unlinks are done. (A private attribute: where grain
    renames it, the warning comes back, and nothing else.)"""
    from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

    gc.collect()  # batches held in reference cycles are dropped, queueing their unlinks
    deleting = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if deleting is not None:
        deleting.apply(int)


def _leave_interrupts_to_the_main(worker_index: int, worker_count: int) -> None:
    # a terminal's Ctrl-C reaches the whole process group: the main process finishes its step and
    # checkpoints, then stops the workers; each would otherwise die on a KeyboardInterrupt traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_batches(
    split: ExampleSplit,
    geometry: Geometry,
    *,
    batch_size: int,
    seed: int,
    start_step: int,
    total_steps: int,
    process_index: int = 0,
    process_count: int = 1,
    threads: int = 4,
    workers: int = 0,
) -> Iterator[dict]:
    """Batches of steps ``start_step .. total_steps - 1``: each epoch a fresh seeded order, full batches
    only (the remainder is dropped, as timm's train loader does). Keys: images (float32 NHWC in
    [0, 1] for integer data), label, mask, row, bad."""
    local = batch_size // process_count
    read = _ReadExample(
        split, geometry, seed=seed, batch_size=batch_size, local_batch=local,
        process_index=process_index, train=True,
    )  # fmt: skip
    ds = grain.MapDataset.range(start_step * local, total_steps * local).map(read)
    return _batched(ds, local, threads=threads, workers=workers)


def eval_batches(
    split: ExampleSplit,
    geometry: Geometry,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    threads: int = 4,
    workers: int = 0,
) -> Iterator[dict]:
    """Every example once, in order; the last batch is padded (``mask`` 0, ``row`` -1) so every batch
    has the same shape and nothing recompiles."""
    local = batch_size // process_count
    steps = -(-len(split) // batch_size)
    read = _ReadExample(
        split, geometry, seed=0, batch_size=batch_size, local_batch=local,
        process_index=process_index, train=False,
    )  # fmt: skip
    ds = grain.MapDataset.range(0, steps * local).map(read)
    return _batched(ds, local, threads=threads, workers=workers)


def prefetch_to_device(batches: Iterator[dict], sharding, *, keys=("image", "label", "mask"), size: int = 2):
    """Yield ``(arrays on device, host batch)``, keeping ``size`` batches in flight: transfers are
    asynchronous, so the next batch moves while the current step runs. Each process contributes its
    local slice and the result is one global array sharded like ``sharding`` (the mesh's data axis)."""
    import collections

    import jax

    def put(batch: dict):
        return tuple(jax.make_array_from_process_local_data(sharding, batch[k]) for k in keys), batch

    queue = collections.deque()
    try:
        for batch in batches:
            queue.append(put(batch))
            if len(queue) >= size:
                yield queue.popleft()
        while queue:
            yield queue.popleft()
    finally:  # closed early (a preempted or failed fit): so is the source, and its workers
        _close_if_closable(batches)


def sharded_eval_batches(
    split: ExampleSplit, geometry: Geometry, sharding, *, batch_size: int, threads: int = 4, workers: int = 0
) -> Iterator[tuple[object, dict]]:
    """Each process decodes only its slice of every (global) eval batch. Yields the global image
    array laid out as ``sharding`` and the host fields (label, mask, row, bad) of the whole global
    batch, gathered from every process in batch order."""
    import jax

    index, count = jax.process_index(), jax.process_count()
    local_batches = eval_batches(
        split, geometry, batch_size=batch_size, process_index=index, process_count=count,
        threads=threads, workers=workers,
    )  # fmt: skip
    try:
        for batch in local_batches:
            images = jax.make_array_from_process_local_data(sharding, batch["image"])
            fields = {k: batch[k] for k in ("label", "mask", "row", "bad")}
            if count > 1:
                from jax.experimental import multihost_utils

                fields = {
                    k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in fields.items()
                }
            yield images, fields
    finally:  # an evaluation stopped early frees its workers now, not when the generator is collected
        _close_if_closable(local_batches)
