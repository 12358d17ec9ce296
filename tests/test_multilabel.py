"""Multi-label data (CSV ``a|b`` labels): multi-hot targets through the pipeline, sigmoid training,
metrics against scikit-learn's, and fit/eval/predict/embed end to end."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as sk

from tests.train_fixtures import tiny_config
from vision_ft.data.pipeline import Geometry, eval_batches
from vision_ft.data.sources import load_dataset
from vision_ft.train.loop import FitRun
from vision_ft.train.multilabel import (
    average_precision,
    binary_cross_entropy,
    multilabel_metrics,
    positive_weights,
)
from vision_ft.train.output_dir import RUN_ENTRIES

CLASSES = ("red", "green", "blue")


def _reject(constant):
    raise AssertionError(f"{constant} is not strict JSON")


def test_reports_are_strict_json_and_read_back_as_nan(tmp_path):
    from vision_ft.train.report import MetricsLog, write_json

    log = MetricsLog(tmp_path)
    log.log("val", 1, 10, {"auc": float("nan"), "loss": np.float32(0.5), "per_class": [{"auc": np.inf}]})
    log.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(text, parse_constant=_reject) == {
        "epoch": 1, "step": 10, "split": "val", "auc": None, "loss": 0.5, "per_class": [{"auc": None}]
    }  # fmt: skip
    assert np.isnan(MetricsLog.read(tmp_path / "metrics.jsonl")[0]["auc"])
    write_json(tmp_path / "final.json", {"x": [np.float64("nan"), 1.0]})
    assert json.loads((tmp_path / "final.json").read_text(), parse_constant=_reject) == {"x": [None, 1.0]}


def _random_case(seed, n=60, classes=4):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, classes)) < 0.35).astype(np.uint8)
    targets[0], targets[1] = 1, 0  # every class has both outcomes
    logits = rng.normal(size=(n, classes)) + 1.5 * targets
    logits[:, 0] = np.round(logits[:, 0])  # ties
    return targets, logits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn(seed):
    targets, logits = _random_case(seed)
    probs = 1 / (1 + np.exp(-logits))
    preds = (probs >= 0.5).astype(int)
    m = multilabel_metrics(targets, logits)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(targets, preds))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(targets, preds, average="macro"))
    assert m["micro_f1"] == pytest.approx(sk.f1_score(targets, preds, average="micro"))
    assert m["hamming_accuracy"] == pytest.approx(1 - sk.hamming_loss(targets, preds))
    assert m["auc"] == pytest.approx(sk.roc_auc_score(targets, probs, average="macro"))
    assert m["map"] == pytest.approx(sk.average_precision_score(targets, probs, average="macro"))
    balanced = np.mean([sk.balanced_accuracy_score(targets[:, c], preds[:, c]) for c in range(4)])
    assert m["balanced_accuracy"] == pytest.approx(balanced)
    assert m["loss"] == pytest.approx(sk.log_loss(targets.ravel(), probs.ravel()))
    for c, row in enumerate(m["per_class"]):
        tn, fp, fn, tp = sk.confusion_matrix(targets[:, c], preds[:, c]).ravel()
        assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (tp, fp, fn, tn)


def test_macro_f1_counts_a_class_predicted_but_never_true_as_zero():
    targets, logits = _random_case(0)
    targets[:, 3] = 0
    logits[:, 3] = -3.0
    logits[:5, 3] = 2.0  # predicted for five examples
    preds = (logits >= 0).astype(int)
    m = multilabel_metrics(targets, logits)
    assert m["macro_f1"] == pytest.approx(sk.f1_score(targets, preds, average="macro", zero_division=0))
    assert (m["per_class"][3]["fp"], m["per_class"][3]["tp"]) == (5, 0)


def test_average_precision_with_ties_and_without_positives():
    labels = np.array([1, 0, 1, 1, 0, 0])
    scores = np.array([0.9, 0.9, 0.5, 0.5, 0.5, 0.1])
    assert average_precision(labels, scores) == pytest.approx(sk.average_precision_score(labels, scores))
    assert np.isnan(average_precision(np.zeros(4), np.arange(4.0)))


def test_pooled_calibration_decides_at_the_threshold_the_metrics_use(tmp_path):
    """A probability of exactly 0.5 is a positive decision in the metrics, the mistakes and predict
    (``>= THRESHOLD``); the pooled calibration took it as negative (argmax of [0.5, 0.5])."""
    from vision_ft.train.multilabel import multilabel_clinical_report

    targets = np.array([[1, 0], [1, 1], [0, 0]])
    probs = np.array([[0.5, 0.2], [0.9, 0.5], [0.1, 0.3]])
    report = multilabel_clinical_report(targets, probs, ["a", "b", "c"], ["x", "y"], tmp_path)
    assert report["mistake_count"] == 0
    middle = [b for b in report["calibration"]["bins"] if b["lower"] < 0.5 <= b["upper"]]
    assert middle[0]["count"] == 2 and middle[0]["accuracy"] == 1.0


def test_nan_logits_make_every_summary_nan():
    """NaN scores gave a finite, order-dependent mAP (np.diff of NaNs counted each as a threshold),
    and a class whose scores held a NaN dropped out of the macro AUC as if it had no positives."""
    targets = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    for logits in (np.full((4, 2), np.nan), np.array([[3, -2], [-1, 2], [2, np.nan], [-3, -1]])):
        m = multilabel_metrics(targets, logits)
        for key in ("loss", "accuracy", "balanced_accuracy", "macro_f1", "micro_f1", "hamming_accuracy",
                    "auc", "map"):  # fmt: skip
            assert np.isnan(m[key]), (key, logits)
        assert np.isnan(m["per_class"][1]["average_precision"]) and np.isnan(m["per_class"][1]["auc"])


def test_positive_weights_and_weighted_loss_match_torch():
    torch = pytest.importorskip("torch")
    targets, logits = _random_case(3)
    pos_weight = positive_weights(targets)
    expected = (len(targets) - targets.sum(0)) / targets.sum(0)
    np.testing.assert_allclose(pos_weight, expected, rtol=1e-6)
    ours = binary_cross_entropy(targets, logits, pos_weight).mean()
    reference = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(logits), torch.tensor(targets, dtype=torch.float64), pos_weight=torch.tensor(pos_weight)
    )
    assert ours == pytest.approx(float(reference), rel=1e-6)


def _multilabel_csv(root, n=96, side=16, seed=0):
    """Each image lights up the colour channels of its labels: a learnable multi-label task."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        present = rng.random(3) < 0.45
        if not present.any():
            present[rng.integers(3)] = True
        image = rng.integers(0, 70, (side, side, 3), dtype=np.uint8)
        image[..., present] += 150
        Image.fromarray(image).save(root / f"{i}.png")
        split = "train" if i < 64 else ("val" if i < 80 else "test")
        rows.append((f"{i}.png", "|".join(c for c, p in zip(CLASSES, present, strict=True) if p), split))
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return root / "labels.csv", rows


def test_pipeline_carries_multi_hot_rows(tmp_path):
    manifest, rows = _multilabel_csv(tmp_path / "ml", n=24)
    dataset = load_dataset(f"csv:{manifest}")
    assert dataset.multi_label and dataset.class_names == ("blue", "green", "red")
    batch = next(eval_batches(dataset.splits["train"], Geometry(16), batch_size=8))
    assert batch["label"].shape == (8, 3)
    for k in range(8):
        names = {dataset.class_names[c] for c in np.flatnonzero(batch["label"][k])}
        assert names == set(rows[k][1].split("|"))


def test_fit_eval_predict_embed_on_multi_label_csv(tmp_path):
    manifest, _ = _multilabel_csv(tmp_path / "ml")
    cfg = tiny_config(
        tmp_path, data=f"csv:{manifest}", epochs=4, batch_size=16, eval_batch_size=16, lr=3e-3,
        class_weights="auto", select_metric="map", modality="overhead",
    )  # fmt: skip
    run = FitRun(cfg, progress=False)
    final = run.run()
    test = final["test"]
    assert {"accuracy", "auc", "balanced_accuracy", "macro_f1", "loss", "map", "micro_f1"} <= set(test)
    assert test["auc"] > 0.8 and test["map"] > 0.7  # far above chance (AUC 0.5, mAP ~0.45)
    assert len(test["per_class"]) == 3
    assert set(final["test_clinical"]["per_class"]) == set(run.data.class_names)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["multi_label"] is True
    # a new run refuses a directory holding anything else: the list must name all a fit writes
    assert {entry.name for entry in (tmp_path / "run").iterdir()} <= RUN_ENTRIES
    assert json.loads((tmp_path / "run" / "final.json").read_text(), parse_constant=_reject)["test"] == test

    from vision_ft.infer.evaluate import evaluate_run

    report = evaluate_run(tmp_path / "run", split="test")
    assert report["metrics"]["auc"] == pytest.approx(test["auc"], abs=1e-6)
    assert report["metrics"]["map"] == pytest.approx(test["map"], abs=1e-6)

    from click.testing import CliRunner

    from vision_ft.cli import main
    from vision_ft.infer.embeddings import read_embeddings
    from vision_ft.infer.predict import write_predictions  # noqa: F401 - exercised through the CLI below

    runner = CliRunner()
    preds = tmp_path / "preds.csv"
    result = runner.invoke(
        main, ["predict", "--checkpoint", str(tmp_path / "run"), "--input", f"csv:{manifest}",
               "--output", str(preds)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with open(preds) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and set(rows[0]) >= {"label", "predicted", "p_red", "p_green", "p_blue"}
    for row in rows:  # sigmoid probabilities: each class thresholded on its own
        above = {c for c in CLASSES if float(row[f"p_{c}"]) >= 0.5}
        assert set(filter(None, row["predicted"].split("|"))) == above
    exact = np.mean([set(r["predicted"].split("|")) == set(r["label"].split("|")) for r in rows])
    assert exact == pytest.approx(test["accuracy"], abs=1e-9)

    for suffix in (".npz", ".parquet"):
        out = tmp_path / f"emb{suffix}"
        result = runner.invoke(
            main, ["embed", "--checkpoint", str(tmp_path / "run"), "--data", f"csv:{manifest}",
                   "--split", "val", "--output", str(out), "--no-progress"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        emb = read_embeddings(out)
        assert emb.labels.shape == (16, 3) and emb.metadata["multi_label"] is True
    result = runner.invoke(
        main, ["probe", "--train", str(tmp_path / "emb.npz"), "--val", str(tmp_path / "emb.npz"),
               "--output", str(tmp_path / "probe")],
    )  # fmt: skip
    assert result.exit_code == 2 and "multi-label embeddings" in result.output


def _chestmnist_style(path, sizes=(48, 16, 16), side=16, classes=3, seed=0):
    """ChestMNIST's layout: one 0/1 label column per finding; finding c brightens band c of the image."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        labels = (rng.random((n, classes)) < 0.4).astype(np.uint8)
        images = rng.integers(0, 60, (n, side, side), dtype=np.uint8)
        for c in range(classes):
            images[labels[:, c] == 1, c * 5 : c * 5 + 5] += 150
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    np.savez(path, **arrays)
    return path


def test_npz_with_one_binary_column_per_class_is_multi_label(tmp_path):
    path = _chestmnist_style(tmp_path / "chest.npz")
    dataset = load_dataset(f"npz:{path}")
    assert dataset.multi_label and len(dataset.class_names) == 3
    assert dataset.splits["train"].labels.shape == (48, 3)
    final = FitRun(
        tiny_config(tmp_path, data=f"npz:{path}", epochs=1, batch_size=16, eval_batch_size=16), progress=False
    ).run()
    assert {"map", "micro_f1", "per_class"} <= set(final["test"]) and len(final["test"]["per_class"]) == 3

    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((4, 8, 8), np.uint8), train_labels=np.array([[0, 2]] * 4))
    from vision_ft.data.errors import DataError

    with pytest.raises(DataError, match="values other than 0 and 1"):
        load_dataset(f"npz:{bad}")
