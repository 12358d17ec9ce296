"""Two real JAX processes on CPU (gloo collectives, 4 simulated devices each) against one process
with 8 devices: `fit` ends with the same metrics and `embed` writes identical embeddings."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.train_fixtures import write_synthetic_npz
from vision_ft.infer.embeddings import read_embeddings

REPO = Path(__file__).resolve().parents[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )  # fmt: skip
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(args: list[str], processes: int) -> None:
    base = [sys.executable, "-m", "vision_ft.cli", *args]
    if processes == 1:
        out = subprocess.run(base, env=_env(8), capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr
        return
    port = _free_port()
    procs = [
        subprocess.Popen(
            [*base, "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_npz(tmp_path_factory.mktemp("mp") / "data.npz", sizes=(64, 32, 32))


def test_two_processes_fit_and_embed_like_one(data, tmp_path):
    fit = ["fit", "--no-progress", "--model", "resnet18", "--pretrained", "false", "--data", f"npz:{data}",
           "--img-size", "32", "--epochs", "2", "--batch-size", "16", "--seed", "1"]  # fmt: skip
    _run([*fit, "--output", str(tmp_path / "one")], 1)
    _run([*fit, "--output", str(tmp_path / "two")], 2)
    one = json.loads((tmp_path / "one" / "final.json").read_text())
    two = json.loads((tmp_path / "two" / "final.json").read_text())
    assert one["best_step"] == two["best_step"]
    for split in ("best_val", "test"):
        for key in ("loss", "accuracy", "auc", "balanced_accuracy"):
            assert two[split][key] == pytest.approx(one[split][key], rel=1e-4, abs=1e-5), (split, key)
    embed = ["embed", "--checkpoint", str(tmp_path / "one"), "--data", f"npz:{data}", "--split", "test",
             "--no-progress", "--batch-size", "16"]  # fmt: skip
    _run([*embed, "--output", str(tmp_path / "one.npz")], 1)
    _run([*embed, "--output", str(tmp_path / "two.npz")], 2)
    a, b = read_embeddings(tmp_path / "one.npz"), read_embeddings(tmp_path / "two.npz")
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)  # identical, not merely close
