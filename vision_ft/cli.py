"""The ``vision-ft`` command line."""

from __future__ import annotations

import functools
import logging
import sys
from importlib import resources
from pathlib import Path

import click

from vision_ft.data.npz import DataError
from vision_ft.models.registry import UnknownModelError
from vision_ft.train.checkpoint import CheckpointMismatchError
from vision_ft.train.config import ConfigError
from vision_ft.train.rules import RuleError
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
@click.option("--train-bn/--no-train-bn", default=None, help="Update BatchNorm statistics of frozen layers.")
@click.option("--seed", type=int)
@click.option("--output", help="Run directory [runs/fit].")
@click.option("--resume", is_flag=True, default=None, help="Continue the run in --output exactly.")
@click.option("--no-progress", is_flag=True, help="Log instead of drawing a progress bar.")
@user_errors_exit_2
def fit(config_path: Path | None, no_progress: bool, **overrides) -> None:
    """Fine-tune a pretrained backbone (default: tf_efficientnet_lite0 on bundled BreastMNIST)."""
    from vision_ft.train.config import load_config
    from vision_ft.train.loop import FitRun, RunDirError

    cfg = load_config(config_path, overrides)
    try:
        final = FitRun(cfg, progress=not no_progress).run()
    except (RunDirError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    test = final.get("test")
    if test:
        click.echo(
            f"test AUC {test['auc']:.4f}  accuracy {test['accuracy']:.4f}  balanced accuracy "
            f"{test['balanced_accuracy']:.4f}  macro-F1 {test['macro_f1']:.4f}  "
            f"({final['wall_seconds']:.0f} s)"
        )
    click.echo(f"run written to {cfg.output}")


@main.command()
@click.option("--data", required=True, help="A --data spec, as for fit.")
@click.option("--model", default="tf_efficientnet_lite0", help="Model whose input geometry to use.")
@click.option("--img-size", type=int, default=128)
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


if __name__ == "__main__":
    main()
