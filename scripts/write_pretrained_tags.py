"""Rewrite vision_ft/models/pretrained_tags.json from timm: for every registered ``model.tag`` other
than the model's default, the fields of timm's pretrained_cfg that differ from the default's.

    python scripts/write_pretrained_tags.py

Run it after registering a model or a tag; tests/test_pretrained_tags.py fails until then. Needs timm
(a development dependency): the package reads the table, never timm.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import timm

from vision_ft.models.registry import PretrainedCfg, get_model_entry, list_models

TABLE = Path(__file__).resolve().parents[1] / "vision_ft" / "models" / "pretrained_tags.json"
FIELDS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "num_classes", "license")


def timm_fields(name: str) -> dict:
    ref = timm.models.get_pretrained_cfg(name)
    return {field: getattr(ref, field) for field in FIELDS}


def differences(default: PretrainedCfg, fields: dict) -> dict:
    ours = dataclasses.asdict(default)
    return {
        field: list(value) if isinstance(value, tuple) else value
        for field, value in fields.items()
        if (tuple(value) if isinstance(value, tuple | list) else value)
        != (tuple(ours[field]) if isinstance(ours[field], tuple | list) else ours[field])
    }


def main() -> None:
    table = {}
    for model in list_models():
        entry = get_model_entry(model)
        for tag in entry.tags:
            if tag == entry.default_cfg.tag:
                continue
            changed = differences(entry.default_cfg, timm_fields(f"{model}.{tag}"))
            if changed:
                table[f"{model}.{tag}"] = changed
    rows = [f"  {json.dumps(name)}: {json.dumps(table[name], sort_keys=True)}" for name in sorted(table)]
    TABLE.write_text("{\n" + ",\n".join(rows) + "\n}\n")
    print(f"{len(table)} tags differ from their model's default cfg; written to {TABLE}")


if __name__ == "__main__":
    main()
