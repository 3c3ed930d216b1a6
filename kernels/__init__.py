"""qlora_jax.kernels: GPU kernels for 4-bit (NF4/FP4) weights, with an XLA reference path.

Public API (see :mod:`qlora_jax.kernels.ops`):

* :func:`quantized_matmul`: ``y = x @ dequant(W).T`` for ``x: [..., K]`` and a
  :class:`~qlora_jax.quant.QuantizedTensor` ``W: [N, K]`` (NF4, FP4 or int8), differentiable in
  ``x`` (custom VJP with a fused input-gradient kernel), run per shard under a mesh;
* :func:`quantized_matmul_grad`: that input gradient, ``dy @ dequant(W)``;
* :func:`dequantize_fused`: the weight in bf16/f16/f32, double-quantized scales decoded in-kernel
  (the values of :func:`qlora_jax.quant.dequantize`);
* :func:`quantize_fused`: blockwise 4-bit quantization on the device, bitsandbytes' CUDA bytes
  (those of :func:`qlora_jax.quant.quantize` with ``bnb_backend="cuda"``);
* :func:`resolve_backend`: which backend ``"auto"`` (or a fallback) picks, and why;
* :func:`grouped_quantized_matmul`: the grouped MoE expert matmul over rows sorted by expert,
  ``x_g @ dequant(W_g).T`` (or ``dy_g @ dequant(W_g)``) for stacked 4-bit experts, with its own
  switch (:data:`GROUPED_BACKENDS`: ``"auto"``, ``"pallas_triton"``, ``"xla"``) and
  :func:`resolve_grouped_backend`; :func:`qlora_jax.models.moe.grouped_matmul` puts its custom
  VJP around it.

Every op takes ``backend`` in :data:`BACKENDS` (``"auto"``, ``"jax_triton"``, ``"pallas_triton"``,
``"mosaic"``, ``"xla"``) and ``interpret`` (run the kernels through their interpreters, e.g. on
CPU). One file per operation and backend, each holding the kernel, its backward kernel where it
has one, and its pure-JAX ``reference``:

* :mod:`.ops`: the entry points above, the custom VJP of :func:`quantized_matmul` and the
  backend choice;
* Pallas Triton: :mod:`.matmul_triton` (forward and input gradient), :mod:`.dequantize_triton`,
  :mod:`.quantize_triton`, :mod:`.grouped_matmul_triton` (the grouped MoE matmul, both directions);
* Pallas Mosaic GPU: :mod:`.matmul_mosaic` (forward and input gradient);
* jax-triton: the subpackage :mod:`.jax_triton` (:mod:`.jax_triton.kernels` in the Triton
  language, :mod:`.jax_triton.ops` their calls and autotuning, :mod:`.jax_triton.interpreter`).

Shared by them: what each backend takes, :mod:`.support`; sharding, :mod:`.partitioning`; the
in-kernel pieces of the Pallas kernels, :mod:`.common`; their tiles, :mod:`.tiles`; the compile
target, :mod:`.target`; lowering for CUDA without a GPU, :mod:`.lowering`; the benchmark
harness, :mod:`.benchmark`.
"""

from qlora_jax.kernels.ops import (
    BACKENDS,
    GROUPED_BACKENDS,
    Backend,
    GroupedBackend,
    Target,
    current_target,
    dequantize_fused,
    grouped_quantized_matmul,
    jax_triton_missing,
    quantize_fused,
    quantized_matmul,
    quantized_matmul_grad,
    resolve_backend,
    resolve_grouped_backend,
)
from qlora_jax.kernels.tiles import DequantTiles, MatmulTiles

__all__ = [
    "BACKENDS",
    "Backend",
    "DequantTiles",
    "GROUPED_BACKENDS",
    "GroupedBackend",
    "MatmulTiles",
    "Target",
    "current_target",
    "dequantize_fused",
    "grouped_quantized_matmul",
    "jax_triton_missing",
    "quantize_fused",
    "quantized_matmul",
    "quantized_matmul_grad",
    "resolve_backend",
    "resolve_grouped_backend",
]
