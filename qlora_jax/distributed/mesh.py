"""Device meshes over all the devices of a run (every process's, in a multi-process run).

A mesh spec is a string like ``"fsdp=8"``, ``"data=2,fsdp=4"``, ``"data=2,fsdp=2,tensor=2"`` or
``"data=4,expert=2"`` (axes in that order; ``-1`` takes the remaining devices). Axes:

* ``data``: pure data parallelism (the batch is split, parameters are replicated);
* ``fsdp``: the batch is split and the parameters, adapters and optimizer state are sharded too
  (XLA gathers a layer's weights when the layer runs and reduce-scatters its gradients);
* ``tensor``: the linear layers' output features are split (useful for very wide layers);
* ``expert``: expert parallelism for mixture-of-experts models: the expert-stacked base and expert
  adapters split their expert axis over it, and each device computes its own experts' rows
  (:func:`qlora_jax.models.moe.moe_block`); devices along it hold the same batch rows. Last, so
  that its collectives stay within a host.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

__all__ = ["MESH_AXES", "axes_across_processes", "parse_mesh_spec", "make_mesh"]

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
    """Axis sizes of a spec string over ``num_devices`` devices.

    Args:
      spec: comma-separated ``axis=size`` over :data:`MESH_AXES`, e.g. ``"data=2,fsdp=-1"``; one
        size may be -1 (the devices left over).
      num_devices: the devices the mesh must use, all of them.

    Returns:
      ``{axis: size}`` for every axis of :data:`MESH_AXES` (a missing axis has size 1).

    Raises:
      ValueError: an unknown axis, a size that is not a positive integer (or -1), or sizes whose
        product is not ``num_devices``.
    """
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
    """A mesh with axes ``("data", "fsdp", "tensor", "expert")`` over ``devices`` (default: all devices).

    Axes are ``Auto``: shardings are given for inputs and XLA's SPMD partitioner propagates them.

    Args:
      spec: the axis sizes (:func:`parse_mesh_spec`); by default everything on ``fsdp``.
      devices: the devices, in order (None: ``jax.devices()``).

    Returns:
      A :class:`jax.sharding.Mesh`.

    Raises:
      ValueError: a bad ``spec`` (:func:`parse_mesh_spec`).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def axes_across_processes(mesh: Mesh) -> dict[str, int]:
    """For each mesh axis, how many processes one line of devices along it spans (the most over all lines).

    Devices are laid out process after process, so the last axes stay within a host.

    Args:
      mesh: a mesh from :func:`make_mesh`.

    Returns:
      ``{axis: processes}``: 1 when the axis stays within each process (host), more when its
      collectives cross the network.
    """
    processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
    spans = {}
    for dim, name in enumerate(mesh.axis_names):
        lines = np.moveaxis(processes, dim, -1).reshape(-1, processes.shape[dim])
        spans[name] = max(len(set(line.tolist())) for line in lines)
    return spans
