"""Real-data results of the default fine-tuning recipe, run through the ``vision-ft fit`` CLI.

    python benchmarks/medmnist.py --runs default,scratch,pneumonia --out runs/bench --json OUT

- ``default``: ``vision-ft fit`` with no options (tf_efficientnet_lite0, offline ImageNet weights,
  bundled BreastMNIST, official splits, checkpoint chosen by validation AUC).
- ``scratch``: the same recipe from random initialisation: what transfer buys.
- ``pneumonia``: the same recipe on ../shared/data/pneumoniamnist.npz (imbalanced train subset),
  with ``--class-weights auto``, at 64 px for 6 epochs (the train split is 7x BreastMNIST's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from vision_ft.compile_cache import environ_without_cache

RUNS = {
    "default": [],
    "scratch": ["--pretrained", "false"],
    # 3882 training images (7x BreastMNIST): at 64 px and 6 epochs to stay near 10 minutes on 2 cores
    "pneumonia": "--data npz:{shared}/data/pneumoniamnist.npz --class-weights auto "
    "--img-size 64 --epochs 6".split(),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--json", dest="json_path")
    parser.add_argument(
        "--compile-cache",
        action="store_true",
        help="let fit load compiled steps from earlier runs (off: wall times are a first run's)",
    )
    args = parser.parse_args()
    env = dict(os.environ) if args.compile_cache else environ_without_cache()
    results = {}
    for name in args.runs.split(","):
        out = Path(args.out) / name
        extra = [a.format(shared=args.shared) for a in RUNS[name]]
        cmd = [sys.executable, "-m", "vision_ft.cli", "fit", "--no-progress", "--output", str(out), *extra]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
        final = json.loads((out / "final.json").read_text())
        results[name] = {
            "test_auc": final["test"]["auc"],
            "test_accuracy": final["test"]["accuracy"],
            "test_balanced_accuracy": final["test"]["balanced_accuracy"],
            "best_val_auc": final["best_val"]["auc"],
            "best_epoch": final["best_val"]["epoch"],
            "wall_seconds": final["wall_seconds"],
        }
        print(name, results[name], flush=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
