"""The device mesh of a run and how arrays are laid out on it.

The mesh has two axes, ``data`` and ``fsdp``. The batch is split over both (every device gets its own
examples). Parameters, optimizer state and BatchNorm statistics are replicated over ``data`` and, with
``fsdp`` > 1, sharded over ``fsdp`` as ZeRO-3/FSDP does: each device stores 1/M of every large tensor,
and XLA's SPMD partitioner all-gathers a layer's weights where the step uses them and reduce-scatters
its gradients. ``data=N,fsdp=1`` is plain data parallelism.

The layout of a tensor depends only on its shape (as big_vision's ``fsdp`` rule): its largest
dimension divisible by M is sharded, if the tensor has at least ``min_size`` elements. AdamW's moments
have their parameters' shapes, so they land on the same devices as their parameters.
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)  # the batch dimension over every device, data-major
DEFAULT_MIN_SIZE = 2**14  # smaller tensors (biases, norms, small kernels) stay replicated
_PART = re.compile(r"\s*(data|fsdp)\s*=\s*(-?\d+)\s*")


class MeshError(ValueError):
    """A --mesh that does not describe the available devices."""


def parse_mesh(text: str | None, num_devices: int) -> tuple[int, int]:
    """``data=N,fsdp=M`` -> (N, M). Either part may be left out or be -1: it takes the devices the
    other leaves (a part left out beside the other's -1 is 1). ``None`` or empty: data parallel over
    every device."""
    sizes = {"data": -1, "fsdp": 1}
    if text:
        given = set()
        for part in text.split(","):
            match = _PART.fullmatch(part)
            if not match:
                raise MeshError(f"--mesh {text!r}: expected data=N,fsdp=M (e.g. data=2,fsdp=4)")
            name, value = match.group(1), int(match.group(2))
            if name in given:
                raise MeshError(f"--mesh {text!r}: {name} is given twice")
            if value == 0 or value < -1:
                raise MeshError(f"--mesh {text!r}: {name} must be a positive size or -1")
            given.add(name)
            sizes[name] = value
        if given == {"data"}:  # data=N alone: FSDP over what it leaves; data=-1 alone: none
            sizes["fsdp"] = 1 if sizes["data"] == -1 else -1
        if given == {"fsdp"} and sizes["fsdp"] == -1:  # fsdp=-1 alone: FSDP over every device
            sizes["data"] = 1
    unknown = [name for name, size in sizes.items() if size == -1]
    known = math.prod(size for size in sizes.values() if size != -1)
    if len(unknown) == 2:
        raise MeshError(f"--mesh {text!r}: give the size of data or fsdp")
    if unknown:
        if num_devices % known:
            raise MeshError(f"--mesh {text!r}: {num_devices} devices do not divide into {known}")
        sizes[unknown[0]] = num_devices // known
    if sizes["data"] * sizes["fsdp"] != num_devices:
        raise MeshError(
            f"--mesh {text!r}: data={sizes['data']} x fsdp={sizes['fsdp']} is "
            f"{sizes['data'] * sizes['fsdp']} devices; this run has {num_devices}"
        )
    return sizes["data"], sizes["fsdp"]


def in_process_order(devices) -> list:
    """``devices`` grouped by process (stably): jax.devices() is in id order, which need not keep a
    process's devices together (TPU slices number chips by position)."""
    return sorted(np.asarray(devices, dtype=object).reshape(-1), key=lambda d: d.process_index)


def make_mesh(text: str | None = None, devices=None) -> Mesh:
    """The (data, fsdp) mesh over ``devices`` (all of them by default), in process order, so that
    each process's devices hold a contiguous part of every batch: the part it reads, and whose
    labels it gathers in process order beside the logits."""
    devices = np.asarray(in_process_order(devices if devices is not None else jax.devices())).reshape(-1)
    data, fsdp = parse_mesh(text, devices.size)
    return Mesh(devices.reshape(data, fsdp), AXES)


def tensor_spec(shape: tuple[int, ...], fsdp: int, min_size: int = DEFAULT_MIN_SIZE) -> P:
    """Where a tensor of this shape lives: sharded on its largest dimension divisible by ``fsdp``
    (the last such, on ties), or replicated when small or indivisible."""
    if fsdp == 1 or not shape or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(tree, mesh: Mesh, min_size: int = DEFAULT_MIN_SIZE):
    """A NamedSharding for every array of ``tree`` (arrays or ShapeDtypeStructs), by its shape."""
    fsdp = mesh.shape["fsdp"]

    def one(leaf) -> NamedSharding:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, tensor_spec(tuple(leaf.shape), fsdp, min_size))

    return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)
