"""--resume: exact continuation, refused mismatches, and runs that died at every awkward moment."""

import dataclasses
import json
import logging
import os
import signal

import jax
import numpy as np
import optax
import pytest

import vision_ft
from tests.train_fixtures import tiny_config
from vision_ft.train.checkpoint import CheckpointMismatchError, RunCheckpoints
from vision_ft.train.config import load_config, resume_conflicts
from vision_ft.train.loop import FitRun, RunDirError
from vision_ft.train.optimizer import build_optimizer
from vision_ft.train.preemption import MARKER, Preempted
from vision_ft.train.step import Trainer


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


class _StopsAfter:
    """A PreemptionWatch whose SIGTERM (or Ctrl-C) arrives during the ``steps``-th step."""

    def __init__(self, steps: int, *, ctrl_c: bool):
        self.left, self.ctrl_c, self.interrupted = steps, ctrl_c, False

    def requested(self, *, failed: bool = False) -> tuple[bool, bool]:
        self.left -= 1
        self.interrupted = self.ctrl_c and self.left == 0
        return self.left == 0, False

    def close(self) -> None:
        pass


def test_a_ctrl_c_in_a_preempted_run_s_rerun_is_not_resumed_by_the_same_command(tmp_path, monkeypatch):
    """The rerun kept the first stop's PREEMPTED marker through its Ctrl-C, so the same command
    resumed it again, where a Ctrl-C'd run needs --resume."""
    from vision_ft.train import loop
    from vision_ft.train.preemption import Interrupted

    cfg = tiny_config(tmp_path)
    monkeypatch.setattr(loop, "PreemptionWatch", lambda: _StopsAfter(2, ctrl_c=False))
    with pytest.raises(Preempted):
        FitRun(cfg, progress=False).run()
    assert (tmp_path / "run" / MARKER).read_text() == "2\n"
    monkeypatch.setattr(loop, "PreemptionWatch", lambda: _StopsAfter(2, ctrl_c=True))
    with pytest.raises(Interrupted, match="interrupted at step 4"):
        FitRun(cfg, progress=False).run()  # the same command: it resumes the preempted run
    assert not (tmp_path / "run" / MARKER).exists()
    with pytest.raises(RunDirError, match="pass --resume"):
        FitRun(cfg, progress=False)


def test_a_finished_one_epoch_run_without_its_latest_checkpoint_keeps_its_best(tmp_path):
    """--resume took a one-epoch run whose latest checkpoint was gone for one that died before its
    first save: it started again and discarded the best checkpoint, the run's only weights."""
    import shutil

    cfg = tiny_config(tmp_path, epochs=1)
    FitRun(cfg, progress=False).run()
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.rmtree(checkpoints / "latest")
    best = sorted(p.name for p in (checkpoints / "best").iterdir())
    assert best
    with pytest.raises(RunDirError, match="no checkpoint in"):
        FitRun(load_config(None, {**cfg.to_dict(), "resume": True}), progress=False).run()
    assert sorted(p.name for p in (checkpoints / "best").iterdir()) == best
