"""Rewrite vision_ft/models/parameter_counts.json from the registered architectures.

    python scripts/write_parameter_counts.py

Run it after adding or changing an architecture; tests/test_parameter_counts.py fails until then.
"""

from __future__ import annotations

import json
from pathlib import Path

from vision_ft.models.registry import list_models
from vision_ft.models.summary import COUNTS_FILE, abstract_parameter_count

if __name__ == "__main__":
    import vision_ft.models

    path = Path(vision_ft.models.__file__).with_name(COUNTS_FILE)
    counts = {name: abstract_parameter_count(name) for name in list_models()}
    path.write_text(json.dumps(counts, indent=1) + "\n")
    print(f"{len(counts)} models written to {path}")
