"""The fine-tuning engine: rules, frozen layers, sharding, recompilation, reports."""

import dataclasses
import json
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vision_ft
from tests.train_fixtures import numpy_state, tiny_config, train_batch, write_synthetic_npz
from vision_ft.data.files import FileSplit
from vision_ft.data.npz import ArraySplit
from vision_ft.data.pipeline import eval_batches, may_be_unusable
from vision_ft.data.records import Record
from vision_ft.train.config import ConfigError, load_config
from vision_ft.train.groups import layer_decay_scales, named_group
from vision_ft.train.loop import FitRun, RunDirError
from vision_ft.train.optimizer import build_optimizer, keypath_to_str
from vision_ft.train.output_dir import RUN_ENTRIES
from vision_ft.train.rules import RuleError, build_plan
from vision_ft.train.step import Augment, Trainer, data_mesh, freeze_batchnorm
from vision_ft.train.tta import augmented_views

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def resnet18():
    return vision_ft.create_model("resnet18", num_classes=2)


def test_named_groups_follow_timm_grouping(resnet18):
    assert named_group(resnet18, "stem") == {"conv1.kernel", "bn1.scale", "bn1.bias"}
    assert named_group(resnet18, "head") == {"fc.kernel", "fc.bias"}
    assert all(p.startswith("layer4.") for p in named_group(resnet18, "stages.3"))
    blocks = named_group(resnet18, "blocks.0-1")
    assert {p.split(".")[0] + "." + p.split(".")[1] for p in blocks} == {"layer1.0", "layer1.1"}
    with pytest.raises(ValueError, match="out of range"):
        named_group(resnet18, "stages.4")
    with pytest.raises(ValueError, match=r"'stages.2-1' runs backwards: write stages.1-2"):
        named_group(resnet18, "stages.2-1")
    scales = layer_decay_scales(resnet18, 0.5)
    # timm: stem is layer 0, 8 blocks are 1..8, the head is 9 -> decay ** (9 - id)
    assert scales["fc.kernel"] == 1.0 and scales["layer4.1.conv1.kernel"] == 0.5
    assert scales["conv1.kernel"] == 0.5**9


def test_plan_rules(resnet18):
    plan = build_plan(resnet18, freeze=["stem", r"layer1\..*"], lr_rules=[("head", 10.0), (".*", 1.0)])
    assert not plan["conv1.kernel"].trainable and not plan["layer1.0.bn1.scale"].trainable
    assert plan["layer2.0.conv1.kernel"].trainable and plan["fc.kernel"].lr_scale == 10.0
    assert plan["layer2.0.conv1.kernel"].weight_decay and not plan["layer2.0.bn1.scale"].weight_decay
    assert not plan["fc.bias"].weight_decay
    with pytest.raises(RuleError, match="match no LR rule"):
        build_plan(resnet18, lr_rules=[("head", 1.0)])
    with pytest.raises(RuleError, match="matches no parameter"):
        build_plan(resnet18, freeze=["nothing_here"])


def test_frozen_params_have_no_optimizer_state(resnet18):
    plan = build_plan(resnet18, freeze=["backbone"])
    trainer = Trainer(
        resnet18,
        plan,
        build_optimizer(plan),
        data_mesh(),
        class_weights=np.ones(2),
    )
    paths = {keypath_to_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(trainer.trainable)[0]}
    assert paths == {"fc.kernel", "fc.bias"}
    # Adam's mu and nu exist for the two head tensors only
    opt_leaves = [x for x in jax.tree.leaves(trainer.opt_state) if getattr(x, "ndim", 0) > 0]
    assert sorted(x.shape for x in opt_leaves) == sorted([(512, 2), (512, 2), (2,), (2,)])


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_fit_with_frozen_backbone_changes_only_the_head(tmp_path, ema_decay):
    """After the run the model holds the best checkpoint: with EMA, the average of the weights."""
    cfg = tiny_config(tmp_path, freeze=("backbone",), epochs=1, ema_decay=ema_decay)
    run = FitRun(cfg, progress=False)
    params_before = numpy_state(run.model, nnx.Param)
    stats_before = numpy_state(run.model, nnx.BatchStat)
    run.run()
    params_after = numpy_state(run.model, nnx.Param)
    stats_after = numpy_state(run.model, nnx.BatchStat)
    for path, before in params_before.items():
        if path.startswith("fc."):
            assert not np.array_equal(before, params_after[path]), path
        else:
            assert np.array_equal(before, params_after[path]), path
    for path, before in stats_before.items():
        assert np.array_equal(before, stats_after[path]), path


def test_tta_views_follow_the_training_augmentation_unless_set(tmp_path):
    def resolved(name, **overrides):
        (tmp_path / name).mkdir()
        cfg = FitRun(tiny_config(tmp_path / name, **overrides), progress=False).cfg
        return cfg.tta_flip, cfg.tta_shift

    # the synthetic one-band data gets the medical preset: flips and shifts of up to 10%
    assert resolved("a") == (True, 0.05)
    assert resolved("b", hflip=False, translate=0.0) == (False, 0.0)
    assert resolved("c", tta_flip=False, tta_shift=0.2) == (False, 0.2)


@pytest.mark.parametrize("val_tta_shift", [False, True])
def test_validation_picks_checkpoints_on_mirrors_only_unless_asked(tmp_path, monkeypatch, val_tta_shift):
    cfg = tiny_config(tmp_path, epochs=1, val_tta_shift=val_tta_shift)
    run = FitRun(cfg, progress=False)
    assert (run.cfg.tta_flip, run.cfg.tta_shift) == (True, 0.05)  # 2 of the 32 pixels
    trainer = run._trainer(run.phases[0])
    images = train_batch(run, 0)[0]
    trainer.write_back(run.model, evaluated=True)
    x = (images - np.asarray(run.model.pretrained_cfg.mean)) / np.asarray(run.model.pretrained_cfg.std)
    views = augmented_views(x, flip=True, shift=0.05)
    assert len(views) == 10
    expected = [np.mean([np.asarray(run.model(v)) for v in subset], axis=0) for subset in (views[:2], views)]
    unshifted, shifted = (np.asarray(trainer.predict(images, shifted=s)) for s in (False, True))
    np.testing.assert_allclose(unshifted, expected[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(shifted, expected[1], rtol=1e-4, atol=1e-5)
    assert not np.allclose(unshifted, shifted, rtol=1e-4, atol=1e-5)

    calls = []
    original = FitRun.predict_split

    def recording(self, trainer, split, *, shifted=True):
        calls.append((split, shifted))
        return original(self, trainer, split, shifted=shifted)

    monkeypatch.setattr(FitRun, "predict_split", recording)
    run.run()
    assert calls == [("val", val_tta_shift), ("test", True)]


def test_train_bn_updates_frozen_statistics(tmp_path):
    cfg = tiny_config(tmp_path, freeze=("backbone",), epochs=1, train_bn=True)
    run = FitRun(cfg, progress=False)
    before = numpy_state(run.model, nnx.BatchStat)
    run.run()
    after = numpy_state(run.model, nnx.BatchStat)
    assert not np.array_equal(before["bn1.mean"], after["bn1.mean"])


def _run_steps(model, devices, batches):
    plan = build_plan(model)
    # SGD keeps updates proportional to gradients; Adam's m/sqrt(v) would turn float noise in
    # near-zero gradients into full-size steps of either sign, hiding what this test compares.
    tx = optax.sgd(0.05, momentum=0.9)
    trainer = Trainer(model, plan, tx, data_mesh(devices), class_weights=np.ones(2))
    losses = [float(trainer.train_step(*batch, step)["loss"]) for step, batch in enumerate(batches)]
    trainer.write_back(model)
    return losses, numpy_state(model, nnx.Param), numpy_state(model, nnx.BatchStat)


def test_an_unusable_example_adds_nothing_to_a_mixed_batch(tmp_path):
    """A masked example's blank image and label must not reach the loss, through its own slot or
    through the image it is mixed with."""
    images, labels, mask = train_batch(FitRun(tiny_config(tmp_path), progress=False), 0)
    mask = mask.copy()
    mask[0] = 0.0
    images = images.copy()
    images[0] = 0

    def loss_with_label(label):
        model = vision_ft.create_model("test_resnet", num_classes=2, in_chans=1)
        plan = build_plan(model)
        trainer = Trainer(
            model, plan, optax.sgd(0.0), data_mesh(jax.devices()[:1]), class_weights=np.ones(2),
            augment=Augment(mixup=0.8),
        )  # fmt: skip
        return float(trainer.train_step(images, np.r_[label, labels[1:]], mask, 0)["loss"])

    assert loss_with_label(0) == loss_with_label(1)


def test_one_device_and_eight_devices_agree(tmp_path):
    assert jax.device_count() == 8, "conftest simulates 8 CPU devices"
    cfg = tiny_config(tmp_path)
    run = FitRun(cfg, progress=False)
    batches = [train_batch(run, s) for s in range(3)]
    one = _run_steps(
        vision_ft.create_model("test_resnet", num_classes=2, in_chans=1, drop_path_rate=0.1),
        jax.devices()[:1],
        batches,
    )
    eight = _run_steps(
        vision_ft.create_model("test_resnet", num_classes=2, in_chans=1, drop_path_rate=0.1),
        jax.devices(),
        batches,
    )
    np.testing.assert_allclose(one[0], eight[0], rtol=1e-4)
    for a, b in ((one[1], eight[1]), (one[2], eight[2])):
        for path in a:
            np.testing.assert_allclose(a[path], b[path], rtol=1e-3, atol=1e-4, err_msg=path)


def test_the_model_stays_readable_while_its_trainer_steps_on_one_device(tmp_path):
    """On one device device_put hands back the very buffers it is given: the first step donated the
    model's own weights, and the model (a notebook's run.model after a failed or stopped fit) held
    deleted arrays; so did it after each write_back."""
    run = FitRun(tiny_config(tmp_path), progress=False)
    batches = [train_batch(run, s) for s in range(3)]
    run.release_output()
    model = vision_ft.create_model("test_resnet", num_classes=2, in_chans=1)
    trainer = Trainer(
        model, build_plan(model), optax.sgd(0.05), data_mesh(jax.devices()[:1]), class_weights=np.ones(2),
        ema_decay=0.9,
    )  # fmt: skip
    trainer.train_step(*batches[0], 0)
    for evaluated in (False, True):
        trainer.write_back(model, evaluated=evaluated)
        trainer.train_step(*batches[1 + evaluated], 1 + evaluated)
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param)) + jax.tree.leaves(
            nnx.state(model, nnx.BatchStat)
        )
        assert not any(leaf.is_deleted() for leaf in leaves), evaluated
        numpy_state(model, nnx.Param)  # readable


def test_no_recompilation_after_first_step(tmp_path):
    cfg = tiny_config(tmp_path)
    run = FitRun(cfg, progress=False)
    trainer = run._trainer(run.phases[0])
    for step in range(4):
        trainer.train_step(*train_batch(run, step), step)
    assert trainer._train_step._cache_size() == 1
    val = run.data.splits["val"]
    val = type(val)(val.images[:21], val.labels[:21])  # 21 = 16 + a padded batch of 5
    batches = list(eval_batches(val, run.eval_geometry, batch_size=16))
    assert [int(b["mask"].sum()) for b in batches] == [16, 5]
    assert [b["row"][-1] for b in batches] == [15, -1]
    for batch in batches:
        trainer.predict(batch["image"])
    assert trainer._eval_step._cache_size() == 1


def test_eval_steps_and_ema_compile_in_the_background(tmp_path, caplog):
    cfg = tiny_config(tmp_path, ema_decay=0.9)  # with tta_shift, validation and test differ
    run = FitRun(cfg, progress=False)

    def compiled_programs() -> set[str]:
        found = {
            m.group(1) for r in caplog.records if (m := re.search(r"Compiling jit\((\w+)\)", r.getMessage()))
        }
        caplog.clear()
        return found

    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        trainer = run._trainer(run.phases[0])  # starts compiling the eval steps and the EMA update
        assert trainer._background is not None
        run._check_steps_fit(trainer, run.phases[0])  # compiles the train step to check its memory
        assert "train_step" in compiled_programs()
        trainer._wait_for_background()
        images = next(eval_batches(run.data.splits["val"], run.eval_geometry, batch_size=16))["image"]
        compiled_programs()
        for step in range(2):
            trainer.train_step(*train_batch(run, step), step)
        shifted, unshifted = trainer.predict(images), trainer.predict(images, shifted=False)
        compiled = compiled_programs()
    assert not compiled & {"train_step", "eval_step", "ema_update"}, compiled
    assert not np.allclose(shifted, unshifted)  # two distinct steps were compiled ahead


def test_fit_tests_its_best_checkpoint_with_the_eval_steps_it_compiled(tmp_path, caplog):
    # set globally, not with jax.log_compiles(): the eval steps compile on a background thread
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            final = FitRun(tiny_config(tmp_path, ema_decay=0.9), progress=False).run()
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled = [
        m.group(1) for r in caplog.records if (m := re.search(r"Compiling jit\((\w+)\)", r.getMessage()))
    ]
    assert final["best_step"] is not None  # the test split was scored on restored weights
    # validation's step (image + mirror) and test's (all views), each compiled once
    assert compiled.count("eval_step") == 2 and compiled.count("train_step") == 1, compiled


def test_fit_writes_reports(tmp_path):
    cfg = tiny_config(tmp_path)
    final = FitRun(cfg, progress=False).run()
    out = tmp_path / "run"
    for name in (
        "metrics.jsonl",
        "final.json",
        "config.json",
        "learning_curves.png",
        "confusion_matrix.png",
        "roc.png",
    ):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").iterdir())
    # a new run refuses a directory holding anything else: the list must name all a fit writes
    assert {entry.name for entry in out.iterdir()} <= RUN_ENTRIES
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "val", "test"}
    assert all({"epoch", "step", "split", "loss"} <= set(r) for r in records)
    saved = json.loads((out / "final.json").read_text())
    assert set(saved["test"]) >= {"accuracy", "auc", "balanced_accuracy", "macro_f1", "loss"}
    assert saved["test"] == json.loads(json.dumps(final["test"]))
    # the synthetic task is learnable: the model must beat chance clearly
    assert saved["test"]["auc"] > 0.8
    assert json.loads((out / "config.json").read_text())["vision_ft_version"] == vision_ft.__version__
    with pytest.raises(RunDirError, match="already holds a run"):
        FitRun(cfg, progress=False)


def test_fine_tune_recipe_switches_phase(tmp_path):
    cfg = tiny_config(tmp_path, recipe="fine_tune", head_epochs=1, epochs=2)
    run = FitRun(cfg, progress=False)
    assert [p.name for p in run.phases] == ["head", "full"]
    assert "backbone" in run.phases[0].freeze and run.phases[1].layer_decay < 1
    final = run.run()
    assert final["test"]["auc"] > 0.5


def test_freeze_batchnorm_marks_only_fully_frozen_layers(resnet18):
    plan = build_plan(resnet18, freeze=["stem"])
    assert freeze_batchnorm(resnet18, plan) == 1 and resnet18.bn1.frozen_stats
    assert freeze_batchnorm(resnet18, plan, enabled=False) == 0 and not resnet18.bn1.frozen_stats


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model in vision_ft.list_models()


def test_default_config_is_the_bundled_breastmnist_recipe():
    cfg = load_config(REPO / "configs" / "breastmnist.yaml")
    default = load_config(None)
    # every setting but where the run is written
    assert dataclasses.replace(cfg, output=default.output) == default


def test_bf16_compute_keeps_fp32_parameters(tmp_path):
    run = FitRun(tiny_config(tmp_path, precision="bf16", epochs=1), progress=False)
    initial = numpy_state(run.model, nnx.Param)
    final = run.run()
    params = numpy_state(run.model, nnx.Param)
    assert not np.array_equal(params["fc.kernel"], initial["fc.kernel"])  # it trained
    assert {v.dtype for v in params.values()} == {np.dtype("float32")}
    x = np.zeros((2, 32, 32, 1), np.float32)
    assert run.model.forward_features(x).dtype == jax.numpy.bfloat16
    assert np.isfinite(final["test"]["loss"])


def test_select_metric_loss_keeps_the_lowest_validation_loss(tmp_path):
    cfg = tiny_config(tmp_path, epochs=3, select_metric="loss")
    final = FitRun(cfg, progress=False).run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [line for line in lines if line["split"] == "val"]
    losses = [line["loss"] for line in val]
    assert len(losses) == 3 and len(set(losses)) == 3
    lowest = val[int(np.argmin(losses))]
    assert final["best_val"]["epoch"] == lowest["epoch"]
    assert final["best_val"]["loss"] == pytest.approx(lowest["loss"], rel=1e-6)


@pytest.mark.parametrize("mixup", [0.0, 0.8])
def test_an_unreadable_image_changes_nothing_in_the_train_step(mixup):
    """The pipeline hands an unreadable image over as a blank with mask 0. The loss ignored it, but it
    entered BatchNorm's batch statistics: every other image was normalised against a batch holding
    a blank, and the running statistics moved towards it. Now the step with the blank trains as the
    step without it does. With mixup the image paired with the blank leaves the batch too: the step
    equals one where both are masked."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.8, (6, 32, 32, 1)).astype(np.float32)
    labels = np.array([0, 1, 1, 0, 1, 0], np.int32)

    def trained(images, labels, mask):
        model = vision_ft.create_model("test_resnet", num_classes=2, in_chans=1)
        # SGD: updates proportional to the gradients, which Adam's first step is not
        trainer = Trainer(
            model, build_plan(model), optax.sgd(1.0), data_mesh(jax.devices()[:1]),
            class_weights=np.ones(2), augment=Augment(hflip=False, mixup=mixup), learning_rate=0.1,
            mask_batch_statistics=True,
        )  # fmt: skip
        metrics = trainer.train_step(images, labels, mask, 0)
        trainer.write_back(model)
        return float(metrics["loss"]), numpy_state(model, nnx.Param), numpy_state(model, nnx.BatchStat)

    with_blank = images.copy()
    with_blank[2] = 0.0
    mask = np.array([1, 1, 0, 1, 1, 1], np.float32)
    # mixup pairs image i with image 5 - i: the blank (2) with image 3, so those two leave the batch
    kept = [0, 1, 3, 4, 5] if mixup == 0 else [0, 1, 4, 5]
    if mixup == 0:
        reference = trained(images[kept], labels[kept], np.ones(len(kept), np.float32))
    else:  # the same pairs and mixing draw: the partners' images replaced by themselves, masked out
        reference = trained(images, labels, np.array([1, 1, 0, 0, 1, 1], np.float32))
    loss, params, stats = trained(with_blank, labels, mask)
    assert loss == pytest.approx(reference[0], rel=1e-5)
    # fit masks the statistics where the data can hold unreadable files, not for arrays in memory
    assert may_be_unusable(FileSplit([Record("a.png", 0)]))
    assert not may_be_unusable(ArraySplit(images, labels))
    for path in stats:
        np.testing.assert_allclose(stats[path], reference[2][path], rtol=1e-5, atol=1e-6, err_msg=path)
    for path in params:
        np.testing.assert_allclose(params[path], reference[1][path], rtol=1e-4, atol=1e-6, err_msg=path)


def test_mixup_weighs_each_share_of_an_image_by_its_own_class(monkeypatch):
    """With class weights (9, 1) and mixup at lambda 1/2, the two images of a batch become the same
    half-and-half image, which must count as 9 parts class 0 to 1 part class 1: the loss and update
    equal those of that image given twice with labels 0 and 1. The mixed weight (5 each) used to scale
    a half-and-half target instead, which weighed the classes 1:1. (96 px: at 32 the last stage is
    1x1, where two equal images leave BatchNorm's batch statistics nothing but rounding.)"""
    monkeypatch.setattr(jax.random, "beta", lambda key, a, b, *args, **kwargs: jnp.asarray(0.5, jnp.float32))
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.8, (2, 96, 96, 1)).astype(np.float32)
    labels = np.array([0, 1], np.int32)

    def trained(images, mixup):
        model = vision_ft.create_model("test_resnet", num_classes=2, in_chans=1)
        trainer = Trainer(
            model, build_plan(model), optax.sgd(1.0), data_mesh(jax.devices()[:1]),
            class_weights=np.array([9.0, 1.0]), augment=Augment(hflip=False, mixup=mixup),
            learning_rate=0.1,
        )  # fmt: skip
        metrics = trainer.train_step(images, labels, np.ones(2, np.float32), 0)
        trainer.write_back(model)
        return float(metrics["loss"]), numpy_state(model, nnx.Param)

    half_and_half = 0.5 * images[0] + 0.5 * images[1]
    reference_loss, reference_params = trained(np.stack([half_and_half, half_and_half]), mixup=0.0)
    loss, params = trained(images, mixup=1.0)
    assert loss == pytest.approx(reference_loss, rel=1e-5)
    for path in params:
        np.testing.assert_allclose(params[path], reference_params[path], rtol=1e-4, atol=1e-6, err_msg=path)


def test_class_weights_with_label_smoothing_give_torch_s_loss():
    """torch's CrossEntropyLoss(weight=w, label_smoothing=e) weighs the smoothing term class by class:
    (1 - e) w_y nll_y + e/C sum_c w_c nll_c over sum w_y. The true class's weight scaled the whole
    smoothed target instead: 1.3734 where torch gives 1.3760 for the batch below."""
    import torch

    model = vision_ft.create_model("test_resnet", num_classes=3, in_chans=1)
    images = np.random.default_rng(0).uniform(0, 1, (6, 32, 32, 1)).astype(np.float32)
    labels = np.array([0, 1, 2, 2, 1, 0], np.int32)
    class_weights = np.array([0.5, 2.0, 4.0], np.float32)
    cfg = model.pretrained_cfg
    normalized = (images - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    logits = np.array(nnx.clone(model)(jnp.asarray(normalized), train=True))  # the step's own
    for smoothing in (0.0, 0.1):
        trainer = Trainer(
            nnx.clone(model), build_plan(model), optax.sgd(0.0), data_mesh(jax.devices()[:1]),
            class_weights=class_weights, label_smoothing=smoothing, augment=Augment(hflip=False),
        )  # fmt: skip
        loss = float(trainer.train_step(images, labels, np.ones(6, np.float32), 0)["loss"])
        expected = torch.nn.functional.cross_entropy(
            torch.from_numpy(logits), torch.from_numpy(labels).long(), weight=torch.from_numpy(class_weights),
            label_smoothing=smoothing,
        )  # fmt: skip
        assert loss == pytest.approx(float(expected), rel=1e-5), smoothing


def test_a_validation_split_of_one_class_cannot_choose_checkpoints_by_auc(tmp_path):
    """Its AUC is undefined at every epoch: no checkpoint was ever kept, and final.json tested the
    last weights under best_val: null, without a word."""
    data = write_synthetic_npz(tmp_path / "one_class_val.npz")
    arrays = dict(np.load(data))
    arrays["val_labels"] = np.zeros_like(arrays["val_labels"])
    np.savez(data, **arrays)
    with pytest.raises(ConfigError, match=r"val split holds one class only .*select_metric: loss"):
        FitRun(tiny_config(tmp_path, data=f"npz:{data}"), progress=False)
    assert not (tmp_path / "run").exists()
    FitRun(tiny_config(tmp_path, data=f"npz:{data}", select_metric="loss", epochs=1), progress=False)


def test_classes_without_training_images_are_named(tmp_path, caplog):
    """npz labels counted from 1, or a class found only in val or test, trained a model with classes
    it never saw, without a word."""
    data = write_synthetic_npz(tmp_path / "gap.npz", classes=2)
    arrays = dict(np.load(data))
    arrays["train_labels"] = np.where(arrays["train_labels"] == 1, 3, 0)  # 1 and 2 never seen
    arrays["test_labels"][:2] = 2
    np.savez(data, **arrays)
    with caplog.at_level("WARNING", logger="vision_ft.fit"):
        FitRun(tiny_config(tmp_path, data=f"npz:{data}"), progress=False)
    warned = [r.getMessage() for r in caplog.records if r.name == "vision_ft.fit"]
    assert any("no training images of class 1, class 2 (2 of 4" in m for m in warned), warned


@pytest.mark.parametrize(
    "model, img_size, seen",
    [("vit_tiny_patch16_224", 40, 32), ("convnext_atto", 100, 96), ("test_resnet", 33, None)],
)
def test_an_image_size_whose_border_the_model_leaves_out_is_named(tmp_path, caplog, model, img_size, seen):
    """A ViT's patches and ConvNeXt's strided convolutions leave out the rows and columns past the
    last whole patch, as in timm: --img-size 40 trained a ViT-16 on 32 px without a word."""
    with caplog.at_level("WARNING", logger="vision_ft.fit"):
        FitRun(tiny_config(tmp_path, model=model, img_size=img_size), progress=False).release_output()
    warned = [r.getMessage() for r in caplog.records if "is not a multiple of" in r.getMessage()]
    if seen is None:  # padded convolutions see every pixel
        assert not warned
    else:
        assert len(warned) == 1 and f"sees the first {seen} of each image's {img_size} rows" in warned[0]
