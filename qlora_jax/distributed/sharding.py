"""Shardings for the frozen base, the adapters, the optimizer state and the batches.

Rules (``fsdp`` and ``tensor`` mesh axes together are the "parameter" axes):

* a linear weight ``[L, out, in]`` and its packed codes ``[L, out, in/2]`` and scales
  ``[L, out, in/blocksize]`` split their ``out`` rows over the parameter axes, so every device
  holds ``1/n`` of the packed NF4 weights; the nested scales split with them when the split falls
  on whole nested blocks of 256, else they are replicated (they are 1/512 of the codes);
  per-layer offsets are replicated;
* embeddings and the output head split their vocabulary rows;
* adapters ``A: [L, r, in]`` split ``in``, ``B: [L, out, r]`` split ``out``; any other leaf
  splits its largest dimension that the axes divide, or is replicated;
* with an ``expert`` mesh axis of more than one device, the experts of an MoE layer (the
  expert-stacked ``layers.mlp.{gate,up,down}_proj`` base tensors, every array of their
  quantization included, and their adapters ``[L, E, ...]``) split their expert axis ``E`` over
  ``expert`` together with the parameter axes where ``E`` divides, else over ``expert`` alone
  (the layout :func:`qlora_jax.models.moe.moe_block`'s ``shard_map`` computes in); without
  that axis they follow the rules above (their leading split falls on ``E``);
* the optimizer state follows the adapters (:func:`qlora_jax.optim.state_shardings`);
* batches ``[accum, B, T]`` split ``B`` over ``data`` and ``fsdp``; each process reads only the rows
  its devices hold (:func:`process_rows`).

Layer-stacked leaves never split the layer axis: ``lax.scan`` runs the layers in sequence.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qlora_jax.quant import QuantizedTensor

__all__ = ["param_shardings", "batch_sharding", "process_rows", "shard_tree", "shard_batch", "PARAM_AXES",
           "BATCH_AXES"]

PARAM_AXES = ("fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def _axes_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _split(ndim: int, dim: int, axes: tuple[str, ...]) -> P:
    spec: list[Any] = [None] * ndim
    spec[dim] = axes
    return P(*spec)


def _largest_divisible(shape: tuple[int, ...], first: int, size: int) -> int | None:
    candidates = [d for d in range(first, len(shape)) if shape[d] % size == 0 and shape[d] >= size]
    return max(candidates, key=lambda d: shape[d]) if candidates else None


def _quantized(qt: QuantizedTensor, mesh: Mesh, stacked: bool) -> QuantizedTensor:
    size = _axes_size(mesh, PARAM_AXES)
    lead = 1 if stacked else 0
    codes_shape = qt.codes.shape
    rows = codes_shape[lead] if len(codes_shape) > lead + 1 else None
    replicated = NamedSharding(mesh, P())
    if size == 1 or rows is None or rows % size:
        return jax.tree.map(lambda _: replicated, qt)
    rowwise = NamedSharding(mesh, _split(len(codes_shape), lead, PARAM_AXES))
    scales = NamedSharding(mesh, _split(qt.scales.ndim, lead, PARAM_AXES))
    nested = replicated
    if qt.double_quant:
        scales_per_shard = (rows // size) * qt.scales.shape[-1]
        if scales_per_shard % qt.nested_blocksize == 0 and qt.nested_scales.shape[-1] % size == 0:
            nested = NamedSharding(mesh, _split(qt.nested_scales.ndim, lead, PARAM_AXES))
    return QuantizedTensor(rowwise, scales, nested if qt.double_quant else None,
                           replicated if qt.double_quant else None, qt.shape, qt.dtype, qt.quant_type, qt.blocksize,
                           qt.nested_blocksize)


def _expert_axes(mesh: Mesh, experts: int, where: str) -> tuple[str, ...]:
    """The mesh axes an expert axis of ``experts`` splits over (see the module docstring)."""
    for axes in (("expert", *PARAM_AXES), ("expert",)):
        if experts % _axes_size(mesh, axes) == 0:
            return axes
    raise ValueError(f"{where}: its {experts} experts do not split over the 'expert' mesh axis "
                     f"({mesh.shape['expert']} devices); use an expert axis that divides {experts}")


def _expert_leaf(names: list[str], ndim: int, mesh: Mesh) -> bool:
    """Whether a leaf is an expert-stacked MoE tensor ``[L, E, ...]`` to split over the expert axis."""
    return (mesh.shape.get("expert", 1) > 1 and len(names) >= 3 and names[0] == "layers" and names[1] == "mlp"
            and names[2] in ("gate_proj", "up_proj", "down_proj") and ndim >= 4)


def _by_expert(tree: Any, mesh: Mesh, where: str) -> Any:
    """Every array of ``tree`` (one expert tensor, or its quantized parts) split on its expert axis (1)."""
    experts = jax.tree.leaves(tree)[0].shape[1]
    axes = _expert_axes(mesh, experts, where)
    return jax.tree.map(lambda leaf: NamedSharding(mesh, _split(leaf.ndim, 1, axes)), tree)


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def param_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a base or adapter pytree (see the module docstring).

    Args:
      tree: a base pytree (QuantizedTensor linears, stacked ``[L, ...]`` layers) or adapters.
      mesh: a mesh with the :data:`PARAM_AXES`.

    Returns:
      A pytree of :class:`~jax.sharding.NamedSharding` matching ``tree`` (a QuantizedTensor gets
      one per array leaf).
    """
    size = _axes_size(mesh, PARAM_AXES)
    replicated = NamedSharding(mesh, P())

    def rule(path, leaf):
        names = _path_names(path)
        stacked = "layers" in names
        main = leaf.codes if isinstance(leaf, QuantizedTensor) else leaf
        if _expert_leaf(names, len(main.shape), mesh):
            return _by_expert(leaf, mesh, ".".join(names))
        if isinstance(leaf, QuantizedTensor):
            return _quantized(leaf, mesh, stacked)
        shape = tuple(leaf.shape)
        lead = 1 if stacked else 0
        if size == 1 or len(shape) <= lead:
            return replicated
        name = names[-1] if names else ""
        if name == "lora_A" and shape[-1] % size == 0:
            return NamedSharding(mesh, _split(len(shape), len(shape) - 1, PARAM_AXES))
        if name in ("lora_B", "weight", "bias", "embed_tokens", "lm_head") and shape[lead] % size == 0:
            return NamedSharding(mesh, _split(len(shape), lead, PARAM_AXES))
        if name.endswith("layernorm") or name == "norm":
            return replicated
        dim = _largest_divisible(shape, lead, size)
        return replicated if dim is None else NamedSharding(mesh, _split(len(shape), dim, PARAM_AXES))

    return jax.tree_util.tree_map_with_path(rule, tree, is_leaf=lambda x: isinstance(x, QuantizedTensor))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """How ``[accum, B, T]`` batches are placed: ``B`` split over the data-parallel axes.

    Args:
      mesh: a mesh with the :data:`BATCH_AXES`.

    Returns:
      A :class:`~jax.sharding.NamedSharding`.
    """
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def shard_tree(tree: Any, shardings: Any) -> Any:
    """``tree`` placed with ``shardings``.

    Args:
      tree: a pytree of arrays (host or device).
      shardings: a matching pytree of shardings (e.g. :func:`param_shardings`).

    Returns:
      The pytree of placed ``jax.Array``.
    """
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def process_rows(mesh: Mesh | None, batch_size: int) -> np.ndarray:
    """The rows of a global ``[accum, batch_size, T]`` batch that this process's devices hold.

    Under :func:`batch_sharding` the rows split over the data-parallel axes; devices that differ
    only along ``tensor`` or ``expert`` hold the same rows. A process reads and pads only these rows of each
    batch, and :func:`shard_batch` assembles the global array from what every process holds.

    Args:
      mesh: the mesh, or None (one device).
      batch_size: rows of the global batch.

    Returns:
      int ``[n]`` row indices, ascending; every row without a mesh, or when one process holds the
      whole mesh.

    Raises:
      ValueError: ``batch_size`` does not split over the data axes.
    """
    if mesh is None:
        return np.arange(batch_size)
    if batch_size % _axes_size(mesh, BATCH_AXES):
        raise ValueError(f"the batch of {batch_size} sequences does not split over the data axes "
                         f"({_axes_size(mesh, BATCH_AXES)} ways): make it a multiple")
    held = batch_sharding(mesh).addressable_devices_indices_map((1, batch_size, 1)).values()
    return np.unique(np.concatenate([np.arange(batch_size)[index[1]] for index in held]))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, *, rows: np.ndarray | None = None,
                batch_size: int | None = None) -> dict[str, jax.Array]:
    """Global ``[accum, B, T]`` arrays, split over the data axes, from this process's host rows.

    Each device gets its rows from its own process: nothing crosses processes.

    Args:
      batch: ``{name: [accum, rows, T]}`` numpy arrays, this process's rows of the global batch.
      mesh: the mesh.
      rows: which rows of the global batch ``batch`` holds (ascending, :func:`process_rows`); None:
        the whole batch (then every process passes the same).
      batch_size: rows of the global batch (None: ``batch``'s).

    Returns:
      ``{name: jax.Array [accum, batch_size, T]}`` placed with :func:`batch_sharding`.

    Raises:
      ValueError: ``rows`` that disagree with ``batch``, a batch that does not split over the data
        axes, or a device needing rows this process does not hold.
    """
    local = batch["input_ids"].shape[1]
    batch_size = local if batch_size is None else batch_size
    rows = np.arange(batch_size) if rows is None else np.asarray(rows)
    if len(rows) != local:
        raise ValueError(f"the host batch has {local} rows but {len(rows)} row indices were given")
    if batch_size % _axes_size(mesh, BATCH_AXES):
        raise ValueError(f"the batch of {batch_size} sequences does not split over the data axes "
                         f"({_axes_size(mesh, BATCH_AXES)} ways): make it a multiple")
    sharding = batch_sharding(mesh)
    position = np.full(batch_size, -1)
    position[rows] = np.arange(len(rows))

    def rows_of(value: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
        wanted = position[np.arange(batch_size)[index[1]]]
        if (wanted < 0).any():
            raise ValueError(f"a device of this process needs rows {np.arange(batch_size)[index[1]].tolist()} "
                             f"of the batch, which holds rows {rows.tolist()}")
        return value[index[0], wanted[0]:wanted[-1] + 1, index[2]]  # a device's rows are consecutive

    return {k: jax.make_array_from_callback((v.shape[0], batch_size, *v.shape[2:]), sharding,
                                            lambda index, v=v: rows_of(v, index)) for k, v in batch.items()}
