"""Baselines on frozen embeddings: a multinomial logistic-regression probe and a cosine k-NN classifier.

Both answer "how good are these features before any fine-tuning?", the number a transfer-learning paper
reports next to the fine-tuned one. Inputs are host arrays: float32 embeddings (N, D), int labels (N,).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vision_ft.train.metrics import classification_metrics

DEFAULT_L2_GRID: tuple[float, ...] = tuple(float(v) for v in np.logspace(-6, 1, 8))
SELECT_MODES = ("loss", "auc", "accuracy")
# a standardized feature with (near-)zero spread carries no information; the floor keeps it finite
STD_FLOOR = 1e-6
# largest similarity block (query rows x train rows) held at once, so a 100k x 100k k-NN fits in memory
KNN_CHUNK_FLOATS = 64 * 2**20
# k-NN probabilities of exactly 0 would make the validation cross-entropy infinite
_PROB_FLOOR = 1e-7
# L-BFGS gives up after this many consecutive steps without any decrease of the objective
_STALL_STEPS = 10
_PROBE_KEYS = ("weights", "bias", "mean", "scale", "l2", "class_names")


# ---------------------------------------------------------------- validation


def check_embeddings(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """``x`` as float32 (N, D) embeddings, or a one-line ValueError that starts with ``name``: empty,
    not real numbers, of another dimension than ``dim``, or holding NaN or inf."""
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, D) array of embeddings, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: embeddings must be real numbers, got dtype {arr.dtype}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name}: embeddings have dimension {arr.shape[1]}, expected {dim}")
    arr = arr.astype(np.float32, copy=False)  # embeddings files hold float32 already: no second copy
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"{name}: {int((~finite).sum())} of {len(arr)} embeddings hold NaN or inf (first: row {row})"
        )
    return arr


def _check_labels(y: np.ndarray, name: str, count: int, num_classes: int) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1 or len(arr) != count:
        raise ValueError(f"{name}: expected {count} labels to match the embeddings, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: labels must be integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        raise ValueError(
            f"{name}: {int(bad.sum())} labels outside [0, {num_classes}) (first: {int(arr[bad][0])})"
        )
    return arr.astype(np.int32)


def _check_split(
    x, y, prefix: str, num_classes: int, dim: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    xs = check_embeddings(x, f"{prefix}_x", dim)
    return xs, _check_labels(y, f"{prefix}_y", len(xs), num_classes)


def _check_train(x, y, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    xs, ys = _check_split(x, y, "train", num_classes)
    present = np.unique(ys)
    if len(present) < 2:
        raise ValueError(f"train_y: only {len(present)} class present; a classifier needs at least 2")
    return xs, ys


# ---------------------------------------------------------------- linear probe


@dataclass(frozen=True)
class LinearProbe:
    """A fitted multinomial logistic regression; it carries its own feature standardization."""

    weights: np.ndarray  # (D, C) float32, acting on standardized features
    bias: np.ndarray  # (C,)
    mean: np.ndarray  # (D,) feature standardization fitted on train
    scale: np.ndarray  # (D,)
    l2: float
    class_names: tuple[str, ...]

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """Class scores (N, C) float32 for raw (unstandardized) embeddings."""
        x = check_embeddings(embeddings, "embeddings", self.weights.shape[0])
        return (((x - self.mean) / self.scale) @ self.weights + self.bias).astype(np.float32)

    def save(self, path: str | Path) -> None:
        """Write a plain-array .npz (loadable without pickle); an existing file is never overwritten."""
        path = Path(path)
        # "xb" creates atomically-or-fails, and a file object stops numpy from appending ".npz"
        with open(path, "xb") as f:
            try:
                np.savez(
                    f,
                    weights=np.asarray(self.weights, np.float32),
                    bias=np.asarray(self.bias, np.float32),
                    mean=np.asarray(self.mean, np.float32),
                    scale=np.asarray(self.scale, np.float32),
                    l2=np.float64(self.l2),
                    class_names=np.array(self.class_names, dtype=np.str_),
                )
            except BaseException:
                f.close()
                path.unlink(missing_ok=True)  # a half-written probe must not pass for a saved one
                raise

    @classmethod
    def load(cls, path: str | Path) -> LinearProbe:
        """Read a probe written by :meth:`save`; any unusable file raises a one-line ValueError."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such probe file")
        try:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError(
                    f"{path}: not a linear probe file (a single .npy array, not an .npz archive)"
                )
            with loaded as archive:
                missing = [k for k in _PROBE_KEYS if k not in archive.files]
                if missing:
                    raise ValueError(f"{path}: not a linear probe file, missing {', '.join(missing)}")
                arrays = {k: archive[k] for k in _PROBE_KEYS}
        except ValueError as e:
            if str(e).startswith(str(path)):
                raise
            raise ValueError(f"{path}: unreadable probe file ({_one_line(e)})") from None
        except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"{path}: unreadable probe file ({_one_line(e)})") from None
        return cls._from_arrays(path, arrays)

    @classmethod
    def _from_arrays(cls, path: Path, a: dict[str, np.ndarray]) -> LinearProbe:
        w, b, mean, scale, l2, names = (a[k] for k in _PROBE_KEYS)
        if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
            raise ValueError(f"{path}: weights must be a (D, C) float array, got {w.dtype} {w.shape}")
        dim, num_classes = w.shape
        expected = {"bias": (b, num_classes), "mean": (mean, dim), "scale": (scale, dim)}
        for key, (arr, size) in expected.items():
            if arr.shape != (size,) or not np.issubdtype(arr.dtype, np.floating):
                raise ValueError(f"{path}: {key} must be a float array of shape ({size},), got {arr.shape}")
        if names.shape != (num_classes,) or names.dtype.kind != "U":
            raise ValueError(
                f"{path}: class_names must be {num_classes} strings, got {names.dtype} {names.shape}"
            )
        if l2.shape != () or not np.issubdtype(l2.dtype, np.floating):
            raise ValueError(f"{path}: l2 must be a float scalar, got {l2.dtype} {l2.shape}")
        if not all(np.isfinite(arr).all() for arr in (w, b, mean, scale, l2)) or (scale <= 0).any():
            raise ValueError(f"{path}: probe holds NaN, inf or a non-positive scale")
        return cls(
            weights=w.astype(np.float32),
            bias=b.astype(np.float32),
            mean=mean.astype(np.float32),
            scale=scale.astype(np.float32),
            l2=float(l2),
            class_names=tuple(str(n) for n in names),
        )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _objective(params: tuple[jax.Array, jax.Array], x: jax.Array, y: jax.Array, l2: jax.Array) -> jax.Array:
    weights, bias = params
    logits = x @ weights + bias
    nll = jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    return nll.mean() + l2 * jnp.sum(weights**2)


@jax.jit
def _lbfgs(params, x, y, l2, max_iter, tol):
    """Full-batch L-BFGS until the gradient norm drops under ``tol`` or ``max_iter`` steps are taken.

    One compiled program serves every l2 value and iteration budget: both are traced, not static.
    """

    def value_fn(p):
        return _objective(p, x, y, l2)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(value_fn)

    def step(carry):
        p, state, flat_steps = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = solver.update(grad, state, p, value=value, grad=grad, value_fn=value_fn)
        # in float32 the linesearch can run out of precision before the gradient reaches tol; after a
        # run of steps that do not lower the objective, more iterations only repeat the failed step
        improved = optax.tree.get(state, "value") < value
        return optax.apply_updates(p, updates), state, jnp.where(improved, 0, flat_steps + 1)

    def keep_going(carry):
        _, state, flat_steps = carry
        count = optax.tree.get(state, "count")
        grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
        # at count 0 the state holds no gradient yet
        return (count == 0) | ((count < max_iter) & (grad_norm >= tol) & (flat_steps < _STALL_STEPS))

    params, state, _ = jax.lax.while_loop(keep_going, step, (params, solver.init(params), jnp.int32(0)))
    grad_norm = optax.tree.norm(jax.grad(value_fn)(params))
    return params, optax.tree.get(state, "count"), grad_norm


def _selection_key(metrics: dict, select: str) -> tuple[float, float]:
    """Larger is better; for AUC/accuracy, ties go to the lower validation loss."""
    if select == "loss":
        return (-metrics["loss"], 0.0)
    score = metrics[select]
    return (score if np.isfinite(score) else -np.inf, -metrics["loss"])


def fit_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    class_names: Sequence[str],
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    max_iter: int = 500,
    select: str = "loss",
    tol: float = 1e-5,
) -> tuple[LinearProbe, list[dict]]:
    """Multinomial logistic regression on standardized embeddings, its l2 strength chosen on validation.

    Minimises mean softmax cross-entropy + l2 * ||W||^2 (bias free) with full-batch L-BFGS, once per
    l2 value. Fits run from the strongest penalty to the weakest, each warm-started from the previous
    solution (the regularization path: neighbouring optima are close, so later fits converge fast).
    The first fit starts at zero, so results are deterministic. ``select``: 'loss' minimises validation
    cross-entropy, 'auc'/'accuracy' maximise that metric. Returns the chosen probe and the sweep, one
    dict per l2 in ascending order: l2, L-BFGS iterations, final gradient norm and validation metrics.
    """
    class_names = tuple(str(n) for n in class_names)
    num_classes = len(class_names)
    train_x, train_y = _check_train(train_x, train_y, num_classes)
    val_x, val_y = _check_split(val_x, val_y, "val", num_classes, train_x.shape[1])
    grid = _check_l2_grid(l2_grid)
    if select not in SELECT_MODES:
        raise ValueError(f"select must be one of {', '.join(SELECT_MODES)}, got {select!r}")
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")

    mean = train_x.mean(axis=0, dtype=np.float64)
    scale = np.maximum(train_x.std(axis=0, dtype=np.float64), STD_FLOOR)
    mean, scale = mean.astype(np.float32), scale.astype(np.float32)
    x = jnp.asarray((train_x - mean) / scale)
    y = jnp.asarray(train_y)
    params = (jnp.zeros((train_x.shape[1], num_classes), jnp.float32), jnp.zeros(num_classes, jnp.float32))

    fits = []
    for l2 in sorted(grid, reverse=True):
        params, count, grad_norm = _lbfgs(
            params, x, y, jnp.float32(l2), jnp.int32(max_iter), jnp.float32(tol)
        )
        weights, bias = (np.asarray(p, np.float32) for p in params)
        # the bias is free up to a shared constant; centring it makes the stored probe canonical
        probe = LinearProbe(weights, bias - bias.mean(), mean, scale, float(l2), class_names)
        row = {"l2": float(l2), "iterations": int(count), "grad_norm": float(grad_norm)}
        row.update(classification_metrics(val_y, probe.logits(val_x)))
        fits.append((probe, row))

    fits.sort(key=lambda fit: fit[1]["l2"])
    best = max(range(len(fits)), key=lambda i: _selection_key(fits[i][1], select))
    return fits[best][0], [row for _, row in fits]


def _check_l2_grid(l2_grid: Sequence[float]) -> list[float]:
    grid = [float(v) for v in l2_grid]
    if not grid:
        raise ValueError("l2_grid is empty")
    if not all(np.isfinite(v) and v >= 0 for v in grid):
        raise ValueError(f"l2_grid values must be finite and >= 0, got {grid}")
    if len(set(grid)) != len(grid):
        raise ValueError(f"l2_grid has repeated values: {grid}")
    return grid


# ---------------------------------------------------------------- k-NN


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)  # an all-zero embedding stays zero: similarity 0 to everything


def _nearest(train: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities (N, k) in descending order and the train indices they belong to.

    Query rows go in chunks so the similarity block never exceeds ``KNN_CHUNK_FLOATS`` entries.
    """
    rows = max(1, KNN_CHUNK_FLOATS // len(train))
    sims_out = np.empty((len(query), k), np.float32)
    idx_out = np.empty((len(query), k), np.int64)
    for start in range(0, len(query), rows):
        sims = query[start : start + rows] @ train.T
        if k < len(train):
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(len(train)), sims.shape)
        top_sims = np.take_along_axis(sims, top, axis=1)
        # stable sort on (-similarity) so equal similarities keep a fixed, index-based order
        order = np.lexsort((top, -top_sims), axis=1)
        sims_out[start : start + rows] = np.take_along_axis(top_sims, order, axis=1)
        idx_out[start : start + rows] = np.take_along_axis(top, order, axis=1)
    return sims_out, idx_out


def _vote(sims: np.ndarray, labels: np.ndarray, num_classes: int, temperature: float) -> np.ndarray:
    """DINO-style weighted vote: each neighbour adds exp(sim / T) to its class, then normalise."""
    logits = sims.astype(np.float64) / temperature
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))  # shift cancels in the normalisation
    rows = np.repeat(np.arange(len(sims)), sims.shape[1])
    votes = np.bincount(
        rows * num_classes + labels.ravel(), weights=weights.ravel(), minlength=len(sims) * num_classes
    ).reshape(len(sims), num_classes)
    return (votes / votes.sum(axis=1, keepdims=True)).astype(np.float32)


def _check_knn_args(k: int, temperature: float) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")


def knn_probabilities(
    train_x: np.ndarray,
    train_y: np.ndarray,
    query_x: np.ndarray,
    *,
    k: int,
    num_classes: int,
    temperature: float = 0.07,
) -> np.ndarray:
    """Class probabilities (N, C) from the k most cosine-similar training embeddings.

    Neighbours are weighted by exp(similarity / temperature), as in DINO's k-NN evaluation; k larger
    than the training set is clipped to it.
    """
    _check_knn_args(k, temperature)
    train_x, train_y = _check_train(train_x, train_y, num_classes)
    query_x = check_embeddings(query_x, "query_x", train_x.shape[1])
    k = min(int(k), len(train_x))
    sims, idx = _nearest(_normalize(train_x), _normalize(query_x), k)
    return _vote(sims, train_y[idx], num_classes, temperature)


def knn_log_probabilities(probs: np.ndarray) -> np.ndarray:
    """Log of k-NN probabilities, floored: one floor for the k sweep and for the probe's reports, so
    the chosen k's reported loss is its sweep row's."""
    return np.log(np.maximum(probs, _PROB_FLOOR))


def fit_knn(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    num_classes: int,
    ks: Sequence[int] = (1, 5, 10, 20, 50, 100),
    temperature: float = 0.07,
) -> tuple[int, list[dict]]:
    """Choose k by validation accuracy (ties go to the smaller k).

    Returns the chosen k and one dict per distinct k (after clipping to the training-set size): k and
    the validation metrics. Neighbours are searched once for the largest k and reused for the others.
    """
    train_x, train_y = _check_train(train_x, train_y, num_classes)
    val_x, val_y = _check_split(val_x, val_y, "val", num_classes, train_x.shape[1])
    if not len(ks):
        raise ValueError("ks is empty")
    for k in ks:
        _check_knn_args(k, temperature)
    clipped = sorted({min(int(k), len(train_x)) for k in ks})

    sims, idx = _nearest(_normalize(train_x), _normalize(val_x), clipped[-1])
    neighbour_labels = train_y[idx]
    sweep = []
    for k in clipped:
        probs = _vote(sims[:, :k], neighbour_labels[:, :k], num_classes, temperature)
        sweep.append({"k": k, **classification_metrics(val_y, knn_log_probabilities(probs))})
    best = max(sweep, key=lambda row: (row["accuracy"], -row["k"]))
    return best["k"], sweep
