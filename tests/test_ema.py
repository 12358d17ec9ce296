"""The EMA of the weights: timm's and TF's warmups, one move per optimizer update, what gets evaluated
and checkpointed, and a fresh average for a fine_tune's second phase."""

import numpy as np
import pytest
from flax import nnx

from tests.train_fixtures import tiny_config, train_batch
from vision_ft.train.loop import FitRun
from vision_ft.train.step import ema_decay_at
from vision_ft.weights.mapping import format_path


def _fc_kernel(tree) -> np.ndarray:
    return np.array({format_path(p): v.get_value() for p, v in nnx.to_flat_state(tree)}["fc.kernel"])


def test_ema_warmups_follow_timm_and_tf():
    steps = np.array([0, 1, 7, 100, 1000])
    expected = {
        "none": [0.0, 0.98, 0.98, 0.98, 0.98],
        "power": [0.0, 1 - 2 ** (-2 / 3), 1 - 8 ** (-2 / 3), 1 - 101 ** (-2 / 3), 0.98],
        "count": [0.1, 2 / 11, 8 / 17, 101 / 110, 0.98],
    }
    for warmup, values in expected.items():
        got = [float(ema_decay_at(s, 0.98, warmup)) for s in steps]
        np.testing.assert_allclose(got, values, rtol=1e-6, err_msg=warmup)
    with pytest.raises(ValueError, match="ema_warmup"):
        ema_decay_at(1, 0.98, "linear")


@pytest.mark.parametrize("ema_warmup, accumulate", [("count", 1), ("none", 1), ("count", 2), ("count", 4)])
def test_ema_is_the_warmed_up_average_and_what_gets_evaluated(tmp_path, ema_warmup, accumulate):
    cfg = tiny_config(
        tmp_path, ema_decay=0.5, ema_warmup=ema_warmup, tta_flip=False, tta_shift=0.0,
        accumulate_steps=accumulate,
    )  # fmt: skip
    run = FitRun(cfg, progress=False)
    trainer = run._trainer(run.phases[0])

    # as timm's, the EMA moves once per optimizer update: step -> update it closes. 6 steps an epoch,
    # so accumulating 4 makes an update of 4 steps and one of the epoch's 2 left
    updates = {1: {s: s for s in range(3)}, 2: {1: 0, 3: 1, 5: 2}, 4: {3: 0, 5: 1, 9: 2, 11: 3}}[accumulate]
    assert run.steps_per_epoch == 6
    expected = _fc_kernel(trainer.trainable)
    for step in range(max(updates) + 1):
        trainer.train_step(*train_batch(run, step), step)
        if step not in updates:
            continue
        update = updates[step]
        decay = min(0.5, (1 + update) / (10 + update)) if ema_warmup == "count" else (0.5 if update else 0.0)
        expected = expected * decay + _fc_kernel(trainer.trainable) * (1 - decay)
    np.testing.assert_allclose(_fc_kernel(trainer.ema[0]), expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(_fc_kernel(trainer.ema[0]), _fc_kernel(trainer.trainable))
    images = train_batch(run, 5)[0]
    weights = run._weights(trainer, 3)  # the best checkpoint keeps the EMA ...
    np.testing.assert_array_equal(
        np.asarray(weights["params"]["fc"]["kernel"].get_value()), _fc_kernel(trainer.ema[0])
    )
    ema_logits = np.asarray(trainer.predict(images))
    trainer.write_back(run.model)  # ... while the model keeps training from the raw weights
    np.testing.assert_array_equal(np.asarray(run.model.fc.kernel.get_value()), _fc_kernel(trainer.trainable))
    trainer.write_back(run.model, evaluated=True)
    x = (images - np.asarray(run.model.pretrained_cfg.mean)) / np.asarray(run.model.pretrained_cfg.std)
    np.testing.assert_allclose(np.asarray(run.model(x)), ema_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_second_phase_ema_warms_up_from_its_own_first_update(tmp_path, accumulate):
    """A fine_tune's full phase starts a new EMA, but its warmup counted the head phase's updates
    too: TF's warmup began at (1 + 6) / (10 + 6) instead of at 0.1, as a new average's does."""
    cfg = tiny_config(
        tmp_path, recipe="fine_tune", head_epochs=1, epochs=2, ema_decay=0.9, ema_warmup="count",
        accumulate_steps=accumulate, tta_flip=False, tta_shift=0.0,
    )  # fmt: skip
    run = FitRun(cfg, progress=False)
    full = run.phases[1]
    assert full.first_step == run.steps_per_epoch == 6
    trainer = run._trainer(full)

    expected = _fc_kernel(trainer.trainable)
    for update in range(3):
        for step in range(full.first_step + update * accumulate, full.first_step + (update + 1) * accumulate):
            trainer.train_step(*train_batch(run, step), step)
        decay = min(0.9, (1 + update) / (10 + update))  # counted from the phase's first update
        expected = expected * decay + _fc_kernel(trainer.trainable) * (1 - decay)
    np.testing.assert_allclose(_fc_kernel(trainer.ema[0]), expected, rtol=1e-5, atol=1e-7)
