"""Checkpoints and resume: exact continuation, mismatches, damaged saves, new fine-tunes from a run."""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import vision_ft
from tests.train_fixtures import numpy_state, tiny_config, write_synthetic_npz
from vision_ft.train.checkpoint import CheckpointMismatchError, RunCheckpoints, abstract_like
from vision_ft.train.config import load_config, resume_conflicts
from vision_ft.train.loop import FitRun, RunDirError
from vision_ft.train.optimizer import build_optimizer
from vision_ft.train.preemption import MARKER, Preempted
from vision_ft.train.run_dir import load_run_model, run_checkpoints
from vision_ft.train.step import Trainer, data_mesh


@pytest.mark.parametrize("steps_into_phase, accumulate", [(0, 1), (2, 1), (3, 4)])
def test_fine_tune_resumed_in_its_second_phase_matches_an_uninterrupted_run(
    tmp_path, monkeypatch, steps_into_phase, accumulate
):
    """At 0 the latest checkpoint is the head phase's last: its optimizer state and EMA cover only
    the head, and the resumed run must switch phases as the uninterrupted one did. Accumulating 4
    of an epoch's 6 steps, 3 steps in stops mid-window: the resumed run goes on with its gradients."""
    settings = dict(recipe="fine_tune", head_epochs=1, epochs=2, ema_decay=0.9, accumulate_steps=accumulate)
    full = FitRun(tiny_config(tmp_path, output=str(tmp_path / "full"), **settings), progress=False).run()
    stopped = FitRun(tiny_config(tmp_path, **settings), progress=False)
    stop_at = stopped.phases[1].first_step + steps_into_phase
    train_step = Trainer.train_step

    def sigterm_during_step(self, images, labels, mask, step):
        if step == stop_at - 1:  # as TPU maintenance or a spot VM's notice would
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, images, labels, mask, step)

    monkeypatch.setattr(Trainer, "train_step", sigterm_during_step)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match=f"step {stop_at}"):
        stopped.run()
    assert signal.getsignal(signal.SIGTERM) is handler  # a script or notebook goes on as before
    resumed = FitRun(tiny_config(tmp_path, resume=True, **settings), progress=False).run()
    assert resumed["best_step"] == full["best_step"]
    for split in ("best_val", "test"):
        for key in ("loss", "accuracy", "auc"):
            assert resumed[split][key] == pytest.approx(full[split][key], rel=1e-6, abs=1e-7), (split, key)
    # the train loss of the epoch it stopped in averages every step of it, as uninterrupted
    logs = [json_lines(tmp_path / name / "metrics.jsonl") for name in ("full", "run")]
    train_losses = [[(r["step"], r["loss"]) for r in log if r["split"] == "train"] for log in logs]
    assert [s for s, _ in train_losses[1]] == [s for s, _ in train_losses[0]]
    for (_, resumed_loss), (_, full_loss) in zip(train_losses[1], train_losses[0], strict=True):
        assert resumed_loss == pytest.approx(full_loss, rel=1e-6)


def test_a_resume_reads_only_its_own_checkpoint_not_the_weights_it_started_from(tmp_path, monkeypatch):
    """A resume loaded its --pretrained source again (then overwrote it from the checkpoint): a run
    started from run:DIR, or a weights file, that had since moved could not be resumed at all."""
    import shutil

    FitRun(tiny_config(tmp_path, output=str(tmp_path / "earlier"), epochs=1), progress=False).run()
    settings = dict(pretrained=f"run:{tmp_path / 'earlier'}", epochs=2, ema_decay=0.5)
    full = FitRun(tiny_config(tmp_path, output=str(tmp_path / "full"), **settings), progress=False).run()
    stopped = FitRun(tiny_config(tmp_path, **settings), progress=False)
    train_step = Trainer.train_step

    def sigterm_during_step(self, images, labels, mask, step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, images, labels, mask, step)

    monkeypatch.setattr(Trainer, "train_step", sigterm_during_step)
    with pytest.raises(Preempted):
        stopped.run()
    monkeypatch.undo()
    shutil.move(tmp_path / "earlier", tmp_path / "moved")
    resumed = FitRun(tiny_config(tmp_path, resume=True, **settings), progress=False)
    assert resumed.model.pretrained_cfg == stopped.model.pretrained_cfg  # normalized as it was
    final = resumed.run()
    assert final["best_step"] == full["best_step"]
    for key in ("loss", "accuracy", "auc"):
        assert final["test"][key] == pytest.approx(full["test"][key], rel=1e-6, abs=1e-7), key


_READ_WEIGHTS_ON_ONE_DEVICE = """
import sys
import jax
import numpy as np
from vision_ft.train.checkpoint import RunCheckpoints

one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
target = {"params": {"w": jax.ShapeDtypeStruct((8, 4), np.float32, sharding=one)}, "stats": {}}
step, weights = RunCheckpoints(sys.argv[1], create=False).restore_latest_weights(target)
print(step, float(weights["params"]["w"].sum()), jax.device_count())
"""


def test_the_latest_weights_of_a_run_on_8_devices_read_on_1(tmp_path):
    """eval, predict and run:DIR of a run without a best checkpoint read the latest full state; its
    optimizer state and EMA must not need the 8 devices they were saved from."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = data_mesh()
    fsdp = NamedSharding(jax.make_mesh((8,), ("fsdp",), devices=mesh.devices.ravel()), P("fsdp"))
    w = jax.device_put(np.arange(32, dtype=np.float32).reshape(8, 4), fsdp)
    ones = jax.device_put(np.ones((8, 4), np.float32), fsdp)
    state = {"params": {"w": w}, "stats": {}, "opt_state": {"mu": ones * 0}, "ema": ({"w": ones}, {}),
             "step": np.int32(3)}  # fmt: skip
    RunCheckpoints(tmp_path / "ckpt").save_latest(3, state)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", _READ_WEIGHTS_ON_ONE_DEVICE, str(tmp_path / "ckpt")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3", "32.0", "1"]  # the EMA's weights (ones), on the one device


def test_checkpoint_restore_checks_keys_and_shapes(tmp_path):
    ckpts = RunCheckpoints(tmp_path / "ckpt")
    state = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
    ckpts.save_latest(1, state)
    step, restored = ckpts.restore_latest(abstract_like(state))
    assert step == 1 and np.array_equal(restored["b"], state["b"])
    with pytest.raises(CheckpointMismatchError, match=r"missing \(1\): c.*shape mismatch \(1\): a"):
        ckpts.restore_latest(
            abstract_like({"a": np.zeros((3, 3), np.float32), "b": state["b"], "c": state["b"]})
        )


def test_a_best_checkpoint_saved_again_after_a_kill_before_the_latest_is_kept(tmp_path):
    state = {"a": np.arange(3, dtype=np.float32)}
    killed = RunCheckpoints(tmp_path / "ckpt")
    killed.save_latest(2, state)
    killed.save_best(5, state, 0.75)  # killed here, before save_latest(5)
    resumed = RunCheckpoints(tmp_path / "ckpt")  # replays steps 3-5 and reaches the same score
    resumed.save_best(5, state, 0.75)
    resumed.save_latest(5, state)
    assert (resumed.best_step(), resumed.latest_step()) == (5, 5)
    _, restored = resumed.restore_best(abstract_like(state))
    np.testing.assert_array_equal(restored["a"], state["a"])


def test_eval_finds_the_best_of_a_run_kept_by_its_loss(tmp_path):
    """A kill between Orbax's write of a new best and its removal of the old one leaves two; eval,
    predict and run:DIR took the higher score as the best, also for a run kept by its lowest loss."""
    import shutil

    state = {"a": np.arange(3, dtype=np.float32)}
    for step, loss in ((6, 0.5), (12, 0.3)):  # 12 the new best, 6 not yet removed
        RunCheckpoints(tmp_path / str(step), best_mode="min").save_best(step, state, loss)
        shutil.copytree(
            tmp_path / str(step) / "best" / str(step), tmp_path / "run" / "checkpoints" / "best" / str(step)
        )
    for metric, best in (("loss", 12), ("auc", 6)):
        checkpoints = run_checkpoints(tmp_path / "run", {"select_metric": metric})
        assert checkpoints.best_step() == best, metric
        checkpoints.close()


def test_saving_replicated_arrays_on_cpu_devices_compiles_nothing(tmp_path):
    """Orbax's replica-parallel write compiles one slice per array shape and device; on CPU devices,
    which share one memory, that only costs time (each save of a ResNet-18 state 2-6x slower)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = data_mesh()
    assert mesh.devices.size == 8
    state = {f"w{n}": jax.device_put(np.arange(8 * n, dtype=np.float32) + 0.5, NamedSharding(mesh, P()))
             for n in (37, 41, 43)}  # fmt: skip
    compiles = []
    listener = lambda event, *_a, **_k: compiles.append(event) if "/jax/core/compile/" in event else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        RunCheckpoints(tmp_path / "ckpt").save_latest(1, state)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    _, restored = RunCheckpoints(tmp_path / "ckpt").restore_latest(abstract_like(state))
    for key, value in state.items():
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value))


def test_resume_compares_every_setting_that_changes_what_the_run_computes():
    started = load_config(
        None, {"model": "resnet18", "eval_crop_pct": None, "tta_flip": True, "tta_shift": 0.05}
    )
    saved = {**started.to_dict(), "num_classes": 2, "in_chans": 1}  # config.json records more
    # fit --resume takes the run's settings, None included (eval_crop_pct's default is 1.0)
    assert load_config(None, {"resume": True}, base=saved) == dataclasses.replace(started, resume=True)
    assert resume_conflicts(saved, started) == []
    # and whether an unreadable image stops the run: a run stopped on a test image it was told to
    # fail on, after all its training, could be finished no other way
    moved = {"output": "elsewhere", "mesh": "data=2", "loader_threads": 1, "eval_batch_size": 8,
             "on_bad_image": "fail"}  # fmt: skip
    assert resume_conflicts(saved, dataclasses.replace(started, **moved)) == []
    older = {k: v for k, v in saved.items() if k != "tta_shift"}  # a run from before shifted views
    assert load_config(None, {"resume": True}, base=older).tta_shift == 0.0
    # a run from when validation averaged every view it was tested on
    older = {k: v for k, v in saved.items() if k != "val_tta_shift"}
    assert load_config(None, {"resume": True}, base=older).val_tta_shift is True
    assert not started.val_tta_shift
    resolved_at_start = dataclasses.replace(started, tta_flip=None, tta_shift=None)
    assert resume_conflicts(saved, resolved_at_start) == []
    changed = dataclasses.replace(started, lr=0.5, tta_flip=False, tta_shift=0.1, freeze=("stem",))
    assert resume_conflicts(saved, changed) == [
        "lr (run 0.001, now 0.5)",
        "freeze (run [], now ['stem'])",
        "tta_flip (run True, now False)",
        "tta_shift (run 0.05, now 0.1)",
    ]
    from_run = dataclasses.replace(started, model="tf_efficientnet_lite0", pretrained="run:earlier")
    assert resume_conflicts({**saved, "pretrained": "run:earlier"}, from_run) == []


def test_a_new_fine_tune_on_other_classes_of_the_same_count_gets_a_new_head(tmp_path):
    """run:DIR kept the earlier run's classifier whenever the class count matched: on classes named
    or ordered otherwise its rows scored the wrong classes (test accuracy 0.08 of a run at 1.0)."""
    FitRun(tiny_config(tmp_path, epochs=1), progress=False).run()
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["class_names"] == ["class 0", "class 1"]
    kept = load_run_model(run, num_classes=2).fc.kernel.get_value()
    for names, same_head in (
        (("class 0", "class 1"), True),
        (("a", "b"), True),  # the run's classes were unnamed (an .npz): matched by position
    ):
        model = load_run_model(run, num_classes=2, class_names=names)
        assert np.array_equal(model.fc.kernel.get_value(), kept) == same_head, names
    config["class_names"] = ["benign", "malignant"]
    (run / "config.json").write_text(json.dumps(config))
    for names, same_head in ((("benign", "malignant"), True), (("malignant", "benign"), False),
                             (("cyst", "mass"), False)):  # fmt: skip
        model = load_run_model(run, num_classes=2, class_names=names)
        assert np.array_equal(model.fc.kernel.get_value(), kept) == same_head, names


def test_new_fine_tune_starts_from_an_earlier_run(tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    FitRun(tiny_config(first, epochs=1), progress=False).run()
    earlier = load_run_model(first / "run")
    three_classes = write_synthetic_npz(tmp_path / "three.npz", classes=3, seed=1)
    cfg = tiny_config(
        tmp_path, model="convnext_atto", pretrained=f"run:{first / 'run'}", data=f"npz:{three_classes}"
    )
    run = FitRun(cfg, progress=False)
    assert run.cfg.model == "test_resnet"  # the architecture comes from the earlier run
    assert run.model.fc.kernel.get_value().shape == (96, 3)
    before = numpy_state(earlier, nnx.Param)
    after = numpy_state(run.model, nnx.Param)
    assert before.keys() == after.keys()
    for path in before:
        if not path.startswith("fc."):
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    np.testing.assert_array_equal(
        numpy_state(run.model, nnx.BatchStat)["bn1.mean"], numpy_state(earlier, nnx.BatchStat)["bn1.mean"]
    )
    with pytest.raises(RunDirError, match="no config.json"):
        FitRun(tiny_config(tmp_path, pretrained=f"run:{tmp_path}", output=str(tmp_path / "x")))


def test_checkpoint_saved_on_8_devices_resumes_on_2(tmp_path):
    cfg = tiny_config(tmp_path, epochs=2)
    eight = FitRun(cfg, progress=False).run()
    resumed_cfg = load_config(None, {**cfg.to_dict(), "resume": True})
    two = FitRun(resumed_cfg, devices=jax.devices()[:2], progress=False).run()
    for key in ("loss", "accuracy", "auc"):
        assert two["test"][key] == pytest.approx(eight["test"][key], rel=1e-4, abs=1e-5), key


def test_resuming_another_release_s_checkpoint_names_both_releases_and_keeps_the_run(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, epochs=1)
    FitRun(cfg, progress=False).run()
    config_path = tmp_path / "run" / "config.json"
    saved = json.loads(config_path.read_text())
    assert saved["vision_ft_version"] == vision_ft.__version__
    config_path.write_text(json.dumps({**saved, "vision_ft_version": "0.0.9"}))
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}

    # an optimizer whose state the saved one lacks, as a release that changed its layout would build
    import vision_ft.train.phases as phases

    def other_layout(*args, **kwargs):
        return optax.chain(optax.scale_by_schedule(lambda n: 1.0), build_optimizer(*args, **kwargs))

    monkeypatch.setattr(phases, "build_optimizer", other_layout)
    with pytest.raises(CheckpointMismatchError, match=r"saved by vision-ft 0\.0\.9 and this is "):
        FitRun(load_config(None, {**cfg.to_dict(), "resume": True}), progress=False).run()
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before  # config.json included: a failed resume rewrites nothing


def test_a_checkpoint_whose_accumulation_window_crosses_epochs_is_refused(tmp_path):
    """Before windows restarted every epoch, one ran on across the epoch's end: resumed now, the
    device's updates and the host's learning rate and EMA would fall out of step."""
    run = FitRun(tiny_config(tmp_path, accumulate_steps=4), progress=False)  # 6 steps an epoch
    phase = run.phases[0]

    def restored(mini_step, gradient_step, step):
        state = optax.MultiStepsState(mini_step, gradient_step, None, None, None)
        return {"opt_state": state, "step": np.int32(step)}

    run._check_accumulation_window(restored(0, 2, 6), phase)  # windows of 4 and 2 steps
    run._check_accumulation_window(restored(1, 2, 7), phase)
    with pytest.raises(CheckpointMismatchError, match="accumulates gradients across epochs"):
        run._check_accumulation_window(restored(2, 1, 6), phase)  # the old windows: 4, then 2 of the next 4


def test_abandoned_metadata_reads_of_a_damaged_checkpoint_are_hushed_and_nothing_else(caplog):
    """A damaged checkpoint's failed restore leaves tensorstore's other reads behind; one that was
    opening an array's metadata ends as a future nobody awaits, which asyncio logs with its whole
    traceback when it is collected (seen once in CI, after the one-line error). Only those go."""
    import asyncio
    import gc

    from vision_ft.train.checkpoint import _hush_abandoned_reads

    _hush_abandoned_reads()

    def abandon(error: Exception) -> None:
        loop = asyncio.new_event_loop()
        loop.create_future().set_exception(error)  # never retrieved: logged when collected
        loop.close()
        gc.collect()

    spec = '[tensorstore_spec=\'{"driver":"zarr"}\']'
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        abandon(ValueError(f'OUT_OF_RANGE: Error opening "zarr" driver: Error reading ".zarray" {spec}'))
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
        for other in (
            "something else went wrong",
            f'Error opening "zarr" driver: Error writing ".zarray" {spec}',
        ):
            caplog.clear()
            abandon(ValueError(other))  # a write that failed (a full disk) is still heard
            assert [r for r in caplog.records if "never retrieved" in r.getMessage()], other


def test_a_resume_without_the_runs_config_says_it_cannot_check_the_settings(tmp_path, caplog):
    from vision_ft.train.output_dir import claim_output_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1, "step": 6, "split": "train", "loss": 0.5}\n')
    with caplog.at_level(logging.WARNING, logger="vision_ft.fit"):
        claimed = claim_output_dir(tiny_config(tmp_path, resume=True))
    assert claimed.saved is None
    assert "holds no config.json, so this resume cannot check its settings" in caplog.text


@pytest.mark.parametrize("metric, value", [("accuracy", 5 / 6), ("auc", 0.7), ("loss", 0.1)])
def test_a_tie_with_the_best_score_is_no_improvement_in_a_resumed_run_either(metric, value):
    """The latest checkpoint keeps the best score in float32; compared with float64 scores after a
    resume, a best rounded down (5/6 -> 0.83333331) lost to a tie, which became the new best and
    moved the final test onto other weights than the uninterrupted run's."""
    from vision_ft.train.evaluation import improves_selection, selection_score

    best = selection_score({metric: value}, metric)
    resumed_best = float(np.asarray(best, np.float32))  # as _state saves it and _resume reads it
    tie = selection_score({metric: value}, metric)
    assert not improves_selection(tie, best, metric) and not improves_selection(tie, resumed_best, metric)


def test_a_fit_that_stops_in_its_first_validation_resumes_from_the_start(tmp_path, monkeypatch):
    """The first epoch's train record is logged before its validation and first checkpoint: a fit
    that died there (out of memory, killed) left a directory a new run refused ("already holds a
    run") and --resume refused too ("no checkpoint")."""
    evaluate = FitRun.evaluate

    def out_of_memory(self, trainer, split, **kwargs):
        raise MemoryError("in the first validation")

    monkeypatch.setattr(FitRun, "evaluate", out_of_memory)
    with pytest.raises(MemoryError):
        FitRun(tiny_config(tmp_path, epochs=1), progress=False).run()
    monkeypatch.setattr(FitRun, "evaluate", evaluate)
    with pytest.raises(RunDirError, match="already holds a run"):
        FitRun(tiny_config(tmp_path, epochs=1), progress=False)
    final = FitRun(tiny_config(tmp_path, epochs=1, resume=True), progress=False).run()
    logged = [(r["split"], r["step"]) for r in json_lines(tmp_path / "run" / "metrics.jsonl")]
    epoch_end = logged[0][1]
    assert logged == [("train", epoch_end), ("val", epoch_end), ("test", final["best_step"])]


@pytest.mark.parametrize("dies_in", ["its first validation", "its first latest save"])
def test_a_resume_that_starts_again_starts_as_the_run_did(tmp_path, monkeypatch, dies_in):
    """A resume finding no latest checkpoint started the run again from random weights (a restore
    replaces every weight, so the --pretrained source was never read) and kept the dead attempt's
    best checkpoint, whose weights final.json then tested beside the new attempt's record."""
    source = tmp_path / "source"
    FitRun(tiny_config(tmp_path, epochs=1, output=str(source)), progress=False).run()

    def settings(name, **overrides):
        out = str(tmp_path / name)
        return tiny_config(tmp_path, epochs=2, output=out, pretrained=f"run:{source}", **overrides)

    expected = FitRun(settings("uninterrupted"), progress=False).run()
    save_best = RunCheckpoints.save_best

    def save_a_best_no_later_attempt_beats(self, step, state, score):
        save_best(self, step + 1, state, 1e9)

    def dies(*args, **kwargs):
        raise MemoryError(dies_in)

    if dies_in == "its first validation":
        monkeypatch.setattr(FitRun, "evaluate", dies)
    else:
        monkeypatch.setattr(RunCheckpoints, "save_best", save_a_best_no_later_attempt_beats)
        monkeypatch.setattr(RunCheckpoints, "save_latest", dies)
    with pytest.raises(MemoryError):
        FitRun(settings("run"), progress=False).run()
    monkeypatch.undo()
    final = FitRun(settings("run", resume=True), progress=False).run()
    for run in (final, expected):
        del run["wall_seconds"]
    assert final == expected
    logged = json_lines(tmp_path / "run" / "metrics.jsonl")
    assert logged == json_lines(tmp_path / "uninterrupted" / "metrics.jsonl")


def test_a_fit_that_fails_while_finishing_is_finished_by_the_same_command(tmp_path, monkeypatch):
    """A SIGTERM in the last step or while the reports were written, a kill or a failure there left
    no preemption marker: the same command was refused ("pass --resume"), and --resume logged a
    second test record."""
    finish = FitRun._finish
    monkeypatch.setattr(FitRun, "_finish", lambda *args: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        FitRun(tiny_config(tmp_path, epochs=1), progress=False).run()
    assert (tmp_path / "run" / MARKER).exists()
    monkeypatch.setattr(FitRun, "_finish", finish)
    final = FitRun(tiny_config(tmp_path, epochs=1), progress=False).run()  # the same command
    assert [r["split"] for r in json_lines(tmp_path / "run" / "metrics.jsonl")].count("test") == 1
    assert final["test"]["auc"] == json.loads((tmp_path / "run" / "final.json").read_text())["test"]["auc"]
    assert not (tmp_path / "run" / MARKER).exists()
    again = FitRun(tiny_config(tmp_path, epochs=1, resume=True), progress=False).run()
    assert [r["split"] for r in json_lines(tmp_path / "run" / "metrics.jsonl")].count("test") == 1
    assert again["test"] == final["test"]


def test_a_process_dying_between_a_checkpoint_and_its_notes_resumes_with_the_epochs_losses(
    tmp_path, monkeypatch
):
    """The latest checkpoint was written before the resume notes of its step: a process killed between
    the two left a checkpoint without notes, and the resumed epoch's train loss averaged only the steps
    after the resume. Whichever comes second at step 4 dies here; the resume must log what an
    uninterrupted run logs."""
    import vision_ft.train.loop as loop

    settings = dict(epochs=1, save_every_steps=2, ema_decay=0.0)  # 6 steps: checkpoints at 2, 4, 6
    uninterrupted = FitRun(tiny_config(tmp_path, output=str(tmp_path / "full"), **settings), progress=False)
    uninterrupted.run()

    class Killed(BaseException):
        pass

    written_at_4 = []

    def dying_at_4(write):
        def wrapped(*args):
            if args[1] == 4:  # (out, step, ...) and (self, step, state)
                if written_at_4:
                    raise Killed
                written_at_4.append(write)
            return write(*args)

        return wrapped

    monkeypatch.setattr(loop, "write_resume_notes", dying_at_4(loop.write_resume_notes))
    monkeypatch.setattr(RunCheckpoints, "save_latest", dying_at_4(RunCheckpoints.save_latest))
    with pytest.raises(Killed):
        FitRun(tiny_config(tmp_path, **settings), progress=False).run()
    monkeypatch.undo()
    FitRun(tiny_config(tmp_path, resume=True, **settings), progress=False).run()

    def train_losses(run_dir):
        return [r["loss"] for r in json_lines(run_dir / "metrics.jsonl") if r["split"] == "train"]

    np.testing.assert_allclose(train_losses(tmp_path / "run"), train_losses(tmp_path / "full"), rtol=1e-6)


def test_a_run_on_grey_data_resumes_and_evaluates_on_the_same_images_read_as_colour(tmp_path, monkeypatch):
    """The band count a dataset reports may differ from the one its run recorded (a grey model on data
    with a few colour photos, sampled otherwise by another release): the resume built a 3-band model
    the 1-band checkpoint could not fill, and eval refused the run's own data."""
    from click.testing import CliRunner

    from vision_ft.cli import main

    data = tmp_path / "data.npz"
    cfg = tiny_config(tmp_path, epochs=2)
    evaluate, calls = FitRun.evaluate, []

    def killed_in_the_second_validation(self, trainer, split, **kwargs):
        calls.append(split)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(self, trainer, split, **kwargs)

    monkeypatch.setattr(FitRun, "evaluate", killed_in_the_second_validation)
    with pytest.raises(KeyboardInterrupt):
        FitRun(cfg, progress=False).run()
    monkeypatch.undo()
    with np.load(data) as arrays:
        colour = {
            k: np.repeat(v[..., None], 3, axis=-1) if k.endswith("_images") else v for k, v in arrays.items()
        }
    np.savez(data, **colour)  # the same images, now read as 3 bands
    resumed = FitRun(dataclasses.replace(cfg, resume=True), progress=False)
    assert resumed.model.pretrained_cfg.input_size[0] == 1
    resumed.run()
    result = CliRunner().invoke(
        main, ["eval", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "e")]
    )
    assert result.exit_code == 0, result.output


def json_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(
    "error",
    [
        MemoryError("Unable to allocate 9.5 GiB"),
        Exception("restore failed"),  # Orbax's bare wrapper around the device's error
    ],
)
def test_a_checkpoint_too_big_for_memory_is_not_called_damaged(error):
    """Every error while reading was reported as "could not be read (damaged?)", an out-of-memory
    restore too, which sent the user after a checkpoint with nothing wrong."""
    from vision_ft.train.checkpoint import CheckpointUnreadableError, reading

    if type(error) is Exception:
        error.__cause__ = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 10200547328 bytes.")
    with pytest.raises(
        CheckpointUnreadableError, match=r"^checkpoint /run/best does not fit in memory here: "
    ):
        with reading("/run/best"):
            raise error
    with pytest.raises(CheckpointUnreadableError, match=r"could not be read \(damaged\?\)"):
        with reading("/run/best"):
            raise ValueError("bad chunk")


def test_a_run_saved_before_the_crop_mode_was_recorded_resumes_with_the_center_crop(tmp_path, monkeypatch):
    """Such a run (a squash model, eval_crop_pct null) was evaluated with the center crop, which eval
    and predict still use for it; a resume switched its validation to squash mid-run."""
    import vision_ft.train.setup as setup

    create = setup.create_model

    def squash_model(*args, **kwargs):
        model = create(*args, **kwargs)
        model.pretrained_cfg = dataclasses.replace(model.pretrained_cfg, crop_mode="squash", crop_pct=0.9)
        return model

    monkeypatch.setattr(setup, "create_model", squash_model)
    cfg = dataclasses.replace(tiny_config(tmp_path, epochs=1), eval_crop_pct=None)
    FitRun(cfg, progress=False).run()
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    assert config["eval_crop_mode"] == "squash"
    resumed = dataclasses.replace(cfg, resume=True)
    assert FitRun(resumed, progress=False).eval_geometry.eval_crop_mode == "squash"
    del config["eval_crop_mode"]  # as a release before it was recorded wrote config.json
    path.write_text(json.dumps(config))
    older = FitRun(resumed, progress=False)
    assert older.eval_geometry.eval_crop_mode == older.train_geometry.eval_crop_mode == "center"
