"""``vision-ft probe``: fit a linear probe and a k-NN baseline on embedding files, and save the probe
with what ``predict`` needs to embed new images the same way."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from vision_ft.data.errors import DataError
from vision_ft.data.sources import recorded_data
from vision_ft.infer.embeddings import Embeddings, check_metadata_fields, read_embeddings
from vision_ft.infer.predictor import Predictor, embedding_dim, from_pretrained, from_run
from vision_ft.output_dirs import make_directory, refuse_used_directory
from vision_ft.train.metrics import classification_metrics
from vision_ft.train.probe import (
    LinearProbe,
    check_embeddings,
    fit_knn,
    fit_linear_probe,
    knn_log_probabilities,
    knn_probabilities,
)
from vision_ft.train.report import write_json
from vision_ft.weights.sources import pretrained_from_text, recorded_pretrained

PROBE_FILE, SOURCE_FILE = "probe.npz", "probe.json"
# embed's metadata that decides what a feature or a label index means: files that differ in any of
# them cannot share a probe. Not the data spec or split (each file's own), nor the precision (bf16
# and fp32 embeddings of one model agree closely, and predict computes at its own --precision)
SAME_IN_EVERY_FILE = (
    "checkpoint", "zoo_model", "pretrained", "model", "in_chans", "layer", "tta", "input_size",
    "interpolation", "crop_pct", "crop_mode", "mean", "std", "dataset_classes", "multi_label",
)  # fmt: skip


def _class_names(train: Embeddings, others: list[Embeddings]) -> tuple[str, ...]:
    names = train.metadata.get("dataset_classes")
    num_classes = int(max(e.labels.max() for e in [train, *others] if len(e))) + 1
    if names and len(names) >= num_classes:
        return tuple(names)
    return tuple(f"class {i}" for i in range(num_classes))


def _check_made_alike(train_path: Path, train: Embeddings, others: dict[Path, Embeddings]) -> None:
    """Raise ``DataError`` where a file's metadata says its embeddings were made otherwise than
    train's (another model, layer, preprocessing or class list). A field either file lacks (arrays
    made elsewhere) is not compared."""
    for path, part in others.items():
        for key in SAME_IN_EVERY_FILE:
            if key not in train.metadata or key not in part.metadata:
                continue
            if _comparable(key, train.metadata[key]) != _comparable(key, part.metadata[key]):
                raise DataError(
                    f"{path}: {key} {part.metadata[key]!r}, but {train.metadata[key]!r} in the train "
                    f"file {train_path}; a probe needs embeddings made the same way"
                )


def _comparable(key: str, value):
    """One weights source, however a file recorded it: embed used to keep --pretrained as typed
    ("True", a relative path), and a run reached through a symlink or ``..`` is the same run."""
    if key == "pretrained" and isinstance(value, str):
        value = recorded_pretrained(value)
    if key == "data" and isinstance(value, str):  # files embedded before it was recorded absolute
        value = recorded_data(value)
    if key in ("checkpoint", "pretrained") and isinstance(value, str) and Path(value).is_absolute():
        return str(Path(value).resolve())
    return value


def _check_values(path: Path, part: Embeddings, role: str, train: Embeddings) -> None:
    """Raise ``DataError`` naming the file where its values would fail the probe, or pass it wrongly:
    the probe's own checks would name an array (``val_x``) instead, and a label beyond the classes
    would quietly add classes of its own. Embeddings get the probe's checks, under the file's name."""
    try:
        check_embeddings(part.embeddings, str(path), train.embeddings.shape[1])
    except ValueError as e:
        raise DataError(str(e)) from None
    if (part.labels < 0).any():
        first = int(np.flatnonzero(part.labels < 0)[0])
        why = "cannot train a probe" if role == "train" else "cannot evaluate a probe"
        raise DataError(f"{path}: unlabelled examples (label {part.labels[first]} at row {first}) {why}")
    names = train.metadata.get("dataset_classes")
    if names:
        limit, what = len(names), f"the {len(names)} classes its embeddings were made with"
    else:  # arrays made elsewhere: the train file's labels are the classes
        limit, what = int(train.labels.max()) + 1, f"the train file's classes 0-{int(train.labels.max())}"
    beyond = part.labels >= limit
    if beyond.any():
        first = int(np.flatnonzero(beyond)[0])
        raise DataError(f"{path}: label {part.labels[first]} at row {first} is outside {what}")


_WHY_DISJOINT = {
    "train": "a probe must be scored on examples it was not fitted on",
    "val": "the test split must hold examples that chose none of the probe's settings",
}


def _check_disjoint(files: dict[str, tuple[Path, Embeddings]]) -> None:
    """Raise ``DataError`` where two of the files (by role: train, val, test) share an example (a
    train file from ``embed --split all``, a test file that is the val file): the probe would look
    better than it is. Only ids embed wrote are compared, and not the ``train[i]`` of two different
    npz: files, which name rows of different arrays."""
    roles = list(files)
    for n, earlier in enumerate(roles):
        earlier_path, earlier_part = files[earlier]
        earlier_ids = set(earlier_part.ids.tolist())
        for later in roles[n + 1 :]:
            path, part = files[later]
            specs = [_comparable("data", e.metadata.get("data")) for e in (earlier_part, part)]
            if None in specs or (specs[0] != specs[1] and all(s.startswith("npz:") for s in specs)):
                continue
            shared = [i for i in part.ids.tolist() if i in earlier_ids]
            if shared:
                raise DataError(
                    f"{path}: {len(shared)} of its {len(part)} examples are in the {earlier} file "
                    f"{earlier_path} too (first: {shared[0]}); {_WHY_DISJOINT[earlier]}"
                )


def _public(metrics: dict) -> dict:
    keep = ("loss", "accuracy", "balanced_accuracy", "macro_f1", "auc", "confusion_matrix", "count")
    return {k: metrics[k] for k in keep}


def run_probe(
    train_path: Path, val_path: Path, test_path: Path | None, output: Path, *, select: str = "loss"
) -> dict:
    started = time.time()
    output = Path(output)
    refuse_used_directory(output)
    train, val = read_embeddings(train_path), read_embeddings(val_path)
    test = read_embeddings(test_path) if test_path is not None else None
    splits = [e for e in (val, test) if e is not None]
    for path, part in zip((train_path, val_path, test_path), [train, *splits], strict=False):
        if not len(part):
            raise DataError(f"{path}: no examples in this embeddings file")
        if part.labels.ndim != 1:
            raise DataError(
                f"{path}: multi-label embeddings; the probe is a multinomial (one label per image) model"
            )
    missing = _missing_source(train.metadata)
    if missing:  # checked now: the probe directory would be one predict --probe cannot load
        raise DataError(
            f"{train_path}: its metadata names no checkpoint, and misses {', '.join(missing)}; predict "
            "could not embed new images as it was made (use files from vision-ft embed)"
        )
    others = dict(zip((val_path, test_path), splits, strict=False))
    _check_made_alike(train_path, train, others)
    roles = {"train": (train_path, train), "val": (val_path, val)}
    if test is not None:
        roles["test"] = (test_path, test)
    _check_disjoint(roles)
    for role, (path, part) in roles.items():
        _check_values(path, part, role, train)
    names = _class_names(train, splits)
    probe, sweep = fit_linear_probe(
        train.embeddings, train.labels, val.embeddings, val.labels, class_names=names, select=select
    )
    k, k_sweep = fit_knn(train.embeddings, train.labels, val.embeddings, val.labels, num_classes=len(names))

    def knn_metrics(part: Embeddings) -> dict:
        probs = knn_probabilities(
            train.embeddings, train.labels, part.embeddings, k=k, num_classes=len(names)
        )
        return _public(classification_metrics(part.labels, knn_log_probabilities(probs)))

    linear = {
        "l2": probe.l2,
        "best_val": _public(classification_metrics(val.labels, probe.logits(val.embeddings))),
    }
    knn = {"k": k, "best_val": knn_metrics(val)}
    if test is not None:
        linear["test"] = _public(classification_metrics(test.labels, probe.logits(test.embeddings)))
        knn["test"] = knn_metrics(test)
    make_directory(output)
    probe.save(output / PROBE_FILE)
    (output / SOURCE_FILE).write_text(json.dumps(train.metadata, indent=2) + "\n")
    final = {
        "best_val": linear["best_val"],
        "test": linear.get("test"),
        "linear": {**linear, "l2_sweep": sweep},
        "knn": {**knn, "k_sweep": k_sweep},
        "embeddings": {
            "train": str(train_path),
            "val": str(val_path),
            "test": str(test_path) if test_path else None,
        },
        "wall_seconds": round(time.time() - started, 1),
    }
    write_json(output / "final.json", final)
    return final


def load_probe_dir(directory: Path, *, precision: str = "fp32") -> tuple[Predictor, LinearProbe]:
    """The probe and a predictor that embeds images as the probe's training embeddings were made,
    computing at ``precision``."""
    directory = Path(directory)
    if not (directory / PROBE_FILE).is_file() or not (directory / SOURCE_FILE).is_file():
        raise DataError(f"--probe {directory}: not a probe directory (needs {PROBE_FILE} and {SOURCE_FILE})")
    source = _probe_source(directory / SOURCE_FILE)
    probe = LinearProbe.load(directory / PROBE_FILE)
    if source.get("checkpoint"):
        predictor = from_run(source["checkpoint"], precision=precision)
    else:
        pretrained = pretrained_from_text(str(source["pretrained"]))
        predictor = from_pretrained(
            source["zoo_model"], pretrained, in_chans=source["in_chans"], precision=precision
        )
    predictor.class_names = tuple(probe.class_names)
    predictor.tta_flip = source.get("tta") == "flip"
    predictor.tta_shift = 0.0  # embed averages mirrors only, whatever the run evaluated with
    predictor.layer = source.get("layer")
    try:
        dim = embedding_dim(predictor, predictor.layer)
    except ValueError as e:
        raise DataError(f"{directory / SOURCE_FILE}: {e}") from None
    if dim != probe.weights.shape[0]:  # a run directory fitted again, or a probe.npz from elsewhere
        raise DataError(
            f"--probe {directory}: its probe takes embeddings of dimension {probe.weights.shape[0]}, but "
            f"{predictor.source} gives {dim}"
        )
    return predictor, probe


def _probe_source(path: Path) -> dict:
    """What ``probe`` saved of its training embeddings' metadata: how to embed new images the same way."""
    try:
        source = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if not isinstance(source, dict):
        raise DataError(f"{path}: not the metadata of a probe's embeddings (a JSON object)")
    try:
        check_metadata_fields(path, source)
    except ValueError as e:
        raise DataError(str(e)) from None
    missing = _missing_source(source)
    if missing:
        raise DataError(f"{path}: names no checkpoint, and misses {', '.join(missing)}")
    return source


def _missing_source(metadata: dict) -> list[str]:
    """What ``metadata`` lacks to make its model again: a run directory, or a zoo model and weights."""
    needed = () if metadata.get("checkpoint") else ("pretrained", "zoo_model", "in_chans")
    return [key for key in needed if metadata.get(key) is None]
