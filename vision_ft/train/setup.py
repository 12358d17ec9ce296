"""What a fit needs before its first step: data, model, input pipeline and phases, each checked
against the config and, for a resume, against the run's own record (``config.json``).

Nothing here writes: a set-up that is refused leaves the run directory as it was.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from vision_ft.data.pipeline import Geometry, bands_convertible, eval_geometry
from vision_ft.data.presets import resolve_augmentation
from vision_ft.data.sources import DataOptions, Dataset, load_dataset
from vision_ft.data.splitting import refuse_empty_held_out
from vision_ft.data.stats import band_statistics
from vision_ft.models.factory import create_model
from vision_ft.train.checkpoint import holds_checkpoint
from vision_ft.train.class_weights import class_counts, class_weights_for
from vision_ft.train.config import ConfigError, FitConfig
from vision_ft.train.distributed import is_primary
from vision_ft.train.evaluation import BadExamples
from vision_ft.train.output_dir import check_resumed_data
from vision_ft.train.phases import Phase, num_layers, plan_phases
from vision_ft.train.rules import RuleError, build_plan
from vision_ft.train.run_dir import (
    RUN_PREFIX,
    RunDirError,
    adopt_recorded_pretrained_cfg,
    evaluated_crop_mode,
    load_run_model,
    read_run_config,
)
from vision_ft.weights.sources import pretrained_from_text

log = logging.getLogger("vision_ft.fit")


@dataclass
class RunSetUp:
    cfg: FitConfig  # resolved: the run's architecture, and the test-time views training implies
    data: Dataset
    num_classes: int
    multi_label: bool
    channels: int  # the bands the model takes
    model: nnx.Module  # its pretrained_cfg carries the normalization the run uses
    augment_settings: dict
    eval_geometry: Geometry
    train_geometry: Geometry
    steps_per_epoch: int
    total_steps: int
    phases: list[Phase]
    class_weights: np.ndarray
    bad_examples: BadExamples


def set_up_run(cfg: FitConfig, saved: dict | None, checkpoint_dir: epath.Path, out: Path) -> RunSetUp:
    """The run of ``cfg`` ready to train; ``saved`` is the run's config.json where it resumes one."""
    dtype = jnp.bfloat16 if cfg.precision == "bf16" else jnp.float32
    start_run = cfg.pretrained.removeprefix(RUN_PREFIX) if cfg.pretrained.startswith(RUN_PREFIX) else None
    # a resume restores every weight from its latest checkpoint: the source it started from is
    # not read again (it may have moved since); one with none yet starts again as the run did
    restores = saved is not None and holds_checkpoint(checkpoint_dir, kinds=("latest",))
    if saved is not None:  # the architecture is the run's
        cfg = dataclasses.replace(cfg, model=saved["model"])
    if restores:
        start_run = None
    if start_run is not None:
        # A new fine-tune from an earlier run's weights: the architecture is the run's.
        earlier = read_run_config(start_run)
        if earlier["model"] != cfg.model:
            log.info("model %s, as in run %s", earlier["model"], start_run)
        cfg = dataclasses.replace(cfg, model=earlier["model"])
    # the classes in the order of the run this one continues or starts from (ordered_classes)
    recorded_names = (saved or {}).get("class_names") or (earlier.get("class_names") if start_run else None)
    options = DataOptions(
        cfg.val_fraction, cfg.test_fraction, cfg.seed, cfg.data_dir, cfg.window,
        class_order=tuple(recorded_names) if recorded_names else None,
    )  # fmt: skip
    data = load_dataset(cfg.data, options)
    num_classes = len(data.class_names)
    _check_select_metric(cfg, data)
    bad_examples = BadExamples(data.skipped, cfg.on_bad_image)  # with on_bad_image fail, stops here
    # the bands the model takes: the data's, or those of the run it continues or starts from
    # where the data's count differs only as grey and RGB (the pipeline converts each image)
    recorded = (saved or {}).get("in_chans") or (earlier["in_chans"] if start_run is not None else None)
    channels = recorded if recorded and bands_convertible(data.channels, recorded) else data.channels
    if start_run is not None:
        if earlier["in_chans"] != channels:
            raise RunDirError(
                f"--pretrained {cfg.pretrained}: the run's model takes {earlier['in_chans']} channels, "
                f"{cfg.data} has {data.channels}"
            )
        model = load_run_model(
            start_run,
            num_classes=num_classes,
            class_names=data.class_names,
            img_size=cfg.img_size,
            drop_path_rate=cfg.drop_path_rate,
            dtype=dtype,
            seed=cfg.seed,
        )
    else:
        model = create_model(
            cfg.model,
            pretrained=False if restores else pretrained_from_text(cfg.pretrained),
            num_classes=num_classes,
            in_chans=channels,
            img_size=cfg.img_size,
            drop_path_rate=cfg.drop_path_rate,
            dtype=dtype,
            seed=cfg.seed,
        )
        if restores:
            adopt_recorded_pretrained_cfg(model, saved)  # normalized as the run was
    _name_an_unseen_border(cfg, model)
    resized_as = saved if restores else None
    augment_settings, eval_at, train_at = _input_pipeline(cfg, model, data, channels, resized_as)
    # resolved, so that the run's config.json says what eval and predict do
    if cfg.tta_flip is None:
        cfg = dataclasses.replace(cfg, tta_flip=augment_settings["hflip"])
    if cfg.tta_shift is None:
        cfg = dataclasses.replace(cfg, tta_shift=augment_settings["translate"] / 2)
    train = data.splits["train"]
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} exceeds the {len(train)} training images")
    refuse_empty_held_out(
        {name: len(split) for name, split in data.splits.items()},
        cfg.data,
        {"val": cfg.val_fraction, "test": cfg.test_fraction},
    )
    phases = plan_phases(cfg, steps_per_epoch, num_layers(model))
    for phase in phases:  # the rules checked before anything is written, phase by phase
        try:
            build_plan(model, freeze=phase.freeze, lr_rules=cfg.lr_rules, layer_decay=phase.layer_decay)
        except RuleError as e:
            raise RuleError(f"phase {phase.name}: {e}" if len(phases) > 1 else str(e)) from None
    class_weights = class_weights_for(cfg.class_weights, train.labels, num_classes)
    _name_classes_without_training_images(cfg, data, train.labels)
    if saved is not None:
        check_resumed_data(saved, data, cfg.data, out)
    return RunSetUp(
        cfg=cfg,
        data=data,
        num_classes=num_classes,
        multi_label=data.multi_label,
        channels=channels,
        model=model,
        augment_settings=augment_settings,
        eval_geometry=eval_at,
        train_geometry=train_at,
        steps_per_epoch=steps_per_epoch,
        total_steps=cfg.epochs * steps_per_epoch,
        phases=phases,
        class_weights=class_weights,
        bad_examples=bad_examples,
    )


def _check_select_metric(cfg: FitConfig, data: Dataset) -> None:
    if cfg.select_metric == "map" and not data.multi_label:
        raise ConfigError("select_metric map is for multi-label data; use auc, accuracy, ... here")
    val = data.splits.get("val")
    if cfg.select_metric == "auc" and not data.multi_label and val is not None and len(val):
        present = np.unique(val.labels)
        if len(present) == 1 and 0 <= present[0] < len(data.class_names):
            # undefined at every epoch: no checkpoint would ever be kept
            raise ConfigError(
                f"{cfg.data}: the val split holds one class only ({data.class_names[present[0]]}), "
                "so its AUC is undefined and cannot choose the checkpoint; set select_metric: loss "
                "(or accuracy), or give the val split images of other classes"
            )


def _name_an_unseen_border(cfg: FitConfig, model: nnx.Module) -> None:
    multiple = model.input_multiple
    if cfg.img_size % multiple and is_primary():
        seen = cfg.img_size // multiple * multiple
        log.warning(
            "img_size %d is not a multiple of %d: %s sees the first %d of each image's %d rows and "
            "columns (as timm's); choose %d or %d to see them all",
            cfg.img_size, multiple, cfg.model, seen, cfg.img_size, seen, seen + multiple,
        )  # fmt: skip


def _name_classes_without_training_images(cfg: FitConfig, data: Dataset, labels: np.ndarray) -> None:
    """Labels counted from 1, or a class found only in val or test, give a head output that
    training never sees: worth a word before the run."""
    num_classes = len(data.class_names)
    counts = class_counts(labels, num_classes)
    unseen = [str(data.class_names[i]) for i in np.flatnonzero(counts == 0)]
    if unseen and is_primary():
        log.warning(
            "%s: no training images of %s (%d of %d classes); the model will rarely predict them",
            cfg.data, ", ".join(unseen), len(unseen), num_classes,
        )  # fmt: skip


def _input_pipeline(
    cfg: FitConfig, model: nnx.Module, data: Dataset, channels: int, saved: dict | None
) -> tuple[dict, Geometry, Geometry]:
    """Augmentation, and the eval and train geometry, from the model, the modality and the config;
    sets the model's normalization. A resume resizes as the run (``saved``) did."""
    pretrained = model.pretrained_cfg
    augment_settings = resolve_augmentation(
        cfg.modality, channels, random_crop=cfg.random_crop, hflip=cfg.hflip, vflip=cfg.vflip,
        rot90=cfg.rot90, translate=cfg.translate, color_jitter=cfg.color_jitter,
    )  # fmt: skip
    # band statistics read a center crop; the model's own crop mode may pad with the mean
    crop_pct = cfg.eval_crop_pct if cfg.eval_crop_pct is not None else pretrained.crop_pct
    center_crop = eval_geometry(pretrained, cfg.img_size, crop_pct, channels)
    mean, std = _normalization(cfg, model, data, channels, center_crop)
    model.pretrained_cfg = dataclasses.replace(pretrained, mean=mean, std=std)
    eval_at = eval_geometry(model.pretrained_cfg, cfg.img_size, cfg.eval_crop_pct, channels)
    if saved is not None:  # as eval and predict read the run (older runs center-cropped)
        eval_at = dataclasses.replace(eval_at, eval_crop_mode=evaluated_crop_mode(saved))
    train_at = dataclasses.replace(
        eval_at, train_scale=cfg.crop_scale if augment_settings["random_crop"] else None
    )
    return augment_settings, eval_at, train_at


def _normalization(
    cfg: FitConfig, model: nnx.Module, data: Dataset, channels: int, center_crop: Geometry
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if cfg.mean is not None:
        if len(cfg.mean) != channels or len(cfg.std) != channels:
            raise ConfigError(f"mean/std have {len(cfg.mean)} values, the data has {channels} bands")
        return cfg.mean, cfg.std
    if cfg.normalize == "dataset" or (cfg.normalize == "auto" and channels not in (1, 3)):
        # ImageNet statistics mean nothing for these bands: never normalize with them silently
        mean, std, used = band_statistics(data.splits["train"], center_crop, threads=cfg.loader_threads)
        log.info("per-band statistics of %d training images: mean %s std %s", used, mean, std)
        return mean, std
    return model.pretrained_cfg.mean, model.pretrained_cfg.std
