"""``vision-ft fit`` configuration: a frozen dataclass, loaded from YAML and command-line overrides."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BUNDLED_DATA = "npz:bundled:breastmnist"
MODALITIES = ("auto", "natural", "overhead", "medical")
EMA_WARMUPS = ("none", "power", "count")


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


def valid_lr_multiplier(scale: float) -> bool:
    """Finite and >= 0: a negative multiplier would freeze its parameters silently (only those above
    0 train; 0 is how a rule freezes), and NaN compares false both ways."""
    return math.isfinite(scale) and scale >= 0


@dataclass(frozen=True)
class FitConfig:
    # what to train
    model: str = "tf_efficientnet_lite0"
    pretrained: str = "true"  # "true", "false", "hf-hub:timm/NAME.TAG", a checkpoint file, or "run:DIR"
    data: str = BUNDLED_DATA
    img_size: int = 160  # chosen by cross-validation on the train split: benchmarks/breastmnist_cv.py
    # optimisation
    epochs: int = 12
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.01
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    clip_norm: float = 1.0
    accumulate_steps: int = 1
    label_smoothing: float = 0.1
    class_weights: str = "none"  # "none" or "auto" (inverse class frequency; multi-label: pos_weight)
    drop_path_rate: float = 0.1
    # which parameters train, and how fast: ordered (pattern, value) rules; see train/rules.py
    freeze: tuple[str, ...] = ()
    lr_rules: tuple[tuple[str, float], ...] = ((".*", 1.0),)
    layer_decay: float | None = None
    train_bn: bool = False  # frozen BatchNorm layers keep running statistics unless this is set
    # fastai's fine_tune: head-only epochs with the backbone frozen, then everything unfrozen
    recipe: str = "standard"  # "standard" or "fine_tune"
    head_epochs: int = 1
    head_lr_mult: float = 10.0  # LR multiplier of the head phase relative to lr
    # data: how file sources are split and decoded, what bad examples do, how many loaders
    val_fraction: float = 0.1  # folder/csv/tfds sources without a validation split
    test_fraction: float = 0.0
    data_dir: str | None = None  # tfds data_dir
    window: tuple[float, float] | None = None  # DICOM window (center, width); default the file's
    on_bad_image: str = "skip"  # "skip" (count and report) or "fail" (stop with exit code 2)
    workers: int = 0  # grain worker processes for decoding; 0 decodes on threads
    loader_threads: int = 4
    # preprocessing: None takes the model's pretrained_cfg or the modality's preset
    # center crop, 1.0 keeping all of a square image; None: the model's crop_pct and crop_mode
    eval_crop_pct: float | None = 1.0
    normalize: str = "auto"  # "pretrained", "dataset" (per-band statistics of train), "auto"
    mean: tuple[float, ...] | None = None  # explicit per-band statistics (e.g. from vision-ft stats)
    std: tuple[float, ...] | None = None
    # augmentation; None takes the modality's preset (see data/presets.py)
    modality: str = "auto"  # "auto", "natural", "overhead" (satellite, histology), "medical"
    random_crop: bool | None = None  # random resized crop on the host
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: bool | None = None
    vflip: bool | None = None
    rot90: bool | None = None
    translate: float | None = None  # max shift as a fraction of the image side
    color_jitter: float | None = None  # 1 or 3 bands (saturation on RGB only)
    mixup: float = 0.0
    cutmix: float = 0.0
    # evaluation: an exponential moving average of the weights (timm's model EMA; 0 disables) is what
    # gets evaluated and kept as best; tta_flip averages logits with the mirrored image (None: where
    # training flips images horizontally). Both chosen by cross-validation on BreastMNIST's train
    # split (held-out AUC 0.902 against 0.885 without): benchmarks/breastmnist_cv.py. tta_shift > 0
    # also averages over those views moved by that fraction of the side up, down, left and right
    # (train/tta.py), 5x the evaluation's forward passes; None: half of training's translate (0.05
    # for BreastMNIST, chosen on the cross-validation's checkpoints: held-out AUC 0.896 against 0.890)
    ema_decay: float = 0.98
    # how the EMA's decay rises to ema_decay over the first updates (train/step.py ema_decay_at):
    # "none" holds it from the second update on (timm's ModelEmaV3 default), "power" follows timm's
    # warmup 1 - (1 + step)^(-2/3), "count" TF's min(decay, (1 + step) / (10 + step)) (the only one
    # before stop 19). In a short fit the warmup, not ema_decay, sets the horizon: "power" stays
    # under 0.98 for 350 steps, "count" for 440. "power" won BreastMNIST's CV round 6 on all 3 folds
    ema_warmup: str = "power"
    tta_flip: bool | None = None
    tta_shift: float | None = None
    # whether fit's per-epoch validation, which picks the best checkpoint, uses the shifted views
    # too; off, it averages the image and its mirror only (as timm validates without its TTA), and
    # the shifted views score the kept checkpoint on test and in eval and predict. The views were
    # chosen on checkpoints picked this way (benchmarks/README.md), at a fifth of validation's cost
    val_tta_shift: bool = False
    # run
    precision: str = "fp32"  # "fp32" or "bf16" (bf16 compute, fp32 parameters)
    mesh: str | None = None  # "data=N,fsdp=M": FSDP over M devices; None: data parallel on all
    fsdp_min_size: int = 2**14  # tensors with fewer elements stay replicated under FSDP
    seed: int = 0
    output: str = "runs/fit"
    checkpoint_dir: str | None = None  # OUTPUT/checkpoints; may be a gs:// URL (written by Orbax)
    resume: bool = False
    select_metric: str = "auc"
    save_every_steps: int = 0  # 0: at each epoch end only
    eval_batch_size: int = 64
    extra: dict = field(default_factory=dict, compare=False)

    def validate(self) -> FitConfig:
        self._refuse_infinities()
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.img_size >= 16, "img_size must be >= 16"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.clip_norm >= 0, "clip_norm must be >= 0 (0 disables clipping)"),
            (0 <= self.drop_path_rate < 1, "drop_path_rate must be in [0, 1)"),
            (self.head_lr_mult > 0, "head_lr_mult must be > 0"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (self.save_every_steps >= 0, "save_every_steps must be >= 0 (0: at each epoch end)"),
            # numpy's generators and jax's keys both take it: they refuse negative or 64-bit seeds
            (0 <= self.seed < 2**32, "seed must be in [0, 2**32)"),
            (self.accumulate_steps >= 1, "accumulate_steps must be >= 1"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.class_weights in ("none", "auto"), "class_weights must be 'none' or 'auto'"),
            (self.recipe in ("standard", "fine_tune"), "recipe must be 'standard' or 'fine_tune'"),
            (self.precision in ("fp32", "bf16"), "precision must be 'fp32' or 'bf16'"),
            (self.fsdp_min_size >= 1, "fsdp_min_size must be >= 1"),
            (self.layer_decay is None or 0 < self.layer_decay <= 1, "layer_decay must be in (0, 1]"),
            (
                self.select_metric in ("auc", "accuracy", "balanced_accuracy", "macro_f1", "loss", "map"),
                "select_metric must be auc, accuracy, balanced_accuracy, macro_f1, loss or map (multi-label)",
            ),
            (
                self.recipe != "fine_tune" or 1 <= self.head_epochs < self.epochs,
                "head_epochs must be >= 1 and < epochs",
            ),
            (self.translate is None or 0 <= self.translate < 0.5, "translate must be in [0, 0.5)"),
            (self.color_jitter is None or 0 <= self.color_jitter < 1, "color_jitter must be in [0, 1)"),
            (self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be >= 0"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (self.ema_warmup in EMA_WARMUPS, f"ema_warmup must be one of {', '.join(EMA_WARMUPS)}"),
            (self.tta_shift is None or 0 <= self.tta_shift < 0.5, "tta_shift must be in [0, 0.5)"),
            (self.on_bad_image in ("skip", "fail"), "on_bad_image must be 'skip' or 'fail'"),
            (self.modality in MODALITIES, f"modality must be one of {', '.join(MODALITIES)}"),
            (
                self.normalize in ("auto", "pretrained", "dataset"),
                "normalize must be auto, pretrained or dataset",
            ),
            ((self.mean is None) == (self.std is None), "mean and std must be given together"),
            (
                self.mean is None or self.std is None or len(self.mean) == len(self.std) > 0,
                "mean and std must hold one value per band each",
            ),
            (not self.std or min(self.std) > 0, "std must be > 0"),
            (
                0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
                "crop_scale must satisfy 0 < min <= max <= 1",
            ),
            (self.eval_crop_pct is None or 0 < self.eval_crop_pct <= 1, "eval_crop_pct must be in (0, 1]"),
            (
                0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1,
                "val/test fractions must be in [0, 1)",
            ),
            (self.workers >= 0 and self.loader_threads >= 1, "workers must be >= 0, loader_threads >= 1"),
            (self.window is None or self.window[1] > 0, "window width must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for pattern, scale in self.lr_rules:
            if not valid_lr_multiplier(scale):
                raise ConfigError(
                    f"lr_rules: the multiplier of rule {pattern!r} is {scale}; it must be a finite "
                    "number >= 0 (0 freezes the parameters it matches)"
                )
        return self

    def _refuse_infinities(self) -> None:
        """Every float setting finite: an infinity passes the range checks below (inf > 0), and
        --lr inf then trains to NaN where warmup_epochs: .inf stops on an OverflowError."""
        for name in _FIELDS:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, not {value}")
            if isinstance(value, tuple) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
                raise ConfigError(f"{name} must hold finite numbers, not {list(value)}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("extra")
        out["freeze"] = list(self.freeze)
        out["lr_rules"] = [list(r) for r in self.lr_rules]
        for name in ("window", "mean", "std", "crop_scale"):
            out[name] = None if out[name] is None else list(out[name])
        return out


_FIELDS = {f.name: f for f in dataclasses.fields(FitConfig) if f.name != "extra"}


def _coerce(name: str, value):
    hint = typing.get_type_hints(FitConfig)[name]
    try:
        if name == "freeze":
            items = value.split(",") if isinstance(value, str) else list(value)
            if not all(isinstance(item, str) for item in items):
                raise ValueError(value)
            return tuple(s.strip() for s in items if s.strip())
        if name == "lr_rules":
            return tuple(_lr_rule(rule) for rule in value)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
                return None
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if typing.get_origin(hint) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            out = tuple(_number(float, v) for v in items)
            if typing.get_args(hint)[-1] is not Ellipsis and len(out) != len(typing.get_args(hint)):
                raise ValueError(value)
            return out
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):  # YAML's true/false/yes/no; not a number or a list
                raise ValueError(value)
            return value
        if hint in (int, float):
            return _number(hint, value)
        if hint is str:
            if isinstance(value, bool):  # YAML's bare true/false, e.g. pretrained: false
                return str(value).lower()
            # not numbers: YAML 1.1 reads output: 010 as 8 and 12:30 as 750, text other than typed
            if not isinstance(value, str):
                raise ValueError(value)
            return value
        return value
    except (TypeError, ValueError):
        # YAML may have read the text as another type: say so, with how it read it
        quote = (
            " (quote it: YAML read it as a number)" if hint is str and isinstance(value, int | float) else ""
        )
        raise ConfigError(f"bad value for {name}: {value!r}{quote}") from None


def _number(kind: type, value) -> int | float:
    # YAML reads `epochs: true` as a bool, which int() would quietly take as 1
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return kind(value)


def _lr_rule(rule) -> tuple[str, float]:
    if isinstance(rule, str) or len(rule) != 2 or not isinstance(rule[0], str):
        raise ValueError(rule)  # a pattern must be written as one: [[1, 2]] is not the rule "1"
    return rule[0], _number(float, rule[1])


# Settings a resumed run may change: where things are kept and how the work is spread, none of
# which changes what the run computes; and on_bad_image, which only decides whether an unusable
# image stops it (one stopped on a test image after all its training is finished no other way).
RESUMABLE_CHANGES = frozenset(
    {"output", "resume", "checkpoint_dir", "mesh", "fsdp_min_size", "workers", "loader_threads",
     "data_dir", "eval_batch_size", "save_every_steps", "on_bad_image"}
)  # fmt: skip


def settings_of_run(saved: dict) -> dict:
    """The fit settings in a run's ``config.json`` (which also records what the run resolved)."""
    settings = {k: v for k, v in saved.items() if k in _FIELDS}
    if settings and "tta_shift" not in settings:  # written before shifted views existed
        settings["tta_shift"] = 0.0
    if settings and "val_tta_shift" not in settings:  # written when validation used every view
        settings["val_tta_shift"] = True
    if settings and "ema_warmup" not in settings:  # written when TF's warmup was the only one
        settings["ema_warmup"] = "count"
    return settings


def resume_conflicts(saved: dict, cfg: FitConfig) -> list[str]:
    """Settings of ``cfg`` that differ from those the run was started with, as ``name (run X, now Y)``.
    Not compared: ``tta_flip`` and ``tta_shift`` while unset (the run resolved them at its start)
    and the model of a fine-tune from another run (``run:DIR`` decides it)."""
    from vision_ft.data.sources import recorded_data

    current = cfg.to_dict()
    # one data path however spelled: a run records it absolute, a resume may name it as first typed
    current["data"] = recorded_data(cfg.data)
    saved = {**saved, "data": recorded_data(saved["data"])} if isinstance(saved.get("data"), str) else saved
    skip = set(RESUMABLE_CHANGES)
    skip.update(name for name in ("tta_flip", "tta_shift") if getattr(cfg, name) is None)
    if cfg.pretrained.startswith("run:"):
        skip.add("model")
    return [
        f"{k} (run {saved[k]!r}, now {current[k]!r})"
        for k in current
        if k not in skip and k in saved and saved[k] != current[k]
    ]


class _RepeatedKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader, but a key given twice in one mapping is an error: YAML keeps the last silently,
    and the fit would run with another value than the one read at the top of the file."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str):
                if key in first_line:
                    raise _RepeatedKey(f"key {key} is given twice (lines {first_line[key]} and {line})")
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(
    path: str | Path | None = None, overrides: dict | None = None, *, base: dict | None = None
) -> FitConfig:
    """Defaults, then ``base`` (a run's saved settings), then the YAML file, then overrides
    (``None`` values are ignored)."""
    values: dict = settings_of_run(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            missing = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {path} {missing}")
        try:
            loaded = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except _RepeatedKey as e:
            raise ConfigError(f"config file {path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        unknown = sorted(str(key) for key in loaded if key not in _FIELDS)  # YAML keys may be numbers
        if unknown:
            hint = (
                ": this is a run's config.json; continue the run with --output DIR --resume, or "
                "fine-tune from its weights with --pretrained run:DIR"
                if "run_id" in unknown
                else ""
            )
            raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}{hint}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return FitConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()
