"""``QuantizedTensor``: a blockwise-quantized tensor as a JAX pytree, and quantize/dequantize.

Layout (ours, chosen so that bitsandbytes' bytes can be used as they are):

* ``codes``: uint8. 4-bit types pack two codes per byte, element 2j in the high nibble, over the
  row-major flattened tensor (bitsandbytes' byte order). When the last dimension is even the bytes
  keep the leading dimensions, ``shape[:-1] + (shape[-1] // 2,)``, so that a weight ``[out, in]``
  shards by rows; otherwise they are flat, ``((numel + 1) // 2,)``. Int8 codes keep ``shape``.
* ``scales``: one per block of ``blocksize`` consecutive values. float32 absmax, or, with double
  quantization, uint8 codes of ``absmax - offset`` in the signed 8-bit dynamic map. Shape
  ``shape[:-1] + (shape[-1] // blocksize,)`` when the last dimension is a whole number of blocks,
  else flat ``(ceil(numel / blocksize),)``.
* ``nested_scales``: float32 absmax of each ``nested_blocksize`` (256) consecutive scales, flat;
  ``offset``: float32 scalar, the mean that was subtracted. Both ``None`` without double quant.

Metadata (shape, dtype, quant type, block sizes) is static pytree auxiliary data, so
``jax.jit`` specialises on it and Orbax stores only the arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import blockwise, codebooks

QuantType = Literal["nf4", "fp4", "int8"]

__all__ = [
    "QuantType",
    "QuantizedTensor",
    "SUPPORTED_BLOCKSIZES",
    "SUPPORTED_INPUT_DTYPES",
    "quantize",
    "dequantize",
    "decode_scales",
    "codes_shape",
    "scales_shape",
    "QuantizationError",
]

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SUPPORTED_INPUT_DTYPES = ("float32", "bfloat16", "float16")
QUANT_TYPES = ("nf4", "fp4", "int8")
NESTED_BLOCKSIZE = 256


class QuantizationError(ValueError):
    """Bad input to quantization, or a QuantizedTensor whose arrays disagree with its metadata."""


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def codes_shape(shape: tuple[int, ...], quant_type: str) -> tuple[int, ...]:
    """Shape of the ``codes`` array for a tensor of ``shape`` (see the module docstring).

    Args:
      shape: the original tensor's shape.
      quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"``.

    Returns:
      The codes' shape (a tuple of ints).
    """
    if quant_type == "int8":
        return tuple(shape)
    if shape[-1] % 2 == 0:
        return tuple(shape[:-1]) + (shape[-1] // 2,)
    return ((_numel(shape) + 1) // 2,)


def scales_shape(shape: tuple[int, ...], blocksize: int) -> tuple[int, ...]:
    """Shape of the ``scales`` array: one entry per block (see the module docstring).

    Args:
      shape: the original tensor's shape.
      blocksize: values per block.

    Returns:
      The scales' shape (a tuple of ints).
    """
    if shape[-1] % blocksize == 0:
        return tuple(shape[:-1]) + (shape[-1] // blocksize,)
    return (-(-_numel(shape) // blocksize),)


def nested_scales_shape(num_blocks: int, nested_blocksize: int) -> tuple[int, ...]:
    """Shape of ``nested_scales``: one float32 per ``nested_blocksize`` scales."""
    return (-(-num_blocks // nested_blocksize),)


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A blockwise-quantized tensor (NF4, FP4 or Int8), optionally with double-quantized scales.

    Arrays: ``codes``, ``scales``, ``nested_scales``, ``offset`` (see the module docstring).
    Static metadata: ``shape`` and ``dtype`` of the original tensor, ``quant_type``,
    ``blocksize``, ``nested_blocksize``.

    Attributes:
      codes: uint8 codes. 4-bit types: two per byte (element 2j in the high nibble),
        ``shape[:-1] + (shape[-1] // 2,)`` when the last dimension is even, else flat
        ``((numel + 1) // 2,)``; int8: ``shape``.
      scales: one per block of ``blocksize`` values: float32 absmax, or with double quantization
        uint8 codes of ``absmax - offset`` in the signed 8-bit dynamic map; shaped
        ``shape[:-1] + (shape[-1] // blocksize,)`` when the last dimension is whole blocks, else
        flat ``(ceil(numel / blocksize),)``.
      nested_scales: float32 ``[ceil(num_blocks / nested_blocksize)]``, the absmax of each group of
        ``nested_blocksize`` scales; ``None`` without double quantization.
      offset: float32 scalar, the mean subtracted from the scales; ``None`` without double
        quantization.
      shape: shape of the original tensor (static).
      dtype: name of the original dtype, e.g. ``"bfloat16"`` (static).
      quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"`` (static).
      blocksize: values per quantization block (static; one of ``SUPPORTED_BLOCKSIZES``).
      nested_blocksize: scales per double-quantization block (static; 256 as bitsandbytes).

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs <https://arxiv.org/abs/2305.14314>`_, 2023
      (NF4 and double quantization).
    """

    codes: Any
    scales: Any
    nested_scales: Any
    offset: Any
    shape: tuple[int, ...]
    dtype: str
    quant_type: str
    blocksize: int
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        """Whether the scales are themselves quantized (QLoRA's double quantization)."""
        return self.nested_scales is not None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return _numel(self.shape)

    @property
    def num_blocks(self) -> int:
        """Number of quantization blocks (and of scales)."""
        return -(-self.numel // self.blocksize)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The tensor in ``dtype`` (default: the original dtype). See :func:`dequantize`."""
        return dequantize(self, dtype)

    def validate(self) -> QuantizedTensor:
        """Checks that the arrays agree with the metadata; raises QuantizationError naming the field.

        Works on concrete arrays and on tracers (it only reads shapes and dtypes).
        """
        _validate_metadata(self.shape, self.dtype, self.quant_type, self.blocksize, self.nested_blocksize)
        expected = {
            "codes": (codes_shape(self.shape, self.quant_type), jnp.int8 if self.quant_type == "int8" else jnp.uint8),
            "scales": (scales_shape(self.shape, self.blocksize), jnp.uint8 if self.double_quant else jnp.float32),
        }
        if self.double_quant:
            expected["nested_scales"] = (nested_scales_shape(self.num_blocks, self.nested_blocksize), jnp.float32)
            expected["offset"] = ((), jnp.float32)
        elif self.offset is not None:
            raise QuantizationError("QuantizedTensor has an offset but no nested_scales; double quant needs both")
        for name, (shape, dtype) in expected.items():
            array = getattr(self, name)
            if array is None:
                raise QuantizationError(f"QuantizedTensor.{name} is missing")
            if tuple(array.shape) != tuple(shape) or jnp.dtype(array.dtype) != jnp.dtype(dtype):
                raise QuantizationError(
                    f"QuantizedTensor.{name} is {jnp.dtype(array.dtype).name}{list(array.shape)} but a "
                    f"{self.quant_type} tensor of shape {list(self.shape)} with blocksize {self.blocksize} "
                    f"needs {jnp.dtype(dtype).name}{list(shape)}"
                )
        return self

    def __repr__(self) -> str:
        dq = "+DQ" if self.double_quant else ""
        return (
            f"QuantizedTensor({self.quant_type}{dq}, shape={list(self.shape)}, dtype={self.dtype}, "
            f"blocksize={self.blocksize})"
        )


jax.tree_util.register_dataclass(
    QuantizedTensor,
    data_fields=["codes", "scales", "nested_scales", "offset"],
    meta_fields=["shape", "dtype", "quant_type", "blocksize", "nested_blocksize"],
)


def _validate_metadata(shape: tuple[int, ...], dtype: str, quant_type: str, blocksize: int, nested_blocksize: int):
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"unsupported quant_type {quant_type!r}; expected one of {QUANT_TYPES}")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise QuantizationError(
            f"unsupported blocksize {blocksize}; expected one of {SUPPORTED_BLOCKSIZES} (as bitsandbytes)"
        )
    if nested_blocksize not in SUPPORTED_BLOCKSIZES:
        raise QuantizationError(f"unsupported nested_blocksize {nested_blocksize}; "
                                f"expected one of {SUPPORTED_BLOCKSIZES}")
    if len(shape) == 0 or any(int(d) <= 0 for d in shape):
        raise QuantizationError(f"cannot quantize a tensor of shape {list(shape)}: it needs at least one element")
    if dtype not in SUPPORTED_INPUT_DTYPES:
        raise QuantizationError(f"unsupported original dtype {dtype!r}; expected one of {SUPPORTED_INPUT_DTYPES}")


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_finite(w: Any) -> None:
    finite = np.isfinite(np.asarray(jnp.asarray(w, jnp.float32)))
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        raise QuantizationError(
            f"cannot quantize: {len(bad)} non-finite value(s) (NaN or Inf) in the weights, the first at "
            f"index {first}"
        )


def quantize(
    w: Any,
    quant_type: QuantType = "nf4",
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    bnb_backend: blockwise.BnbBackend = "cuda",
    offset: Any = None,
    check_finite: bool = True,
) -> QuantizedTensor:
    """Blockwise-quantizes ``w`` (float32/bfloat16/float16, any shape) to NF4, FP4 or Int8.

    Blocks are ``blocksize`` consecutive values of the row-major flattened tensor; a weight is
    expected as ``[out_features, in_features]``, as PyTorch and Hugging Face store it. A size
    that is not a multiple of ``blocksize`` gets a shorter last block, exactly as bitsandbytes.

    ``double_quant`` stores the scales as 8-bit dynamic-map codes of ``absmax - mean(absmax)`` in
    blocks of ``nested_blocksize``, plus float32 nested absmax and the mean (``offset``), as
    bitsandbytes' ``compress_statistics=True``. ``offset`` overrides the mean (to reproduce a
    given bitsandbytes tensor byte for byte). ``bnb_backend`` picks whose bytes to reproduce where
    bitsandbytes' CUDA and CPU backends differ (see :mod:`qlora_jax.quant.blockwise`).

    Outside ``jax.jit``, non-finite weights raise QuantizationError (``check_finite``). Inside
    ``jit`` the check cannot run; a block holding NaN or Inf then gets a NaN scale, so it
    dequantizes to NaN rather than to finite wrong values.

    Args:
      w: the tensor, float32, bfloat16 or float16, any shape (array-like; numpy or jax).
      quant_type: ``"nf4"`` (QLoRA's 4-bit NormalFloat), ``"fp4"`` or ``"int8"``.
      blocksize: values per block, each with its own absmax scale (one of ``SUPPORTED_BLOCKSIZES``).
      double_quant: also quantize the scales to 8 bits (QLoRA's double quantization).
      nested_blocksize: scales per double-quantization block.
      bnb_backend: ``"cuda"`` or ``"cpu"``, whose bitsandbytes bytes to reproduce.
      offset: float32 scalar overriding the mean subtracted from the scales (double quant only);
        ``None`` computes it.
      check_finite: outside ``jit``, raise on NaN or Inf weights.

    Returns:
      A :class:`QuantizedTensor` of ``w``'s shape and dtype (see its attributes for the arrays'
      shapes and dtypes).

    Raises:
      QuantizationError: an unsupported dtype, quant type, block size or ``bnb_backend``, or (with
        ``check_finite``, outside ``jit``) a non-finite weight.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs <https://arxiv.org/abs/2305.14314>`_, 2023.
    """
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        w = np.asarray(w)
    dtype_name = jnp.dtype(w.dtype).name
    if dtype_name not in SUPPORTED_INPUT_DTYPES:
        raise QuantizationError(
            f"cannot quantize an array of dtype {dtype_name}: expected one of {SUPPORTED_INPUT_DTYPES} "
            "(cast it first, e.g. w.astype(np.float32))"
        )
    shape = tuple(int(d) for d in w.shape)
    _validate_metadata(shape, dtype_name, quant_type, blocksize, nested_blocksize)
    if bnb_backend not in ("cuda", "cpu"):
        raise QuantizationError(f"unsupported bnb_backend {bnb_backend!r}; expected 'cuda' or 'cpu'")
    if check_finite and _is_concrete(w):
        _check_finite(w)
    codes, scales, nested, off = _quantize_jit(
        jnp.asarray(w),
        None if offset is None else jnp.asarray(offset, jnp.float32),
        quant_type=quant_type,
        blocksize=blocksize,
        double_quant=double_quant,
        nested_blocksize=nested_blocksize,
        bnb_backend=bnb_backend,
    )
    return QuantizedTensor(
        codes=codes,
        scales=scales,
        nested_scales=nested,
        offset=off,
        shape=shape,
        dtype=dtype_name,
        quant_type=quant_type,
        blocksize=blocksize,
        nested_blocksize=nested_blocksize,
    )


@functools.partial(
    jax.jit, static_argnames=("quant_type", "blocksize", "double_quant", "nested_blocksize", "bnb_backend")
)
def _quantize_jit(w, offset, *, quant_type, blocksize, double_quant, nested_blocksize, bnb_backend):
    shape = w.shape
    flat = w.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    blocks = blockwise.pad_to_blocks(flat, blocksize)
    absmax = blockwise.block_absmax(blocks)
    # A block holding Inf or NaN must not produce finite scales (see quantize's docstring).
    absmax = jnp.where(jnp.all(jnp.isfinite(blocks), axis=-1), absmax, jnp.float32(jnp.nan))
    if quant_type == "int8":
        codes = blockwise.encode_int8(blocks, absmax).reshape(-1)[:n].reshape(codes_shape(shape, quant_type))
    else:
        unit = blockwise.scale_to_unit(blocks, absmax, bnb_backend, n)
        # An odd count is padded with the code of a scaled 0.0 (the block padding), as bitsandbytes.
        q = blockwise.encode_4bit(unit, quant_type, bnb_backend).reshape(-1)[: n + n % 2]
        codes = blockwise.pack_4bit(q).reshape(codes_shape(shape, quant_type))
    scales_out_shape = scales_shape(shape, blocksize)
    if not double_quant:
        return codes, absmax.reshape(scales_out_shape), None, None
    nested_codes, nested_absmax, off = double_quantize(absmax, nested_blocksize, bnb_backend, offset)
    return codes, nested_codes.reshape(scales_out_shape), nested_absmax, off


def double_quantize(
    absmax: jax.Array,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    bnb_backend: blockwise.BnbBackend = "cuda",
    offset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """QLoRA's double quantization of float32 scales ``[num_blocks]``.

    Returns ``(codes uint8[num_blocks], nested_absmax float32[ceil(num_blocks / nested_blocksize)],
    offset float32[])``: the scales lose their mean (``offset``), then are quantized blockwise with
    the signed 8-bit dynamic map, exactly as bitsandbytes' ``quantize_4bit(compress_statistics=True)``.

    Args:
      absmax: float32 scales, any shape (flattened), ``num_blocks`` values.
      nested_blocksize: scales per nested block.
      bnb_backend: ``"cuda"`` or ``"cpu"``, whose bitsandbytes rounding to reproduce.
      offset: float32 scalar to subtract instead of the scales' mean; ``None`` computes the mean.

    Returns:
      ``(codes, nested_absmax, offset)``: uint8 ``[num_blocks]``, float32
      ``[ceil(num_blocks / nested_blocksize)]`` and a float32 scalar.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023, section 3 (double quantization);
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2021 (the dynamic map).
    """
    flat = absmax.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    off = blockwise.accurate_mean(flat) if offset is None else jnp.asarray(offset, jnp.float32).reshape(())
    # One materialized offset for every consumer, so no fusion recomputes it differently.
    off = jax.lax.optimization_barrier(off)
    centered = blockwise.pad_to_blocks(flat - off, nested_blocksize)
    nested_absmax = blockwise.block_absmax(centered)
    codes = blockwise.encode_dynamic8(centered, nested_absmax, codebooks.DYNAMIC_MAP_SIGNED, bnb_backend)
    return codes.reshape(-1)[:n], nested_absmax, off


def decode_dynamic8(codes: jax.Array, absmax: jax.Array, blocksize: int, code: np.ndarray) -> jax.Array:
    """float32 values of flat 8-bit dynamic-map codes with one float32 absmax per ``blocksize``."""
    n = codes.shape[0]
    values = jnp.asarray(code)[codes.astype(jnp.int32)]
    blocks = blockwise.pad_to_blocks(values, blocksize)
    return (blocks * absmax[:, None]).reshape(-1)[:n]


def decode_scales(qt: QuantizedTensor) -> jax.Array:
    """The float32 absmax of every block, shaped like ``qt.scales``.

    With double quant: ``dynamic_map[code] * nested_absmax + offset``, in float32, as bitsandbytes.

    Args:
      qt: the quantized tensor.

    Returns:
      float32 array of ``qt.scales.shape``, one absmax per block.
    """
    if not qt.double_quant:
        return qt.scales.astype(jnp.float32)
    flat = decode_dynamic8(qt.scales.reshape(-1), qt.nested_scales, qt.nested_blocksize, codebooks.DYNAMIC_MAP_SIGNED)
    # The barrier keeps XLA from fusing the product and the sum into an FMA: bitsandbytes rounds
    # the product first, and so do we, on every backend and under jit or not.
    return (jax.lax.optimization_barrier(flat) + qt.offset).reshape(qt.scales.shape)


def dequantize(qt: QuantizedTensor, dtype: Any = None) -> jax.Array:
    """Reconstructs the tensor: ``code_value * absmax`` in float32, cast to ``dtype``.

    ``dtype`` defaults to the original dtype. Shape: ``qt.shape``. This is the reference (XLA)
    dequantization; the kernels in :mod:`qlora_jax.kernels` compute the same values.

    Args:
      qt: the quantized tensor.
      dtype: output dtype; ``None`` gives the original ``qt.dtype``.

    Returns:
      Array of shape ``qt.shape`` and dtype ``dtype``.

    Raises:
      QuantizationError: ``qt``'s arrays disagree with its metadata.
    """
    qt.validate()
    out_dtype = jnp.dtype(qt.dtype if dtype is None else dtype)
    scales = decode_scales(qt).reshape(-1)
    n = qt.numel
    if qt.quant_type == "int8":
        codes = blockwise.pad_to_blocks(qt.codes.reshape(-1), qt.blocksize)
        values = blockwise.decode_int8(codes, scales)
    else:
        codes = blockwise.unpack_4bit(qt.codes.reshape(-1))[:n].astype(jnp.int32)
        table = jnp.asarray(codebooks.codebook(qt.quant_type))
        values = blockwise.pad_to_blocks(table[codes], qt.blocksize) * scales[:, None]
    return values.reshape(-1)[:n].reshape(qt.shape).astype(out_dtype)
