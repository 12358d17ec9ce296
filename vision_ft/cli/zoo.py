"""``models`` and ``classify``: the model zoo and its ImageNet heads."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import click

from vision_ft.cli.errors import UserError
from vision_ft.cli.paths import UserPath
from vision_ft.cli.runtime import command_body


@click.command()
@click.argument("pattern", default="*")
@click.option("--pretrained", is_flag=True, help="Only models with pretrained weights.")
@command_body
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


@click.command()
@click.argument("image", required=False, type=UserPath(dir_okay=False))
@click.option("--model", "model_name", default="tf_efficientnet_lite0", show_default=True)
@click.option(
    "--pretrained",
    default="true",
    show_default=True,
    help="'true' (default weights, offline where possible), 'hf-hub:timm/NAME.TAG' or a checkpoint file.",
)
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, 1000))
@command_body
def classify(image: Path | None, model_name: str, pretrained: str, top_k: int) -> None:
    """Classify IMAGE (default: a bundled photo) into ImageNet classes."""
    import jax
    import numpy as np

    from vision_ft.data.decode import read_image
    from vision_ft.data.pipeline import eval_geometry, eval_image
    from vision_ft.models.factory import create_model
    from vision_ft.weights.sources import pretrained_from_text

    spec = pretrained_from_text(pretrained)
    if spec is False:  # random weights name no class; it read as a file called "false"
        raise UserError(
            f"--pretrained {pretrained}: classify needs trained ImageNet weights (true, hf-hub:... or a file)"
        )
    model = create_model(model_name, pretrained=spec)
    if model.num_classes != 1000:
        raise UserError(
            f"{model_name} with these weights has {model.num_classes} classes, not ImageNet's 1000"
        )
    image = image or Path(str(resources.files("vision_ft") / "assets" / "chelsea.png"))
    cfg = model.pretrained_cfg
    # decoded as fit reads files (EXIF orientation, true bit depth, formats allowed), then timm's eval
    # geometry; an unreadable file is a one-line error naming it
    geometry = eval_geometry(cfg, cfg.input_size[1], None, cfg.input_size[0])
    decoded = read_image(image)  # an unreadable file: a DataError naming it
    try:
        pixels = eval_image(decoded, geometry)
    except ValueError as e:  # a band count the model cannot take (a 5-band TIFF)
        raise UserError(f"{image}: {e}") from None
    pixels = (pixels - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    logits = model(pixels[None])
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))[0]
    labels = (resources.files("vision_ft") / "assets" / "imagenet_classes.txt").read_text().splitlines()
    click.echo(f"{image.name}  ({model_name}, {model.pretrained_cfg.input_size[1]} px)")
    for idx in np.argsort(-probs)[:top_k]:
        click.echo(f"  {probs[idx]:7.4f}  {idx:4d}  {labels[idx]}")
