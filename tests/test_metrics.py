"""Evaluation metrics against hand-computed values and sklearn, and how a diverged model scores."""

import numpy as np
import pytest

from vision_ft.train.evaluation import improves_selection, selection_score, worst_selection_score
from vision_ft.train.metrics import binary_auc, classification_metrics


def test_metrics_against_hand_computed_values():
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    # pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>both, 0.4>0.1, 0.4=0.4 (half) -> 4.5/6
    assert binary_auc(labels, scores) == pytest.approx(4.5 / 6)
    logits = np.log(np.stack([1 - scores, scores], axis=1))
    m = classification_metrics(labels, logits)
    assert m["confusion_matrix"] == [[2, 0], [2, 1]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 / 3) / 2)
    f1_0, f1_1 = 2 * 0.5 * 1 / 1.5, 2 * 1 * (1 / 3) / (4 / 3)
    assert m["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)


@pytest.mark.parametrize("select", ["accuracy", "balanced_accuracy", "macro_f1", "auc", "loss"])
def test_a_diverged_model_scores_nan_and_is_never_kept_as_best(select):
    """argmax of a NaN row is its first NaN: a model diverged to NaN logits "predicted" class 0 and
    scored finite accuracy, balanced accuracy and macro-F1, so select_metric accuracy kept it as best."""
    labels = np.array([0, 0, 0, 1, 2, 0, 1, 0])
    logits = np.zeros((8, 3))
    logits[2, 1] = np.nan  # one NaN is enough: the weights that made it are broken
    m = classification_metrics(labels, logits)
    for key in ("loss", "accuracy", "balanced_accuracy", "macro_f1", "auc"):
        assert np.isnan(m[key]), key
    score = selection_score(m, select)
    assert not improves_selection(score, worst_selection_score(select), select)  # not even a first


def test_an_empty_split_has_no_accuracy():
    m = classification_metrics(np.zeros(0, np.int64), np.zeros((0, 3)))
    assert np.isnan(m["accuracy"]) and m["count"] == 0  # was 0.0, a score select_metric accuracy kept


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_macro_f1_counts_a_predicted_class_no_example_has_as_sklearn_does():
    sk = pytest.importorskip("sklearn.metrics")
    labels, preds = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1])
    m = classification_metrics(labels, np.eye(3)[preds] * 5.0)
    # class 0: F1 2/3, class 1: 1, class 2 (predicted once, never true): 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["macro_f1"] == pytest.approx(sk.f1_score(labels, preds, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(labels, preds))
