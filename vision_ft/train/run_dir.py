"""A finished or running ``fit`` output directory as a source of weights and preprocessing."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vision_ft.models.factory import create_model
from vision_ft.models.registry import PretrainedCfg, get_model_entry
from vision_ft.train.checkpoint import (
    CheckpointMismatchError,
    RunCheckpoints,
    check_checkpoint_storage,
    checkpoint_location,
)
from vision_ft.train.metrics import selection_mode

log = logging.getLogger("vision_ft.run")

RUN_PREFIX = "run:"


class RunDirError(ValueError):
    """A directory that is not a usable run, or one that does not fit the request; names the path."""


def read_run_config(run_dir: str | Path) -> dict:
    """The resolved configuration a run wrote at its start (``DIR/config.json``)."""
    path = Path(run_dir).expanduser() / "config.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir}: not a vision-ft run directory (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunDirError(f"{path}: unreadable ({e})") from None
    except UnicodeDecodeError:
        raise RunDirError(f"{path}: unreadable (not UTF-8 text)") from None
    if not isinstance(config, dict):
        raise RunDirError(f"{path}: not a run's settings (a JSON object)")
    missing = [k for k in ("model", "num_classes", "in_chans", "img_size") if k not in config]
    if missing:
        raise RunDirError(f"{path}: missing {', '.join(missing)}")
    wrong = [k for k in ("num_classes", "in_chans", "img_size") if not _is_positive_int(config[k])]
    wrong += [] if isinstance(config["model"], str) else ["model"]
    if wrong:
        raise RunDirError(f"{path}: damaged ({', '.join(f'{k} {config[k]!r}' for k in wrong)})")
    _check_recorded_settings(path, config)
    return config


def _check_recorded_settings(path: Path, config: dict) -> None:
    """Raise ``RunDirError`` naming the first setting of a damaged or hand-edited ``config.json``
    that eval, predict, embed or a resume would stop on later, with a traceback."""
    from vision_ft.train.config import ConfigError, load_config

    try:
        load_config(None, base=config)  # each fit setting of its type and in its range
    except ConfigError as e:
        raise RunDirError(f"{path}: damaged ({e})") from None
    names = config.get("class_names")
    if "class_names" in config and (
        not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
        or (len(names) != config["num_classes"] and not config.get("multi_label"))
    ):
        raise RunDirError(f"{path}: damaged (class_names {names!r}: {config['num_classes']} names expected)")
    recorded = config.get("pretrained_cfg")
    for key in ("mean", "std"):
        values = recorded.get(key) if isinstance(recorded, dict) else None
        numbers = isinstance(values, list) and all(_is_finite_number(v) for v in values)
        if key == "std":
            numbers = numbers and all(v > 0 for v in values)
        if recorded is not None and not (numbers and len(values) == config["in_chans"]):
            raise RunDirError(
                f"{path}: damaged (pretrained_cfg {key} {values!r}: one {'positive ' * (key == 'std')}number "
                f"per band expected, {config['in_chans']} bands)"
            )
    _check_recorded_resizing(path, config, recorded)
    if "multi_label" in config and not isinstance(config["multi_label"], bool):
        raise RunDirError(f"{path}: damaged (multi_label {config['multi_label']!r}: true or false expected)")
    weights = config.get("loss_class_weights")
    if "loss_class_weights" in config and not (
        isinstance(weights, list)
        and len(weights) == config["num_classes"]
        and all(_is_finite_number(w) and w >= 0 for w in weights)
    ):
        raise RunDirError(
            f"{path}: damaged (loss_class_weights {weights!r}: {config['num_classes']} weights expected)"
        )


def _check_recorded_resizing(path: Path, config: dict, recorded: dict | None) -> None:
    """How eval and predict resize: the modes and numbers the pipeline takes, or a damaged file."""
    from vision_ft.data.transforms import CROP_MODES, PIL_INTERPOLATION

    settings = [("eval_crop_mode", evaluated_crop_mode(config), CROP_MODES)]
    if isinstance(recorded, dict):
        settings += [
            (
                "pretrained_cfg interpolation",
                recorded.get("interpolation", "bicubic"),
                tuple(PIL_INTERPOLATION),
            ),
            ("pretrained_cfg crop_mode", recorded.get("crop_mode", "center"), CROP_MODES),
        ]
        crop_pct = recorded.get("crop_pct", 1.0)
        if not (_is_finite_number(crop_pct) and 0 < crop_pct <= 1):
            raise RunDirError(
                f"{path}: damaged (pretrained_cfg crop_pct {crop_pct!r}: a number in (0, 1] expected)"
            )
    for name, value, allowed in settings:
        if value not in allowed:
            raise RunDirError(f"{path}: damaged ({name} {value!r}: one of {', '.join(allowed)} expected)")


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def evaluated_crop_mode(config: dict) -> str:
    """The crop mode a run's validation and test resized with: recorded in its config.json; runs
    saved before it was recorded center-cropped."""
    return config.get("eval_crop_mode", "center")


def run_checkpoint_dir(run_dir: str | Path, config: dict) -> str | Path:
    """Where a run keeps its checkpoints: ``RUN/checkpoints`` unless its config names another place."""
    return config.get("checkpoint_dir") or Path(run_dir).expanduser() / "checkpoints"


def load_run_model(
    run_dir: str | Path,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    img_size: int | None = None,
    drop_path_rate: float = 0.0,
    dtype: jnp.dtype = jnp.float32,
    seed: int = 0,
    which: str = "best",
) -> nnx.Module:
    """The model of a run with its ``which`` ("best", else "latest") weights restored.

    ``num_classes`` other than the run's gives a freshly initialised head on the run's backbone: a new
    fine-tune starting from an earlier one, which is not ``--resume``. So do ``class_names`` other
    than the run's, or in another order (unnamed classes, an .npz's, match by position).
    """
    run_dir = Path(run_dir).expanduser()
    config = read_run_config(run_dir)
    restored = {}
    entry = get_model_entry(config["model"])
    resized = img_size is not None and img_size != config["img_size"] and entry.adapt_to_img_size is not None

    def checkpoint_weights(abstract: nnx.Module) -> dict[tuple, jax.Array]:
        saved = _abstract_run_model(config) if resized else abstract  # the shapes the run saved
        # Orbax restores onto the device an eagerly built model's arrays would live on
        device = jnp.zeros(()).sharding
        target = {
            "params": _on(nnx.state(saved, nnx.Param), device),
            "stats": _on(nnx.state(saved, nnx.BatchStat), device),
            "step": jax.ShapeDtypeStruct((), np.int32, sharding=device),
        }
        restored.update(_restore(run_dir, config, target, which))
        flat = nnx.to_flat_state(nnx.merge_state(restored["params"], restored["stats"]))
        weights = {tuple(path): var.get_value() for path, var in flat}
        if resized:
            weights = entry.adapt_to_img_size(saved, abstract, weights)
            log.info("%s: the run's %s px weights adapted to %s px", entry.name, config["img_size"], img_size)
        return weights

    model = create_model(
        config["model"],
        num_classes=config["num_classes"],
        in_chans=config["in_chans"],
        img_size=img_size or config["img_size"],
        drop_path_rate=drop_path_rate,
        dtype=dtype,
        seed=seed,
        weights=checkpoint_weights,
    )
    adopt_recorded_pretrained_cfg(model, config)
    log.info("%s: loaded weights from run %s (step %d)", config["model"], run_dir, int(restored["step"]))
    if num_classes is not None and num_classes != config["num_classes"]:
        model.reset_classifier(num_classes, rngs=nnx.Rngs(params=seed))
        model.pretrained_cfg = dataclasses.replace(model.pretrained_cfg, num_classes=num_classes)
        log.info("new %d-class head (the run had %d classes)", num_classes, config["num_classes"])
    elif _other_classes(class_names, config.get("class_names")):
        model.reset_classifier(config["num_classes"], rngs=nnx.Rngs(params=seed))
        log.info("new head: the classes are %s, the run's were %s", list(class_names), config["class_names"])
    return model


def _abstract_run_model(config: dict) -> nnx.Module:
    """The run's model, abstract, at the run's own input size: the shapes its checkpoints hold."""

    def build() -> nnx.Module:
        return create_model(
            config["model"], num_classes=config["num_classes"], in_chans=config["in_chans"],
            img_size=config["img_size"],
        )  # fmt: skip

    return nnx.eval_shape(build)


def unnamed_classes(names: Sequence[str]) -> bool:
    # arrays without class names (an .npz file) get "class 0", "class 1", ...
    return tuple(names) == tuple(f"class {i}" for i in range(len(names)))


def _other_classes(names: Sequence[str] | None, run_names: Sequence[str] | None) -> bool:
    if names is None or run_names is None or unnamed_classes(names) or unnamed_classes(run_names):
        return False
    return tuple(names) != tuple(run_names)


def adopt_recorded_pretrained_cfg(model: nnx.Module, config: dict) -> None:
    """Give ``model`` the preprocessing (mean, std, crop, interpolation) the run recorded."""
    recorded = config.get("pretrained_cfg")
    if recorded:
        fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in fields}
        model.pretrained_cfg = dataclasses.replace(model.pretrained_cfg, **saved)


def _on(state: nnx.State, sharding: jax.sharding.Sharding) -> nnx.State:
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding), state)


def run_checkpoints(run_dir: str | Path, config: dict) -> RunCheckpoints:
    """A run's checkpoints, to read: the best is the one its ``select_metric`` ranks best."""
    mode = selection_mode(config.get("select_metric", "auc"))
    location = checkpoint_location(run_checkpoint_dir(run_dir, config))
    # gs:// without gcsfs: one line, not fsspec's ImportError
    check_checkpoint_storage(location, hint=f"the checkpoint_dir of {Path(run_dir) / 'config.json'}")
    return RunCheckpoints(location, best_mode=mode, create=False)


def _restore(run_dir: Path, config: dict, target: dict, which: str) -> dict:
    checkpoints = run_checkpoints(run_dir, config)
    try:
        if which == "best" and checkpoints.best_step() is not None:
            return checkpoints.restore_best(target)[1]
        if checkpoints.latest_step() is not None:
            if which == "best" and (config.get("split_sizes") or {}).get("val"):  # fit kept one
                log.warning(
                    "%s: no best checkpoint in %s (removed, or not copied along); reading the latest "
                    "weights instead", run_dir, checkpoints.directory / "best",
                )  # fmt: skip
            # The latest checkpoint holds optimizer state too; restore only the weights from it.
            return checkpoints.restore_latest_weights(target)[1]
        raise RunDirError(f"{run_dir}: the run has no checkpoint yet")
    except CheckpointMismatchError as e:
        raise RunDirError(f"{run_dir}: {e}") from None
    finally:
        checkpoints.close()
