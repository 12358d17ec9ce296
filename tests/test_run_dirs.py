"""Run and checkpoint directories: a fit writes only where a run was, and a refused one leaves nothing."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.train_fixtures import tiny_config
from vision_ft.output_dirs import OutputDirError
from vision_ft.train.config import resume_conflicts
from vision_ft.train.loop import FitRun, RunDirError
from vision_ft.train.rules import RuleError
from vision_ft.train.run_dir import load_run_model
from vision_ft.train.step import Trainer


def test_a_fit_that_stops_before_its_first_checkpoint_leaves_the_directory_usable(tmp_path, monkeypatch):
    with pytest.raises(RuleError, match="matches no parameter"):  # refused before Orbax's folders
        FitRun(tiny_config(tmp_path, freeze=("no_such_layer",)), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()

    def out_of_memory(*args, **kwargs):
        raise MemoryError("in the first step")

    monkeypatch.setattr(FitRun, "_trainer", out_of_memory)  # in the compile, before config.json was
    with pytest.raises(MemoryError):
        FitRun(tiny_config(tmp_path), progress=False).run()
    monkeypatch.undo()
    monkeypatch.setattr(Trainer, "train_step", out_of_memory)
    with pytest.raises(MemoryError):
        FitRun(tiny_config(tmp_path), progress=False).run()
    monkeypatch.undo()
    assert (tmp_path / "run" / "checkpoints" / "latest").is_dir()  # Orbax made its folders, empty
    with pytest.raises(RunDirError, match="holds no run to resume"):
        FitRun(tiny_config(tmp_path, resume=True), progress=False)
    # the corrected command starts afresh in the same directory
    assert FitRun(tiny_config(tmp_path), progress=False).run()["test"]["auc"] > 0.5


def test_a_refused_set_up_leaves_no_new_directory_behind(tmp_path):
    """The directories a refused fit made (the --output, a new parent, a --checkpoint-dir) were left
    behind empty: litter that looked like a run had started."""
    output, store = tmp_path / "new" / "run", tmp_path / "ckpt"
    cfg = tiny_config(tmp_path, output=str(output), checkpoint_dir=str(store), freeze=("no_such_layer",))
    with pytest.raises(RuleError, match="matches no parameter"):
        FitRun(cfg, progress=False)
    assert not (tmp_path / "new").exists() and not store.exists()
    kept = tmp_path / "kept"
    kept.mkdir()  # the user's own empty directory stays
    with pytest.raises(RuleError, match="matches no parameter"):
        FitRun(dataclasses.replace(cfg, output=str(kept), checkpoint_dir=None), progress=False)
    assert kept.is_dir() and not any(kept.iterdir())
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")  # an --output that is a file: refused after --checkpoint-dir was made
    with pytest.raises(OutputDirError, match="is a file"):
        FitRun(dataclasses.replace(cfg, output=str(a_file), freeze=()), progress=False)
    assert not store.exists() and a_file.read_text() == "mine\n"


def test_a_fit_into_the_output_of_a_fit_still_running_is_refused(tmp_path):
    """Two fits in one --output (a job relaunched while the first still ran, a --resume typed in a
    second terminal) both wrote the same checkpoints, logs and config.json."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(  # another process's fit, holding the directory's lock
        [sys.executable, "-c", "import fcntl, os, sys\n"
         f"fcntl.flock(os.open({str(out)!r}, os.O_RDONLY), fcntl.LOCK_EX)\nprint('held', flush=True)\n"
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(
            RunDirError, match=f"--output {out} is in use by another fit that is still running"
        ):
            FitRun(tiny_config(tmp_path, epochs=1), progress=False)
        assert not any(out.iterdir())  # refused before writing anything
    finally:
        holder.communicate("")  # its end lets the lock go, as any process's end would
    run = FitRun(tiny_config(tmp_path, epochs=1), progress=False)
    with pytest.raises(RunDirError, match="in use by another fit"):
        FitRun(tiny_config(tmp_path, epochs=1, resume=True), progress=False)
    run.run()
    # once the run has ended, its directory is free for a resume (here: of a finished run)
    FitRun(tiny_config(tmp_path, epochs=1, resume=True), progress=False).release_output()


def test_a_resume_on_other_data_of_the_same_split_sizes_is_refused(tmp_path):
    """Split sizes were all a resume compared for npz data: another file of the same sizes (or the
    same images relabelled) continued the run on it without a word."""
    cfg = tiny_config(tmp_path, epochs=1)
    FitRun(cfg, progress=False).run()
    config = (tmp_path / "run" / "config.json").read_bytes()
    data = tmp_path / "data.npz"
    arrays = dict(np.load(data))
    arrays["train_labels"] = arrays["train_labels"][::-1].copy()  # the same sizes and classes
    np.savez(data, **arrays)
    with pytest.raises(RunDirError, match=r"--resume: npz:\S+ has other labels than the run in"):
        FitRun(dataclasses.replace(cfg, resume=True), progress=False)
    assert (tmp_path / "run" / "config.json").read_bytes() == config


def test_a_relative_checkpoint_dir_is_recorded_as_the_place_it_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, epochs=1, checkpoint_dir="ckpt", data="npz:data.npz")
    FitRun(cfg, progress=False).run()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["checkpoint_dir"] == str(tmp_path / "ckpt")
    # the data too (eval without --data read ./data.npz of wherever it started), and a resume that
    # names it as it was first typed, or otherwise, is not a change of data
    assert saved["data"] == f"npz:{tmp_path / 'data.npz'}"
    assert resume_conflicts(saved, cfg) == resume_conflicts(
        saved, dataclasses.replace(cfg, data="npz:./data.npz")
    )
    assert not any(c.startswith("data") for c in resume_conflicts(saved, cfg))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # eval or predict started from another directory
    assert load_run_model(tmp_path / "run") is not None


def test_a_new_run_refuses_a_checkpoint_dir_holding_the_users_files(tmp_path):
    """--output was checked for files a fit does not write, --checkpoint-dir not: a new run wrote
    into a folder of the user's and overwrote its run_id.json."""
    store = tmp_path / "ckpt"
    store.mkdir()
    (store / "run_id.json").write_text("my notes")
    (store / "other.txt").write_text("mine")
    cfg = tiny_config(tmp_path, epochs=1, checkpoint_dir=str(store))
    with pytest.raises(
        RunDirError, match=r"checkpoint directory .*ckpt holds files a fit does not write \(other.txt"
    ):
        FitRun(cfg, progress=False)
    (store / "other.txt").unlink()
    with pytest.raises(
        RunDirError, match=r"checkpoint directory .*ckpt holds a run_id.json that is not a run's"
    ):
        FitRun(cfg, progress=False)
    assert (store / "run_id.json").read_text() == "my notes"
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_dir_that_is_another_runs_or_cannot_be_made_is_named(tmp_path):
    """A --checkpoint-dir holding another run's checkpoints was blamed on --output ("already holds a
    run; pass --resume"), and one under a file stopped on a NotADirectoryError traceback."""
    store = str(tmp_path / "ckpt")
    FitRun(tiny_config(tmp_path, epochs=1, checkpoint_dir=store), progress=False).run()
    taken = tiny_config(tmp_path, epochs=1, checkpoint_dir=store, output=str(tmp_path / "new"))
    with pytest.raises(RunDirError, match=r"--checkpoint-dir .*ckpt already holds a run's checkpoints"):
        FitRun(taken, progress=False)
    (tmp_path / "a_file").write_text("mine")
    blocked = dataclasses.replace(taken, checkpoint_dir=str(tmp_path / "a_file" / "ckpt"))
    with pytest.raises(OutputDirError, match=r"--checkpoint-dir .*a_file/ckpt cannot be created"):
        FitRun(blocked, progress=False)
    assert not (tmp_path / "new").exists() and (tmp_path / "a_file").read_text() == "mine"


def test_a_resume_does_not_take_over_another_runs_checkpoints(tmp_path):
    """A new run refused a --checkpoint-dir holding another run's checkpoints, but a resume took it:
    it went on from the other run's weights and replaced its checkpoints with its own."""
    for name in ("a", "b"):
        cfg = tiny_config(tmp_path, epochs=1, output=str(tmp_path / name), seed=ord(name))
        FitRun(cfg, progress=False).run()
    theirs = tmp_path / "a" / "checkpoints"
    before = sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*"))
    taken = tiny_config(tmp_path, epochs=1, output=str(tmp_path / "b"), seed=ord("b"), resume=True)
    with pytest.raises(RunDirError, match=rf"--checkpoint-dir {theirs} holds the checkpoints of another run"):
        FitRun(dataclasses.replace(taken, checkpoint_dir=str(theirs)), progress=False)
    assert sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*")) == before
    own = dataclasses.replace(taken, checkpoint_dir=str(tmp_path / "b" / "checkpoints"))
    FitRun(own, progress=False).checkpoints.close()  # its own, named: accepted


def test_a_new_run_does_not_write_into_a_directory_of_other_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("the user's own")
    (out / "notes.txt").write_text("the user's own")
    with pytest.raises(RunDirError, match=r"--output .*run holds files a fit does not write \(notes.txt\)"):
        FitRun(tiny_config(tmp_path), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert (out / "config.json").read_text() == "the user's own"


def test_a_new_run_writes_only_where_a_run_was(tmp_path):
    """Files were told apart by name alone: a user's own splits.csv (the very manifest --data read)
    or config.json was overwritten, and a folder named config.json or a file named checkpoints
    stopped the fit on a traceback, half-written."""
    manifest = tmp_path / "mine" / "splits.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label\na.png,cat\n")
    with pytest.raises(RunDirError, match=r"--output .*mine holds splits.csv but no run's config.json"):
        FitRun(tiny_config(tmp_path, output=str(manifest.parent)), progress=False)
    own_settings = tmp_path / "settings" / "config.json"
    own_settings.parent.mkdir()
    own_settings.write_text('{"my": "settings"}')
    with pytest.raises(RunDirError, match=r"--output .*settings holds config.json but no run's config.json"):
        FitRun(tiny_config(tmp_path, output=str(own_settings.parent)), progress=False)
    for name, folder in (("config.json", True), ("checkpoints", False)):
        out = tmp_path / f"odd_{name}"
        out.mkdir()
        (out / name).mkdir() if folder else (out / name).touch()
        for resume in (False, True):
            with pytest.raises(RunDirError, match=rf"--output .*odd_{name}: {name} is a"):
                FitRun(tiny_config(tmp_path, output=str(out), resume=resume), progress=False)
        assert [p.name for p in out.iterdir()] == [name]
    assert manifest.read_text() == "path,label\na.png,cat\n"
    assert own_settings.read_text() == '{"my": "settings"}'


def test_a_resume_of_a_folder_whose_metrics_log_is_not_a_runs_is_refused_untouched(tmp_path):
    """A metrics.jsonl holding other records (the user's, or a line without a step) stopped --resume
    on a KeyError traceback, after it had made checkpoint folders in the user's directory."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(RunDirError, match=r"mine/metrics.jsonl, line 1: not a fit's record"):
        FitRun(tiny_config(tmp_path, output=str(out), resume=True), progress=False)
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]
