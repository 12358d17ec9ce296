"""Multi-process runs on JAX's own runtime: ``jax.distributed.initialize``, from explicit options or
where the environment says a run spans processes (TPU VM slices, SLURM, Open MPI)."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import signal
import threading
import time

import jax
import numpy as np

from vision_ft.train.config import ConfigError

log = logging.getLogger("vision_ft.distributed")


def cluster_environment() -> str | None:
    """The launcher a multi-process run came from, if any. jax.distributed.initialize() with no
    arguments reads the coordinator, process count and id from the same variables."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"  # JAX finds it by OMPI_MCA_orte_hnp_uri, which only Open MPI 4 and earlier set
    if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "TPU VM"
    return None


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Start the multi-process runtime if asked to (all three options) or if a cluster launched us.
    Must run before any JAX computation. Returns whether the run is multi-process."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError("--coordinator, --num-processes and --process-id go together")
    if coordinator is not None:
        _check_host_port(coordinator)
    environment = cluster_environment()
    if not any(given) and environment is None:
        return False
    if not any(given) and environment == "Open MPI" and "OMPI_MCA_orte_hnp_uri" not in os.environ:
        raise ConfigError(
            "Open MPI 5 launched this run, which JAX cannot read its processes from: pass --coordinator "
            f"HOST:PORT --num-processes {os.environ['OMPI_COMM_WORLD_SIZE']} --process-id "
            f"{os.environ.get('OMPI_COMM_WORLD_RANK', '$OMPI_COMM_WORLD_RANK')} (process 0's host)"
        )
    if (os.environ.get("JAX_PLATFORMS") or "").startswith("cpu"):
        # CPU devices of different processes talk through gloo (JAX's default there is none)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} must be in [0, {num_processes})")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()
    # JAX's preemption manager takes SIGTERM to set a flag nobody here reads: put the default back so
    # kill, scancel and TPU maintenance end the process again (fit's loop watches for it itself)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    log.info(
        "process %d of %d (%s), %d local of %d devices", jax.process_index(), jax.process_count(),
        environment or "explicit options", jax.local_device_count(), jax.device_count(),
    )  # fmt: skip
    return True


def _check_host_port(coordinator: str) -> None:
    """Refuse a coordinator JAX would split on its last colon with a traceback or a crash."""
    host, colon, port = coordinator.rpartition(":")
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(
            f"--coordinator {coordinator!r}: expected HOST:PORT (process 0's host and a free port)"
        )


def is_primary() -> bool:
    """Logs, progress, plots and reports come from process 0 only."""
    return jax.process_index() == 0


_barrier_count = itertools.count()


def wait_for_all_processes(label: str, timeout_s: int = 3600) -> None:
    """Block until every process gets here, over the coordination service rather than a device
    collective. Gloo gives the other processes 30 s to join a collective (not configurable), and one
    process may finish compiling a step much later than another on a loaded machine; so steps are
    compiled first and the processes meet here before the first collective runs."""
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    # every process makes the same calls in the same order, so the counter agrees across them
    key = f"vision_ft/{label}/{next(_barrier_count)}"
    multihost.get_barrier_sync_fn()(key=key, timeout_ms=timeout_s * 1000)


def gathered(label: str, value) -> np.ndarray:
    """Every process's ``value``, stacked in process order, once all have met at ``label`` (see
    wait_for_all_processes: the collective must not start before the slowest arrives)."""
    from jax.experimental import multihost_utils

    wait_for_all_processes(label)
    return np.asarray(multihost_utils.process_allgather(value))


def from_process_zero(label: str, value) -> np.ndarray:
    """Process 0's ``value`` on every process, once all have met at ``label``."""
    from jax.experimental import multihost_utils

    wait_for_all_processes(label)
    return np.asarray(multihost_utils.broadcast_one_to_all(value))


def meeting_on_first_call(name: str, jitted):
    """``jitted`` itself in a single process. In multi-process runs, a function that on its first
    call compiles ``jitted`` for the arguments, then waits for the other processes, so that all of
    them reach its collectives together however long each took to compile; that call and every
    later one then run ``jitted`` (the executable is in jit's cache)."""
    if jax.process_count() == 1:
        return jitted
    met = False

    def call(*args):
        nonlocal met
        if not met:
            jitted.lower(*args).compile()
            wait_for_all_processes(f"compiled-{name}")
            met = True
        return jitted(*args)

    return call


# where each host may keep its own files or threads; every other setting changes what is computed
HOST_LOCAL_SETTINGS = frozenset({"output", "data_dir", "workers", "loader_threads"})


def check_same_settings(settings: dict) -> None:
    """Stop every process of a run whose processes were given different settings (another --lr on one
    host, or a resume that found the run's config.json on one host only), naming the settings.
    Left alone, such processes would train different models in lockstep or hang in a collective."""
    if jax.process_count() == 1:
        return
    names = sorted(k for k in settings if k not in HOST_LOCAL_SETTINGS)
    digests = [hashlib.sha256(json.dumps(settings[k], sort_keys=True, default=str).encode()) for k in names]
    mine = np.array([int.from_bytes(d.digest()[:4], "little") for d in digests], np.uint32)
    everyone = gathered("settings", mine)
    differ = [name for i, name in enumerate(names) if len(set(everyone[:, i].tolist())) > 1]
    if differ:
        raise ConfigError(
            f"the processes of this run were given different settings: {', '.join(differ)}. "
            "Start every process with the same --config and options"
        )


class ProcessStoppedError(ConfigError):
    """Another process of the run stopped on its input; its own error says why."""


def process_zero_says(value: bool) -> bool:
    """Process 0's ``value`` on every process: what only process 0 writes (the preemption marker in
    its --output) decides for all, where hosts keep their own run directories."""
    if jax.process_count() == 1:
        return value
    return bool(from_process_zero("broadcast", np.int32(value)))


def stop_together(error: Exception | None, what: str) -> None:
    """Raise ``error`` on the process that met it, and on every other process of the run a
    ``ProcessStoppedError`` naming the first that did: one process stopping alone would leave the
    others waiting for it in their next collective (for the barrier's hour)."""
    if jax.process_count() > 1:
        failed = gathered(f"stop-{what}", np.int32(error is not None))
        if error is None and failed.any():
            error = ProcessStoppedError(
                f"process {int(np.flatnonzero(failed)[0])} of this run stopped on its {what} (its error "
                "says why); so did this one"
            )
    if error is not None:
        raise error


_SHARED_PROBE = ".vision-ft-shared-probe"


def check_shared_directory(path, what: str) -> None:
    """Stop every process where ``path`` (an etils path: local, NFS or gs://) is not one directory
    they all share: process 0 writes a random token there and every process must read it back.
    Orbax writes each checkpoint from every process into one directory; on disks of their own, each
    host would hold part of every checkpoint, and a resume or the final restore would fail."""
    if jax.process_count() == 1:
        return
    probe = path / _SHARED_PROBE
    expected = from_process_zero("probe-token", np.frombuffer(os.urandom(8), np.uint32)).tobytes().hex()
    unwritable = None
    if is_primary():
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe.write_text(expected)
        except Exception as e:  # raised below, once the others have looked too
            unwritable = ProcessStoppedError(
                f"{what} {path} cannot be written: {getattr(e, 'strerror', None) or e}"
            )
    wait_for_all_processes("probe-written")
    sees = unwritable is None and _reads_back(probe, expected)
    everyone = gathered("probe-read", np.array([sees, unwritable is not None], np.int32))
    if is_primary():
        try:
            probe.unlink(missing_ok=True)
        except Exception as e:  # a role that may write but not delete: harmless
            log.warning("could not remove %s: %s", probe, e)
    if unwritable is not None:
        raise unwritable
    if everyone[0, 1]:
        raise ProcessStoppedError(f"{what} {path} cannot be written by process 0 (its error says why)")
    if not everyone[:, 0].all():
        blind = ", ".join(str(i) for i in np.flatnonzero(everyone[:, 0] == 0))
        raise ProcessStoppedError(
            f"{what} {path} is not shared by the processes of this run: process {blind} cannot read what "
            "process 0 writes there. Put it on storage every host reads (NFS, gs://BUCKET/...)"
        )


def _reads_back(probe, expected: str, patience_s: float = 10.0) -> bool:
    """Whether ``probe`` holds ``expected``, looking again for ``patience_s``: an NFS client may
    have cached that a directory on its path did not exist a moment ago (before process 0 made it),
    and keeps that answer until it next reads the directory above, for up to a minute."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            if probe.read_text() == expected:
                return True
        except Exception:  # absent, or a backend's own not-found error
            pass
        if time.monotonic() > deadline:
            return False
        _refresh_nearest_directory(probe)
        time.sleep(1.0)


def _refresh_nearest_directory(path) -> None:
    """List the nearest directory above ``path`` that this process can list: opening it makes an NFS
    client read it again, and so learn of the directory below that process 0 created."""
    for directory in path.parents:
        try:
            next(iter(directory.iterdir()), None)
            return
        except Exception:  # absent as far as this client knows: the one above holds the stale entry
            continue


def json_from_process_zero(label: str, value):
    """Process 0's ``value`` (JSON-serialisable) on every process: what process 0 read from its own
    disk, which the others may not hold."""
    if jax.process_count() == 1:
        return value
    payload = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_primary() else np.zeros(0, np.uint8)
    size = int(from_process_zero(f"{label}-size", np.int32(payload.size)))
    padded = np.zeros(size, np.uint8)
    padded[: payload.size] = payload
    return json.loads(from_process_zero(label, padded).tobytes())


def merged_from_all_processes(mapping: dict) -> dict:
    """The union of every process's ``mapping`` (JSON-serialisable), later processes' entries over
    earlier ones: what each process met in its own slice of the batches (the unusable files it
    decoded), for process 0 to report."""
    if jax.process_count() == 1:
        return dict(mapping)
    payload = np.frombuffer(json.dumps(mapping, sort_keys=True).encode(), np.uint8)
    sizes = gathered("merge-sizes", np.int32(payload.size))
    padded = np.zeros(max(int(sizes.max()), 1), np.uint8)
    padded[: payload.size] = payload
    everyone = gathered("merge", padded)
    merged: dict = {}
    for row, size in zip(everyone, sizes, strict=True):
        merged.update(json.loads(row[:size].tobytes()))
    return merged
