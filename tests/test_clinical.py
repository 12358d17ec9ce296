"""The clinical evaluation report: bootstrap AUC interval, operating points, calibration, per-class."""

import csv
import json
import math

import numpy as np
import pytest

from vision_ft.train import clinical
from vision_ft.train.clinical import (
    bootstrap_auc_ci,
    calibration,
    clinical_report,
    hardest_misclassified,
    operating_points,
    per_class_report,
    plot_reliability,
    write_misclassified_csv,
)
from vision_ft.train.evaluation import test_reports as write_test_reports
from vision_ft.train.metrics import classification_metrics, roc_auc


def _scored(n: int, num_classes: int, seed: int, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities with some signal on the true class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), labels] += signal
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, probs


def _plain_python(value) -> bool:
    """True when only builtin JSON types appear (np.float64 passes json.dumps, so check by type)."""
    if isinstance(value, dict):
        return all(type(k) is str and _plain_python(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_python(v) for v in value)
    return type(value) in (str, int, float, bool, type(None))


# --- bootstrap ---------------------------------------------------------------------------------------


def test_bootstrap_ci_contains_point_auc_and_is_reproducible():
    labels, probs = _scored(300, 2, seed=1)
    ci = bootstrap_auc_ci(labels, probs, seed=3)
    assert ci["auc"] == pytest.approx(roc_auc(labels, probs))
    assert ci["low"] < ci["auc"] < ci["high"]
    assert 0.5 < ci["low"] and ci["high"] < 1.0
    assert ci["n_boot"] == 1000
    assert bootstrap_auc_ci(labels, probs, seed=3) == ci
    assert bootstrap_auc_ci(labels, probs, seed=4) != ci


def test_bootstrap_ci_narrows_with_more_examples():
    widths = []
    for n in (100, 2000):
        labels, probs = _scored(n, 2, seed=n)
        ci = bootstrap_auc_ci(labels, probs)
        widths.append(ci["high"] - ci["low"])
    # the width scales like 1/sqrt(N): ~4.5x narrower at 20x the examples
    assert widths[1] < widths[0] / 2.5


def test_bootstrap_ci_of_a_perfectly_separable_set_is_one_one():
    labels = np.array([0] * 20 + [1] * 5)
    scores = np.r_[np.linspace(0.0, 0.4, 20), np.linspace(0.6, 1.0, 5)]
    ci = bootstrap_auc_ci(labels, np.c_[1 - scores, scores], n_boot=200)
    assert (ci["auc"], ci["low"], ci["high"]) == (1.0, 1.0, 1.0)


def test_bootstrap_replicates_match_a_per_replicate_loop():
    # the row-wise ranking must give each replicate's Mann-Whitney AUC, ties included
    labels, probs = _scored(60, 3, seed=5)
    probs = np.round(probs, 1)
    idx = clinical._stratified_resample(labels, 25, np.random.default_rng(0))
    assert all(
        (np.bincount(labels[row], minlength=3) == np.bincount(labels, minlength=3)).all() for row in idx
    )
    vectorised = clinical._bootstrap_aucs(labels, probs, [0, 1, 2], 25, np.random.default_rng(0))
    looped = [roc_auc(labels[row], probs[row]) for row in idx]
    np.testing.assert_allclose(vectorised, looped, rtol=1e-12)


def test_bootstrap_ci_multiclass_and_single_class():
    labels, probs = _scored(400, 3, seed=2)
    ci = bootstrap_auc_ci(labels, probs, n_boot=300)
    assert ci["low"] < roc_auc(labels, probs) < ci["high"]
    single = bootstrap_auc_ci(np.zeros(10, int), probs[:10], n_boot=50)
    assert all(math.isnan(single[k]) for k in ("auc", "low", "high"))


# --- operating points --------------------------------------------------------------------------------


def _brute_force(labels: np.ndarray, scores: np.ndarray, kind: str, target: float) -> tuple:
    best = None
    for threshold in [*np.unique(scores), np.inf]:
        called = scores >= threshold
        sens = (called & labels).sum() / labels.sum()
        spec = (~called & ~labels).sum() / (~labels).sum()
        primary, secondary, feasible = (
            (sens, spec, spec >= target) if kind == "sens" else (spec, sens, sens >= target)
        )
        if feasible and (best is None or (primary, secondary) > best[:2]):
            best = (primary, secondary, threshold, sens, spec)
    return best[3], best[4], best[2]


@pytest.mark.parametrize("seed", range(6))
def test_operating_points_match_brute_force_over_all_thresholds(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(40) < 0.4
    labels[:2] = [True, False]
    # one decimal: many tied scores, within and across classes
    scores = np.round(np.clip(rng.normal(0.5 + 0.2 * labels, 0.2), 0, 1), 1)
    targets = (0.5, 0.8, 0.9, 0.95, 1.0)
    points = operating_points(labels, scores, specificities=targets, sensitivities=targets)
    for target in targets:
        key = f"{target:.2f}"
        got = points[f"sensitivity_at_specificity_{key}"]
        assert (got["sensitivity"], got["specificity"], got["threshold"]) == _brute_force(
            labels, scores, "sens", target
        )
        assert got["specificity"] >= target
        got = points[f"specificity_at_sensitivity_{key}"]
        assert (got["sensitivity"], got["specificity"], got["threshold"]) == _brute_force(
            labels, scores, "spec", target
        )
        assert got["sensitivity"] >= target


def test_operating_points_hand_example_and_single_class():
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.6, 0.9])
    points = operating_points(labels, scores, specificities=(0.75,), sensitivities=(1.0,))
    # specificity >= 0.75 allows one false positive: threshold 0.6 catches both positives
    assert points["sensitivity_at_specificity_0.75"] == {
        "sensitivity": 1.0,
        "specificity": 0.75,
        "threshold": 0.6,
        "target": 0.75,
    }
    assert points["specificity_at_sensitivity_1.00"]["threshold"] == 0.6
    nan_points = operating_points(np.ones(5, bool), scores[:5])
    assert set(nan_points) == {
        "sensitivity_at_specificity_0.90",
        "sensitivity_at_specificity_0.95",
        "specificity_at_sensitivity_0.90",
        "specificity_at_sensitivity_0.95",
    }
    assert all(math.isnan(p["sensitivity"]) and math.isnan(p["threshold"]) for p in nan_points.values())


# --- calibration -------------------------------------------------------------------------------------


def test_ece_of_a_calibrated_model_is_small():
    rng = np.random.default_rng(0)
    p1 = rng.random(40_000)
    labels = (rng.random(40_000) < p1).astype(int)
    result = calibration(labels, np.c_[1 - p1, p1])
    assert result["ece"] < 0.02
    assert len(result["bins"]) == 15
    assert sum(b["count"] for b in result["bins"]) == 40_000
    # binary top-label confidence is never below 0.5: those bins stay listed, empty
    low = [b for b in result["bins"] if b["upper"] <= 0.5]
    assert low and all(b["count"] == 0 and math.isnan(b["accuracy"]) for b in low)


def test_ece_of_an_overconfident_model_is_the_gap():
    n = 1000
    labels = np.zeros(n, int)
    labels[700:] = 1  # the model always says class 0 with 0.99: right 70% of the time
    probs = np.tile([0.99, 0.01], (n, 1))
    result = calibration(labels, probs, n_bins=10)
    assert result["ece"] == pytest.approx(0.29)
    top = result["bins"][-1]
    assert top["count"] == n
    assert top["confidence"] == pytest.approx(0.99) and top["accuracy"] == pytest.approx(0.7)
    assert sum(b["count"] for b in result["bins"]) == n


def test_calibration_bin_edges_follow_guo():
    # bins are ((m-1)/M, m/M]: 0.5 belongs to the bin ending at 0.5, 0.51 to the next one
    labels = np.array([0, 0, 0])
    probs = np.array([[0.5, 0.5], [0.51, 0.49], [1.0, 0.0]])
    bins = calibration(labels, probs, n_bins=2)["bins"]
    assert [b["count"] for b in bins] == [1, 2]
    assert bins[1]["confidence"] == pytest.approx(0.755)


def test_plot_reliability_writes_a_png(tmp_path):
    labels, probs = _scored(200, 3, seed=0)
    path = tmp_path / "rel.png"
    plot_reliability(calibration(labels, probs), path, "val")
    assert path.read_bytes()[:4] == b"\x89PNG"


# --- per-class report --------------------------------------------------------------------------------


def test_per_class_report_against_hand_counts():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = np.array([0, 0, 1, 1, 2, 2, 2, 0, 0])
    probs = np.full((9, 3), 0.1)
    probs[np.arange(9), preds] = 0.8
    rows = per_class_report(labels, probs, ["a", "b", "c"])
    # confusion rows (true) x cols (pred): [[2,1,0],[0,1,1],[2,0,2]], 9 examples
    expected = {
        "a": dict(support=3, precision=2 / 4, recall=2 / 3, specificity=4 / 6, f1=4 / 7),
        "b": dict(support=2, precision=1 / 2, recall=1 / 2, specificity=6 / 7, f1=1 / 2),
        "c": dict(support=4, precision=2 / 3, recall=2 / 4, specificity=4 / 5, f1=4 / 7),
    }
    assert [r["class"] for r in rows] == ["a", "b", "c"]
    for row in rows:
        want = expected[row["class"]]
        assert row["support"] == want["support"]
        for key in ("precision", "recall", "specificity", "f1"):
            assert row[key] == pytest.approx(want[key]), (row["class"], key)
        assert row["sensitivity"] == row["recall"]
        # with two score levels, one-vs-rest AUC is the mean of sensitivity and specificity
        assert row["auc"] == pytest.approx((want["recall"] + want["specificity"]) / 2)
        assert row["tp"] + row["fp"] + row["fn"] + row["tn"] == 9


def test_per_class_report_never_predicted_class_is_nan_not_zero():
    labels = np.array([0, 1, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    rows = per_class_report(labels, probs, ["a", "b", "c"])
    assert math.isnan(rows[2]["precision"]) and math.isnan(rows[2]["recall"]) and math.isnan(rows[2]["f1"])
    assert rows[2]["specificity"] == 1.0
    assert rows[1]["precision"] == 1.0 and rows[1]["recall"] == 0.5 and rows[1]["specificity"] == 1.0
    assert rows[0]["specificity"] == 0.5


# --- misclassified -----------------------------------------------------------------------------------


def _misclassified_case():
    ids = ["a.png", "b.png", 'scan, 3 "odd".png', "d.png", "e.png"]
    labels = np.array([0, 1, 2, 0, 1])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # right
            [0.6, 0.3, 0.1],  # wrong, loss -log 0.3
            [0.05, 0.9, 0.05],  # wrong, loss -log 0.05: the worst
            [0.4, 0.5, 0.1],  # wrong, loss -log 0.4
            [0.1, 0.8, 0.1],  # right
        ]
    )
    return ids, labels, probs, ["cat", "dog", "fox"]


def test_hardest_misclassified_order_and_content():
    ids, labels, probs, names = _misclassified_case()
    rows = hardest_misclassified(ids, labels, probs, names)
    assert [r["id"] for r in rows] == [ids[2], "b.png", "d.png"]
    assert rows[0] == {
        "id": ids[2],
        "label": "fox",
        "predicted": "dog",
        "loss": pytest.approx(-math.log(0.05)),
        "p_label": 0.05,
        "p_predicted": 0.9,
    }
    assert rows[1]["label"] == "dog" and rows[1]["predicted"] == "cat"
    assert [r["loss"] for r in rows] == sorted((r["loss"] for r in rows), reverse=True)
    assert [r["id"] for r in hardest_misclassified(ids, labels, probs, names, limit=2)] == [ids[2], "b.png"]


def test_misclassified_csv_round_trips(tmp_path):
    ids, labels, probs, names = _misclassified_case()
    rows = hardest_misclassified(ids, labels, probs, names)
    path = tmp_path / "mis.csv"
    write_misclassified_csv(rows, path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["id", "label", "predicted", "loss", "p_label", "p_predicted"]
        back = list(reader)
    assert [r["id"] for r in back] == [r["id"] for r in rows]
    for original, read in zip(rows, back, strict=True):
        assert read["label"] == original["label"] and read["predicted"] == original["predicted"]
        for key in ("loss", "p_label", "p_predicted"):
            assert float(read[key]) == original[key]


# --- the whole report --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 3])
def test_clinical_report_writes_files_and_json_ready_output(tmp_path, num_classes):
    labels, probs = _scored(150, num_classes, seed=num_classes)
    names = [f"class{c}" for c in range(num_classes)]
    ids = [f"img_{i}.png" for i in range(150)]
    report = clinical_report(labels, probs, ids, names, tmp_path / "out", prefix="val", seed=1)
    assert (tmp_path / "out" / "val_reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert report["misclassified_csv"] == "val_misclassified.csv"
    with open(tmp_path / "out" / "val_misclassified.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == min(50, report["misclassified_count"]) > 0
    json.dumps(report)
    assert _plain_python(report)
    assert report["auc_ci"]["low"] < report["auc_ci"]["auc"] < report["auc_ci"]["high"]
    assert report["ece"] == calibration(labels, probs)["ece"]
    assert [r["class"] for r in report["per_class"]] == names
    if num_classes == 2:
        point = report["operating_points"]["sensitivity_at_specificity_0.90"]
        assert point["specificity"] >= 0.9
    else:
        assert set(report["operating_points"]) == set(names)
        assert report["operating_points"]["class2"]["specificity_at_sensitivity_0.95"]["sensitivity"] >= 0.95


def test_clinical_report_with_one_class_returns_nan_fields(tmp_path):
    labels = np.ones(8, int)
    _, probs = _scored(8, 2, seed=0)
    report = clinical_report(labels, probs, [str(i) for i in range(8)], ["neg", "pos"], tmp_path)
    json.dumps(report)
    assert _plain_python(report)
    assert math.isnan(report["auc_ci"]["auc"]) and math.isnan(report["auc_ci"]["low"])
    assert all(math.isnan(p["sensitivity"]) for p in report["operating_points"].values())
    assert all(math.isnan(r["auc"]) for r in report["per_class"])
    assert math.isfinite(report["ece"])
    assert (tmp_path / "test_reliability.png").exists() and (tmp_path / "test_misclassified.csv").exists()


def test_clinical_report_rejects_mismatched_class_names(tmp_path):
    labels, probs = _scored(10, 3, seed=0)
    with pytest.raises(ValueError, match="3 columns for 2 class names"):
        clinical_report(labels, probs, [str(i) for i in range(10)], ["a", "b"], tmp_path)


def test_the_clinical_report_ranks_saturated_logits_as_the_metrics_do(tmp_path):
    """Logit gaps of 18-30 all round to probability 1 in float32: the report's AUC was 0.75 there."""
    logits = np.array([[0.0, 30.0], [0.0, 20.0], [0.0, 18.0], [0.0, -5.0]])
    labels = np.array([1, 1, 0, 0])
    test = classification_metrics(labels, logits)
    assert test["auc"] == 1.0
    report = write_test_reports(
        labels, logits, ["a", "b", "c", "d"], test, ["no", "yes"], tmp_path, multi_label=False
    )
    assert report["auc_ci"]["auc"] == 1.0


@pytest.mark.parametrize("nan_at", [slice(None), slice(0, 3)])
def test_operating_points_of_nan_scores_are_nan_not_an_index_error(nan_at):
    """A diverged model scores NaN: roc_curve counts each NaN as its own point and np.unique merges
    them, so the thresholds no longer lined up with the rates (an IndexError after the whole fit, or,
    with some NaNs, a threshold reported beside another threshold's sensitivity)."""
    scores = np.linspace(0.1, 0.9, 10)
    scores[nan_at] = np.nan
    points = operating_points(np.array([0, 1] * 5), scores)
    assert all(math.isnan(p[k]) for p in points.values() for k in ("sensitivity", "specificity", "threshold"))
