"""`vision-ft fit` end to end: exact resume after SIGKILL, and bad input -> one line, exit code 2."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.train_fixtures import write_synthetic_npz

REPO = Path(__file__).resolve().parents[1]


def _env():
    # one device keeps the subprocesses light; the 8-device path is covered in test_train.py
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO)
    return env


def fit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vision_ft.cli", "fit", "--no-progress", *args]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fit_cli")
    data = write_synthetic_npz(tmp_path / "data.npz", sizes=(128, 32, 32))
    cfg = dict(
        model="test_resnet",
        pretrained="false",
        data=f"npz:{data}",
        img_size=48,
        epochs=4,
        batch_size=16,
        eval_batch_size=16,
        save_every_steps=5,  # mid-epoch checkpoints (8 steps an epoch), fewer than every 2 steps
        drop_path_rate=0.1,
        seed=3,
        ema_decay=0.9,  # the EMA must resume exactly too
        tta_flip=True,
    )
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _latest_steps(run: Path) -> list[int]:
    latest = run / "checkpoints" / "latest"
    if not latest.exists():
        return []
    return sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(config_file):
    full = config_file.parent / "full"
    subprocess.run(
        fit_cmd("--config", str(config_file), "--output", str(full)),
        env=_env(),
        check=True,
        capture_output=True,
        timeout=900,
    )
    return full


def _assert_same_results(run: Path, full: Path) -> None:
    expected = json.loads((full / "final.json").read_text())
    got = json.loads((run / "final.json").read_text())
    assert got["best_step"] == expected["best_step"]
    for split in ("best_val", "test"):
        for key, value in expected[split].items():
            if key == "confusion_matrix":
                assert got[split][key] == value, split
            else:
                assert got[split][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (split, key)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    full_steps = [json.loads(line)["step"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert steps == full_steps


def _wait_for_checkpoint(proc, run: Path, step: int) -> None:
    deadline = time.time() + 600
    while time.time() < deadline and not any(s >= step for s in _latest_steps(run)):
        assert proc.poll() is None, "run ended before it could be interrupted"
        time.sleep(0.02)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, config_file, uninterrupted):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        fit_cmd("--config", str(config_file), "--output", str(killed)),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_checkpoint(proc, killed, 10)  # step 10: mid-way through epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final.json").exists()
    kept = _latest_steps(killed)
    assert kept and max(kept) < 32  # 4 epochs x 8 steps: interrupted mid-run
    # debris of a checkpoint that was being written when the process died must not matter
    (killed / "checkpoints" / "latest" / "30.orbax-checkpoint-tmp-1").mkdir()

    resumed = subprocess.run(  # no --config: the run's own settings, from its config.json
        fit_cmd("--output", str(killed), "--resume"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_results(killed, uninterrupted)

    kept = {p: p.read_bytes() for p in killed.iterdir() if p.is_file()}
    changed = subprocess.run(
        fit_cmd("--output", str(killed), "--resume", "--lr", "0.5", "--workers", "1"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    _one_line_exit_2(changed, "lr (run 0.001, now 0.5)")
    assert "workers" not in changed.stderr  # where and how the work runs may change
    assert {p: p.read_bytes() for p in killed.iterdir() if p.is_file()} == kept


# Python as a terminal starts it, with Ctrl-C raising KeyboardInterrupt: a runner started in the
# background without job control (`bash .ci/run &`, nohup) passes SIGINT on ignored, and a fit leaves
# an ignored Ctrl-C ignored, so these tests would test the runner's shell. (Not preexec_fn: a fork
# of this multithreaded process may deadlock before its exec.)
_WITH_CTRL_C = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('vision_ft.cli', run_name='__main__', alter_sys=True)"
)


def _signalled_after_a_checkpoint(config_file: Path, run: Path, signum: int) -> tuple[list[str], int, str]:
    """The fit command into ``run``, its exit code and stderr, sent ``signum`` after its 2nd step's save."""
    command = [
        sys.executable,
        "-c",
        _WITH_CTRL_C,
        *fit_cmd("--config", str(config_file), "--output", str(run))[3:],
    ]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(proc, run, 2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=600)
    return command, proc.returncode, stderr


def test_sigterm_checkpoints_exits_75_and_the_same_command_resumes(tmp_path, config_file, uninterrupted):
    run = tmp_path / "preempted"
    command, returncode, stderr = _signalled_after_a_checkpoint(config_file, run, signal.SIGTERM)
    assert returncode == 75, stderr
    stopped_at = int((run / "PREEMPTED").read_text())
    assert stopped_at < 32 and max(_latest_steps(run)) == stopped_at  # saved after the step it was on
    assert "preempted at step" in stderr and "Traceback" not in stderr
    again = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)  # no --resume
    assert again.returncode == 0, again.stderr
    assert not (run / "PREEMPTED").exists()
    _assert_same_results(run, uninterrupted)


def test_ctrl_c_saves_a_checkpoint_exits_130_and_resume_continues(tmp_path, config_file, uninterrupted):
    """Ctrl-C lost everything since the last save, and one landing in JAX's garbage-collection
    callback was printed as "Exception ignored" while the fit trained on to its end."""
    run = tmp_path / "interrupted"
    command, returncode, stderr = _signalled_after_a_checkpoint(config_file, run, signal.SIGINT)
    assert returncode == 130, stderr
    stopped_at = max(_latest_steps(run))
    assert stopped_at < 32 and f"interrupted at step {stopped_at}" in stderr, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not (run / "PREEMPTED").exists()  # the same command does not go on by itself: it is refused
    again = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "pass --resume" in again.stderr, again.stderr
    resumed = subprocess.run([*command, "--resume"], env=_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_results(run, uninterrupted)


def test_a_second_ctrl_c_stops_at_once_and_an_ignored_one_stays_ignored():
    from vision_ft.train.preemption import PreemptionWatch

    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)  # as Python starts in a terminal
    watch = PreemptionWatch()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert watch.requested() == (True, False) and watch.interrupted
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        watch.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `nohup ... &` starts a job
    try:
        watch = PreemptionWatch()
        os.kill(os.getpid(), signal.SIGINT)
        assert watch.requested() == (False, False)
        watch.close()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGINT, started_with)


def _one_line_exit_2(result, culprit):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and culprit in errors[0], result.stderr


@pytest.mark.parametrize(
    "args, culprit",
    [
        (("--epochs", "0"), "epochs"),
        (("--data", "npz:/no/such/file.npz"), "/no/such/file.npz"),
        (("--data", "csv:whatever"), "whatever"),
        (("--data", "jpeg:photos"), "jpeg:photos"),
        (("--window", "40"), "window"),
        (("--model", "resnet9000"), "resnet9000"),
        (("--freeze", "no_such_layer"), "no_such_layer"),
        (("--lr", "fast"), "--lr"),
        (("--resume",), "no run to resume"),
        (("--mesh", "data=3,fsdp=5"), "--mesh"),
        (("--mesh", "pipeline=2"), "--mesh"),
        (("--seed", "-1"), "seed"),  # numpy's generators refuse it, at the first epoch
    ],
)
def test_fit_bad_options(tmp_path, args, culprit):
    result = subprocess.run(
        # test_resnet: the cheapest random init, for the errors found after the model is built
        fit_cmd("--output", str(tmp_path / "out"), "--model", "test_resnet", "--pretrained", "false", *args),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    _one_line_exit_2(result, culprit)


def test_fit_bad_files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: 3\nnot_a_setting: 1\n")
    _one_line_exit_2(
        subprocess.run(
            fit_cmd("--config", str(bad_yaml)), env=_env(), capture_output=True, text=True, timeout=300
        ),
        "not_a_setting",
    )
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 truncated")
    _one_line_exit_2(
        subprocess.run(
            fit_cmd("--data", f"npz:{broken}", "--output", str(tmp_path / "o")),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        ),
        "broken.npz",
    )


def test_output_naming_a_file_is_refused_and_the_file_kept(tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    for output, culprit in ((mine, "is a file"), (mine / "run", "cannot be created")):
        result = subprocess.run(
            fit_cmd("--output", str(output)), env=_env(), capture_output=True, text=True, timeout=300
        )
        _one_line_exit_2(result, f"--output {output} {culprit}")
    assert mine.read_text() == "mine"


def test_existing_run_is_never_overwritten(tmp_path, config_file):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    result = subprocess.run(
        fit_cmd("--config", str(config_file), "--output", str(out)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    _one_line_exit_2(result, "already holds a run")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_fit_that_failed_before_its_first_evaluation_leaves_a_reusable_directory(tmp_path):
    from vision_ft.train.config import FitConfig
    from vision_ft.train.output_dir import claim_output_dir
    from vision_ft.train.run_dir import RunDirError

    out = tmp_path / "run"
    (out / "checkpoints" / "latest").mkdir(parents=True)
    settings = {**FitConfig(output=str(out)).to_dict(), "num_classes": 2, "in_chans": 1}
    (out / "config.json").write_text(json.dumps(settings))
    (out / "metrics.jsonl").write_text("")  # what a fit out of memory at its first batch leaves
    assert claim_output_dir(FitConfig(output=str(out))).cfg.output == str(out)
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(RunDirError, match="already holds a run"):
        claim_output_dir(FitConfig(output=str(out)))


def test_resume_with_a_config_file_starts_from_the_runs_own_settings(tmp_path):
    """defaults < the run's config.json < --config < options: the file's settings apply on top of
    the run's, and the run's --output may come from the file."""
    from vision_ft.cli.fit import _resumed_settings
    from vision_ft.train.config import load_config

    run = tmp_path / "run"
    run.mkdir()
    started = load_config(None, {"epochs": 5, "output": str(run), "checkpoint_dir": "gs://bucket/run"})
    (run / "config.json").write_text(json.dumps({**started.to_dict(), "num_classes": 2, "in_chans": 1}))
    config_file = tmp_path / "more.yaml"
    config_file.write_text(f"lr: 0.002\noutput: {run}\n")
    overrides = {"resume": True, "seed": 3}
    output = Path(load_config(config_file, overrides).output)  # the run named by the file
    cfg = load_config(config_file, overrides, base=_resumed_settings(output))
    assert (cfg.epochs, cfg.checkpoint_dir, cfg.lr, cfg.seed) == (5, "gs://bucket/run", 0.002, 3)


@pytest.mark.parametrize(
    "content, culprit",
    [
        (b"1: 2\nfoo: 1\n", "unknown key(s) 1, foo"),  # keys YAML reads as numbers crashed sorting
        (b"mean: []\nstd: []\n", "mean and std must hold one value per band each"),
        (b"mean: [0.5]\nstd: [0.2, 0.3]\n", "mean and std must hold one value per band each"),
        (b"\xff\xfe\x00epochs", "is not UTF-8 text"),
        (b"lr: 0.1\nepochs: 2\nlr: 0.001\n", "key lr is given twice (lines 1 and 3)"),  # the last won
        (  # a run's own config.json (JSON is YAML): its recorded facts are no settings
            b'{"lr": 0.1, "num_classes": 2, "run_id": "a1"}',
            "unknown key(s) num_classes, run_id: this is a run's config.json; continue the run with "
            "--output DIR --resume, or fine-tune from its weights with --pretrained run:DIR",
        ),
    ],
)
def test_a_malformed_config_file_is_a_config_error(tmp_path, content, culprit):
    """What `fit` turns into one line and exit code 2; these raised TypeError, ValueError and
    UnicodeDecodeError (a traceback, exit 1)."""
    from vision_ft.train.config import ConfigError, load_config

    path = tmp_path / "settings.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert culprit in str(raised.value)


@pytest.mark.parametrize(
    "content, culprit",
    [
        (b"\xff\xfe{}", "unreadable (not UTF-8 text)"),
        (b"5", "not a run's settings"),
        (b"[1, 2]", "not a run's settings"),
        (
            b'{"model": "resnet50", "num_classes": 2, "in_chans": 3, "img_size": "big"}',
            "damaged (img_size 'big')",
        ),
        (
            b'{"model": 7, "num_classes": true, "in_chans": 3, "img_size": 32}',
            "damaged (num_classes True, model 7)",
        ),
    ],
)
def test_a_damaged_run_config_is_a_run_dir_error(tmp_path, content, culprit):
    """eval, predict, embed, fit --pretrained run:DIR and fit --resume read it; these raised
    TypeError or UnicodeDecodeError, one deep in the input pipeline after creating --output."""
    from vision_ft.train.run_dir import RunDirError, read_run_config

    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(RunDirError) as raised:
        read_run_config(tmp_path)
    assert f"{tmp_path / 'config.json'}: {culprit}" in str(raised.value)


def test_sigterm_before_training_starts_exits_75_for_a_rerun(tmp_path, monkeypatch):
    """SIGTERM while fit loaded data, built the model or restored a resume ended the process with
    143, which the sbatch script does not requeue (it requeues 75, a preempted fit's code)."""
    from click.testing import CliRunner

    from vision_ft.cli import main
    from vision_ft.train import loop

    def terminated_in_set_up(cfg, saved, checkpoint_dir, out):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop, "set_up_run", terminated_in_set_up)
    handler = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(main, ["fit", "--no-progress", "--output", str(tmp_path / "run")])
    assert result.exit_code == 75, (result.output, result.exception)
    assert "rerun the same command" in result.output
    assert signal.getsignal(signal.SIGTERM) is handler  # a notebook or test process goes on as before


_RUN_CONFIG = {
    "model": "resnet18", "num_classes": 2, "in_chans": 1, "img_size": 32, "class_names": ["a", "b"],
    "pretrained_cfg": {
        "mean": [0.5], "std": [0.25], "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
    },
    "eval_crop_mode": "center", "multi_label": False, "loss_class_weights": [1.0, 3.0],
}  # fmt: skip


@pytest.mark.parametrize(
    "damage, culprit",
    [
        ({}, None),  # the undamaged file reads
        ({"eval_crop_mode": "bogus"}, "eval_crop_mode 'bogus': one of center, squash, border expected"),
        ({"eval_crop_mode": None}, "eval_crop_mode None"),
        (
            {"pretrained_cfg": {**_RUN_CONFIG["pretrained_cfg"], "interpolation": "nope"}},
            "interpolation 'nope'",
        ),
        ({"pretrained_cfg": {**_RUN_CONFIG["pretrained_cfg"], "crop_pct": "x"}}, "crop_pct 'x'"),
        ({"pretrained_cfg": {**_RUN_CONFIG["pretrained_cfg"], "std": [0]}}, "std [0]: one positive number"),
        ({"loss_class_weights": "x"}, "loss_class_weights 'x': 2 weights expected"),
        ({"multi_label": "yes"}, "multi_label 'yes': true or false expected"),
        ({"class_names": None}, "class_names None: 2 names expected"),
    ],
)
def test_a_hand_edited_run_config_is_named_before_it_is_used(tmp_path, damage, culprit):
    """Each of these went through: tracebacks deep in the input pipeline or the report (exit 1), an
    AUC of 0.5 from a std of 0, multi-label metrics from a string, or the data blamed for the classes."""
    from vision_ft.train.run_dir import RunDirError, read_run_config

    (tmp_path / "config.json").write_text(json.dumps({**_RUN_CONFIG, **damage}))
    if culprit is None:
        assert read_run_config(tmp_path)["loss_class_weights"] == [1.0, 3.0]
        return
    with pytest.raises(RunDirError, match="damaged") as raised:
        read_run_config(tmp_path)
    assert culprit in str(raised.value)
