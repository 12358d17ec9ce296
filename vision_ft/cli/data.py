"""``stats``: per-band statistics of a dataset split."""

from __future__ import annotations

import click

from vision_ft.cli.errors import UserError
from vision_ft.cli.paths import UserPath
from vision_ft.cli.runtime import command_body
from vision_ft.output_dirs import refuse_unwritable_file
from vision_ft.train.config import FitConfig


class CropFraction(click.ParamType):
    """A crop fraction in (0, 1], or ``model`` for the model's own (a config's null)."""

    name = "FRACTION|model"

    def convert(self, value, param, ctx) -> float | None:
        if value is None or value == "model":
            return None
        try:
            fraction = float(value)
        except (TypeError, ValueError):
            fraction = float("nan")
        if not 0 < fraction <= 1:
            self.fail(f"{value!r} is not a fraction in (0, 1] or 'model'", param, ctx)
        return fraction


@click.command()
@click.option("--data", required=True, help="A --data spec, as for fit.")
@click.option("--model", default="tf_efficientnet_lite0", help="Model whose input geometry to use.")
@click.option(
    "--img-size", type=click.IntRange(min=16), default=FitConfig.img_size, help="Input side, as fit's."
)
@click.option("--split", default="train")
# drawn as fit draws them, so that the train split's statistics leave out its val and test images
@click.option("--val-fraction", type=float, default=FitConfig.val_fraction, help="As fit's.")
@click.option("--test-fraction", type=float, default=FitConfig.test_fraction, help="As fit's.")
@click.option(
    "--seed", type=click.IntRange(0, 2**32 - 1), default=FitConfig.seed, help="As fit's (folder/CSV splits)."
)
@click.option(
    "--eval-crop-pct",
    type=CropFraction(),
    default=str(FitConfig.eval_crop_pct),
    help="As the fit config's eval_crop_pct, whose center crop fit's statistics read; 'model' for null "
    "(the model's own crop_pct).",
)
@click.option("--data-dir", help="TFDS data directory.")
@click.option("--window", help="DICOM window CENTER,WIDTH.")
@click.option("--output", type=UserPath(), help="Also write the statistics as YAML.")
@command_body
def stats(
    data, model, img_size, split, val_fraction, test_fraction, seed, eval_crop_pct, data_dir, window, output
) -> None:
    """Per-band mean and std of a split, in the scale the model is fed (for non-RGB data).

    Pass them to fit as `mean:` / `std:` in a config; fit computes them itself for data with other
    than 1 or 3 bands.
    """
    import yaml

    from vision_ft.data.pipeline import Geometry
    from vision_ft.data.sources import DataOptions, load_dataset
    from vision_ft.data.stats import band_statistics
    from vision_ft.infer.evaluate import empty_split
    from vision_ft.models.registry import get_model_entry
    from vision_ft.train.config import load_config

    if output is not None:
        refuse_unwritable_file(output)  # before the pass over the split, not after
    window_values = load_config(None, {"window": window}).window
    options = DataOptions(val_fraction, test_fraction, seed, data_dir, window_values)
    dataset = load_dataset(data, options)
    if split not in dataset.splits:
        raise UserError(f"--split {split}: {data} has splits {', '.join(dataset.splits)}")
    if not len(dataset.splits[split]):
        raise empty_split(data, split)
    pretrained = get_model_entry(model).default_cfg
    # a center crop, as fit's statistics read, whatever the model's crop_mode
    crop_pct = eval_crop_pct if eval_crop_pct is not None else pretrained.crop_pct
    geometry = Geometry(img_size, pretrained.interpolation, crop_pct, channels=dataset.channels)
    mean, std, used = band_statistics(dataset.splits[split], geometry)
    text = yaml.safe_dump({"mean": list(mean), "std": list(std)}, default_flow_style=True)
    click.echo(f"# {used} images of {data} ({split}), {dataset.channels} bands")
    click.echo(text, nl=False)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(output, "x") as f:  # "x": a file that appeared meanwhile is kept
                f.write(text)
        except FileExistsError:
            raise UserError(f"--output {output} exists; not overwriting it") from None
