"""TensorFlow Datasets catalog entries as random-access sources, read without TensorFlow.

A ``--data tfds:NAME[/CONFIG][:SPLIT]`` dataset must already be prepared in the ``array_record`` format
(preparing needs TensorFlow, reading does not): TFDS then serves it through ``tfds.data_source``, which
decodes examples with NumPy/PIL. Nothing here downloads or prepares data, so the network is never touched;
every way a dataset can be missing or unusable becomes a one-line ``DataError`` that says what to run.

Which features are used:

- image: the feature named ``image``; else the first ``Image`` feature; else the numeric ``Tensor`` of rank
  2 or 3 with the most channels (so2sat/all has ``sentinel1``, 8 SAR bands, and ``sentinel2``, 10 optical
  bands: ``sentinel2`` is taken). Grayscale images come back as (H, W, 1); dtypes are kept as stored.
- label: the ``ClassLabel`` named ``label``; else the first ``ClassLabel``. Its names are the class names.

Splits: TFDS ``train`` is ``train`` (or the explicit ``:SPLIT``, any TFDS split expression such as
``train[:80%]``), ``validation``/``val`` is ``val`` and ``test`` is ``test``. A dataset without a
validation split gets one carved from train by index with ``numpy.random.default_rng(seed)``: stratified
by label when the dataset is at most ``_STRATIFY_MAX_BYTES`` on disk (labels are read with image decoding
skipped, so the cost is one pass over the record bytes), otherwise a plain seeded random split, because
reading every record of a very large dataset just for its labels would cost more than stratification is
worth.
"""

from __future__ import annotations

import functools
import logging
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vision_ft.data.errors import BadImageError, DataError

# Above this many bytes on disk, a labels-only pass over the records is too slow to stratify the val split.
_STRATIFY_MAX_BYTES = 1 << 30
_LABEL_READ_CHUNK = 1024
_NAME = re.compile(r"[A-Za-z0-9_]+")
_VERSION = re.compile(r"\d+\.\d+\.\d+")
_VAL_SPLITS = ("validation", "val")


@dataclass(frozen=True)
class TfdsSpec:
    """A parsed ``NAME[/CONFIG][:SPLIT]``; ``config``/``split`` are None when not given."""

    name: str
    config: str | None
    split: str | None

    @property
    def dataset(self) -> str:
        """``name`` or ``name/config``: what ``tfds.builder`` takes."""
        return f"{self.name}/{self.config}" if self.config else self.name


def parse_tfds_spec(text: str) -> TfdsSpec:
    """Split ``[tfds:]NAME[/CONFIG][:SPLIT]`` into its parts, rejecting malformed specs with a DataError.

    The ``:SPLIT`` part restricts what 'train' means and is passed to TFDS as is (its slicing syntax, e.g.
    ``train[:80%]``). TFDS itself uses ``:`` for versions; those are not selectable here, so a version-like
    suffix is refused rather than silently treated as a split name.
    """
    body = text.strip().removeprefix("tfds:")
    head, colon, split = body.partition(":")
    name, slash, config = head.partition("/")
    if not _NAME.fullmatch(name) or (slash and (not config or "/" in config)):
        raise DataError(
            f"tfds:{body}: expected tfds:NAME[/CONFIG][:SPLIT], e.g. tfds:eurosat/rgb:train[:80%]"
        )
    if colon and not split:
        raise DataError(
            f"tfds:{body}: empty split after ':' (drop the ':' or name a split, e.g. :train[:80%])"
        )
    if _VERSION.fullmatch(split):
        raise DataError(
            f"tfds:{body}: {split!r} looks like a TFDS version; versions cannot be chosen here, "
            "the part after ':' is a split (e.g. :train[:80%])"
        )
    return TfdsSpec(name, config or None, split or None)


class TfdsSplit:
    """One split of a prepared TFDS dataset: ``split[i]`` is ``{"image", "label", "id"}``.

    Grain-compatible random access (``__len__``/``__getitem__``). ``indices`` selects records of the TFDS
    split (a carved train/val subset); the id always names the TFDS record, so it is stable across runs.
    The opened TFDS source is dropped when pickled and reopened on first use, so worker processes can
    receive a split without shipping file handles.
    """

    def __init__(
        self,
        dataset: str,
        tfds_split: str,
        *,
        data_dir: str | None,
        image_feature: str,
        label_feature: str,
        num_classes: int,
        indices: np.ndarray | None = None,
        source: Any = None,
    ):
        self.dataset = dataset
        self.tfds_split = tfds_split
        self.data_dir = data_dir
        self.image_feature = image_feature
        self.label_feature = label_feature
        self.num_classes = num_classes
        self._source = source
        self._indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self._length = len(self._indices) if self._indices is not None else len(self._open())

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        position = operator.index(index)
        if position < 0:
            position += self._length
        if not 0 <= position < self._length:
            raise IndexError(f"{self.dataset}:{self.tfds_split}: index {index} out of range ({self._length})")
        record = int(self._indices[position]) if self._indices is not None else position
        example_id = f"{self.dataset}:{self.tfds_split}[{record}]"
        source = self._open()  # outside the try: a missing dataset is not one bad example
        try:
            example = source[record]
        except Exception as error:  # noqa: BLE001 - any decode failure makes only this example unusable
            raise BadImageError(example_id, _one_line(error)) from error
        label = int(example[self.label_feature])
        if not 0 <= label < self.num_classes:  # e.g. -1, which some TFDS datasets use for "unlabelled"
            raise BadImageError(example_id, f"label {label} out of range for {self.num_classes} classes")
        return {"image": _as_hwc(example[self.image_feature], example_id), "label": label, "id": example_id}

    def load(self, index: int) -> np.ndarray:
        """The pipeline's view (data/pipeline.py ExampleSplit): the image alone."""
        return self[index]["image"]

    def example_id(self, index: int) -> str:
        record = int(self._indices[index]) if self._indices is not None else index
        return f"{self.dataset}:{self.tfds_split}[{record}]"

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """Every label of the split, read once without decoding images (class weights need them)."""
        builder = _builder(parse_tfds_spec(self.dataset), self.data_dir)
        labels = _read_labels(builder, self.dataset, self.tfds_split, self.label_feature)
        return labels if self._indices is None else labels[self._indices]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_source"] = None
        return state

    def _open(self) -> Any:
        if self._source is None:
            import tensorflow_datasets as tfds

            self._source = tfds.data_source(
                self.dataset, split=self.tfds_split, data_dir=self.data_dir, download=False
            )
        return self._source


def load_tfds(
    spec: str,
    *,
    data_dir: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[dict[str, TfdsSplit], tuple[str, ...]]:
    """Open a prepared TFDS dataset as splits 'train' / 'val' / 'test' (where present) and its class names.

    ``data_dir`` defaults to TFDS's own default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    Where the dataset has no validation (or test) split, ``val_fraction`` (``test_fraction``) of the
    train split is carved out for one, seeded by ``seed``; 0 for none. EuroSAT, for one, has only
    'train'. Both fractions are of the whole train split.
    """
    parsed = parse_tfds_spec(spec)
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise DataError(f"tfds:{parsed.dataset}: {name} must be in [0, 1), got {fraction}")
    data_dir = str(Path(data_dir).expanduser()) if data_dir is not None else None
    builder = _builder(parsed, data_dir)
    dataset = builder.info.full_name.rsplit("/", 1)[0]  # "name/config/version" -> "name/config"
    features = builder.info.features
    # Catalog code knows the features before preparation: refuse unusable data before anyone prepares it.
    image_feature = _pick_image_feature(features, dataset)
    label_feature = _pick_label_feature(features, dataset)
    class_names = tuple(features[label_feature].names)
    if len(class_names) < 2:
        raise DataError(f"tfds:{dataset}: label feature {label_feature!r} has {len(class_names)} class(es)")
    _check_prepared(builder, dataset)

    def split(tfds_split: str, source: Any, indices: np.ndarray | None = None) -> TfdsSplit:
        return TfdsSplit(
            dataset,
            tfds_split,
            data_dir=data_dir,
            image_feature=image_feature,
            label_feature=label_feature,
            num_classes=len(class_names),
            indices=indices,
            source=source,
        )

    available = list(builder.info.splits)
    train_split = parsed.split or "train"
    if parsed.split is None and "train" not in available:
        held_out = {"test", *_VAL_SPLITS}
        example = next((name for name in available if name not in held_out), available[0])
        raise DataError(
            f"tfds:{dataset}: no 'train' split (has: {', '.join(available)}); "
            f"name the one to train on, e.g. tfds:{dataset}:{example}"
        )
    train_source = _data_source(builder, dataset, train_split)
    # a split trained on cannot also select or test the model ("train+validation", a common recipe):
    # the held-out split it names is carved from the training data instead, as where there is none
    trained_on = {part.split("[")[0].strip() for part in train_split.split("+")}
    if "all" in trained_on:  # TFDS's name for every split together
        trained_on = set(available)
    val_split = next((name for name in _VAL_SPLITS if name in available and name not in trained_on), None)
    has_test = "test" in available and "test" not in trained_on
    carve = {
        "test": test_fraction if not has_test else 0.0,
        "val": val_fraction if val_split is None else 0.0,
    }
    if carve["test"] + carve["val"] >= 1:
        raise DataError(f"tfds:{dataset}: val_fraction + test_fraction must be below 1")
    kept, carved = np.arange(len(train_source)), {}
    if any(carve.values()):
        cheap = _cheap_to_scan(builder)
        labels = _read_labels(builder, dataset, train_split, label_feature) if cheap else None
        whole = len(kept)
        for name, fraction in carve.items():
            if not fraction:
                continue
            # of the whole split: what an earlier carve took is no longer there to share from
            stay, held = _carve_val(len(kept), labels, fraction * whole / len(kept), seed)
            if len(stay) == 0 or len(held) == 0:
                raise DataError(
                    f"tfds:{dataset}:{train_split}: {whole} example(s), too few to carve a {name} split"
                )
            carved[name] = kept[held]
            kept = kept[stay]
            labels = labels[stay] if labels is not None else None
    splits = {"train": split(train_split, train_source, kept if carved else None)}
    if val_split is not None:
        splits["val"] = split(val_split, _data_source(builder, dataset, val_split))
    elif "val" in carved:
        splits["val"] = split(train_split, train_source, carved["val"])
    if has_test:
        splits["test"] = split("test", _data_source(builder, dataset, "test"))
    elif "test" in carved:
        splits["test"] = split(train_split, train_source, carved["test"])
    return splits, class_names


def _carve_val(
    count: int, labels: np.ndarray | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) record indices: stratified per label when ``labels`` is given, else random.

    Stratified: each class with at least two examples gives ``round(fraction * n)`` of them to val, at
    least one and never all, so every such class is both trained on and validated. Both index arrays come
    back sorted, which keeps reads from the record files roughly sequential.
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(count)
        take = min(max(1, round(fraction * count)), count - 1) if count > 1 else 0
        return np.sort(order[take:]), np.sort(order[:take])
    labels = np.asarray(labels)
    val_parts = []
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        if len(members) >= 2:
            val_parts.append(members[: min(max(1, round(fraction * len(members))), len(members) - 1)])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(count), val)
    return train, val


def _builder(spec: TfdsSpec, data_dir: str | None) -> Any:
    """``tfds.builder`` (catalog code, else prepared files in data_dir), or a DataError naming the fix."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(spec.dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        where = data_dir or "the default TFDS data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
        raise DataError(
            f"tfds:{spec.dataset}: no such dataset in the TFDS catalog and none prepared in {where} "
            "(names: https://www.tensorflow.org/datasets/catalog/overview)"
        ) from None
    except (ValueError, AssertionError) as error:  # unknown config or version
        raise DataError(
            f"tfds:{spec.dataset}: {_unknown_config_hint(spec, tfds) or _one_line(error)}"
        ) from None


class _DropMessages(logging.Filter):
    def __init__(self, part: str):
        super().__init__()
        self.part = part

    def filter(self, record: logging.LogRecord) -> bool:
        return self.part not in record.getMessage()


def _check_prepared(builder: Any, dataset: str) -> None:
    """Refuse data that is missing or lacks random access, saying how to prepare it (never preparing here)."""
    import tensorflow_datasets as tfds

    # tfds warns that the folder has no dataset_info.json: the error below says so, with the fix
    absl = logging.getLogger("absl")
    unprepared = _DropMessages("has no dataset_info.json")
    absl.addFilter(unprepared)
    try:
        prepared = builder.is_prepared()
    finally:
        absl.removeFilter(unprepared)
    if not prepared:
        raise DataError(_not_prepared_message(builder, dataset))
    formats = builder.info.available_file_formats()
    if not formats & tfds.core.file_adapters.FileFormat.with_random_access():
        shown = ", ".join(sorted(f.value for f in formats)) or "an unknown format"
        # data_dir is DATA_DIR/name[/config]/version, one level per part of the full name
        root = Path(builder.data_dir).parents[len(builder.info.full_name.split("/")) - 1]
        raise DataError(
            f"tfds:{dataset}: prepared in {builder.data_dir} as {shown}, which has no random access; "
            f"move it away and re-prepare with file_format array_record: {_prepare_command(dataset, root)}"
        )


def _not_prepared_message(builder: Any, dataset: str) -> str:
    # Only catalog code can be unprepared (prepared files are what a code-less builder is made from), and
    # its data_dir_root is the data dir that was searched.
    root = Path(builder.data_dir_root)
    where = f"tfds:{dataset}: not prepared in {root} (looked for {builder.data_dir})"
    command = _prepare_command(dataset, root)
    if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        instructions = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
        return (
            f"{where}; this dataset needs a manual download: put its files in {root / 'downloads/manual'} "
            f"({instructions}), then run {command}"
        )
    return f"{where}; prepare it once with {command}"


def _prepare_command(dataset: str, data_dir: Path) -> str:
    return (
        f"`pip install tensorflow && tfds build {dataset} --data_dir {data_dir} --file_format array_record`"
    )


def _unknown_config_hint(spec: TfdsSpec, tfds: Any) -> str | None:
    """Name the valid configs when the config is what was wrong; None when it was something else."""
    if spec.config is None:
        return None
    try:
        configs = tfds.builder_cls(spec.name).builder_configs
    except tfds.core.registered.DatasetNotFoundError:
        return None
    if spec.config in configs:
        return None
    return f"no config {spec.config!r}; choose one of: {', '.join(configs) or '(none: drop /CONFIG)'}"


def _data_source(builder: Any, dataset: str, tfds_split: str, decoders: dict | None = None) -> Any:
    try:
        return builder.as_data_source(split=tfds_split, decoders=decoders)
    except (ValueError, KeyError) as error:
        raise DataError(
            f"tfds:{dataset}: split {tfds_split!r} is not usable ({_one_line(error)}); "
            f"splits: {', '.join(builder.info.splits)}"
        ) from None


def _cheap_to_scan(builder: Any) -> bool:
    size = int(builder.info.dataset_size)
    return 0 < size <= _STRATIFY_MAX_BYTES


def _read_labels(builder: Any, dataset: str, tfds_split: str, label_feature: str) -> np.ndarray:
    """Every label of a split, in record order, without decoding any image or tensor feature."""
    import tensorflow_datasets as tfds

    features = builder.info.features
    skip = {
        key: tfds.decode.SkipDecoding()
        for key, feature in features.items()
        if key != label_feature and isinstance(feature, (tfds.features.Image, tfds.features.Tensor))
    }
    source = _data_source(builder, dataset, tfds_split, decoders=skip)
    labels = np.empty(len(source), np.int64)
    for start in range(0, len(source), _LABEL_READ_CHUNK):
        stop = min(start + _LABEL_READ_CHUNK, len(source))
        labels[start:stop] = [
            example[label_feature] for example in source.__getitems__(list(range(start, stop)))
        ]
    return labels


def _pick_image_feature(features: Any, dataset: str) -> str:
    import tensorflow_datasets as tfds

    def usable(feature: Any) -> bool:
        dtype = np.dtype(feature.np_dtype)
        numeric = np.issubdtype(dtype, np.number) and not isinstance(feature, tfds.features.ClassLabel)
        return numeric and len(feature.shape) in (2, 3)

    images = [key for key, f in features.items() if isinstance(f, tfds.features.Image) and usable(f)]
    tensors = [key for key, f in features.items() if type(f) is tfds.features.Tensor and usable(f)]
    if "image" in images or "image" in tensors:
        return "image"
    if images:
        return images[0]
    if tensors:
        # max() keeps the first of equals, so ties go to feature order
        return max(tensors, key=lambda key: features[key].shape[-1] if len(features[key].shape) == 3 else 1)
    raise DataError(
        f"tfds:{dataset}: no image feature (an Image, or a numeric Tensor of rank 2 or 3) among "
        f"{', '.join(features.keys())}"
    )


def _pick_label_feature(features: Any, dataset: str) -> str:
    import tensorflow_datasets as tfds

    labels = [key for key, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if "label" in labels:
        return "label"
    if labels:
        return labels[0]
    raise DataError(
        f"tfds:{dataset}: no ClassLabel feature among {', '.join(features.keys())} "
        "(multi-label datasets, with a Sequence(ClassLabel), are not supported from TFDS)"
    )


def _as_hwc(image: Any, example_id: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        return image[:, :, None]
    if image.ndim != 3:
        raise BadImageError(example_id, f"expected an (H, W, C) image, got shape {image.shape}")
    return image


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
