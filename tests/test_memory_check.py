"""fit refuses a train step that cannot fit in memory before it loads a batch, instead of being
killed by the kernel (CPU) or failing in the first step (GPU)."""

import logging
import os
from types import SimpleNamespace

import jax
import pytest

from vision_ft.train import memory
from vision_ft.train.memory import (
    StepMemoryError,
    cgroup_limit_bytes,
    check_step_fits,
    device_memory_bytes,
    host_memory_bytes,
)

GIB = 2**30


def _accelerator(limit):
    return SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": limit} if limit else None)


def test_a_step_over_the_device_memory_is_refused_naming_the_options():
    with pytest.raises(StepMemoryError) as raised:
        check_step_fits(20 * GIB, _accelerator(16 * GIB), batch_size=64, img_size=512)
    message = str(raised.value)
    assert message.startswith("--batch-size 64 at --img-size 512: the train step needs about 20.0 GiB")
    assert "16.0 GiB of GPU memory" in message and "lower --batch-size" in message


def test_a_tight_step_runs_with_a_warning_and_an_unknown_budget_is_not_checked(caplog):
    with caplog.at_level(logging.WARNING, logger=memory.__name__):
        check_step_fits(15 * GIB, _accelerator(16 * GIB), batch_size=64, img_size=512)
        check_step_fits(1 * GIB, _accelerator(16 * GIB), batch_size=64, img_size=512)
    assert [r.getMessage() for r in caplog.records] == [
        "--batch-size 64 at --img-size 512: the train step needs about 15.0 GiB per device, 94% of "
        "the 16.0 GiB each device has"
    ]
    check_step_fits(10**15, _accelerator(None), batch_size=64, img_size=512)  # no figure, no refusal


def test_simulated_cpu_devices_share_the_host_memory(monkeypatch):
    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 8 * GIB)
    cpus = jax.local_devices(backend="cpu")
    assert device_memory_bytes(cpus[0]) == 8 * GIB // len(cpus)


def _cgroup_tree(root, limits: dict[str, str]):
    for path, text in limits.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text + "\n")


@pytest.mark.parametrize(
    "membership, limits, expected",
    [
        # v2, in a namespace: the group is "/" and its limit at the root
        ("0::/\n", {"memory.max": "1073741824"}, GIB),
        ("0::/\n", {"memory.max": "max"}, None),
        # v2, a job's group below the root: the limit of the job's parent holds it
        ("0::/jobs/42/step\n", {"memory.max": "max", "jobs/42/memory.max": str(2 * GIB),
                                 "jobs/42/step/memory.max": "max"}, 2 * GIB),
        # v1, as in this sandbox: memory:/process_api/<id>, the limit on the group itself
        ("4:memory:/process_api/abc\n3:cpuset:/\n", {
            "memory/memory.limit_in_bytes": "9223372036854771712",
            "memory/process_api/abc/memory.limit_in_bytes": str(3 * GIB)}, 3 * GIB),
        ("4:memory:/process_api/abc\n", {"memory/memory.limit_in_bytes": "9223372036854771712"}, None),
    ],
)  # fmt: skip
def test_a_memory_limit_is_read_from_the_process_s_cgroup_and_its_parents(
    tmp_path, membership, limits, expected
):
    (tmp_path / "cgroup").write_text(membership)
    _cgroup_tree(tmp_path / "fs", limits)
    assert cgroup_limit_bytes(str(tmp_path / "cgroup"), str(tmp_path / "fs")) == expected


def test_the_host_memory_is_at_most_the_machine_s():
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < host_memory_bytes() <= physical


def test_a_device_that_cannot_tell_its_memory_is_not_checked():
    def broken():
        raise RuntimeError("memory_stats is not supported by this plugin")

    assert device_memory_bytes(SimpleNamespace(platform="tpu", memory_stats=broken)) is None


@pytest.mark.parametrize(
    "per_device, culprit",
    [
        # more than the batch, less than the step: XLA's analysis of the compiled step refuses it
        (2**20, "the train step needs about"),
        # less than the input batch alone (16 x 64 x 64 floats over 8 devices, 32 KiB each): refused
        # before compiling, which for a batch of 32 at 20000 px took minutes and 14 GB
        (16 * 2**10, "its input batch alone needs about 0.0 MiB"),
    ],
)
def test_fit_refuses_an_oversized_step_before_loading_a_batch(tmp_path, monkeypatch, per_device, culprit):
    from click.testing import CliRunner

    from tests.train_fixtures import write_synthetic_npz
    from vision_ft.cli import main
    from vision_ft.train import loop
    from vision_ft.train.step import Trainer

    def no_batches(*args, **kwargs):
        raise AssertionError("a train batch was asked for")

    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 8 * per_device)  # 8 devices share it
    monkeypatch.setattr(loop, "train_batches", no_batches)
    if "batch" in culprit:
        monkeypatch.setattr(Trainer, "step_memory", lambda *a, **k: pytest.fail("the step was compiled"))
    data = write_synthetic_npz(tmp_path / "data.npz")
    args = [
        "fit", "--no-progress", "--model", "test_resnet", "--pretrained", "false", "--data", f"npz:{data}",
        "--img-size", "64", "--batch-size", "16", "--epochs", "1", "--output", str(tmp_path / "run"),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"error: --batch-size 16 at --img-size 64: {culprit}" in result.output
    assert "of this machine's memory each device has" in result.output


def test_a_later_phase_that_cannot_fit_is_refused_before_the_first(tmp_path, monkeypatch):
    """fine_tune's head-only phase needs a fifth of what its unfrozen phase does (1.6 against 7.8 MB
    per device here): only the first was checked, so the run spent its head epochs before failing."""
    from tests.train_fixtures import tiny_config
    from vision_ft.train import loop
    from vision_ft.train.loop import FitRun

    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 8 * 4 * 2**20)  # 4 MiB per device
    monkeypatch.setattr(loop, "train_batches", lambda *a, **k: pytest.fail("a train batch was asked for"))
    run = FitRun(tiny_config(tmp_path, recipe="fine_tune"), progress=False)
    assert [p.name for p in run.phases] == ["head", "full"]
    with pytest.raises(
        StepMemoryError, match=r"^--batch-size 16 at --img-size 32: phase full's train step needs"
    ):
        run.run()


def test_a_resume_checks_its_checkpoint_before_compiling_the_step(tmp_path, monkeypatch):
    """The memory check compiles the train step (minutes on a CPU): a resume whose checkpoint does
    not fit the run is refused first."""
    from tests.train_fixtures import tiny_config
    from vision_ft.train.checkpoint import CheckpointMismatchError
    from vision_ft.train.config import load_config
    from vision_ft.train.loop import FitRun
    from vision_ft.train.step import Trainer

    cfg = tiny_config(tmp_path, epochs=1)
    FitRun(cfg, progress=False).run()
    resumed = FitRun(load_config(None, {**cfg.to_dict(), "resume": True}), progress=False)

    def mismatched(*args, **kwargs):
        raise CheckpointMismatchError("the checkpoint holds other arrays")

    monkeypatch.setattr(resumed.checkpoints, "restore_latest", mismatched)
    monkeypatch.setattr(Trainer, "step_memory", lambda *a, **k: pytest.fail("the step was compiled first"))
    with pytest.raises(CheckpointMismatchError):
        resumed.run()


def test_a_resume_refused_by_the_memory_check_leaves_the_run_as_it_was(tmp_path, monkeypatch):
    """The resume cut metrics.jsonl back to its checkpoint (a finished run lost its test record) and
    purged TensorBoard's later events before the check refused the step."""
    from tests.train_fixtures import tiny_config
    from vision_ft.train.config import load_config
    from vision_ft.train.loop import FitRun

    cfg = tiny_config(tmp_path, epochs=1)
    FitRun(cfg, progress=False).run()
    run_dir = tmp_path / "run"

    def contents() -> dict:
        return {
            str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()
        }

    before = contents()
    assert b'"split": "test"' in before["metrics.jsonl"]
    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 8 * 2**20)  # 1 MiB per device
    resumed = FitRun(load_config(None, {**cfg.to_dict(), "resume": True}), progress=False)
    with pytest.raises(StepMemoryError):
        resumed.run()
    after = contents()
    assert after.keys() == before.keys()
    changed = [name for name in before if after[name] != before[name]]
    assert changed == [], changed
