"""The optimizer's learning rate, given to the compiled train step from a table of its schedule."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import vision_ft
from tests.train_fixtures import numpy_state, tiny_config, train_batch
from vision_ft.train.config import ConfigError, FitConfig, load_config
from vision_ft.train.loop import FitRun
from vision_ft.train.optimizer import UpdateWindows, build_optimizer, learning_rate_by_step, warmup_cosine
from vision_ft.train.phases import num_layers, phase_optimizer, plan_phases
from vision_ft.train.rules import ParamSetting, RuleError, build_plan
from vision_ft.train.step import Trainer, data_mesh


@pytest.mark.parametrize("accumulate_steps", [1, 2])
def test_learning_rate_given_to_the_step_trains_as_optax_schedule_inside(tmp_path, accumulate_steps):
    """The step takes its learning rate as an argument (so no schedule is compiled in); with
    gradient accumulation, one rate per update of ``accumulate_steps`` micro-steps, as optax counts."""
    run = FitRun(tiny_config(tmp_path), progress=False)
    batches = [train_batch(run, s) for s in range(6)]
    schedule = warmup_cosine(0.05, total_steps=3, warmup_steps=1)  # 0, then 0.05, then 0.025

    def trained(tx, learning_rate):
        model = vision_ft.create_model("test_resnet", num_classes=2, in_chans=1)
        plan = build_plan(model)
        trainer = Trainer(model, plan, tx, data_mesh(jax.devices()[:1]), class_weights=np.ones(2),
                          learning_rate=learning_rate)  # fmt: skip
        for step, batch in enumerate(batches[: 3 * accumulate_steps]):
            trainer.train_step(*batch, step)
        trainer.write_back(model)
        return numpy_state(model, nnx.Param)

    def decayed_sgd(learning_rate):
        # AdamW's order (decay, then the rate) with SGD's updates, which stay proportional to the
        # gradients: Adam would blow the float noise of near-zero gradients up to full-size steps
        sgd = optax.sgd(learning_rate, momentum=0.9)
        return optax.MultiSteps(optax.chain(optax.add_decayed_weights(0.05), sgd), accumulate_steps)

    inside = trained(decayed_sgd(schedule), 1.0)
    given = trained(
        decayed_sgd(1.0),
        learning_rate_by_step(
            schedule,
            num_steps=3 * accumulate_steps,
            windows=UpdateWindows(3 * accumulate_steps, accumulate_steps),
        ),
    )
    initial = numpy_state(vision_ft.create_model("test_resnet", num_classes=2, in_chans=1), nnx.Param)
    assert any(not np.array_equal(initial[k], given[k]) for k in given)  # it trained
    # not bitwise: the two programs fuse the update into the gradient's reductions differently, which
    # moves float rounding; one update's rate off by a step moves weights by orders of magnitude more
    for path in inside:
        np.testing.assert_allclose(inside[path], given[path], rtol=1e-5, atol=1e-7, err_msg=path)


def test_learning_rate_by_step_counts_updates_from_the_phase_start():
    rate = learning_rate_by_step(
        optax.linear_schedule(1.0, 0.0, 4), num_steps=7, first_step=10, windows=UpdateWindows(7, 2)
    )
    # one epoch of 7 steps: 3 whole updates of 2 and a short fourth
    assert [rate(s) for s in range(10, 17)] == [1.0, 1.0, 0.75, 0.75, 0.5, 0.5, 0.25]
    rate = learning_rate_by_step(
        optax.linear_schedule(1.0, 0.0, 4), num_steps=6, first_step=3, windows=UpdateWindows(3, 2)
    )
    # two epochs of 3 steps: each an update of 2 steps and one of 1, never a window across epochs
    assert [rate(s) for s in range(3, 9)] == [1.0, 1.0, 0.75, 0.5, 0.5, 0.25]


def test_accumulation_windows_restart_every_epoch_and_keep_its_leftover_steps():
    """timm's loop: an update every ``accumulate_steps`` steps, and one at every epoch's end over the
    steps left (5 steps of 2: updates of 2, 2 and 1 step)."""
    windows = UpdateWindows(steps_per_epoch=5, accumulate_steps=2)
    assert windows.updates_per_epoch == 3
    assert [windows.closes_window(s) for s in range(10)] == [False, True, False, True, True] * 2
    assert [windows.update_index(s) for s in range(10)] == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]
    assert [int(windows.window_steps(g)) for g in range(6)] == [2, 2, 1, 2, 2, 1]
    even = UpdateWindows(steps_per_epoch=4, accumulate_steps=2)
    assert [even.closes_window(s) for s in range(4)] == [False, True, False, True]
    assert int(even.window_steps(1)) == 2


def test_a_short_window_updates_with_the_mean_of_its_own_gradients():
    """Three steps an epoch, accumulating 2: the first update is AdamW's on the mean of two steps'
    gradients, the second on the third step's alone, at the epoch's end (it was dropped before, or
    carried into the next epoch)."""
    plan = {"w": ParamSetting(trainable=True, lr_scale=1e-2, weight_decay=True)}
    grads = [{"w": np.array([1.0, -2.0, 3.0], np.float32) * (i + 1)} for i in range(3)]
    params = {"w": np.ones(3, np.float32)}

    def run(tx, grads):
        state, p = tx.init(params), params
        for g in grads:
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p

    accumulated = run(build_optimizer(plan, windows=UpdateWindows(3, 2)), grads)
    mean_first_two = {"w": (grads[0]["w"] + grads[1]["w"]) / 2}
    reference = run(build_optimizer(plan), [mean_first_two, grads[2]])
    np.testing.assert_allclose(accumulated["w"], reference["w"], rtol=1e-6)
    held_back = run(build_optimizer(plan), [mean_first_two])
    assert not np.allclose(accumulated["w"], held_back["w"])


def test_fine_tune_trains_the_head_then_everything_at_rates_falling_100x_to_the_stem():
    """fastai's fine_tune: the new head alone at ``head_lr_mult`` times the LR, then every layer at
    half the LR, discriminative rates from the head down to 1/100 of it at the stem."""
    model = vision_ft.create_model("resnet18", num_classes=2)
    cfg = FitConfig(recipe="fine_tune", epochs=3, head_epochs=1, lr=1e-3, warmup_epochs=0.0, min_lr_ratio=0.0)
    head, full = plan_phases(cfg, steps_per_epoch=4, layers=num_layers(model))
    assert (head.first_step, head.last_step, full.first_step, full.last_step) == (0, 4, 4, 12)
    assert head.lr == pytest.approx(1e-3 * cfg.head_lr_mult) and full.lr == pytest.approx(5e-4)

    head_plan = build_plan(model, freeze=head.freeze, layer_decay=head.layer_decay)
    assert {p for p, s in head_plan.items() if s.trainable} == {"fc.kernel", "fc.bias"}

    full_plan = build_plan(model, freeze=full.freeze, layer_decay=full.layer_decay)
    assert all(s.trainable for s in full_plan.values())
    assert full_plan["fc.kernel"].lr_scale == pytest.approx(1.0)
    assert full_plan["conv1.kernel"].lr_scale == pytest.approx(0.01)
    _, rate = phase_optimizer(cfg, full, full_plan, steps_per_epoch=4)
    # the second phase's cosine starts at its own first step, at its full rate, and falls to 0
    assert rate(4) == pytest.approx(full.lr) and rate(8) == pytest.approx(full.lr / 2)
    assert rate(11) < rate(10) < rate(8)


@pytest.mark.parametrize(
    "setting, culprit",
    [
        (dict(seed=-1), "seed"),
        (dict(seed=2**32), "seed"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio"),
        (dict(warmup_epochs=-1.0), "warmup_epochs"),
        (dict(weight_decay=float("nan")), "weight_decay"),
        (dict(clip_norm=-1.0), "clip_norm"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(recipe="fine_tune", head_epochs=0), "head_epochs"),
        (dict(recipe="fine_tune", epochs=2, head_epochs=2), "head_epochs"),
        (dict(head_lr_mult=0.0), "head_lr_mult"),
        (dict(eval_batch_size=0), "eval_batch_size"),
        (dict(save_every_steps=-5), "save_every_steps"),
        # a negative multiplier froze the parameters it matched, silently
        (dict(lr_rules=(("head", -1.0), (".*", 1.0))), "lr_rules: the multiplier of rule 'head' is -1.0"),
        (dict(lr_rules=((".*", float("nan")),)), r"lr_rules: the multiplier of rule '\.\*' is nan"),
        # infinities passed every ">= 0" check: --lr inf trained to NaN, warmup_epochs: .inf crashed
        (dict(lr=float("inf")), "lr must be a finite number, not inf"),
        (dict(warmup_epochs=float("inf")), "warmup_epochs must be a finite number"),
        (dict(mixup=float("inf")), "mixup must be a finite number"),
        (dict(mean=(0.5, float("inf")), std=(0.2, 0.2)), "mean must hold finite numbers"),
    ],
)
def test_config_refuses_out_of_range_settings(setting, culprit):
    with pytest.raises(ConfigError, match=culprit):
        FitConfig(**setting).validate()
    FitConfig().validate()  # the defaults pass


@pytest.mark.parametrize(
    "yaml_text, culprit",
    [
        ("freeze: [[1]]", "freeze"),  # was an AttributeError traceback
        ("freeze: [1]", "freeze"),
        ("hflip: 5", "hflip"),  # was taken as true
        ("hflip: [false]", "hflip"),
        ("img_size: 16.5", "img_size"),
        ("crop_scale: 0.5", "crop_scale"),
        ("crop_scale: [true, 1.0]", "crop_scale"),
        ("epochs: true", "epochs"),  # YAML's true was taken as 1 epoch
        ("lr: yes", "lr"),
        ("model: [resnet50]", "model"),
        ("lr_rules: [[1, 2]]", "lr_rules"),  # the pattern "1"
        ("lr_rules: [head]", "lr_rules"),
        ("lr_rules: [[head, 1.0, 2.0]]", "lr_rules"),
        ("lr_rules: [[head, true]]", "lr_rules"),
        ("lr_rules: [[head, fast]]", "lr_rules"),
        # YAML 1.1 numbers were turned back into other text: octal 010 -> '8', base-60 12:30 -> '750'
        ("output: 010", "output"),
        ("output: 12:30", "output"),
        ("checkpoint_dir: 2.50", "checkpoint_dir"),
    ],
)
def test_config_file_values_of_the_wrong_type_are_refused(tmp_path, yaml_text, culprit):
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text + "\n")
    with pytest.raises(ConfigError, match=f"bad value for {culprit}"):
        load_config(path)
    path.write_text("hflip: no\nfreeze: [head, ' stem ']\n")  # YAML's own booleans and strings
    assert load_config(path).hflip is False and load_config(path).freeze == ("head", "stem")
    path.write_text("pretrained: false\nlr_rules: [[head, 10], ['.*', 0.5]]\n")
    loaded = load_config(path)
    assert loaded.pretrained == "false" and loaded.lr_rules == (("head", 10.0), (".*", 0.5))


def test_a_negative_lr_multiplier_is_refused_naming_its_rule(tmp_path):
    """A negative multiplier froze the parameters it matched (only those above 0 train) where the
    user surely meant them to train; 0 still freezes them."""
    path = tmp_path / "config.yaml"
    path.write_text("lr_rules: [[head, 10], [stem, -0.5], ['.*', 1]]\n")
    with pytest.raises(ConfigError, match="rule 'stem' is -0.5") as refused:
        load_config(path)
    assert "\n" not in str(refused.value)
    path.write_text("lr_rules: [[head, 0], ['.*', 1]]\n")
    assert load_config(path).lr_rules == (("head", 0.0), (".*", 1.0))

    model = vision_ft.create_model("test_resnet", num_classes=2, in_chans=1)
    with pytest.raises(RuleError, match="LR rule 'head': multiplier -1.0"):
        build_plan(model, lr_rules=[("head", -1.0), (".*", 1.0)])
    plan = build_plan(model, lr_rules=[("head", 0.0), (".*", 1.0)])
    assert {p for p, setting in plan.items() if not setting.trainable} == {"fc.bias", "fc.kernel"}


def test_a_config_path_that_is_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory, not a file"):
        load_config(tmp_path)  # said "does not exist"
    with pytest.raises(ConfigError, match="config file .*absent.yaml does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_an_lr_rule_that_changes_nothing_is_refused():
    """--freeze refused a pattern matching nothing; an LR rule with timm's name for a parameter
    (fc.weight for fc.kernel), a typo, or one after a catch-all trained every
    parameter at 1x without a word."""
    model = vision_ft.create_model("test_resnet", num_classes=2, in_chans=1)
    with pytest.raises(RuleError, match="LR rule 'fc.weight' matches no parameter"):
        build_plan(model, lr_rules=[("fc.weight", 10.0), (".*", 1.0)])
    for rules in ([(".*", 1.0), ("head", 10.0)], [("stem", 0.1), (".*", 1.0), ("head", 10.0)]):
        with pytest.raises(RuleError, match=r"LR rule 'head' sets nothing: earlier rule '\.\*' matches"):
            build_plan(model, lr_rules=rules)
    # a catch-all after rules that cover everything between them is a safety net, not a mistake
    plan = build_plan(model, lr_rules=[("head", 10.0), ("backbone", 0.1), (".*", 1.0)])
    assert plan["fc.kernel"].lr_scale == 10.0 and plan["conv1.layers.0.kernel"].lr_scale == 0.1


def test_a_fit_that_would_train_nothing_is_refused_before_it_starts(tmp_path):
    """Freezing every parameter (or a fine_tune whose head phase is frozen too) logged "0/47
    trainable", ran every epoch and exited 0 with the random head's results."""
    model = vision_ft.create_model("test_resnet", num_classes=2, in_chans=1)
    with pytest.raises(RuleError, match="no parameter left to train: --freeze backbone, head"):
        build_plan(model, freeze=["backbone", "head"])
    with pytest.raises(RuleError, match=r"no parameter left to train: .*lr_rules \[\('\.\*', 0\.0\)\]"):
        build_plan(model, lr_rules=[(".*", 0.0)])
    cfg = tiny_config(tmp_path, recipe="fine_tune", freeze=("head",))
    with pytest.raises(RuleError, match="phase head: no parameter left to train"):
        FitRun(cfg, progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


def test_auto_class_weights_are_inverse_frequencies_of_the_labelled_examples():
    """A training split may hold unlabelled records (-1, which the pipeline skips): np.bincount
    raised on them, a traceback."""
    from vision_ft.train.class_weights import class_weights_for

    labels = np.array([0, 0, 0, 1, -1, -1])  # 4 labelled: 3 of class 0, 1 of class 1, none of class 2
    np.testing.assert_allclose(class_weights_for("auto", labels, 3), [4 / (3 * 3), 4 / (3 * 1), 0.0])
    np.testing.assert_array_equal(class_weights_for("none", labels, 3), np.ones(3))


def test_warmup_counts_the_updates_before_its_epochs_end_as_timm():
    """timm warms up while update < warmup_epochs x updates_per_epoch; int() of a product that float
    arithmetic leaves just under a whole number dropped one update (0.29 x 100 = 28.999...)."""
    from vision_ft.train.phases import warmup_updates

    assert 0.29 * 100 < 29 and warmup_updates(0.29, 100) == 29
    assert warmup_updates(0.5, 7) == 4 and warmup_updates(1, 12) == 12 and warmup_updates(0, 12) == 0
