"""What each kernel backend can take: the one place the "is this supported" rules are written.

:func:`unsupported_reason` answers for a :class:`Problem` (an op on a weight of some shape and
type, with activations or output of some dtype) and a kernel backend; the dispatcher
(:func:`qlora_jax.kernels.resolve_backend`) falls back to XLA, or from Mosaic GPU to a Triton
kernel, with that reason, and every kernel wrapper raises it (:func:`check`) when called
directly on a problem it cannot take.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax.numpy as jnp
from qlora_jax.kernels.common import KERNEL_DTYPES, KERNEL_QUANT_TYPES, largest_pow2_divisor

from qlora_jax.quant import SUPPORTED_BLOCKSIZES, QuantizedTensor

__all__ = [
    "Op",
    "OPS",
    "KERNEL_BACKENDS",
    "DEQUANTIZE_OUTPUT_DTYPES",
    "QUANTIZE_INPUT_DTYPES",
    "Problem",
    "unsupported_reason",
    "check",
]

Op = Literal["matmul", "matmul_grad", "dequantize", "quantize"]
OPS = ("matmul", "matmul_grad", "dequantize", "quantize")
# jax_triton: Triton-language kernels through jax_triton.triton_call; pallas_triton: Pallas kernels
# on its (deprecated) Triton backend; mosaic: Pallas Mosaic GPU (Hopper wgmma, matmul ops only).
KERNEL_BACKENDS = ("jax_triton", "pallas_triton", "mosaic")
DEQUANTIZE_OUTPUT_DTYPES = ("bfloat16", "float16", "float32")
QUANTIZE_INPUT_DTYPES = ("bfloat16", "float16", "float32")
_INT32_LIMIT = 2**31


@dataclasses.dataclass(frozen=True)
class Problem:
    """One kernel call, described by what the rules need.

    ``shape``: the weight's shape (``[N, K]`` for the matmul ops). ``dtype``: the activations'
    dtype (matmul ops), the output's (dequantize) or the input weight's (quantize). ``m``: the
    activation rows (matmul ops; None otherwise).
    """

    op: Op
    quant_type: str
    shape: tuple[int, ...]
    blocksize: int
    dtype: str
    m: int | None = None
    nested_blocksize: int = 256

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; expected one of {OPS}")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @classmethod
    def of_weight(cls, op: Op, qt: QuantizedTensor, dtype: Any, m: int | None = None) -> Problem:
        """The problem of running ``op`` on the quantized weight ``qt``."""
        return cls(op, qt.quant_type, tuple(qt.shape), qt.blocksize, dtype, m, qt.nested_blocksize)


def _common_reason(p: Problem) -> str | None:
    if p.quant_type not in KERNEL_QUANT_TYPES:
        return f"{p.quant_type} weights have no kernel (kernels take {KERNEL_QUANT_TYPES})"
    if not p.shape:
        return "a scalar has no blocks"
    k = p.shape[-1]
    if k % 2 or k % p.blocksize:
        return f"K={k} is odd or not a multiple of blocksize={p.blocksize}"
    numel = math.prod(p.shape)
    if numel >= _INT32_LIMIT or (p.m and p.m * max(p.shape[0], k) >= _INT32_LIMIT):
        return "an operand has 2^31 or more elements (the kernels index in int32)"
    if p.op in ("matmul", "matmul_grad"):
        if len(p.shape) != 2:
            return f"the matmul kernels take 2-D weights, not {list(p.shape)}"
        if p.dtype not in KERNEL_DTYPES:
            return f"{p.dtype} activations (the kernels' dot takes {KERNEL_DTYPES})"
        if not p.m:
            return "empty batch"
        if largest_pow2_divisor(k, 16) < 16:
            return f"K={k} has no power-of-two factor >= 16"
    elif p.op == "dequantize":
        if p.dtype not in DEQUANTIZE_OUTPUT_DTYPES:
            return f"{p.dtype} output (the kernels write {DEQUANTIZE_OUTPUT_DTYPES})"
    elif p.op == "quantize":
        if p.dtype not in QUANTIZE_INPUT_DTYPES:
            return f"{p.dtype} weights (the kernels read {QUANTIZE_INPUT_DTYPES})"
        if p.blocksize not in SUPPORTED_BLOCKSIZES or p.nested_blocksize not in SUPPORTED_BLOCKSIZES:
            return f"blocksize={p.blocksize} / nested_blocksize={p.nested_blocksize} not in {SUPPORTED_BLOCKSIZES}"
    return None


def _mosaic_reason(p: Problem) -> str | None:
    if p.op not in ("matmul", "matmul_grad"):
        return f"the Mosaic GPU backend has no {p.op} kernel"
    if p.dtype != "bfloat16":
        return f"{p.dtype} activations (the Mosaic GPU kernels take bfloat16)"
    n, k = p.shape
    if n % 64:
        return f"N={n} is not a multiple of 64"
    if p.blocksize < 64:
        # A K-step covers one block: 16-byte code rows cannot be swizzled for TMA.
        return f"blocksize={p.blocksize} < 64"
    if p.op == "matmul_grad" and k % 128:
        return f"K={k} is not a multiple of 128"
    return None


def _jax_triton_reason(p: Problem) -> str | None:
    if p.op in ("matmul", "matmul_grad") and largest_pow2_divisor(p.shape[-1], 64) < 64:
        # Triton 3.9 cannot compile narrower dequantized tiles (jt_ops.MIN_K_TILE).
        return f"K={p.shape[-1]} has no power-of-two factor >= 64 (the jax_triton kernels' K-tile)"
    return None


def unsupported_reason(problem: Problem, backend: str) -> str | None:
    """Why ``backend``'s kernel cannot take ``problem``, or None when it can."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {KERNEL_BACKENDS}")
    reason = _common_reason(problem)
    if reason is None and backend == "mosaic":
        reason = _mosaic_reason(problem)
    if reason is None and backend == "jax_triton":
        reason = _jax_triton_reason(problem)
    return reason


def check(problem: Problem, backend: str) -> None:
    """Raises ValueError naming the problem when ``backend``'s kernel cannot take it."""
    reason = unsupported_reason(problem, backend)
    if reason is not None:
        raise ValueError(f"the {backend} {problem.op} kernel cannot take this problem: {reason}")
