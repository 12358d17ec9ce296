"""Multi-process runs on JAX's own runtime: ``jax.distributed.initialize``, from explicit options or
where the environment says a run spans processes (TPU VM slices, SLURM, Open MPI)."""

from __future__ import annotations

import itertools
import logging
import os

import jax

from vision_ft.train.config import ConfigError

log = logging.getLogger("vision_ft.distributed")


def cluster_environment() -> str | None:
    """The launcher a multi-process run came from, if any. jax.distributed.initialize() with no
    arguments reads the coordinator, process count and id from the same variables."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"
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
    environment = cluster_environment()
    if not any(given) and environment is None:
        return False
    if (os.environ.get("JAX_PLATFORMS") or "").startswith("cpu"):
        # CPU devices of different processes talk through gloo (JAX's default there is none)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} must be in [0, {num_processes})")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()
    log.info(
        "process %d of %d (%s), %d local of %d devices", jax.process_index(), jax.process_count(),
        environment or "explicit options", jax.local_device_count(), jax.device_count(),
    )  # fmt: skip
    return True


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
