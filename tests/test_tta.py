"""Test-time views: which views, in what order, and the average the evaluations take."""

import jax.numpy as jnp
import numpy as np

from vision_ft.train.tta import augmented_views, averaged_over_views


def batch(n=2, h=10, w=12, c=3):
    return jnp.asarray(np.random.default_rng(0).random((n, h, w, c)), jnp.float32)


def test_views_are_the_image_its_mirror_and_their_reflect_padded_shifts():
    x = batch()
    assert len(augmented_views(x, flip=False, shift=0.0)) == 1
    assert len(augmented_views(x, flip=True, shift=0.0)) == 2
    assert len(augmented_views(x, flip=False, shift=0.01)) == 1  # rounds to no pixel on a 10-pixel side
    views = augmented_views(x, flip=True, shift=0.2)  # 2 pixels of the shorter (10-pixel) side
    assert len(views) == 10 and all(v.shape == x.shape for v in views)
    np.testing.assert_array_equal(views[0], x)
    np.testing.assert_array_equal(views[1], x[:, :, ::-1])
    padded = np.pad(np.asarray(x), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    expected = [padded[:, 0:10, 2:14], padded[:, 4:14, 2:14], padded[:, 2:12, 0:12], padded[:, 2:12, 4:16]]
    for view, want in zip(views[2:6], expected, strict=True):
        np.testing.assert_array_equal(view, want)
    mirrored = np.pad(np.asarray(x)[:, :, ::-1], ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(views[6], mirrored[:, 0:10, 2:14])


def test_average_over_views():
    x = batch()

    def fn(v):
        return v.mean(axis=(1, 2))

    np.testing.assert_array_equal(averaged_over_views(fn, x, flip=False, shift=0.0), fn(x))
    # bitwise what the mirrored-image TTA computed before shifts existed
    np.testing.assert_array_equal(
        averaged_over_views(fn, x, flip=True, shift=0.0), (fn(x) + fn(x[:, :, ::-1])) / 2
    )
    views = augmented_views(x, flip=True, shift=0.2)
    np.testing.assert_allclose(
        averaged_over_views(fn, x, flip=True, shift=0.2),
        np.mean([np.asarray(fn(v)) for v in views], axis=0),
        rtol=1e-6,
    )
