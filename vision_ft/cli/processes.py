"""Multi-process options shared by the commands that run on several hosts (fit, embed)."""

from __future__ import annotations

import logging

import click


def distributed_options(command):
    """Explicit multi-process options; TPU VM slices, SLURM and Open MPI are detected without them."""
    for option in reversed(
        [
            click.option("--coordinator", help="host:port of process 0, for a multi-process run."),
            click.option(
                "--num-processes", type=click.IntRange(min=1), help="Number of processes in the run."
            ),
            click.option("--process-id", type=click.IntRange(min=0), help="This process's index, 0-based."),
        ]
    ):
        command = option(command)
    return command


def start_processes(coordinator, num_processes, process_id) -> None:
    from vision_ft.train.distributed import initialize, is_primary

    if initialize(coordinator, num_processes, process_id) and not is_primary():
        logging.getLogger("vision_ft").setLevel(logging.WARNING)  # one process speaks for the run
