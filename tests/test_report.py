"""What a run writes: TensorBoard scalars that read back, written without importing torch."""

import importlib.util
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_LOG_ONE_EVALUATION = """
import sys
from pathlib import Path
from vision_ft.train.report import MetricsLog

log = MetricsLog(Path(sys.argv[1]))
log.log("val", 1, 5, {"auc": 0.75, "loss": 1.5, "confusion_matrix": [[1, 0], [0, 1]]})
log.close()
print("torch loaded:", "torch" in sys.modules)
"""


def _scalars(event_file: Path) -> dict[tuple[str, int], float]:
    """Scalars of a TFRecord event file: records of [length u64][crc u32][Event proto][crc u32]."""
    from tensorboardX.proto import event_pb2

    data, offset, found = event_file.read_bytes(), 0, {}
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            found[(value.tag, event.step)] = value.simple_value
    return found


def test_tensorboard_scalars_read_back_and_torch_stays_unloaded(tmp_path):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed, so there is nothing to keep unloaded")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _LOG_ONE_EVALUATION, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "torch loaded: False" in out.stdout  # torch is for parity tests and benchmarks only
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    assert _scalars(event_file) == {("val/auc", 5): 0.75, ("val/loss", 5): 1.5}


def test_learning_curves_of_a_run_without_validation_yet(tmp_path):
    import warnings

    from vision_ft.train.report import plot_learning_curves

    records = [{"epoch": 0, "step": 4, "split": "train", "loss": 0.7}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns on a legend with nothing to label
        plot_learning_curves(records, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_plots_of_many_classes_stay_a_bounded_size(tmp_path):
    """The confusion matrix grew 1.2 inches a class with a number in every cell: 101 classes took 47 s
    to draw, 600 ran out of 22 GB after training, before final.json was written."""
    import numpy as np
    from PIL import Image

    from vision_ft.train.report import plot_confusion_matrix, plot_roc

    classes = 60
    rng = np.random.default_rng(0)
    names = [f"class {i}" for i in range(classes)]
    plot_confusion_matrix(rng.integers(0, 9, (classes, classes)).tolist(), names, tmp_path / "cm.png", "test")
    labels = np.arange(3 * classes) % classes
    probs = rng.dirichlet(np.ones(classes), len(labels))
    plot_roc(labels, probs, names, tmp_path / "roc.png", "test ROC")
    for name in ("cm.png", "roc.png"):
        with Image.open(tmp_path / name) as image:
            assert max(image.size) <= 2000, (name, image.size)


def test_a_record_cut_short_by_a_kill_is_dropped_and_a_damaged_log_named(tmp_path):
    from vision_ft.train.report import MetricsLog
    from vision_ft.train.run_dir import RunDirError

    path = tmp_path / "metrics.jsonl"
    whole = '{"epoch": 1, "step": 4, "split": "train", "loss": 0.7}\n'
    path.write_text(whole + '{"epoch": 1, "step": 4, "split": "val", "au')  # killed mid-append
    log = MetricsLog(tmp_path, resume_step=4)
    log.close()
    assert [r["split"] for r in log.records] == ["train"]
    assert path.read_text() == whole
    path.write_text('{"epoch": 1, "st\n' + whole)
    with pytest.raises(RunDirError, match=r"metrics.jsonl, line 1: not a JSON record"):
        MetricsLog.read(path)


def test_a_resumed_log_keeps_the_checkpoints_step_and_drops_the_test_record(tmp_path):
    """On --resume from step 8: the records after it run again, and so does the test, which the run's
    end writes again (a resume of a finished run, or one killed while finishing, had two); TensorBoard
    must purge from step 9, not 8, or it hid the epoch logged at the checkpoint's own step."""
    import json

    from tensorboardX.proto import event_pb2

    from vision_ft.train.report import MetricsLog

    logged = [("train", 4), ("val", 4), ("train", 8), ("val", 8), ("test", 8), ("train", 12)]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"epoch": s // 4, "step": s, "split": split, "loss": 1.0}) + "\n"
            for split, s in logged
        )
    )
    log = MetricsLog(tmp_path, resume_step=8)
    log.close()
    kept = [(r["split"], r["step"]) for r in MetricsLog.read(tmp_path / "metrics.jsonl")]
    assert kept == [("train", 4), ("val", 4), ("train", 8), ("val", 8)]
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    data, offset, starts = event_file.read_bytes(), 0, []
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
            starts.append(event.step)
    assert starts == [9]
