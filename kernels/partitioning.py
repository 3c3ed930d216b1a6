"""The fused kernels under sharding: each device runs the kernel on its shard (``jax.shard_map``).

A Triton or Mosaic kernel is an opaque custom call to XLA's SPMD partitioner, which would gather
every operand and run the whole product on every device. :func:`per_shard` instead wraps the
kernel in a ``shard_map`` over the mesh in context (``jax.set_mesh(mesh)``, or an abstract mesh
when exporting), with the layout of :mod:`qlora_jax.distributed.sharding`:

* activation rows (tokens) split over the batch axes (``data``, ``fsdp``);
* **FSDP**: weight rows split over ``fsdp`` are all-gathered inside the wrapper, one layer at a
  time (the layer's packed codes and scales, ~0.52 byte per weight, never a bf16 copy);
* **tensor parallelism**, ``tensor_parallel="column"`` (the default): the weight's rows (output
  features) split over ``tensor`` stay split, the forward gives each device its slice of the
  output features and the input gradient adds the devices' partial sums (``psum``);
  ``tensor_parallel="row"``: the weight's input features split over ``tensor`` (whole
  quantization blocks per device), the forward adds partial sums and the input gradient gives
  each device its slice of the input features. Megatron pairs them: column-parallel q/k/v and
  gate/up, row-parallel o and down, so that the activations between them stay split.

Codes, scales and nested scales are split together. The nested scales (one per 256 scales) keep
their double quantization when a shard holds whole nested blocks; otherwise (small layers) each
device decodes its own scales to float32 from the replicated nested scales, with the global block
index, so the values are the reference's. Without a mesh in context, or when a dimension does not
divide, the kernel runs on the whole (gathered) problem as before.

The wrapper is used by :func:`qlora_jax.kernels.quantized_matmul` for every kernel backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qlora_jax.quant import QuantizedTensor, codebooks
from qlora_jax.quant.tensor import decode_dynamic8

__all__ = ["BATCH_AXES", "FSDP_AXIS", "TENSOR_AXIS", "TensorParallel", "local_rows", "per_shard"]

BATCH_AXES = ("data", "fsdp")
FSDP_AXIS = "fsdp"
TENSOR_AXIS = "tensor"
TensorParallel = Literal["column", "row"]


def _active(mesh, names) -> tuple[str, ...]:
    return tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)


def _size(mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _spec(*dims) -> P:
    return P(*[(d if len(d) > 1 else d[0]) if d else None for d in dims])


def local_rows(m: int) -> int:
    """The activation rows one device multiplies when ``m`` rows are split over the batch axes of
    the mesh in context (``m`` without a mesh, or when they do not divide)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return m
    size = _size(mesh, _active(mesh, BATCH_AXES))
    return m // size if m % size == 0 else m


def _local_weight(codes, scales, nested, offset, qt: QuantizedTensor, *, shape, row0, col0, nested_local: bool):
    """The shard's QuantizedTensor ``[rows, cols]``; ``row0``/``col0`` (traced) place it in the global weight."""
    rows, cols = shape
    meta = dict(shape=(rows, cols), dtype=qt.dtype, quant_type=qt.quant_type, blocksize=qt.blocksize,
                nested_blocksize=qt.nested_blocksize)
    if not qt.double_quant or nested_local:
        return QuantizedTensor(codes, scales, nested, offset, **meta)
    # Decode this shard's scales with their global flat block index: the reference's arithmetic
    # (dynamic map value times nested scale, rounded, then plus the offset).
    blocks_per_row = qt.shape[1] // qt.blocksize
    local_blocks = cols // qt.blocksize
    flat = ((row0 + jnp.arange(rows))[:, None] * blocks_per_row
            + col0 // qt.blocksize + jnp.arange(local_blocks)[None, :]).reshape(-1)
    per_block = nested[flat // qt.nested_blocksize]
    values = decode_dynamic8(scales.reshape(-1), per_block, 1, codebooks.DYNAMIC_MAP_SIGNED)
    absmax = (jax.lax.optimization_barrier(values) + offset).reshape(rows, local_blocks)
    return QuantizedTensor(codes, absmax, None, None, **meta)


class _Layout(NamedTuple):
    """Where one weight's shards live: the mesh axes per dimension and the local shape."""

    batch: tuple[str, ...]  # axes splitting the activations' rows (M)
    fsdp: tuple[str, ...]
    tensor: tuple[str, ...]
    split: Literal["rows", "cols"]  # the weight dimension the tensor axis splits
    row_axes: tuple[str, ...]
    col_axes: tuple[str, ...]
    local_shape: tuple[int, int]  # of the weight each tensor-parallel device uses, after the FSDP gather
    nested_local: bool  # the nested scales split like the codes (else every device holds them all)


def _layout(mesh, m: int, qt: QuantizedTensor, tensor_parallel: TensorParallel) -> _Layout | None:
    """How ``qt`` and ``m`` activation rows split over ``mesh``; None: run the kernel unsharded."""
    batch = _active(mesh, BATCH_AXES)
    fsdp = _active(mesh, (FSDP_AXIS,))
    tensor = _active(mesh, (TENSOR_AXIS,))
    if not batch and not fsdp and not tensor:
        return None
    n, k = qt.shape
    if m % _size(mesh, batch):
        batch = ()
    f, t = _size(mesh, fsdp), _size(mesh, tensor)
    if tensor_parallel not in ("column", "row"):
        raise ValueError(f"tensor_parallel must be 'column' or 'row', got {tensor_parallel!r}")
    split = "rows" if tensor_parallel == "column" else "cols"
    if split == "rows":
        if n % (f * t):
            return None
        row_axes, col_axes = tensor + fsdp, ()  # tensor-major: gathering fsdp leaves contiguous row blocks
        local_shape = (n // t, k)
    else:
        if n % f or k % t or (k // t) % qt.blocksize or (k // t) % 2:
            return None
        row_axes, col_axes = fsdp, tensor
        local_shape = (n, k // t)
    weight_shards = _size(mesh, row_axes) * _size(mesh, col_axes)
    nested_local = (
        qt.double_quant and split == "rows"
        and (n // weight_shards * (k // qt.blocksize)) % qt.nested_blocksize == 0
        and qt.nested_scales.shape[0] % weight_shards == 0
    )
    return _Layout(batch, fsdp, tensor, split, row_axes, col_axes, local_shape, nested_local)


def _shard_body(kernel: Callable[[jax.Array, QuantizedTensor], jax.Array], qt: QuantizedTensor, layout: _Layout,
                reduce_tensor: tuple[str, ...]) -> Callable[..., jax.Array]:
    """The per-device program: gather the FSDP rows, rebuild the local weight, run ``kernel``, reduce."""
    fsdp, tensor, split, local_shape = layout.fsdp, layout.tensor, layout.split, layout.local_shape

    def body(a_local, codes, scales, *dq):
        if fsdp:  # FSDP: gather this layer's rows (packed) from the devices that hold them
            codes = jax.lax.all_gather(codes, fsdp, axis=0, tiled=True)
            scales = jax.lax.all_gather(scales, fsdp, axis=0, tiled=True)
            if layout.nested_local:
                dq = (jax.lax.all_gather(dq[0], fsdp, axis=0, tiled=True), dq[1])
        nested, offset = dq if dq else (None, None)
        index = jax.lax.axis_index(tensor) if tensor else 0
        row0 = index * local_shape[0] if split == "rows" else 0
        col0 = index * local_shape[1] if split == "cols" else 0
        local = _local_weight(codes, scales, nested, offset, qt, shape=local_shape, row0=row0, col0=col0,
                              nested_local=layout.nested_local)
        out = kernel(a_local, local)
        if reduce_tensor:
            out = jax.lax.psum(out.astype(jnp.float32), reduce_tensor).astype(a_local.dtype)
        return out

    return body


def per_shard(
    kernel: Callable[[jax.Array, QuantizedTensor], jax.Array],
    a: jax.Array,
    qt: QuantizedTensor,
    *,
    direction: Literal["forward", "input_grad"],
    tensor_parallel: TensorParallel = "column",
) -> jax.Array:
    """``kernel(a, qt)`` run per shard over the context mesh; see the module docstring.

    ``direction="forward"``: ``a = x[M, K]``, result ``[M, N]``; ``"input_grad"``: ``a = dy[M, N]``,
    result ``[M, K]``. ``kernel`` takes and returns local (2-D) arrays.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(a, qt)
    layout = _layout(mesh, a.shape[0], qt, tensor_parallel)
    if layout is None:
        return kernel(a, qt)
    batch, tensor, split = layout.batch, layout.tensor, layout.split
    # Tensor-parallel outputs: the forward's features on "rows", the input gradient's on "cols".
    out_tensor = tensor if (split == "rows") == (direction == "forward") else ()
    reduce_tensor = tensor if not out_tensor else ()
    a_spec = _spec(batch, tensor if (direction == "forward") == (split == "cols") else ())
    codes_spec = _spec(layout.row_axes, layout.col_axes)
    specs = [a_spec, codes_spec, codes_spec]
    operands = [a, qt.codes, qt.scales]
    if qt.double_quant:
        specs += [_spec(layout.row_axes) if layout.nested_local else P(), P()]
        operands += [qt.nested_scales, qt.offset]
    body = _shard_body(kernel, qt, layout, reduce_tensor)
    return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=_spec(batch, out_tensor),
                         check_vma=False)(*operands)
