"""Scaling past one device: meshes, multi-host initialisation, and shardings of every pytree."""

from qlora_jax.distributed.mesh import MESH_AXES, initialize_distributed, make_mesh, parse_mesh_spec
from qlora_jax.distributed.sharding import (
                                            BATCH_AXES,
                                            PARAM_AXES,
                                            batch_sharding,
                                            param_shardings,
                                            shard_batch,
                                            shard_tree,
)

__all__ = ["BATCH_AXES", "MESH_AXES", "PARAM_AXES", "batch_sharding", "initialize_distributed", "make_mesh",
           "param_shardings", "parse_mesh_spec", "shard_batch", "shard_tree"]
