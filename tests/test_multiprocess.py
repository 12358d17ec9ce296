"""Two real JAX processes on CPU (gloo collectives, 4 simulated devices each) against one process
with 8 devices: `fit` with FSDP across the two processes ends with the same metrics as data-parallel
`fit` in one, and `embed` writes identical embeddings.

For `embed` every process gets the same intra-op thread pool (8 threads, as `NPROC` sets it): XLA
sizes the pool to max(cores, local devices), so it would hold 8 threads in the single process and 4
in each of the two, and Eigen splits its contractions by the pool's size, which moves the last bits
(up to 1e-7). `fit` keeps the default pools: 16 threads on two cores slowed the two processes enough
to miss gloo's 30 s start-up deadline."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.train_fixtures import write_synthetic_npz
from vision_ft.infer.embeddings import read_embeddings

REPO = Path(__file__).resolve().parents[1]


def _env(devices: int, threads: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NPROC")}
    env.update(
        PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )  # fmt: skip
    if threads is not None:
        env["NPROC"] = str(threads)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(args: list[str], processes: int, logs: Path, threads: int | None = None) -> None:
    base = [sys.executable, "-m", "vision_ft.cli", *args]
    if processes == 1:
        out = subprocess.run(base, env=_env(8, threads), capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr
        return
    # Output goes to files, not pipes: a process blocked on a full pipe while the other waits for it
    # in a collective would deadlock both. One that dies (killed for memory, say) leaves the other
    # waiting in a collective for ever, so the survivor is killed at once.
    port = _free_port()
    label = Path(args[args.index("--output") + 1]).stem
    paths = [logs / f"{label}.process{i}.log" for i in range(2)]
    commands = [
        [*base, "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
        for i in range(2)
    ]
    _wait_for_all(_start(commands, paths, _env(4, threads)), paths, timeout=900)


def _start(commands: list[list[str]], paths: list[Path], env: dict, cwds: list[Path] | None = None) -> list:
    """One process per command, its output (stdout and stderr) to the log file beside it."""
    procs = []
    for i, (command, path) in enumerate(zip(commands, paths, strict=True)):
        with open(path, "w") as log:
            cwd = cwds[i] if cwds else None
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd))
    return procs


def _wait_for_all(procs: list, paths: list[Path], timeout: float, exit_code: int = 0) -> None:
    """Wait for every process to exit with ``exit_code``; kill the others as soon as one exits with
    another code or time runs out."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, exit_code) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, path in zip(procs, paths, strict=True):
        assert p.returncode == exit_code, f"{path.name} (exit {p.returncode}):\n" + path.read_text()[-4000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_npz(tmp_path_factory.mktemp("mp") / "data.npz", sizes=(64, 32, 32))


def test_two_processes_fit_and_embed_like_one(data, tmp_path):
    fit = ["fit", "--no-progress", "--model", "test_resnet", "--pretrained", "false", "--data", f"npz:{data}",
           "--img-size", "32", "--epochs", "2", "--batch-size", "16", "--seed", "1"]  # fmt: skip
    _run([*fit, "--output", str(tmp_path / "one")], 1, tmp_path)
    # FSDP over all 8 devices: every sharded tensor has shards on both hosts, and the tensors under
    # fsdp_min_size (biases, norms) stay replicated, so one run covers both kinds of cross-process
    # gradient reduction and checkpoint write. (Each two-process run costs two cold compiles on two
    # cores; a separate pure data-parallel run added 1.5-2.5 minutes and no code path.)
    (tmp_path / "fsdp.yaml").write_text("fsdp_min_size: 256\n")
    fsdp = ["--config", str(tmp_path / "fsdp.yaml"), "--mesh", "fsdp=8", "--output", str(tmp_path / "two")]
    _run([*fit, *fsdp], 2, tmp_path)
    one = json.loads((tmp_path / "one" / "final.json").read_text())
    two = json.loads((tmp_path / "two" / "final.json").read_text())
    assert one["best_step"] == two["best_step"]
    for split in ("best_val", "test"):
        for key in ("loss", "accuracy", "auc", "balanced_accuracy"):
            assert two[split][key] == pytest.approx(one[split][key], rel=1e-4, abs=1e-5), (split, key)
    embed = ["embed", "--checkpoint", str(tmp_path / "one"), "--data", f"npz:{data}", "--split", "test",
             "--no-progress", "--batch-size", "16"]  # fmt: skip
    _run([*embed, "--output", str(tmp_path / "one.npz")], 1, tmp_path, threads=8)
    _run([*embed, "--output", str(tmp_path / "two.npz")], 2, tmp_path, threads=8)
    a, b = read_embeddings(tmp_path / "one.npz"), read_embeddings(tmp_path / "two.npz")
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)  # identical, not merely close


def test_processes_given_different_settings_stop_before_writing(data, tmp_path):
    port = _free_port()
    paths = [tmp_path / f"process{i}.log" for i in range(2)]
    commands = [
        [sys.executable, "-m", "vision_ft.cli", "fit", "--no-progress", "--model", "test_resnet",
         "--pretrained", "false", "--data", f"npz:{data}", "--img-size", "32",
         "--output", str(tmp_path / f"run{i}"),
         *(["--lr", "0.5", "--workers", "1", "--resume"] if i == 1 else []),
         "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
        for i in range(2)
    ]  # fmt: skip
    _wait_for_all(_start(commands, paths, _env(1)), paths, timeout=300, exit_code=2)
    for path in paths:
        text = path.read_text()
        # --resume on one process only: the other waited for it where it read its run's settings
        assert "were given different settings: lr, resume." in text and "Traceback" not in text, text[-4000:]
    assert not (tmp_path / "run0").exists() and not (tmp_path / "run1").exists()


_SKEWED_SUM = """
import sys, time
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from vision_ft.train.distributed import initialize, meeting_on_first_call

port, pid, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
initialize(f"localhost:{port}", 2, pid)
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.full(2, pid + 1.0, np.float32))
total = jax.jit(lambda v: v.sum(), out_shardings=NamedSharding(mesh, P()))
time.sleep(delay if pid == 1 else 0)  # as if process 1 took that much longer to compile
print("sum", float(meeting_on_first_call("sum", total)(x)))
"""


def test_processes_meet_before_a_collective_however_late_one_compiles(tmp_path):
    """Gloo lets a collective wait 30 s for the other processes; process 1 arrives 35 s late.
    Without meeting_on_first_call's barrier this fails with gloo's DEADLINE_EXCEEDED (checked by hand)."""
    port = _free_port()
    paths = [tmp_path / f"process{i}.log" for i in range(2)]
    commands = [[sys.executable, "-c", _SKEWED_SUM, str(port), str(i), "35"] for i in range(2)]
    _wait_for_all(_start(commands, paths, _env(1)), paths, timeout=300)
    for path in paths:
        assert "sum 6.0" in path.read_text()  # 2 x 1.0 from process 0 + 2 x 2.0 from process 1


def test_an_unusable_image_with_on_bad_image_fail_stops_every_process(tmp_path):
    """Each process reads its own slice of a batch, so one alone meets the broken file; raising there
    alone left the other waiting in the next collective. All now stop after the same step, exit 2."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(12):
            path = tmp_path / "data" / name / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
            if (name, i) == ("b", 5):
                path.write_bytes(path.read_bytes()[:100])  # one broken file, so one process meets it
    port = _free_port()
    paths = [tmp_path / f"process{i}.log" for i in range(2)]
    commands = [
        [sys.executable, "-m", "vision_ft.cli", "fit", "--no-progress", "--model", "test_resnet",
         "--pretrained", "false", "--data", f"folder:{tmp_path / 'data'}", "--val-fraction", "0",
         "--img-size", "32", "--epochs", "3", "--batch-size", "16", "--on-bad-image", "fail",
         "--output", str(tmp_path / "run"),
         "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
        for i in range(2)
    ]  # fmt: skip
    _wait_for_all(_start(commands, paths, _env(4)), paths, timeout=300, exit_code=2)
    errors = sorted(line for p in paths for line in p.read_text().splitlines() if line.startswith("error:"))
    assert len(errors) == 2, errors
    assert errors[0].endswith(
        "b/5.jpg: cannot decode image: OSError: Truncated File Read (on_bad_image: fail)"
    ), errors
    assert errors[1].startswith("error: a training image read by another process: unusable"), errors
    assert not any("Traceback" in p.read_text() for p in paths)


def _fit_two_processes(data: Path, outputs: list[Path], logs: Path) -> list[str]:
    """Start a two-process fit with each process's --output, expect both to exit 2, return the logs."""
    port = _free_port()
    paths = [logs / f"process{i}.log" for i in range(2)]
    commands = [
        [sys.executable, "-m", "vision_ft.cli", "fit", "--no-progress", "--model", "test_resnet",
         "--pretrained", "false", "--data", f"npz:{data}", "--img-size", "32", "--output", str(outputs[i]),
         "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
        for i in range(2)
    ]  # fmt: skip
    _wait_for_all(_start(commands, paths, _env(1)), paths, timeout=300, exit_code=2)
    texts = [path.read_text() for path in paths]
    assert not any("Traceback" in text for text in texts), texts
    return texts


def test_a_refused_output_or_unshared_checkpoints_stop_every_process(data, tmp_path):
    """Hosts may keep their own --output, but a refusal on one process stopped that one alone (the
    other then waited for it in a collective), and checkpoints must go to one directory all share:
    on disks of their own each host held part of every checkpoint."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    first, second = _fit_two_processes(data, [tmp_path / "mine", tmp_path / "fresh"], tmp_path)
    assert "holds files a fit does not write (notes.txt)" in first, first[-2000:]
    assert "process 0 of this run stopped on its --output (its error says why); so did this one" in second
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's"

    outputs = [tmp_path / "host0", tmp_path / "host1"]  # the same run on two hosts' own disks
    texts = _fit_two_processes(data, outputs, tmp_path)
    for text, out in zip(texts, outputs, strict=True):
        assert (
            f"the checkpoint directory {out / 'checkpoints'} is not shared by the processes of this run: "
            "process 1 cannot read what process 0 writes there"
        ) in text, text[-2000:]
    assert list((tmp_path / "host0" / "checkpoints").iterdir()) == []  # the probe is gone


def _two_hosts(args: list[list[str]], cwds: list[Path], logs: Path) -> list[str]:
    """Run ``fit`` as two processes, process i with ``args[i]`` in working directory ``cwds[i]`` (as
    on a host of its own), expect both to exit 2 without a traceback, and return their logs."""
    port = _free_port()
    paths = [logs / f"host{i}.log" for i in range(2)]
    commands = [
        [sys.executable, "-m", "vision_ft.cli", "fit", "--no-progress", *args[i],
         "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
        for i in range(2)
    ]  # fmt: skip
    _wait_for_all(_start(commands, paths, _env(1), cwds), paths, timeout=300, exit_code=2)
    texts = [path.read_text() for path in paths]
    assert not any("Traceback" in text for text in texts), texts
    return texts


def test_a_check_that_fails_on_one_host_alone_stops_every_process(data, tmp_path):
    """Hosts read their own data and run directories. Where a check after --output's failed on one
    process only (here the data file is missing on host 1), the other went on and waited for it in
    its first collective, for the barrier's hour."""
    hosts = [tmp_path / "host0", tmp_path / "host1"]
    for host in hosts:
        host.mkdir()
    shutil.copy(data, hosts[0] / "data.npz")
    args = ["--model", "test_resnet", "--pretrained", "false", "--data", "npz:data.npz", "--img-size", "32",
            "--output", "run", "--checkpoint-dir", str(tmp_path / "checkpoints")]  # fmt: skip
    first, second = _two_hosts([args, args], hosts, tmp_path)
    assert "data.npz" in second.strip().splitlines()[-1], second[-2000:]
    assert "process 1 of this run stopped on its set-up (its error says why); so did this one" in first
    assert not (hosts[0] / "run" / "config.json").exists()


def test_a_resume_on_hosts_with_their_own_output_starts_from_process_zeros_run(data, tmp_path):
    """Only process 0 writes config.json, which records what the run resolved (tta_flip, the
    checkpoint directory as an absolute path); the other processes of a resume given the same
    command started from their commands' settings, and every process was refused for "different
    settings". Now process 0's run decides for all, and the resume goes on to the run directories
    (here host 1 finds no checkpoint to resume from, which stops both)."""
    from vision_ft.train.config import FitConfig

    (tmp_path / "host0").mkdir()
    settings = FitConfig(
        model="test_resnet", pretrained="false", data=f"npz:{data}", img_size=32, output="host0",
        checkpoint_dir=str(tmp_path / "checkpoints"), tta_flip=True, tta_shift=0.0,
    ).to_dict()  # fmt: skip
    (tmp_path / "host0" / "config.json").write_text(json.dumps({**settings, "num_classes": 2, "in_chans": 3}))
    (tmp_path / "host0" / "metrics.jsonl").write_text('{"epoch": 1, "step": 4, "split": "val"}\n')
    args = [
        ["--model", "test_resnet", "--pretrained", "false", "--data", f"npz:{data}", "--img-size", "32",
         "--output", f"host{i}", "--checkpoint-dir", "checkpoints", "--resume"]
        for i in range(2)
    ]  # fmt: skip
    first, second = _two_hosts(args, [tmp_path, tmp_path], tmp_path)
    assert not any("different settings" in text for text in (first, second)), first[-2000:]
    assert "--resume: host1 holds no run to resume" in second, second[-2000:]
    assert "process 1 of this run stopped on its --output (its error says why); so did this one" in first


def test_unusable_images_either_process_read_are_all_reported(tmp_path):
    """Each process decodes its own slice of a batch and noted the unusable files it met; final.json
    (process 0's) listed only process 0's. One epoch of one batch of all 16 images: process 0 reads
    8 of them, process 1 the other 8, and all 4 broken files must be reported."""
    from PIL import Image

    rng = np.random.default_rng(0)
    broken = {("a", 1), ("a", 5), ("b", 2), ("b", 6)}
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(8):
            path = tmp_path / "data" / name / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
            if (name, i) in broken:
                path.write_bytes(path.read_bytes()[:60])
    port = _free_port()
    paths = [tmp_path / f"process{i}.log" for i in range(2)]
    commands = [
        [sys.executable, "-m", "vision_ft.cli", "fit", "--no-progress", "--model", "test_resnet",
         "--pretrained", "false", "--data", f"folder:{tmp_path / 'data'}", "--val-fraction", "0",
         "--img-size", "32", "--epochs", "1", "--batch-size", "16", "--output", str(tmp_path / "run"),
         "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
        for i in range(2)
    ]  # fmt: skip
    _wait_for_all(_start(commands, paths, _env(4)), paths, timeout=300)
    reported = json.loads((tmp_path / "run" / "final.json").read_text())["bad_examples"]
    expected = {str(tmp_path / "data" / name / f"{i}.png") for name, i in broken}
    assert reported["count"] == 4 and set(reported["examples"]) == expected, reported


class _NfsClientView:
    """A path as an NFS client sees it after caching that some directories did not exist (looked up
    before process 0 created them): those stay invisible, with all below them, until the client
    reads the directory above again."""

    def __init__(self, path: Path, stale: set[Path]):
        self.path, self.stale = path, stale

    def __truediv__(self, name: str) -> "_NfsClientView":
        return _NfsClientView(self.path / name, self.stale)

    @property
    def parents(self) -> list["_NfsClientView"]:
        return [_NfsClientView(p, self.stale) for p in self.path.parents]

    def _check_visible(self) -> None:
        if any(p in self.stale for p in (self.path, *self.path.parents)):
            raise FileNotFoundError(self.path)

    def read_text(self) -> str:
        self._check_visible()
        return self.path.read_text()

    def iterdir(self):
        self._check_visible()
        self.stale.difference_update({p for p in self.stale if p.parent == self.path})
        return iter(self.path.iterdir())


def test_the_shared_directory_probe_refreshes_the_directory_above_one_cached_as_absent(tmp_path):
    """Process 1 looked up the checkpoint directory (for a resumable run) before process 0 created it
    and wrote the probe there; listing that directory itself, as the retry did, met the same cached
    miss, so a shared directory was refused as not shared on a first run."""
    from vision_ft.train.distributed import _reads_back

    probe = tmp_path / "ckpt" / "run7" / "probe"
    probe.parent.mkdir(parents=True)
    probe.write_text("token")
    for stale in (probe.parent, probe.parent.parent):  # made by process 0: one level, or two
        view = _NfsClientView(probe, {stale})
        with pytest.raises(FileNotFoundError):
            view.read_text()
        assert _reads_back(view, "token", patience_s=3.0)
    assert not _reads_back(_NfsClientView(probe, set()), "another token", patience_s=0.0)


@pytest.mark.parametrize("coordinator", ["localhost", "localhost:abc", ":1234", "localhost:70000"])
def test_a_coordinator_that_is_not_host_port_is_refused_before_jax_reads_it(coordinator):
    """JAX split "localhost" on its colon (an IndexError traceback) and crashed on a port of letters."""
    from vision_ft.train.config import ConfigError
    from vision_ft.train.distributed import initialize

    with pytest.raises(ConfigError, match=f"--coordinator {coordinator!r}: expected HOST:PORT"):
        initialize(coordinator, 2, 0)


def test_open_mpi_5_is_told_to_pass_the_options_jax_cannot_read(monkeypatch):
    """Open MPI 5 sets OMPI_COMM_WORLD_SIZE but not the OMPI_MCA_orte_hnp_uri JAX finds it by: JAX
    stopped on "coordinator_address should be defined", a traceback."""
    from vision_ft.train.config import ConfigError
    from vision_ft.train.distributed import initialize

    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    monkeypatch.delenv("OMPI_MCA_orte_hnp_uri", raising=False)
    with pytest.raises(
        ConfigError, match="Open MPI 5.*--coordinator HOST:PORT --num-processes 2 --process-id 0"
    ):
        initialize()


_SIGTERM_AFTER_INITIALIZE = """
import os, signal, sys, time
from vision_ft.train.distributed import initialize

initialize(f"localhost:{sys.argv[1]}", 1, 0)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(10)
print("survived")
"""


def test_sigterm_still_ends_a_process_after_the_multi_process_runtime_starts(tmp_path):
    """jax.distributed.initialize installs a SIGTERM handler that only sets a flag: embed (and fit
    until its loop watched for SIGTERM itself) ran on through kill, scancel or TPU maintenance."""
    out = subprocess.run(
        [sys.executable, "-c", _SIGTERM_AFTER_INITIALIZE, str(_free_port())],
        capture_output=True, text=True, env=_env(1), timeout=120,
    )  # fmt: skip
    assert out.returncode == -15 and "survived" not in out.stdout, (out.returncode, out.stderr[-2000:])
