"""Linear probe and k-NN baselines: the solver against scipy, l2 selection, k-NN maths, probe files."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from vision_ft.train import probe as probe_mod
from vision_ft.train.probe import LinearProbe, fit_knn, fit_linear_probe, knn_probabilities

CLASSES = ("a", "b", "c")
# every linear-probe fit below uses these shapes, so the L-BFGS program compiles once for them
N_TRAIN, N_VAL, DIM = 300, 150, 16


def blobs(separation: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Three Gaussian blobs split into train and val; large separation makes them linearly separable."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, DIM)) * separation
    y = np.arange(N_TRAIN + N_VAL) % 3
    x = (centers[y] + rng.normal(size=(len(y), DIM))).astype(np.float32)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


@pytest.fixture(scope="module")
def separable():
    return blobs(separation=3.0, seed=0)


@pytest.fixture(scope="module")
def separable_fit(separable):
    return fit_linear_probe(*separable, class_names=CLASSES)


def reference_objective(params: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float, classes: int):
    """The probe objective and its gradient in float64 numpy, written independently of the JAX code."""
    w = params[: x.shape[1] * classes].reshape(x.shape[1], classes)
    b = params[x.shape[1] * classes :]
    logits = x @ w + b
    value = -log_softmax(logits, axis=1)[np.arange(len(y)), y].mean() + l2 * np.sum(w**2)
    residual = (softmax(logits, axis=1) - np.eye(classes)[y]) / len(y)
    grad = np.concatenate([(x.T @ residual + 2 * l2 * w).ravel(), residual.sum(axis=0)])
    return value, grad


def test_lbfgs_matches_scipy_reference():
    train_x, train_y, val_x, val_y = blobs(separation=0.5, seed=1)  # overlapping: a well-posed optimum
    l2 = 0.01
    probe, sweep = fit_linear_probe(
        train_x, train_y, val_x, val_y, class_names=CLASSES, l2_grid=(l2,), tol=1e-6
    )
    x = (train_x.astype(np.float64) - train_x.mean(axis=0)) / train_x.std(axis=0)
    np.testing.assert_allclose(probe.mean, train_x.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probe.scale, train_x.std(axis=0), rtol=1e-5)

    ref = minimize(
        reference_objective,
        np.zeros(DIM * 3 + 3),
        args=(x, train_y, l2, 3),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-10, "ftol": 1e-15, "maxiter": 10_000},
    )
    ref_w = ref.x[: DIM * 3].reshape(DIM, 3)
    assert np.linalg.norm(probe.weights - ref_w) / np.linalg.norm(ref_w) < 1e-3
    ref_log_probs = log_softmax(x @ ref_w + ref.x[DIM * 3 :], axis=1)
    ours = log_softmax(probe.logits(train_x).astype(np.float64), axis=1)
    assert np.abs(ours - ref_log_probs).max() < 1e-3 * np.abs(ref_log_probs).max()

    ours_params = np.concatenate([probe.weights.ravel(), probe.bias]).astype(np.float64)
    _, grad = reference_objective(ours_params, x, train_y, l2, 3)
    assert np.linalg.norm(grad) < 1e-4
    assert sweep[0]["l2"] == l2 and sweep[0]["grad_norm"] < 1e-4 and sweep[0]["iterations"] > 1


def test_l2_choice_moves_with_overfitting(separable_fit):
    # few samples, 100 pure-noise features and one informative one: a weak penalty memorises noise
    rng = np.random.default_rng(2)

    def noisy(n):
        y = np.arange(n) % 3
        x = rng.normal(size=(n, 101))
        x[:, 0] += (y - 1) * 1.5
        return x.astype(np.float32), y

    (tx, ty), (vx, vy) = noisy(30), noisy(300)
    noisy_probe, noisy_sweep = fit_linear_probe(tx, ty, vx, vy, class_names=CLASSES)
    clean_probe, clean_sweep = separable_fit

    assert [row["l2"] for row in noisy_sweep] == sorted(probe_mod.DEFAULT_L2_GRID)
    by_l2 = {row["l2"]: row["loss"] for row in noisy_sweep}
    assert by_l2[noisy_probe.l2] == min(by_l2.values())
    assert by_l2[min(by_l2)] > by_l2[noisy_probe.l2] + 0.5  # the weakest penalty really overfits
    assert noisy_probe.l2 >= 1e-2
    assert clean_probe.l2 <= 1e-3
    assert noisy_probe.l2 > clean_probe.l2


def test_select_by_accuracy_breaks_ties_on_loss(separable, separable_fit):
    _, sweep = separable_fit
    chosen, _ = fit_linear_probe(*separable, class_names=CLASSES, select="accuracy")
    best = max(row["accuracy"] for row in sweep)
    tied = [row for row in sweep if row["accuracy"] == best]
    assert chosen.l2 == min(tied, key=lambda row: row["loss"])["l2"]


def test_separable_blobs_probe_and_knn(separable, separable_fit):
    train_x, train_y, val_x, val_y = separable
    probe, sweep = separable_fit
    assert probe.class_names == CLASSES
    assert probe.weights.shape == (DIM, 3) and probe.weights.dtype == np.float32
    assert probe.logits(val_x).shape == (N_VAL, 3) and probe.logits(val_x).dtype == np.float32
    assert (probe.logits(val_x).argmax(axis=1) == val_y).all()
    chosen = next(row for row in sweep if row["l2"] == probe.l2)
    assert chosen["accuracy"] == 1.0 and chosen["count"] == N_VAL

    k, knn_sweep = fit_knn(train_x, train_y, val_x, val_y, num_classes=3, ks=(5, 1, 20, 1000))
    assert [row["k"] for row in knn_sweep] == [1, 5, 20, N_TRAIN]  # sorted, 1000 clipped to the train size
    assert k == 1  # every k is perfect here, and ties go to the smaller k
    assert knn_sweep[0]["accuracy"] == 1.0

    probs = knn_probabilities(train_x, train_y, train_x, k=1, num_classes=3)
    assert (probs.argmax(axis=1) == train_y).all()
    probs = knn_probabilities(train_x, train_y, val_x, k=20, num_classes=3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert probs.shape == (N_VAL, 3) and (probs >= 0).all()


def brute_force_knn(train_x, train_y, query_x, k, num_classes, temperature):
    train = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    query = query_x / np.linalg.norm(query_x, axis=1, keepdims=True)
    sims = query.astype(np.float64) @ train.T.astype(np.float64)
    out = np.zeros((len(query), num_classes))
    for i, row in enumerate(sims):
        for j in np.argsort(-row)[:k]:
            out[i, train_y[j]] += np.exp(row[j] / temperature)
    return out / out.sum(axis=1, keepdims=True)


def test_knn_matches_brute_force_and_chunking(monkeypatch):
    train_x, train_y, val_x, val_y = blobs(separation=0.3, seed=3)  # overlapping: neighbours disagree
    whole = knn_probabilities(train_x, train_y, val_x, k=15, num_classes=3, temperature=0.1)
    expected = brute_force_knn(train_x, train_y, val_x, 15, 3, 0.1)
    np.testing.assert_allclose(whole, expected, atol=1e-5)
    assert ((whole > 0.05) & (whole < 0.95)).any()  # the vote is not trivially unanimous

    monkeypatch.setattr(probe_mod, "KNN_CHUNK_FLOATS", N_TRAIN * 7)
    assert probe_mod.KNN_CHUNK_FLOATS // N_TRAIN < N_VAL  # 7 query rows at a time: 22 chunks
    chunked = knn_probabilities(train_x, train_y, val_x, k=15, num_classes=3, temperature=0.1)
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    _, chunked_sweep = fit_knn(train_x, train_y, val_x, val_y, num_classes=3, ks=(1, 15))
    monkeypatch.undo()
    _, whole_sweep = fit_knn(train_x, train_y, val_x, val_y, num_classes=3, ks=(1, 15))
    assert [r["loss"] for r in chunked_sweep] == pytest.approx([r["loss"] for r in whole_sweep], rel=1e-6)
    assert [r["accuracy"] for r in chunked_sweep] == [r["accuracy"] for r in whole_sweep]


def test_save_load_round_trip(tmp_path, separable, separable_fit):
    probe, _ = separable_fit
    path = tmp_path / "probe.npz"
    probe.save(path)
    loaded = LinearProbe.load(path)
    assert loaded.class_names == CLASSES and loaded.l2 == probe.l2
    np.testing.assert_array_equal(loaded.logits(separable[2]), probe.logits(separable[2]))
    with np.load(path, allow_pickle=False) as archive:
        assert archive["class_names"].dtype.kind == "U"

    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        probe.save(path)
    assert path.read_bytes() == before

    other = tmp_path / "probe_file"  # no .npz suffix: saved under exactly the name given
    probe.save(other)
    assert other.is_file() and not (tmp_path / "probe_file.npz").exists()


def assert_one_line_naming(error: pytest.ExceptionInfo, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_load_rejects_bad_files(tmp_path, separable_fit):
    probe, _ = separable_fit
    good = tmp_path / "good.npz"
    probe.save(good)

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError) as error:
        LinearProbe.load(truncated)
    assert_one_line_naming(error, str(truncated))

    missing = tmp_path / "missing.npz"
    with np.load(good) as archive:
        np.savez(missing, **{k: archive[k] for k in archive.files if k != "scale"})
    with pytest.raises(ValueError) as error:
        LinearProbe.load(missing)
    assert_one_line_naming(error, str(missing), "scale")

    wrong_shape = tmp_path / "wrong_shape.npz"
    with np.load(good) as archive:
        np.savez(wrong_shape, **{**{k: archive[k] for k in archive.files}, "bias": np.zeros(5, np.float32)})
    with pytest.raises(ValueError) as error:
        LinearProbe.load(wrong_shape)
    assert_one_line_naming(error, str(wrong_shape), "bias")

    bare_array = tmp_path / "bare.npy"
    np.save(bare_array, probe.weights)
    for path, content in [(tmp_path / "empty.npz", b""), (tmp_path / "text.npz", b"not an archive\n")]:
        path.write_bytes(content)
    for path in [bare_array, tmp_path / "empty.npz", tmp_path / "text.npz"]:
        with pytest.raises(ValueError) as error:
            LinearProbe.load(path)
        assert_one_line_naming(error, str(path))

    with pytest.raises(ValueError) as error:
        LinearProbe.load(tmp_path / "absent.npz")
    assert_one_line_naming(error, "absent.npz")


def test_bad_inputs_raise_value_error(separable):
    train_x, train_y, val_x, val_y = separable
    nan_x = train_x.copy()
    nan_x[3, 2] = np.nan
    inf_x = val_x.copy()
    inf_x[0, 0] = np.inf
    one_class = np.zeros_like(train_y)
    out_of_range = train_y.copy()
    out_of_range[5] = 3
    negative = val_y.copy()
    negative[0] = -1
    cases = {
        "train_y": (train_x, train_y[:-1], val_x, val_y, {}),
        "val_x": (train_x, train_y, val_x[:, :-1], val_y, {}),
        "NaN": (nan_x, train_y, val_x, val_y, {}),
        "inf": (train_x, train_y, inf_x, val_y, {}),
        "only 1 class": (train_x, one_class, val_x, val_y, {}),
        "outside [0, 3)": (train_x, out_of_range, val_x, val_y, {}),
        "val_y": (train_x, train_y, val_x, negative, {}),
        "integers": (train_x, train_y.astype(np.float32), val_x, val_y, {}),
        "(N, D)": (train_x[0], train_y, val_x, val_y, {}),
        "select": (train_x, train_y, val_x, val_y, {"select": "f1"}),
        "l2_grid": (train_x, train_y, val_x, val_y, {"l2_grid": ()}),
        "finite": (train_x, train_y, val_x, val_y, {"l2_grid": (-1.0,)}),
    }
    for words, (tx, ty, vx, vy, kwargs) in cases.items():
        with pytest.raises(ValueError) as error:
            fit_linear_probe(tx, ty, vx, vy, class_names=CLASSES, **kwargs)
        assert_one_line_naming(error, words)

    with pytest.raises(ValueError, match="NaN"):
        fit_knn(nan_x, train_y, val_x, val_y, num_classes=3)
    with pytest.raises(ValueError, match="only 1 class"):
        knn_probabilities(train_x, one_class, val_x, k=3, num_classes=3)
    with pytest.raises(ValueError, match="k must be"):
        knn_probabilities(train_x, train_y, val_x, k=0, num_classes=3)
    with pytest.raises(ValueError, match="query_x"):
        knn_probabilities(train_x, train_y, val_x[:, :4], k=3, num_classes=3)
    with pytest.raises(ValueError, match="temperature"):
        fit_knn(train_x, train_y, val_x, val_y, num_classes=3, temperature=0.0)
    probe = LinearProbe(
        np.zeros((DIM, 3), np.float32),
        np.zeros(3, np.float32),
        np.zeros(DIM, np.float32),
        np.ones(DIM, np.float32),
        0.1,
        CLASSES,
    )
    with pytest.raises(ValueError, match="dimension"):
        probe.logits(val_x[:, :4])
