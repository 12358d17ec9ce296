"""Choose test-time views without the test split: score the cross-validation's saved checkpoints.

Each fold's kept checkpoint (from ``breastmnist_cv.py``) is evaluated on its held-out fold of the
official train split with each set of views: the image and its mirror (the earlier default), then
those plus their shifts by a fraction of the side (``tta_shift``). The pairs are of one checkpoint,
so the difference is the views' alone. The official test split is not read.

    python benchmarks/breastmnist_tta.py --runs runs/cv/lr5e-4,runs/cv/lr2e-3 --shifts 0.05,0.1 --json OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from vision_ft.data.pipeline import ExampleSplit
from vision_ft.data.sources import load_dataset
from vision_ft.infer.predictor import Predictor, compiled_forward, from_run, run_split
from vision_ft.train.metrics import classification_metrics


def held_out_metrics(predictor: Predictor, split: ExampleSplit, shift: float) -> dict:
    forward, _ = compiled_forward(predictor, "logits", tta_flip=True, tta_shift=shift)
    logits, labels = [], []
    for outputs, batch in run_split(predictor, split, forward, batch_size=64):
        logits.append(outputs)
        labels.append(batch["label"][batch["mask"] > 0])
    metrics = classification_metrics(np.concatenate(labels), np.concatenate(logits))
    return {"auc": metrics["auc"], "accuracy": metrics["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", required=True, help="candidate directories of breastmnist_cv.py")
    parser.add_argument("--shifts", default="0.05,0.1")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    shifts = [0.0] + [float(s) for s in args.shifts.split(",")]
    results = {}
    for candidate in map(Path, args.runs.split(",")):
        for run in sorted(candidate.glob("fold*")):
            predictor = from_run(run)  # loaded once: only the views change between shifts
            fold_file = candidate.parent / f"{run.name}.npz"
            held_out = load_dataset(f"npz:{fold_file}", predictor.data_options).splits["test"]
            scores = {f"shift {s}": held_out_metrics(predictor, held_out, s) for s in shifts}
            results[str(run)] = scores
            print(run, " ".join(f"{k}: {v['auc']:.3f}/{v['accuracy']:.3f}" for k, v in scores.items()))
    summary = {}
    for s in shifts:
        key = f"shift {s}"
        aucs = [r[key]["auc"] for r in results.values()]
        accs = [r[key]["accuracy"] for r in results.values()]
        summary[key] = {"held_out_auc": round(float(np.mean(aucs)), 4),
                        "held_out_accuracy": round(float(np.mean(accs)), 4)}  # fmt: skip
        if s:
            base = [r["shift 0.0"]["auc"] for r in results.values()]
            summary[key]["better_auc_than_mirror_only"] = int(np.sum(np.asarray(aucs) > np.asarray(base)))
        print(key, json.dumps(summary[key]))
    print(f"({len(results)} checkpoints; AUC / accuracy on held-out folds)")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"per_run": results, "mean": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
