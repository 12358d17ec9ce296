"""``vision-ft eval``: a run's best weights on a split, with the metrics of ``fit`` and a clinical report."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy.special import expit, softmax

from vision_ft.data.errors import DataError
from vision_ft.data.pipeline import ExampleSplit, bands_convertible, unusable_examples
from vision_ft.data.sources import load_dataset, recorded_data
from vision_ft.data.splitting import matches_split_file
from vision_ft.infer.predictor import Predictor, compiled_forward, from_run, run_split
from vision_ft.output_dirs import absent_directories, make_directory, refuse_used_directory, remove_empty
from vision_ft.train.clinical import clinical_report
from vision_ft.train.metrics import classification_metrics
from vision_ft.train.multilabel import as_multi_hot, multilabel_clinical_report, multilabel_metrics
from vision_ft.train.report import write_json
from vision_ft.train.run_dir import RunDirError, read_run_config, unnamed_classes

log = logging.getLogger("vision_ft.eval")


def predict_logits(
    predictor: Predictor, examples: ExampleSplit, *, batch_size: int = 64, probe=None
) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, str]]:
    """(ids, labels, logits) of the readable examples, in order, and id -> reason of the unreadable
    ones. With a linear ``probe``, logits are the probe's on the model's embeddings."""
    output = "embedding" if probe is not None else "logits"
    layer = predictor.layer if probe is not None else None
    forward, n_devices = compiled_forward(
        predictor, output, tta_flip=predictor.tta_flip, tta_shift=predictor.tta_shift, layer=layer
    )
    batch_size = -(-batch_size // n_devices) * n_devices
    ids, labels, outputs, bad = [], [], [], {}
    for out, batch in run_split(predictor, examples, forward, batch_size=batch_size):
        keep = batch["mask"] > 0
        ids += [examples.example_id(int(r)) for r in batch["row"][keep]]
        bad |= unusable_examples(examples, batch, predictor.input_geometry)
        labels.append(batch["label"][keep])
        outputs.append(out)
    if not outputs or not ids:
        raise nothing_readable("predict", bad)
    logits = np.concatenate(outputs)
    if probe is not None:
        logits = probe.logits(logits)
    return ids, np.concatenate(labels).astype(np.int64), logits, bad


def nothing_readable(task: str, bad: dict[str, str]) -> DataError:
    """The error where no image of the data could be used, naming the first unusable one and why (a
    band count the model does not take, a broken file...)."""
    culprit = ""
    if bad:
        path, reason = next(iter(bad.items()))
        culprit = f": {path}: {reason}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
    return DataError(f"no readable images to {task}{culprit}")


def empty_split(spec: str, split: str) -> DataError:
    """The error where a split has no examples at all: a small folder's default val_fraction can
    round the val split down to nothing, which is not a matter of unreadable images."""
    if split == "all":
        return DataError(f"--split all: every split of {spec} is empty (no examples)")
    return DataError(f"--split {split}: the {split} split of {spec} is empty (no examples)")


def check_split_as_run(run_dir: Path, config: dict, dataset, spec: str) -> None:
    """Where ``spec`` names the run's own data, however spelled, refuse it unless it still splits
    as the run did (eval, predict and embed on its "test" would score images it trained on)."""
    if recorded_data(spec) == recorded_data(config["data"]):
        _check_split_as_fitted(run_dir, config, dataset, spec)


def _check_split_as_fitted(run_dir: Path, config: dict, dataset, spec: str) -> None:
    """Raise ``DataError`` where the run's data, split again now, would not give the split the run
    was evaluated on (a folder that gained an image redraws every class): its test images could
    include ones the run trained on. The run's own split stays readable from its ``splits.csv``."""
    sizes = {name: len(part) for name, part in dataset.splits.items()}
    recorded = run_dir / "splits.csv"
    changed = config.get("split_sizes") not in (None, sizes)
    if not changed and dataset.index is not None and recorded.is_file():
        changed = not matches_split_file(recorded, dataset.index.splits, dataset.class_names)
    if changed:
        own = f"; evaluate the run's own split with --data csv:{recorded}" if recorded.is_file() else ""
        raise DataError(
            f"{spec} no longer splits as the run {run_dir} was evaluated on (images added, removed or "
            f"moved){own}"
        )


def _free_directory(run_dir: Path, split: str) -> Path:
    """``RUN/eval-SPLIT``, or ``-2``, ``-3``...: an earlier report is never overwritten."""
    candidate, n = run_dir / f"eval-{split}", 1
    while candidate.exists():
        n += 1
        candidate = run_dir / f"eval-{split}-{n}"
    return candidate


def evaluate_run(
    run_dir: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    output: str | Path | None = None,
    batch_size: int = 64,
    data_dir: str | None = None,
    precision: str = "fp32",
) -> dict:
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    spec = data or config.get("data")
    if not isinstance(spec, str):
        raise RunDirError(f"{run_dir / 'config.json'} records no data to evaluate on; give --data")
    predictor = from_run(run_dir, precision=precision)
    if data_dir:
        import dataclasses

        predictor.data_options = dataclasses.replace(predictor.data_options, data_dir=data_dir)
    dataset = load_dataset(spec, predictor.data_options)
    if split not in dataset.splits:
        raise DataError(f"--split {split}: {spec} has splits {', '.join(dataset.splits)}")
    if not len(dataset.splits[split]):
        raise empty_split(spec, split)
    if not bands_convertible(dataset.channels, predictor.channels):
        raise DataError(f"{spec} has {dataset.channels} bands; the run's model takes {predictor.channels}")
    check_split_as_run(run_dir, config, dataset, spec)
    if dataset.multi_label and not predictor.multi_label:
        raise DataError(f"{spec} has multi-label rows (a|b); the run was trained on single labels")
    to_run_classes = run_class_order(spec, dataset.class_names, tuple(predictor.class_names or ()))
    out = Path(output) if output is not None else _free_directory(run_dir, split)
    refuse_used_directory(out)
    made = absent_directories(out)
    make_directory(out)  # before the predictions: an --output that cannot be made fails first
    try:
        ids, labels, logits, bad = predict_logits(predictor, dataset.splits[split], batch_size=batch_size)
    except BaseException:
        remove_empty(made)  # or the next eval's report would go to eval-SPLIT-2
        raise
    # the rows left out as the data was read (a CSV row naming a missing file) count, as in fit's
    bad = {**dataset.skipped_from(split), **bad}
    if to_run_classes is not None:
        labels = reorder_labels(labels, to_run_classes)
    names = predictor.class_names
    # the loss weighs classes as fit's did (class_weights: auto); runs before it was recorded, evenly
    weights = config.get("loss_class_weights")
    class_weights = np.asarray(weights, np.float64) if weights is not None else None
    # probabilities in float64, as fit's test report takes them: float32 rounds confident ones to 1.0,
    # where their ties give another AUC than the metrics' (computed from the logits)
    logits64 = np.asarray(logits, np.float64)
    if predictor.multi_label:
        # a manifest whose rows happen to carry one label each is still scored per class
        labels = as_multi_hot(labels, len(names))
        metrics = multilabel_metrics(labels, logits, class_weights)
        clinical = multilabel_clinical_report(labels, expit(logits64), ids, names, out, prefix=split)
    else:
        metrics = classification_metrics(labels, logits, class_weights)
        clinical = clinical_report(labels, softmax(logits64, axis=1), ids, names, out, prefix=split)
    report = {
        "checkpoint": str(run_dir),
        "data": spec,
        "split": split,
        "precision": precision,
        "metrics": metrics,
        "clinical": clinical,
        "bad_examples": {"count": len(bad), "examples": bad},
        "output": str(out),
    }
    write_json(out / "eval.json", report)
    return report


def run_class_order(spec: str, data_names: tuple[str, ...], run_names: tuple[str, ...]) -> np.ndarray | None:
    """For each of the data's classes, the index of the run's class of the same name; ``None`` when
    they are already the same. Unnamed classes match by position; different classes are an error."""
    if len(data_names) != len(run_names):
        raise DataError(f"{spec} has {len(data_names)} classes; the run was trained on {len(run_names)}")
    if data_names == run_names or unnamed_classes(data_names) or unnamed_classes(run_names):
        return None
    if sorted(data_names) != sorted(run_names):
        raise DataError(
            f"{spec} has classes {', '.join(data_names)}; the run was trained on {', '.join(run_names)}"
        )
    return np.asarray([run_names.index(name) for name in data_names])


def reorder_labels(labels: np.ndarray, to_run_classes: np.ndarray) -> np.ndarray:
    if labels.ndim == 2:  # multi-hot: column j of the data is column to_run_classes[j] of the run
        reordered = np.zeros_like(labels)
        reordered[:, to_run_classes] = labels
        return reordered
    return np.where(labels >= 0, to_run_classes[np.maximum(labels, 0)], labels)
