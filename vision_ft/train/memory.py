"""Does the compiled train step fit in memory? Asked once its program exists and before it runs:
on a CPU an over-sized step is otherwise killed by the kernel minutes later, without a message."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

from vision_ft.train.config import ConfigError

log = logging.getLogger(__name__)

# above this share of a device's memory the step may still run, but little is left for the rest
_TIGHT_SHARE = 0.8


class StepMemoryError(ConfigError):
    """The train step needs more memory than a device has; the message names the options to lower."""


def _limit_in(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) < 2**60 else None  # "max", or v1's near-2**63


def cgroup_limit_bytes(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """The tightest memory limit on this process's control group and its ancestors (a container's,
    a batch job's), cgroup v2 or v1; None where none is set or none can be read."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":  # v2's one hierarchy
            where, name = Path(root), "memory.max"
        elif "memory" in controllers.split(","):
            where, name = Path(root) / "memory", "memory.limit_in_bytes"
        else:
            continue
        # the group and each group above it, to the hierarchy's root (inside a cgroup namespace,
        # the group is "/" and the root is the container's own group)
        parts = Path(group.lstrip("/")).parts
        for depth in range(len(parts), -1, -1):
            limit = _limit_in(where.joinpath(*parts[:depth], name))
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def host_memory_bytes() -> int | None:
    """The physical memory this process may use: the machine's, or its control group's limit."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        physical = None
    limits = [b for b in (physical, cgroup_limit_bytes()) if b]
    return min(limits) if limits else None


def device_memory_bytes(device: jax.Device) -> int | None:
    """What one device can hold: an accelerator's own memory, or a CPU device's share of the host's
    (simulated CPU devices all live in the one process's memory). None where it cannot be told."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a plugin that cannot say: the check is skipped, not the fit
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        host = host_memory_bytes()
        return host // len(jax.local_devices(backend="cpu")) if host else None
    return None


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_step_fits(
    needed: int, device: jax.Device, *, batch_size: int, img_size: int, what: str = "the train step"
) -> None:
    """Raise StepMemoryError when ``what`` (the step, or a part of it) needing ``needed`` bytes per
    device cannot fit on ``device``; log a warning when it leaves little room."""
    available = device_memory_bytes(device)
    if available is None:
        return
    where = "this machine's memory" if device.platform == "cpu" else f"{device.platform.upper()} memory"
    options = f"--batch-size {batch_size} at --img-size {img_size}"
    if needed > available:
        raise StepMemoryError(
            f"{options}: {what} needs about {_size(needed)} per device, more than the "
            f"{_size(available)} of {where} each device has; lower --batch-size (accumulate_steps keeps "
            "the effective batch) or --img-size"
        )
    if needed > _TIGHT_SHARE * available:
        log.warning(
            "%s: %s needs about %s per device, %.0f%% of the %s each device has",
            options, what, _size(needed), 100 * needed / available, _size(available),
        )  # fmt: skip
