"""The ``vision-ft`` command line: one group, its commands in modules by what they act on."""

from __future__ import annotations

import logging
import sys

import click

from vision_ft import __version__
from vision_ft.cli.data import stats
from vision_ft.cli.errors import OneLineErrors
from vision_ft.cli.fit import fit
from vision_ft.cli.inference import embed, evaluate, predict, probe
from vision_ft.cli.zoo import classify, models

__all__ = ["main"]


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
@click.version_option(__version__, "-V", "--version", prog_name="vision-ft")
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
    # huggingface_hub prints through a handler of its own; a root handler that an imported library
    # configured would print each of its lines a second time
    logging.getLogger("huggingface_hub").propagate = False
    # the host allocator and the compilation cache: cli/runtime.py, when a command's body starts


for command in (models, classify, fit, stats, embed, evaluate, predict, probe):
    main.add_command(command)
