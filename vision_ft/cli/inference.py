"""``embed``, ``eval``, ``predict`` and ``probe``: applying a zoo model or a fit run to data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from vision_ft.cli.errors import UserError
from vision_ft.cli.paths import UserPath
from vision_ft.cli.processes import distributed_options, start_processes
from vision_ft.cli.runtime import command_body
from vision_ft.infer.precision import PRECISIONS
from vision_ft.output_dirs import refuse_unwritable_file
from vision_ft.progress import ProgressBar

precision_option = click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    help="fp32: full float32 on every backend, as timm on a CPU; tf32 or bf16: faster on GPUs/TPUs [fp32].",
)


def _predictor(
    model: str | None, pretrained: str, checkpoint: Path | None, data: str | None, data_dir, precision: str
):
    """The model and preprocessing for embed/eval/predict: a run directory, or a zoo model."""
    from vision_ft.data.sources import DataOptions, load_dataset
    from vision_ft.infer.predictor import from_pretrained, from_run
    from vision_ft.weights.sources import pretrained_from_text

    if (model is None) == (checkpoint is None):
        raise UserError("give exactly one of --model or --checkpoint")
    if checkpoint is not None:
        predictor = from_run(checkpoint, precision=precision)
        if data_dir:
            predictor.data_options = dataclasses.replace(predictor.data_options, data_dir=data_dir)
        return predictor
    options = DataOptions(data_dir=data_dir)
    channels = load_dataset(data, options).channels if data else 3
    predictor = from_pretrained(
        model, pretrained_from_text(pretrained), in_chans=channels, precision=precision
    )
    predictor.data_options = options  # the data is read again with them (TFDS from --data-dir)
    return predictor


def _metadata(predictor, **extra) -> dict:
    cfg = predictor.model.pretrained_cfg
    return {
        "source": predictor.source,
        "model": type(predictor.model).__name__,
        "input_size": list(cfg.input_size),
        "interpolation": predictor.geometry.interpolation,
        "crop_pct": predictor.geometry.eval_crop_pct,
        "crop_mode": predictor.geometry.eval_crop_mode,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "class_names": list(predictor.class_names) if predictor.class_names else None,
        **extra,
    }


@click.command()
@click.option("--model", help="A zoo model (with --pretrained) ...")
@click.option("--pretrained", help="... its weights [true].")
@click.option("--checkpoint", type=UserPath(), help="... or a fit run directory.")
@click.option("--data", required=True, help="A --data spec, as for fit.")
@click.option("--split", default="train", help="train, val, test or all [train].")
@click.option("--output", required=True, type=UserPath(), help=".npz or .parquet file.")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", help="Average with the mirror.")
@click.option("--layer", type=int, help="Pooled output of this stage/block instead (0-based, -1 last).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64)
@click.option("--data-dir", help="TFDS data directory.")
@precision_option
@click.option("--no-progress", is_flag=True)
@distributed_options
@command_body
def embed(
    model, pretrained, checkpoint, data, split, output, tta, layer, batch_size, data_dir, precision,
    no_progress, coordinator, num_processes, process_id,
) -> None:  # fmt: skip
    """Pooled pre-logit embeddings, forward_head(forward_features(x), pre_logits=True), of a split."""
    import numpy as np

    from vision_ft.data.pipeline import bands_convertible
    from vision_ft.data.sources import load_dataset, recorded_data
    from vision_ft.infer.embeddings import Embeddings, check_output_format, embed_split, write_embeddings
    from vision_ft.infer.evaluate import check_split_as_run, empty_split, nothing_readable
    from vision_ft.train.run_dir import read_run_config
    from vision_ft.weights.sources import recorded_pretrained

    check_output_format(output)
    refuse_unwritable_file(output)
    start_processes(coordinator, num_processes, process_id)
    from vision_ft.train.distributed import is_primary

    no_progress = no_progress or not is_primary()
    if checkpoint is not None and pretrained is not None:
        raise UserError("--pretrained is for --model; a run's weights come from --checkpoint")
    pretrained = pretrained or "true"  # unset by default, so that beside --checkpoint it is refused
    predictor = _predictor(model, pretrained, checkpoint, data, data_dir, precision)
    dataset = load_dataset(data, predictor.data_options)
    if checkpoint is not None:
        check_split_as_run(Path(checkpoint), read_run_config(checkpoint), dataset, data)
    names = list(dataset.splits) if split == "all" else [split]
    missing = [n for n in names if n not in dataset.splits]
    if missing:
        raise UserError(f"--split {split}: {data} has splits {', '.join(dataset.splits)}")
    if not bands_convertible(dataset.channels, predictor.channels):
        raise UserError(f"{data} has {dataset.channels} bands; the model takes {predictor.channels}")
    # an empty split (a small folder's val) adds nothing to --split all, and its (0, 0) embeddings
    # would not concatenate with the others
    names = [n for n in names if len(dataset.splits[n])]
    if not names:
        raise empty_split(data, split)
    parts, bad = [], {}
    total = sum(len(dataset.splits[n]) for n in names)
    with ProgressBar("embed", total, enabled=not no_progress) as progress:
        for name in names:
            try:
                part, unreadable = embed_split(
                    predictor, dataset.splits[name], batch_size=batch_size, tta_flip=tta == "flip",
                    layer=layer, on_batch=progress.advance,
                )  # fmt: skip
            except ValueError as e:  # a --layer the model does not have
                raise UserError(str(e)) from None
            parts.append(part)
            bad |= dataset.skipped_from(name) | unreadable  # with rows left out as the data was read
    if not sum(len(p) for p in parts):  # an empty file would look like a finished embedding
        raise nothing_readable("embed", bad)
    result = Embeddings(
        np.concatenate([p.embeddings for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.ids for p in parts]),
        _metadata(
            predictor, data=recorded_data(data), split=split, tta=tta, layer=layer,
            dataset_classes=list(dataset.class_names), multi_label=dataset.multi_label,
            checkpoint=str(checkpoint.absolute()) if checkpoint else None, zoo_model=model,
            pretrained=recorded_pretrained(pretrained) if model else None,
            in_chans=predictor.channels, precision=precision,
        ),
    )  # fmt: skip
    if not is_primary():
        return
    write_embeddings(output, result)
    for path, reason in bad.items():
        click.echo(f"skipped unreadable example {path}: {reason}", err=True)
    click.echo(f"{len(result)} embeddings of dimension {result.embeddings.shape[1]} written to {output}")
    if bad:
        click.echo(f"{len(bad)} unreadable examples skipped")


@click.command(name="eval")
@click.option("--checkpoint", required=True, type=UserPath(), help="A fit run directory.")
@click.option("--data", help="A --data spec [the run's].")
@click.option("--split", default="test", help="[test]")
@click.option("--output", type=UserPath(), help="Report directory [RUN/eval-SPLIT].")
@click.option("--batch-size", type=click.IntRange(min=1), default=64)
@click.option("--data-dir", help="TFDS data directory.")
@precision_option
@command_body
def evaluate(checkpoint, data, split, output, batch_size, data_dir, precision) -> None:
    """Metrics of a run's best weights on a split, with ROC-AUC CI, operating points and calibration."""
    from vision_ft.infer.evaluate import evaluate_run

    report = evaluate_run(checkpoint, data=data, split=split, output=output, batch_size=batch_size,
                          data_dir=data_dir, precision=precision)  # fmt: skip
    m = report["metrics"]
    if "map" in m:  # multi-label: intervals are per class, in the report
        click.echo(
            f"{report['split']}: {m['count']} images  macro AUC {m['auc']:.4f}  mAP {m['map']:.4f}"
            f"  exact-match accuracy {m['accuracy']:.4f}  macro F1 {m['macro_f1']:.4f}"
        )
    else:
        ci = report["clinical"]["auc_ci"]
        click.echo(
            f"{report['split']}: {m['count']} images  AUC {m['auc']:.4f} "
            f"(95% CI {ci['low']:.4f}-{ci['high']:.4f})"
            f"  accuracy {m['accuracy']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}"
            f"  ECE {report['clinical']['ece']:.4f}"
        )
    click.echo(f"report written to {report['output']}")


@click.command()
@click.option("--checkpoint", type=UserPath(), help="A fit run directory ...")
@click.option("--probe", "probe_dir", type=UserPath(), help="... or a probe directory.")
@click.option("--input", "input_", required=True, help="An image file, a folder, or a --data spec.")
@click.option("--split", help="Split of a --data spec [test, else val, else train].")
@click.option("--output", required=True, type=UserPath(), help="CSV file to write.")
@click.option("--top-k", type=click.IntRange(min=1), default=3)
@click.option("--batch-size", type=click.IntRange(min=1), default=64)
@click.option("--data-dir", help="TFDS data directory (for a tfds: --input).")
@precision_option
@command_body
def predict(checkpoint, probe_dir, input_, split, output, top_k, batch_size, data_dir, precision) -> None:
    """Class probabilities and top-k for new images, with the run's own preprocessing."""
    from vision_ft.infer.evaluate import predict_logits
    from vision_ft.infer.predict import named_alike, resolve_input, write_predictions

    if (checkpoint is None) == (probe_dir is None):
        raise UserError("give exactly one of --checkpoint or --probe")
    refuse_unwritable_file(output)
    if checkpoint is not None:
        from vision_ft.infer.predictor import from_run

        predictor, probe = from_run(checkpoint, precision=precision), None
    else:
        from vision_ft.infer.probe_files import load_probe_dir

        try:
            predictor, probe = load_probe_dir(probe_dir, precision=precision)
        except ValueError as e:  # an unreadable probe file
            raise UserError(str(e)) from None
    if data_dir:
        predictor.data_options = dataclasses.replace(predictor.data_options, data_dir=data_dir)
    # a probe embeds with its source run's weights (where it has one): the same check applies
    examples, label_names, left_out = resolve_input(
        input_, predictor.data_options, split, run_dir=predictor.run_dir
    )
    ids, labels, logits, bad = predict_logits(predictor, examples, batch_size=batch_size, probe=probe)
    bad = {**left_out, **bad}  # rows of the split left out as the data was read (a missing file)
    names = predictor.class_names or tuple(f"class {i}" for i in range(logits.shape[1]))
    label_names, names = named_alike(label_names, names)
    write_predictions(
        output, ids, logits, names, labels=labels if label_names else None, label_names=label_names,
        top_k=top_k, multi_label=predictor.multi_label and probe is None,
    )  # fmt: skip
    click.echo(f"{len(ids)} predictions written to {output}")
    for path, reason in bad.items():
        click.echo(f"skipped unreadable image {path}: {reason}", err=True)


@click.command()
@click.option("--train", "train_path", required=True, type=UserPath())
@click.option("--val", "val_path", required=True, type=UserPath())
@click.option("--test", "test_path", type=UserPath())
@click.option("--output", required=True, type=UserPath(), help="Directory to create.")
@click.option("--select", type=click.Choice(["loss", "auc", "accuracy"]), default="loss")
@command_body
def probe(train_path, val_path, test_path, output, select) -> None:
    """Linear probe (logistic regression, L2 chosen on val) and k-NN on embeddings from `embed`."""
    from vision_ft.infer.probe_files import run_probe

    try:
        final = run_probe(train_path, val_path, test_path, output, select=select)
    except ValueError as e:  # the probe's own checks on the embeddings
        raise UserError(str(e)) from None
    for name in ("linear", "knn"):
        result = final[name]
        where = result.get("test") or result["best_val"]
        split = "test" if result.get("test") else "val"
        click.echo(f"{name}: {split} AUC {where['auc']:.4f}  accuracy {where['accuracy']:.4f}")
    click.echo(f"probe written to {output}")
