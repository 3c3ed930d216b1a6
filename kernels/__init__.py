"""qlora_jax.kernels: Pallas GPU kernels for 4-bit (NF4/FP4) weights, with an XLA reference path.

Public API (see :mod:`qlora_jax.kernels.ops`):

* :func:`quantized_matmul` (alias :func:`nf4_matmul`): ``y = x @ dequant(W).T`` for
  ``x: [..., K]`` and a :class:`~qlora_jax.quant.QuantizedTensor` ``W: [N, K]``, differentiable
  in ``x`` (custom VJP with a fused input-gradient kernel);
* :func:`quantized_matmul_grad`: that input gradient, ``dy @ dequant(W)``;
* :func:`dequantize`: the weight in bf16/f16/f32, double-quantized scales decoded in-kernel;
* :func:`quantize`: blockwise 4-bit quantization on the device, bitsandbytes' CUDA bytes;
* :func:`resolve_backend`: which backend ``"auto"`` (or a fallback) picks, and why.

Every op takes ``backend`` in ``("auto", "triton", "mosaic", "xla")`` and ``interpret``
(run the Pallas kernels through the interpreter, e.g. on CPU). One kernel per module, each with
its pure-JAX ``reference`` beside it: :mod:`.matmul_triton`, :mod:`.matmul_grad_triton`,
:mod:`.dequantize_triton`, :mod:`.quantize_triton` (Pallas Triton), :mod:`.matmul_mosaic`,
:mod:`.matmul_grad_mosaic` (Pallas Mosaic GPU); shared in-kernel pieces in :mod:`.common`; tile
shapes per size class in :mod:`.tiles`; lowering for CUDA without a GPU in :mod:`.lowering`; the
benchmark harness in :mod:`.benchmark`.
"""

from qlora_jax.kernels.ops import (
    BACKENDS,
    Backend,
    Target,
    current_target,
    dequantize,
    nf4_matmul,
    quantize,
    quantized_matmul,
    quantized_matmul_grad,
    resolve_backend,
)
from qlora_jax.kernels.tiles import DequantTiles, MatmulTiles

__all__ = [
    "BACKENDS",
    "Backend",
    "DequantTiles",
    "MatmulTiles",
    "Target",
    "current_target",
    "dequantize",
    "nf4_matmul",
    "quantize",
    "quantized_matmul",
    "quantized_matmul_grad",
    "resolve_backend",
]
