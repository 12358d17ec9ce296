"""``fit``: fine-tune a backbone, or resume a run."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from vision_ft.cli.errors import UserError
from vision_ft.cli.paths import UserPath
from vision_ft.cli.processes import distributed_options, start_processes
from vision_ft.cli.runtime import command_body


@click.command()
@click.option("--config", "config_path", type=UserPath(), help="YAML file of fit settings.")
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
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    help="fp32: float32 activations, matmuls at the backend's default (TF32 on GPUs, one bf16 pass on TPUs); "
    "bf16: bf16 compute on float32 weights.",
)
@click.option(
    "--mesh", help="Device mesh data=N,fsdp=M: shard weights and optimizer state over M [data only]."
)
@click.option("--train-bn/--no-train-bn", default=None, help="Update BatchNorm statistics of frozen layers.")
@click.option("--seed", type=int)
@click.option("--output", type=UserPath(), help="Run directory [runs/fit].")
@click.option("--checkpoint-dir", help="Where checkpoints go [OUTPUT/checkpoints]; may be gs://BUCKET/PATH.")
@click.option("--resume", is_flag=True, default=None, help="Continue the run in --output exactly.")
@click.option("--no-progress", is_flag=True, help="Log instead of drawing a progress bar.")
@distributed_options
@command_body
def fit(
    config_path: Path | None, no_progress: bool, coordinator, num_processes, process_id, **overrides
) -> None:
    """Fine-tune a pretrained backbone (default: tf_efficientnet_lite0 on bundled BreastMNIST)."""
    if overrides["output"] is not None:
        overrides["output"] = str(overrides["output"])
    from vision_ft.train.config import load_config
    from vision_ft.train.distributed import check_same_settings, is_primary
    from vision_ft.train.loop import FitRun, RunDirError
    from vision_ft.train.preemption import EXIT_PREEMPTED, Interrupted, Preempted

    cfg = load_config(config_path, overrides)  # a bad command stops before the processes meet
    start_processes(coordinator, num_processes, process_id)
    # the commands' settings (--resume on one host only would leave the others waiting for it); a
    # resume's then come from process 0's run, the same on every process
    check_same_settings(cfg.to_dict())
    if cfg.resume:
        cfg = load_config(config_path, overrides, base=_resumed_settings(Path(cfg.output)))
    # SIGTERM before the loop watches for it (data, model, a resume's restore) ends the command as a
    # preempted one, so that a scheduler that requeues exit code 75 reruns it; the loop's own watch
    # takes over while it trains and checkpoints
    previous = signal.signal(signal.SIGTERM, _preempted_before_training)
    try:
        final = FitRun(cfg, progress=not no_progress).run()
    except (RunDirError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    except Interrupted as e:
        click.echo(f"stopped: {e}", err=True)
        sys.exit(130)  # the shell's code for a Ctrl-C
    except Preempted as e:
        click.echo(f"stopped: {e}", err=True)
        sys.exit(EXIT_PREEMPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)
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


def _preempted_before_training(signum, frame) -> None:
    from vision_ft.train.preemption import EXIT_PREEMPTED

    # while setting up, or closing the run after its reports are written
    click.echo("stopped: SIGTERM outside the training loop, nothing lost; rerun the same command", err=True)
    sys.exit(EXIT_PREEMPTED)


def _resumed_settings(run: Path) -> dict | None:
    """The settings ``fit --resume`` starts from: the run's own (its ``config.json``), which a
    ``--config`` file and the command's options then override (where that changes what the run
    computes, the resume is refused). In a multi-process run, process 0's run decides for every
    process, as its preemption marker does: hosts may keep their own --output, and only process 0
    writes config.json, which records settings the run resolved (tta_flip, an absolute
    --checkpoint-dir) that the other processes' commands leave unset. Each keeps its host-local
    settings (--output, --data-dir, ...)."""
    from vision_ft.train.distributed import HOST_LOCAL_SETTINGS, json_from_process_zero, stop_together
    from vision_ft.train.run_dir import RunDirError, read_run_config

    own, error = None, None
    try:
        own = read_run_config(run) if (run / "config.json").is_file() else None
    except RunDirError as e:
        error = e
    stop_together(error, "--resume")
    first = json_from_process_zero("resumed-settings", own)
    if first is None or first is own:
        return first
    shared = {k: v for k, v in first.items() if k not in HOST_LOCAL_SETTINGS}
    return {**shared, **{k: own[k] for k in HOST_LOCAL_SETTINGS if own and k in own}}
