"""Pooled pre-logit embeddings of a split, and the files that hold them (.npz, or .parquet)."""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vision_ft.data.pipeline import ExampleSplit, unusable_examples
from vision_ft.infer.predictor import Predictor, compiled_forward, run_split

FORMATS = (".npz", ".parquet")


class EmbeddingFileError(ValueError):
    """An embeddings file that cannot be written or read; the message names it."""


@dataclass(frozen=True)
class Embeddings:
    embeddings: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64, -1 where unknown; (N, classes) multi-hot for multi-label data
    ids: np.ndarray  # (N,) str: file paths, or "<split>[i]" for arrays
    metadata: dict  # model, weights, data, split, class names, preprocessing

    def __len__(self) -> int:
        return len(self.labels)


def embed_split(
    predictor: Predictor,
    split: ExampleSplit,
    *,
    batch_size: int = 64,
    tta_flip: bool = False,
    layer: int | None = None,
    devices=None,
    threads: int = 4,
    on_batch=None,
) -> tuple[Embeddings, dict[str, str]]:
    """Embeddings of every readable example of ``split`` (in order), and id -> reason of the
    unreadable ones."""
    forward, n_devices = compiled_forward(
        predictor, "embedding", tta_flip=tta_flip, layer=layer, devices=devices
    )
    batch_size = -(-batch_size // n_devices) * n_devices
    chunks, labels, ids, bad = [], [], [], {}
    for outputs, batch in run_split(predictor, split, forward, batch_size=batch_size, threads=threads):
        keep = batch["mask"] > 0
        chunks.append(outputs)
        labels.append(batch["label"][keep])
        ids.extend(split.example_id(int(r)) for r in batch["row"][keep])
        bad |= unusable_examples(split, batch, predictor.input_geometry)
        if on_batch is not None:
            on_batch(int((batch["row"] >= 0).sum()))
    dim = chunks[0].shape[1] if chunks else 0
    result = Embeddings(
        np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32),
        np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64),
        np.asarray(ids, dtype=str),
        {},
    )
    return result, bad


def check_output_format(path: Path) -> None:
    """Raise ``EmbeddingFileError`` where ``path`` could not be written: checked before embedding,
    so a missing pyarrow does not surface only after all the work."""
    if path.suffix not in FORMATS:
        raise EmbeddingFileError(f"--output {path}: use a .npz or .parquet file name")
    if path.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise EmbeddingFileError("parquet output needs pyarrow: pip install pyarrow") from None


def write_embeddings(path: str | Path, data: Embeddings) -> None:
    """Write ``.npz`` (arrays plus JSON metadata, no pickles) or ``.parquet``; never overwrite."""
    path = Path(path)
    check_output_format(path)
    if path.exists():
        raise EmbeddingFileError(f"--output {path} exists; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(data.metadata)
    table = _parquet_table(data, meta) if path.suffix == ".parquet" else None
    # "xb": another file of that name, made meanwhile, is never overwritten
    with open(path, "xb") as f:
        try:
            if table is None:
                np.savez(
                    f, embeddings=data.embeddings, labels=data.labels, ids=data.ids, metadata=np.asarray(meta)
                )
            else:
                import pyarrow.parquet as pq

                pq.write_table(table, f)
        except BaseException:
            f.close()
            path.unlink(missing_ok=True)  # a partial file would block the rerun ("exists; not overwriting")
            raise


def _parquet_table(data: Embeddings, meta: str):
    import pyarrow as pa  # there: check_output_format looked

    return pa.table(
        {
            "id": pa.array(data.ids.tolist(), pa.string()),
            "label": _column(data.labels),
            "embedding": _column(data.embeddings),
        }
    ).replace_schema_metadata({"vision_ft": meta})


def _column(values: np.ndarray):
    """A parquet column: plain values, or a fixed-size list per row for (N, D) arrays."""
    import pyarrow as pa

    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def read_embeddings(path: str | Path) -> Embeddings:
    """An embeddings file as ``embed`` writes it; ``EmbeddingFileError`` naming the file where it is
    not one (an array of another shape, rows that disagree in number, metadata not an object)."""
    path = Path(path)
    read = _read_embeddings(path)
    if read.embeddings.ndim != 2:
        raise EmbeddingFileError(
            f"{path}: embeddings of shape {read.embeddings.shape}, not (examples, dimensions)"
        )
    labels, ids = read.labels, np.asarray(read.ids)
    if labels.ndim not in (1, 2) or ids.ndim != 1 or not len(labels) == len(ids) == len(read.embeddings):
        raise EmbeddingFileError(
            f"{path}: {len(read.embeddings)} embeddings, labels of shape {labels.shape} and ids of shape "
            f"{ids.shape}; they must be one per example"
        )
    if not isinstance(read.metadata, dict):
        raise EmbeddingFileError(f"{path}: its metadata is not a JSON object")
    check_metadata_fields(path, read.metadata)
    return read


# the metadata fields that probe and predict act on, as embed writes them (each may be null)
_METADATA_FIELDS = {
    "checkpoint": (str, "a run directory"),
    "zoo_model": (str, "a model name"),
    "pretrained": ((str, bool), "a weights source"),
    "data": (str, "a --data spec"),
    "tta": (str, "none or flip"),
    "in_chans": (int, "a positive channel count"),
    "layer": (int, "a stage or block index"),
    "dataset_classes": (list, "a list of class names"),
}


def check_metadata_fields(where: str | Path, metadata: dict) -> None:
    """Raise ``EmbeddingFileError`` naming ``where`` if a field embed writes has another type: a file
    made or edited by hand would otherwise fail later, in the middle of a probe or a prediction."""
    for key, (kinds, what) in _METADATA_FIELDS.items():
        value = metadata.get(key)
        if value is None:
            continue
        fits = isinstance(value, kinds) and (not isinstance(value, bool) or kinds == (str, bool))
        if fits and key == "in_chans":
            fits = value > 0
        if fits and key == "dataset_classes":
            fits = all(isinstance(name, str) for name in value)
        if not fits:
            raise EmbeddingFileError(f"{where}: metadata {key} {value!r} is not {what}")


def _class_indices(path: Path, labels: np.ndarray) -> np.ndarray:
    """Labels as int64, refusing values a cast would change (0.6 would become class 0)."""
    if labels.dtype.kind in "biu":
        return labels.astype(np.int64)
    if labels.dtype.kind != "f":
        raise EmbeddingFileError(f"{path}: labels of type {labels.dtype}, not class indices")
    # NaN is never equal, and inf (which equals its rounding) is no index: both refused too
    fractional = (labels != np.round(labels)) | ~np.isfinite(labels) | (np.abs(labels) >= 2**62)
    if fractional.any():
        raise EmbeddingFileError(f"{path}: label {labels[fractional].flat[0]} is not a whole class index")
    return labels.astype(np.int64)


def _read_embeddings(path: Path) -> Embeddings:
    if not path.is_file():
        missing = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise EmbeddingFileError(f"embeddings file {path} {missing}")
    if path.suffix != ".parquet" and not zipfile.is_zipfile(path):  # numpy: "pickled data"
        raise EmbeddingFileError(f"embeddings file {path} is not an .npz archive")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            flat = table.column("embedding").combine_chunks()
            embeddings = np.asarray(flat.values, np.float32).reshape(len(table), -1)
            meta = (table.schema.metadata or {}).get(b"vision_ft", b"{}").decode()
            labels = table.column("label").combine_chunks()
            if hasattr(labels, "flatten"):  # multi-hot rows, a fixed-size list per example
                labels = np.asarray(labels.flatten()).reshape(len(table), -1)
            return Embeddings(
                embeddings,
                _class_indices(path, np.asarray(labels)),
                np.asarray(table.column("id").to_pylist(), dtype=str),
                json.loads(meta),
            )
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("embeddings", "labels", "ids") if k not in f.files]
            if missing:
                raise EmbeddingFileError(f"{path}: not an embeddings file (no {', '.join(missing)})")
            meta = json.loads(str(f["metadata"])) if "metadata" in f.files else {}
            return Embeddings(
                f["embeddings"].astype(np.float32), _class_indices(path, f["labels"]), f["ids"], meta
            )
    except EmbeddingFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to parse is a bad file, reported in one line
        raise EmbeddingFileError(f"{path}: unreadable embeddings file ({type(e).__name__}: {e})") from None
