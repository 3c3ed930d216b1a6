"""Scaling past one device: meshes, multi-process runs, and shardings of every pytree."""

from qlora_jax.distributed.mesh import MESH_AXES, axes_across_processes, make_mesh, parse_mesh_spec
from qlora_jax.distributed.multiprocess import (
    DistributedSetupError,
    PrimaryProcessError,
    initialize_distributed,
    is_primary,
)
from qlora_jax.distributed.sharding import (
    BATCH_AXES,
    PARAM_AXES,
    batch_sharding,
    param_shardings,
    process_rows,
    shard_batch,
    shard_tree,
)

__all__ = ["BATCH_AXES", "MESH_AXES", "PARAM_AXES", "DistributedSetupError", "PrimaryProcessError",
           "axes_across_processes", "batch_sharding", "initialize_distributed", "is_primary", "make_mesh",
           "param_shardings", "parse_mesh_spec", "process_rows", "shard_batch", "shard_tree"]
