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


def test_the_host_memory_is_the_machine_s_or_its_container_s():
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    container = cgroup_limit_bytes()
    assert host_memory_bytes() == (min(physical, container) if container else physical)


def test_simulated_cpu_devices_share_the_host_memory(monkeypatch):
    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 8 * GIB)
    cpus = jax.local_devices(backend="cpu")
    assert device_memory_bytes(cpus[0]) == 8 * GIB // len(cpus)


@pytest.mark.parametrize(
    "content, limit", [("max\n", None), ("1073741824\n", GIB), ("9223372036854771712\n", None)]
)
def test_a_container_limit_is_read_from_its_cgroup(tmp_path, content, limit):
    (tmp_path / "memory.max").write_text(content)
    assert cgroup_limit_bytes((str(tmp_path / "missing"), str(tmp_path / "memory.max"))) == limit


@pytest.mark.parametrize(
    "per_device, culprit",
    [
        # more than the batch, less than the step: XLA's analysis of the compiled step refuses it
        (2**20, "the train step needs about"),
        # less than the input batch alone (16 x 64 x 64 floats over 8 devices, 32 KiB each): refused
        # before compiling, which for a batch of 32 at 20000 px took minutes and 14 GB
        (16 * 2**10, "its input batch alone needs about 0.0 GiB"),
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
