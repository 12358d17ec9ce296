"""The ``vision-ft`` command line."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from importlib import resources
from pathlib import Path

import click

from vision_ft.cpu_runtime import keep_freed_host_memory
from vision_ft.data.errors import DataError
from vision_ft.infer.embeddings import EmbeddingFileError
from vision_ft.models.registry import UnknownModelError
from vision_ft.progress import ProgressBar
from vision_ft.train.checkpoint import CheckpointMismatchError
from vision_ft.train.config import ConfigError, FitConfig
from vision_ft.train.rules import RuleError
from vision_ft.train.run_dir import RunDirError
from vision_ft.weights.mapping import WeightLoadError
from vision_ft.weights.sources import WeightSourceError

# Errors that mean "the user's input is wrong": a message, exit code 2, no traceback.
USER_ERRORS = (
    WeightSourceError,
    WeightLoadError,
    UnknownModelError,
    ConfigError,
    DataError,
    RuleError,
    CheckpointMismatchError,
    EmbeddingFileError,
    RunDirError,
)


class UserError(click.ClickException):
    exit_code = 2


def user_errors_exit_2(command):
    """Turn the user-input errors raised below a command into one-line messages with exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as e:
            raise UserError(e.args[0] if e.args else str(e)) from None

    return wrapper


class _OneLineErrors(click.Group):
    """Click's usage errors, too, become one ``error:`` line with exit code 2."""

    def main(self, *args, **kwargs):
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except click.ClickException as e:
            hint = f" (see {e.ctx.command_path} --help)" if isinstance(e, click.UsageError) and e.ctx else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(2)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
def main(verbose: bool) -> None:
    """vision-ft: fine-tune and apply timm backbones in JAX."""
    # our own handler: jax/absl may have configured the root logger already, so basicConfig
    # could silently do nothing
    logger = logging.getLogger("vision_ft")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    logging.getLogger("absl").setLevel(logging.WARNING)
    keep_freed_host_memory()


def _distributed_options(command):
    """Explicit multi-process options; TPU VM slices, SLURM and Open MPI are detected without them."""
    for option in reversed(
        [
            click.option("--coordinator", help="host:port of process 0, for a multi-process run."),
            click.option("--num-processes", type=int, help="Number of processes in the run."),
            click.option("--process-id", type=int, help="This process's index, 0-based."),
        ]
    ):
        command = option(command)
    return command


def _start_processes(coordinator, num_processes, process_id) -> None:
    from vision_ft.train.distributed import initialize, is_primary

    if initialize(coordinator, num_processes, process_id) and not is_primary():
        logging.getLogger("vision_ft").setLevel(logging.WARNING)  # one process speaks for the run


@main.command()
@click.argument("pattern", default="*")
@click.option("--pretrained", is_flag=True, help="Only models with pretrained weights.")
@user_errors_exit_2
def models(pattern: str, pretrained: bool) -> None:
    """List architectures matching PATTERN (shell wildcards) with size, input and weight tags."""
    from rich.console import Console
    from rich.table import Table

    from vision_ft.models.registry import all_entries, list_models
    from vision_ft.models.summary import parameter_count

    names = list_models(pattern)
    entries = all_entries()
    if pretrained:
        names = [n for n in names if entries[n].tags]
    if not names:
        raise UserError(f"no model matches {pattern!r}")
    table = Table("model", "params (M)", "input", "default tag", "pretrained tags")
    for name in names:
        entry = entries[name]
        cfg = entry.default_cfg
        table.add_row(
            name,
            f"{parameter_count(name) / 1e6:.2f}",
            "x".join(str(s) for s in cfg.input_size[1:]),
            cfg.tag,
            ", ".join(entry.tags),
        )
    Console(width=200).print(table)


@main.command()
@click.argument("image", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "model_name", default="tf_efficientnet_lite0", show_default=True)
@click.option(
    "--pretrained",
    default="true",
    show_default=True,
    help="'true' (default weights, offline where possible), 'hf-hub:timm/NAME.TAG' or a checkpoint file.",
)
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, 1000))
@user_errors_exit_2
def classify(image: Path | None, model_name: str, pretrained: str, top_k: int) -> None:
    """Classify IMAGE (default: a bundled photo) into ImageNet classes."""
    import jax
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from vision_ft.data.transforms import eval_transform
    from vision_ft.models.factory import create_model

    spec: bool | str = True if pretrained.lower() == "true" else pretrained
    model = create_model(model_name, pretrained=spec)
    if model.num_classes != 1000:
        raise UserError(
            f"{model_name} with these weights has {model.num_classes} classes, not ImageNet's 1000"
        )
    image = image or Path(str(resources.files("vision_ft") / "assets" / "chelsea.png"))
    try:
        with Image.open(image) as img:
            pixels = eval_transform(img, model.pretrained_cfg)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {image}: {e}") from None
    logits = model(pixels[None])
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))[0]
    labels = (resources.files("vision_ft") / "assets" / "imagenet_classes.txt").read_text().splitlines()
    click.echo(f"{image.name}  ({model_name}, {model.pretrained_cfg.input_size[1]} px)")
    for idx in np.argsort(-probs)[:top_k]:
        click.echo(f"  {probs[idx]:7.4f}  {idx:4d}  {labels[idx]}")


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="YAML file of fit settings.")
@click.option("--model", help="timm architecture name [tf_efficientnet_lite0].")
@click.option(
    "--pretrained",
    help="true, false, hf-hub:timm/NAME.TAG, a checkpoint file, or run:DIR (an earlier run's best "
    "weights, new head if the classes differ) [true].",
)
@click.option(
    "--data",
    help="npz:PATH (MedMNIST layout), folder:DIR, csv:FILE or tfds:NAME[/CONFIG][:SPLIT] "
    "[bundled BreastMNIST].",
)
@click.option("--data-dir", help="TFDS data directory (prepared datasets).")
@click.option("--val-fraction", type=float, help="Validation share for data without a val split [0.1].")
@click.option("--test-fraction", type=float, help="Test share for data without a test split [0].")
@click.option("--window", help="DICOM window CENTER,WIDTH [the file's].")
@click.option("--on-bad-image", type=click.Choice(["skip", "fail"]), help="Unusable images [skip].")
@click.option("--workers", type=int, help="Decoding worker processes [0: threads].")
@click.option("--modality", type=click.Choice(["auto", "natural", "overhead", "medical"]))
@click.option("--mixup", type=float, help="Mixup Beta alpha [0: off].")
@click.option("--cutmix", type=float, help="CutMix Beta alpha [0: off].")
@click.option("--img-size", type=int)
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--lr", type=float)
@click.option(
    "--freeze", help="Comma-separated regexes or groups (stem, blocks.N[-M], stages.N, head, backbone)."
)
@click.option("--layer-decay", type=float, help="Layer-wise LR decay, e.g. 0.75.")
@click.option("--class-weights", type=click.Choice(["none", "auto"]))
@click.option("--recipe", type=click.Choice(["standard", "fine_tune"]))
@click.option("--precision", type=click.Choice(["fp32", "bf16"]))
@click.option(
    "--mesh", help="Device mesh data=N,fsdp=M: shard weights and optimizer state over M [data only]."
)
@click.option("--train-bn/--no-train-bn", default=None, help="Update BatchNorm statistics of frozen layers.")
@click.option("--seed", type=int)
@click.option("--output", help="Run directory [runs/fit].")
@click.option("--checkpoint-dir", help="Where checkpoints go [OUTPUT/checkpoints]; may be gs://BUCKET/PATH.")
@click.option("--resume", is_flag=True, default=None, help="Continue the run in --output exactly.")
@click.option("--no-progress", is_flag=True, help="Log instead of drawing a progress bar.")
@_distributed_options
@user_errors_exit_2
def fit(
    config_path: Path | None, no_progress: bool, coordinator, num_processes, process_id, **overrides
) -> None:
    """Fine-tune a pretrained backbone (default: tf_efficientnet_lite0 on bundled BreastMNIST)."""
    from vision_ft.train.config import load_config
    from vision_ft.train.distributed import check_same_settings, is_primary
    from vision_ft.train.loop import FitRun, RunDirError
    from vision_ft.train.preemption import EXIT_PREEMPTED, Preempted

    cfg = load_config(config_path, overrides, base=_resumed_settings(config_path, overrides))
    _start_processes(coordinator, num_processes, process_id)
    check_same_settings(cfg.to_dict())
    try:
        final = FitRun(cfg, progress=not no_progress).run()
    except (RunDirError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    except Preempted as e:
        click.echo(f"stopped: {e}", err=True)
        sys.exit(EXIT_PREEMPTED)
    test = final.get("test")
    if not is_primary():
        return
    if test:
        click.echo(
            f"test AUC {test['auc']:.4f}  accuracy {test['accuracy']:.4f}  balanced accuracy "
            f"{test['balanced_accuracy']:.4f}  macro-F1 {test['macro_f1']:.4f}  "
            f"({final['wall_seconds']:.0f} s)"
        )
    click.echo(f"run written to {cfg.output}")


def _resumed_settings(config_path: Path | None, overrides: dict) -> dict | None:
    """``fit --resume`` without ``--config`` continues with the settings the run was started with."""
    from vision_ft.train.config import FitConfig
    from vision_ft.train.run_dir import read_run_config

    if not overrides.get("resume") or config_path is not None:
        return None
    run = Path(overrides.get("output") or FitConfig.output)
    return read_run_config(run) if (run / "config.json").is_file() else None


@main.command()
@click.option("--data", required=True, help="A --data spec, as for fit.")
@click.option("--model", default="tf_efficientnet_lite0", help="Model whose input geometry to use.")
@click.option("--img-size", type=int, default=FitConfig.img_size, help="Input side, as fit's.")
@click.option("--split", default="train")
@click.option("--data-dir", help="TFDS data directory.")
@click.option("--window", help="DICOM window CENTER,WIDTH.")
@click.option("--output", type=click.Path(path_type=Path), help="Also write the statistics as YAML.")
@user_errors_exit_2
def stats(data, model, img_size, split, data_dir, window, output) -> None:
    """Per-band mean and std of a split, in the scale the model is fed (for non-RGB data).

    Pass them to fit as `mean:` / `std:` in a config; fit computes them itself for data with other
    than 1 or 3 bands.
    """
    import yaml

    from vision_ft.data.pipeline import Geometry
    from vision_ft.data.sources import DataOptions, load_dataset
    from vision_ft.data.stats import band_statistics
    from vision_ft.models.registry import get_model_entry
    from vision_ft.train.config import load_config

    window_values = load_config(None, {"window": window}).window
    dataset = load_dataset(data, DataOptions(data_dir=data_dir, window=window_values))
    if split not in dataset.splits:
        raise UserError(f"--split {split}: {data} has splits {', '.join(dataset.splits)}")
    interpolation = get_model_entry(model).default_cfg.interpolation
    geometry = Geometry(img_size, interpolation, 1.0, channels=dataset.channels)
    mean, std, used = band_statistics(dataset.splits[split], geometry)
    text = yaml.safe_dump({"mean": list(mean), "std": list(std)}, default_flow_style=True)
    click.echo(f"# {used} images of {data} ({split}), {dataset.channels} bands")
    click.echo(text, nl=False)
    if output is not None:
        if output.exists():
            raise UserError(f"--output {output} exists; not overwriting it")
        output.write_text(text)


def _predictor(model: str | None, pretrained: str, checkpoint: Path | None, data: str | None, data_dir):
    """The model and preprocessing for embed/eval/predict: a run directory, or a zoo model."""
    from vision_ft.data.sources import DataOptions, load_dataset
    from vision_ft.infer.predictor import from_pretrained, from_run

    if (model is None) == (checkpoint is None):
        raise UserError("give exactly one of --model or --checkpoint")
    if checkpoint is not None:
        predictor = from_run(checkpoint)
        if data_dir:
            predictor.data_options = dataclasses.replace(predictor.data_options, data_dir=data_dir)
        return predictor
    channels = load_dataset(data, DataOptions(data_dir=data_dir)).channels if data else 3
    spec = {"true": True, "false": False}.get(pretrained.lower(), pretrained)
    return from_pretrained(model, spec, in_chans=channels)


def _metadata(predictor, **extra) -> dict:
    cfg = predictor.model.pretrained_cfg
    return {
        "source": predictor.source,
        "model": type(predictor.model).__name__,
        "input_size": list(cfg.input_size),
        "interpolation": predictor.geometry.interpolation,
        "crop_pct": predictor.geometry.eval_crop_pct,
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "class_names": list(predictor.class_names) if predictor.class_names else None,
        **extra,
    }


@main.command()
@click.option("--model", help="A zoo model (with --pretrained) ...")
@click.option("--pretrained", default="true", help="... its weights [true].")
@click.option("--checkpoint", type=click.Path(path_type=Path), help="... or a fit run directory.")
@click.option("--data", required=True, help="A --data spec, as for fit.")
@click.option("--split", default="train", help="train, val, test or all [train].")
@click.option("--output", required=True, type=click.Path(path_type=Path), help=".npz or .parquet file.")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", help="Average with the mirror.")
@click.option("--layer", type=int, help="Pooled output of this stage/block instead (0-based, -1 last).")
@click.option("--batch-size", type=int, default=64)
@click.option("--data-dir", help="TFDS data directory.")
@click.option("--no-progress", is_flag=True)
@_distributed_options
@user_errors_exit_2
def embed(
    model, pretrained, checkpoint, data, split, output, tta, layer, batch_size, data_dir, no_progress,
    coordinator, num_processes, process_id,
) -> None:  # fmt: skip
    """Pooled pre-logit embeddings, forward_head(forward_features(x), pre_logits=True), of a split."""
    import numpy as np

    from vision_ft.data.sources import load_dataset
    from vision_ft.infer.embeddings import FORMATS, Embeddings, embed_split, write_embeddings

    if output.exists():
        raise UserError(f"--output {output} exists; not overwriting it")
    if output.suffix not in FORMATS:
        raise UserError(f"--output {output}: use a .npz or .parquet file name")
    _start_processes(coordinator, num_processes, process_id)
    from vision_ft.train.distributed import is_primary

    no_progress = no_progress or not is_primary()
    predictor = _predictor(model, pretrained, checkpoint, data, data_dir)
    dataset = load_dataset(data, predictor.data_options)
    names = list(dataset.splits) if split == "all" else [split]
    missing = [n for n in names if n not in dataset.splits]
    if missing:
        raise UserError(f"--split {split}: {data} has splits {', '.join(dataset.splits)}")
    if dataset.channels != predictor.channels:
        raise UserError(f"{data} has {dataset.channels} bands; the model takes {predictor.channels}")
    parts, bad = [], []
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
            bad += unreadable
    result = Embeddings(
        np.concatenate([p.embeddings for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.ids for p in parts]),
        _metadata(
            predictor, data=data, split=split, tta=tta, layer=layer,
            dataset_classes=list(dataset.class_names), multi_label=dataset.multi_label,
            checkpoint=str(checkpoint.absolute()) if checkpoint else None, zoo_model=model,
            pretrained=pretrained if model else None, in_chans=predictor.channels,
        ),
    )  # fmt: skip
    if not is_primary():
        return
    write_embeddings(output, result)
    for path in bad:
        logging.getLogger("vision_ft").warning("skipped unreadable example %s", path)
    click.echo(f"{len(result)} embeddings of dimension {result.embeddings.shape[1]} written to {output}")
    if bad:
        click.echo(f"{len(bad)} unreadable examples skipped")


@main.command(name="eval")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path), help="A fit run directory.")
@click.option("--data", help="A --data spec [the run's].")
@click.option("--split", default="test", help="[test]")
@click.option("--output", type=click.Path(path_type=Path), help="Report directory [RUN/eval-SPLIT].")
@click.option("--batch-size", type=int, default=64)
@click.option("--data-dir", help="TFDS data directory.")
@user_errors_exit_2
def evaluate(checkpoint, data, split, output, batch_size, data_dir) -> None:
    """Metrics of a run's best weights on a split, with ROC-AUC CI, operating points and calibration."""
    from vision_ft.infer.evaluate import evaluate_run

    report = evaluate_run(checkpoint, data=data, split=split, output=output, batch_size=batch_size,
                          data_dir=data_dir)  # fmt: skip
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


@main.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), help="A fit run directory ...")
@click.option("--probe", "probe_dir", type=click.Path(path_type=Path), help="... or a probe directory.")
@click.option("--input", "input_", required=True, help="An image file, a folder, or a --data spec.")
@click.option("--split", help="Split of a --data spec [test, else val, else train].")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="CSV file to write.")
@click.option("--top-k", type=int, default=3)
@click.option("--batch-size", type=int, default=64)
@user_errors_exit_2
def predict(checkpoint, probe_dir, input_, split, output, top_k, batch_size) -> None:
    """Class probabilities and top-k for new images, with the run's own preprocessing."""
    from vision_ft.infer.evaluate import predict_logits
    from vision_ft.infer.predict import resolve_input, write_predictions

    if (checkpoint is None) == (probe_dir is None):
        raise UserError("give exactly one of --checkpoint or --probe")
    if output.exists():
        raise UserError(f"--output {output} exists; not overwriting it")
    if checkpoint is not None:
        from vision_ft.infer.predictor import from_run

        predictor, probe = from_run(checkpoint), None
    else:
        from vision_ft.infer.probe_files import load_probe_dir

        try:
            predictor, probe = load_probe_dir(probe_dir)
        except ValueError as e:  # an unreadable probe file
            raise UserError(str(e)) from None
    examples, labelled = resolve_input(input_, predictor.data_options, split)
    ids, labels, logits, bad = predict_logits(predictor, examples, batch_size=batch_size, probe=probe)
    names = predictor.class_names or tuple(f"class {i}" for i in range(logits.shape[1]))
    write_predictions(
        output, ids, logits, names, labels=labels if labelled else None, top_k=top_k,
        multi_label=predictor.multi_label and probe is None,
    )  # fmt: skip
    click.echo(f"{len(ids)} predictions written to {output}")
    for path in bad:
        click.echo(f"skipped unreadable image {path}", err=True)


@main.command()
@click.option("--train", "train_path", required=True, type=click.Path(path_type=Path))
@click.option("--val", "val_path", required=True, type=click.Path(path_type=Path))
@click.option("--test", "test_path", type=click.Path(path_type=Path))
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Directory to create.")
@click.option("--select", type=click.Choice(["loss", "auc", "accuracy"]), default="loss")
@user_errors_exit_2
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


if __name__ == "__main__":
    main()
