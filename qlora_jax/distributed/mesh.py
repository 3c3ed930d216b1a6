"""Device meshes and multi-host initialisation, through JAX's own distributed machinery.

A mesh spec is a string like ``"fsdp=8"``, ``"data=2,fsdp=4"`` or ``"data=2,fsdp=2,tensor=2"``
(axes in that order; ``-1`` takes the remaining devices). Axes:

* ``data``: pure data parallelism (the batch is split, parameters are replicated);
* ``fsdp``: the batch is split and the parameters, adapters and optimizer state are sharded too
  (XLA gathers a layer's weights when the layer runs and reduce-scatters its gradients);
* ``tensor``: the linear layers' output features are split (useful for very wide layers).
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

__all__ = ["MESH_AXES", "parse_mesh_spec", "make_mesh", "initialize_distributed"]

MESH_AXES = ("data", "fsdp", "tensor")


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
    """Axis sizes of a spec string over ``num_devices`` devices (every axis present, missing = 1)."""
    sizes = {axis: 1 for axis in MESH_AXES}
    wildcard = None
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; axes are {MESH_AXES}")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {name!r} needs an integer size, got {value!r} in {spec!r}") from None
        if size == -1:
            wildcard = name
        elif size < 1:
            raise ValueError(f"mesh axis {name!r} must have a positive size, got {size}")
        sizes[name] = size
    if wildcard is not None:
        sizes[wildcard] = 1
        rest, remainder = divmod(num_devices, math.prod(sizes.values()))
        if remainder:
            raise ValueError(f"cannot fill {spec!r} over {num_devices} devices")
        sizes[wildcard] = rest
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh {spec!r} uses {math.prod(sizes.values())} devices but {num_devices} are available")
    return sizes


def make_mesh(spec: str = "fsdp=-1", devices: list | None = None) -> Mesh:
    """A mesh with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all devices).

    Axes are ``Auto``: shardings are given for inputs and XLA's SPMD partitioner propagates them.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """``jax.distributed.initialize`` for a multi-host run (no-op for a single process).

    All three values are needed for an explicit setup; on managed clusters (SLURM, TPU pods)
    pass none and JAX discovers them.
    """
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if not any(given):
        return
    if num_processes == 1 and coordinator_address is None:
        return
    if not all(given):
        raise ValueError("multi-host needs --coordinator_address, --num_processes and --process_id together")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
