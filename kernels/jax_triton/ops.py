"""The ``jax_triton`` backend: the Triton-language kernels of :mod:`.kernels`, called from JAX.

On a CUDA GPU (or under an abstract one, for ``jax.export``) every call goes through
:func:`jax_triton.triton_call`, which compiles the kernel with Triton at lowering time (TTIR ->
PTX, so lowering without a GPU already runs the whole Triton compiler) and hands XLA a custom call.
With more than one configuration the kernel is a :func:`triton.autotune` kernel: jax_triton
compiles every configuration and XLA's runtime times them on the first call of the compiled
executable, then keeps the fastest for that call site (the choice is cached per executable).

Configurations per size class of the activation rows ``M`` (:func:`matmul_configs`,
:func:`matmul_grad_configs`): decode (``M <= 16``, one 16-row tile, narrow weight tiles and a
split reduction to fill the SMs), medium, and training/prefill (``M >= 256``, 128-wide tiles,
8 warps). The reduction split changes the output's shape (float32 partial sums ``[split, M, N]``
that XLA adds), so it is fixed per call from the shape and only the tiles, warps and stages are
tuned. An explicit ``tiles`` (:class:`~qlora_jax.kernels.tiles.MatmulTiles`) runs that one
configuration. These lists are starting points chosen without a GPU (BENCHMARKS.md).

``interpret=True`` runs the same kernel source through Triton's interpreter on the host instead:
a :func:`jax.pure_callback` sends the operands to a worker process started with
``TRITON_INTERPRET=1`` (:mod:`.interpreter`; Triton decides at import whether to interpret, so
this process keeps compiling for jax_triton), with the first configuration of the list or the
given ``tiles``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import triton
from qlora_jax.kernels import common, support
from qlora_jax.kernels import tiles as tiles_lib
from qlora_jax.kernels.jax_triton import kernels as jt_kernels
from qlora_jax.kernels.jax_triton.interpreter import InterpreterWorker
from qlora_jax.kernels.target import current_target, triton_compute_capability

from qlora_jax.quant import QuantizedTensor, codebooks

__all__ = [
    "BACKEND_OPTIONS",
    "MIN_K_TILE",
    "autotune_disabled",
    "triton_call",
    "matmul_configs",
    "matmul_grad_configs",
    "dequantize_configs",
    "quantize_configs",
    "fused_matmul",
    "fused_matmul_grad",
    "dequantize_kernel",
    "quantize_blocks",
]

_AUTOTUNE = contextvars.ContextVar("qlora_jax_jt_autotune", default=True)


@contextlib.contextmanager
def autotune_disabled():
    """Within this context the kernels compile only the first configuration of their list (no
    autotuning): faster lowering, e.g. for tests, and a fixed choice."""
    token = _AUTOTUNE.set(False)
    try:
        yield
    finally:
        _AUTOTUNE.reset(token)


# No FMA contraction: the double-quant scale rounds its product before adding the offset, as
# bitsandbytes (and the XLA reference) do.
BACKEND_OPTIONS = {"enable_fp_fusion": False}


def _poison(dtype: Any) -> Any:
    dtype = np.dtype(dtype)
    return np.nan if np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16 else np.iinfo(dtype).max


@functools.cache
def _autotuned(kernel: Any, configs: tuple[tuple, ...]) -> Any:
    return triton.autotune(
        configs=[triton.Config(dict(meta), num_warps=warps, num_stages=stages) for meta, warps, stages in configs],
        key=[],
    )(kernel)


def triton_call(
    kernel: Any,
    *inputs: jax.Array,
    out_shapes: Sequence[jax.ShapeDtypeStruct],
    grid: Callable[[dict[str, Any]], tuple[int, ...]],
    configs: Sequence[tuple[dict[str, int], int, int]],
    metaparams: dict[str, Any],
    interpret: bool,
    name: str,
    debug_poison_output: bool = False,
) -> tuple[jax.Array, ...]:
    """Runs ``kernel(*inputs, *outputs, **metaparams, **config)`` over ``grid(meta)`` programs.

    ``configs``: ``(block sizes, num_warps, num_stages)`` triples to autotune over (the
    interpreter takes the first). ``debug_poison_output`` (interpreter only) starts the outputs
    as NaN / all ones, so that an unwritten tile shows.
    """
    configs = tuple((tuple(sorted(meta.items())), warps, stages) for meta, warps, stages in configs)
    if not _AUTOTUNE.get():
        configs = configs[:1]
    if not configs:
        raise ValueError(f"{name}: no kernel configuration fits this problem")
    if interpret:
        meta = {**metaparams, **dict(configs[0][0])}

        def host(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
            outputs = [np.full(s.shape, _poison(s.dtype), s.dtype) if debug_poison_output
                       else np.zeros(s.shape, s.dtype) for s in out_shapes]
            return tuple(InterpreterWorker.run(kernel.fn.__name__, list(arrays), outputs, grid(meta), meta))

        return tuple(jax.pure_callback(host, tuple(out_shapes), *inputs))
    if debug_poison_output:
        raise ValueError("debug_poison_output is an interpreter option")
    capability = triton_compute_capability(current_target())
    import jax_triton  # noqa: PLC0415 - optional at import time, needed to compile for a GPU

    out = jax_triton.triton_call(
        *inputs, kernel=_autotuned(kernel, configs), out_type=tuple(out_shapes), grid=grid, name=name,
        compute_capability=capability, backend_options=BACKEND_OPTIONS, **metaparams,
    )
    return tuple(out)


def _weight_inputs(qt: QuantizedTensor) -> list[jax.Array]:
    """``codes, scales, nested, offset[1], dynamic map, code table`` (placeholders without DQ)."""
    if qt.double_quant:
        dq = [qt.nested_scales, jnp.reshape(qt.offset, (1,)).astype(jnp.float32), common.dynamic_map()]
    else:
        dq = [jnp.zeros((1,), jnp.float32)] * 3
    return [qt.codes, qt.scales, *dq, common.code_table(qt.quant_type)]


def _weight_meta(qt: QuantizedTensor) -> dict[str, Any]:
    return dict(BLOCKSIZE=qt.blocksize, NESTED_BS=qt.nested_blocksize, DOUBLE_QUANT=qt.double_quant)


# (block_m, block_out, block_red, num_warps, num_stages) per size class; block_out tiles the
# output features (N forward, K backward), block_red steps through the reduction.
_FORWARD_CLASSES = {
    "decode": [(16, 32, 256, 4, 4), (16, 64, 256, 4, 4), (16, 128, 128, 4, 4), (16, 64, 128, 4, 3),
               (16, 32, 128, 4, 4), (16, 128, 256, 8, 3)],
    "medium": [(32, 64, 128, 4, 3), (64, 64, 128, 4, 3), (32, 128, 64, 4, 4), (64, 128, 64, 4, 3),
               (64, 64, 64, 4, 4)],
    "prefill": [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4),
                (128, 64, 64, 4, 4)],
}
_GRAD_CLASSES = {
    "decode": [(16, 128, 128, 4, 4), (16, 64, 128, 4, 4), (16, 256, 64, 4, 4), (16, 128, 64, 4, 3),
               (16, 64, 256, 4, 4)],
    "medium": [(32, 128, 64, 4, 3), (64, 128, 64, 4, 3), (32, 64, 128, 4, 4), (64, 64, 64, 4, 4)],
    "prefill": [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4),
                (128, 64, 64, 4, 4)],
}


# Triton 3.9 fails to compile ("Illegal shared layout") a dequantized tile whose code rows are
# narrower than 32 bytes: every K-step (forward) and K-tile (input gradient) is >= 64 elements.
MIN_K_TILE = 64


def _fits(block: int, size: int) -> bool:
    """A tile no wider than the problem needs (the next power of two, at least 16)."""
    return block <= max(16, common.pow2_ceil(size))


def matmul_configs(m: int, n: int, k: int, num_sms: int | None = None) -> list[tiles_lib.MatmulTiles]:
    """Forward configurations for ``x[M, K] @ W[N, K].T``, all with the same reduction split.

    The split is the one :func:`~qlora_jax.kernels.tiles.matmul_tiles` picks for the size class;
    a configuration stays when its K-step divides K's share per split.
    """
    num_sms = num_sms or tiles_lib.device_num_sms()
    split = tiles_lib.matmul_tiles(m, n, k, num_sms).split
    out = []
    for bm, bn, bk, warps, stages in _FORWARD_CLASSES[tiles_lib.size_class(m)]:
        if (k // split) % bk == 0 and _fits(bm, m) and _fits(bn, n):
            out.append(tiles_lib.MatmulTiles(bm, bn, bk, split, warps, stages))
    # K's share per split may be too short for every listed step: no split, the largest step.
    return out or [tiles_lib.MatmulTiles(16 if m <= 16 else 64, 64, common.largest_pow2_divisor(k, 256))]


def matmul_grad_configs(m: int, n: int, k: int, num_sms: int | None = None) -> list[tiles_lib.MatmulTiles]:
    """Input-gradient configurations for ``dy[M, N] @ W[N, K]`` (``block_out`` tiles K)."""
    num_sms = num_sms or tiles_lib.device_num_sms()
    split = tiles_lib.matmul_grad_tiles(m, n, k, num_sms).split
    out = []
    for bm, bk, bn, warps, stages in _GRAD_CLASSES[tiles_lib.size_class(m)]:
        if k % bk == 0 and _fits(bm, m) and _fits(bn, n):
            out.append(tiles_lib.MatmulTiles(bm, bk, bn, split, warps, stages))
    return out or [tiles_lib.MatmulTiles(16 if m <= 16 else 64, common.largest_pow2_divisor(k, 256), 64, split)]


def dequantize_configs(n: int, k: int) -> list[tiles_lib.DequantTiles]:
    """Tiles for dequantizing ``W[N, K]``: ~4-16K elements per program, columns dividing K."""
    out = []
    for rows, cols, warps in ((16, 256, 4), (32, 256, 8), (8, 512, 4), (64, 128, 8), (4, 1024, 4)):
        if k % cols == 0 and _fits(rows, n):
            out.append(tiles_lib.DequantTiles(rows, cols, warps))
    return out or [tiles_lib.dequantize_tiles(n, k)]


def quantize_configs(n: int, k: int, blocksize: int) -> list[tiles_lib.DequantTiles]:
    """Tiles for quantizing ``W[N, K]``: whole quantization blocks, columns dividing K."""
    out = []
    for rows, cols, warps in ((16, 256, 4), (8, 256, 4), (32, 128, 4), (4, 1024, 4), (2, 2048, 4), (1, 4096, 4)):
        if k % cols == 0 and cols >= blocksize and _fits(rows, n):
            out.append(tiles_lib.DequantTiles(rows, cols, warps))
    return out or [tiles_lib.quantize_tiles(n, k, blocksize)]


def _check_tiles(tiles: Any) -> None:
    if getattr(tiles, "lookup", "gather") != "gather":
        raise ValueError(f"{tiles}: the jax_triton kernels look codes up with a table gather only")


def _matmul_call(kernel, a: jax.Array, qt: QuantizedTensor, out_size: int,
                 configs: list[tiles_lib.MatmulTiles], grid_out: str, interpret: bool, poison: bool,
                 name: str) -> jax.Array:
    m = a.shape[0]
    n, k = qt.shape
    split = configs[0].split
    if any(t.split != split for t in configs):
        raise ValueError("every configuration of one call must have the same reduction split")
    for t in configs:
        _check_tiles(t)
    if split == 1:
        out_shape = jax.ShapeDtypeStruct((m, out_size), a.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((split, m, out_size), jnp.float32)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(out_size, meta[grid_out]), split)

    if grid_out == "BLOCK_N":  # forward: block_out tiles N, block_red steps K
        blocks = [({"BLOCK_M": t.block_m, "BLOCK_N": t.block_out, "BLOCK_K": t.block_red}, t.num_warps, t.num_stages)
                  for t in configs]
    else:  # input gradient: block_out tiles K, block_red steps N
        blocks = [({"BLOCK_M": t.block_m, "BLOCK_K": t.block_out, "BLOCK_N": t.block_red}, t.num_warps, t.num_stages)
                  for t in configs]
    meta = dict(M=m, N=n, K=k, SPLIT=split, INTERPRET=interpret, **_weight_meta(qt))
    [out] = triton_call(kernel, a, *_weight_inputs(qt), out_shapes=[out_shape], grid=grid, configs=blocks,
                        metaparams=meta, interpret=interpret, name=name, debug_poison_output=poison)
    if split > 1:
        out = out.sum(axis=0).astype(a.dtype)
    return out


@functools.partial(jax.jit, static_argnames=("tiles", "interpret", "debug_poison_output"))
def fused_matmul(
    x: jax.Array,
    qt: QuantizedTensor,
    *,
    tiles: tiles_lib.MatmulTiles | None = None,
    interpret: bool = False,
    debug_poison_output: bool = False,
) -> jax.Array:
    """``x[M, K] @ dequant(W[N, K]).T`` -> ``[M, N]`` in ``x.dtype`` (float32 accumulation).

    Autotuned over :func:`matmul_configs` unless ``tiles`` fixes the configuration. ``interpret``
    runs Triton's interpreter on the host; ``debug_poison_output`` (interpreter) starts the output
    as NaN so that an unwritten tile shows.
    """
    qt.validate()
    if x.ndim != 2 or x.shape[1] != qt.shape[-1]:
        raise ValueError(f"x must be [M, K={qt.shape[-1]}], got {list(x.shape)}")
    support.check(support.Problem.of_weight("matmul", qt, x.dtype, x.shape[0]), "jax_triton")
    m, k = x.shape
    n = qt.shape[0]
    configs = [tiles] if tiles is not None else matmul_configs(m, n, k, current_target().num_sms)
    for t in configs:
        if k % t.block_red or (k // t.block_red) % t.split:
            raise ValueError(f"{t} does not divide K={k} into whole steps per split")
        if t.block_red < MIN_K_TILE:
            raise ValueError(f"{t}: the jax_triton forward needs block_red >= {MIN_K_TILE}")
    return _matmul_call(jt_kernels.fused_matmul_kernel, x, qt, n, configs, "BLOCK_N", interpret,
                        debug_poison_output, "qlora_jt_fused_dequant_matmul")


@functools.partial(jax.jit, static_argnames=("tiles", "interpret", "debug_poison_output"))
def fused_matmul_grad(
    dy: jax.Array,
    qt: QuantizedTensor,
    *,
    tiles: tiles_lib.MatmulTiles | None = None,
    interpret: bool = False,
    debug_poison_output: bool = False,
) -> jax.Array:
    """``dy[M, N] @ dequant(W[N, K])`` -> ``[M, K]`` in ``dy.dtype`` (float32 accumulation).

    Options as :func:`fused_matmul`; ``tiles.block_out`` tiles K, ``tiles.block_red`` steps N.
    """
    qt.validate()
    n, k = qt.shape if len(qt.shape) == 2 else (None, None)
    if dy.ndim != 2 or dy.shape[1] != n:
        raise ValueError(f"dy must be [M, N={n}], got {list(dy.shape)}")
    support.check(support.Problem.of_weight("matmul_grad", qt, dy.dtype, dy.shape[0]), "jax_triton")
    m = dy.shape[0]
    configs = [tiles] if tiles is not None else matmul_grad_configs(m, n, k, current_target().num_sms)
    for t in configs:
        if k % t.block_out:
            raise ValueError(f"{t}: block_out must divide K={k}")
        if t.block_out < MIN_K_TILE:
            raise ValueError(f"{t}: the jax_triton input gradient needs block_out >= {MIN_K_TILE}")
    return _matmul_call(jt_kernels.fused_matmul_grad_kernel, dy, qt, k, configs, "BLOCK_K", interpret,
                        debug_poison_output, "qlora_jt_fused_dequant_matmul_grad")


@functools.partial(jax.jit, static_argnames=("dtype", "tiles", "interpret", "debug_poison_output"))
def dequantize_kernel(
    qt: QuantizedTensor,
    dtype: Any = jnp.bfloat16,
    *,
    tiles: tiles_lib.DequantTiles | None = None,
    interpret: bool = False,
    debug_poison_output: bool = False,
) -> jax.Array:
    """The tensor ``qt`` in ``dtype`` (bf16, f16 or f32), shape ``qt.shape``; autotuned over
    :func:`dequantize_configs` unless ``tiles`` is given."""
    qt.validate()
    support.check(support.Problem.of_weight("dequantize", qt, dtype), "jax_triton")
    k = qt.shape[-1]
    n = qt.numel // k
    configs = [tiles] if tiles is not None else dequantize_configs(n, k)
    for t in configs:
        _check_tiles(t)
        if k % t.block_cols:
            raise ValueError(f"{t}: block_cols must divide K={k}")
    flat = QuantizedTensor(
        codes=qt.codes.reshape(n, k // 2), scales=qt.scales.reshape(n, k // qt.blocksize),
        nested_scales=qt.nested_scales, offset=qt.offset, shape=(n, k), dtype=qt.dtype,
        quant_type=qt.quant_type, blocksize=qt.blocksize, nested_blocksize=qt.nested_blocksize,
    )

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_ROWS"]), k // meta["BLOCK_COLS"])

    blocks = [({"BLOCK_ROWS": t.block_rows, "BLOCK_COLS": t.block_cols}, t.num_warps, 1) for t in configs]
    [out] = triton_call(jt_kernels.dequantize_kernel, *_weight_inputs(flat),
                        out_shapes=[jax.ShapeDtypeStruct((n, k), jnp.dtype(dtype))], grid=grid, configs=blocks,
                        metaparams=dict(N=n, K=k, INTERPRET=interpret, **_weight_meta(flat)), interpret=interpret,
                        name="qlora_jt_dequantize_4bit", debug_poison_output=debug_poison_output)
    return out.reshape(qt.shape)


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize", "tiles", "interpret", "debug_poison_output"))
def quantize_blocks(
    w: jax.Array,
    quant_type: str = "nf4",
    *,
    blocksize: int = 64,
    tiles: tiles_lib.DequantTiles | None = None,
    interpret: bool = False,
    debug_poison_output: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """First stage: ``(codes uint8[..., K // 2], absmax float32[..., K // blocksize])`` of ``w[..., K]``,
    bitsandbytes' CUDA bytes."""
    support.check(support.Problem("quantize", quant_type, w.shape, blocksize, w.dtype), "jax_triton")
    k = w.shape[-1]
    n = int(np.prod(w.shape[:-1], dtype=np.int64))
    configs = [tiles] if tiles is not None else quantize_configs(n, k, blocksize)
    for t in configs:
        if k % t.block_cols or t.block_cols % blocksize:
            raise ValueError(f"{t}: block_cols must divide K={k} and be a multiple of blocksize={blocksize}")
    if quant_type == "nf4":
        thresholds = codebooks.NF4_CUDA_THRESHOLDS
    else:
        thresholds = codebooks.FP4_CUDA_THRESHOLDS
    out_shapes = [jax.ShapeDtypeStruct((n, k // 2), jnp.uint8), jax.ShapeDtypeStruct((n, k // blocksize), jnp.float32)]

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_ROWS"]), k // meta["BLOCK_COLS"])

    blocks = [({"BLOCK_ROWS": t.block_rows, "BLOCK_COLS": t.block_cols}, t.num_warps, 1) for t in configs]
    codes, absmax = triton_call(
        jt_kernels.quantize_kernel, w.reshape(n, k), jnp.asarray(thresholds, jnp.float32),
        jnp.asarray(codebooks.FP4_CUDA_MAGNITUDE_CODES, jnp.int32), out_shapes=out_shapes, grid=grid, configs=blocks,
        metaparams=dict(N=n, K=k, BLOCKSIZE=blocksize, NF4=quant_type == "nf4"), interpret=interpret,
        name="qlora_jt_quantize_4bit", debug_poison_output=debug_poison_output,
    )
    return codes.reshape(*w.shape[:-1], k // 2), absmax.reshape(*w.shape[:-1], k // blocksize)
