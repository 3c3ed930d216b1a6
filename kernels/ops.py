"""Entry points: the 4-bit matmul (with its custom VJP), dequantize and quantize, behind one backend switch.

Backends (``backend=``):

* ``"jax_triton"``: kernels written in the Triton language (:mod:`.jax_triton.kernels`), called through
  ``jax_triton.triton_call`` and autotuned per size class (:mod:`.jax_triton.ops`); CUDA, compute
  capability >= 8.0. Needs ``triton`` and ``jax-triton`` (the ``gpu`` extra).
* ``"pallas_triton"``: the same algorithms as Pallas kernels on Pallas' Triton backend (which jax
  0.11 deprecates; kept until a GPU run shows whether to retire them).
* ``"mosaic"``: the Pallas Mosaic-GPU kernels (Hopper ``wgmma``): the matmul and its input
  gradient, for the shapes they accept (:mod:`.support`); everything else runs the Pallas-Triton
  kernels under it. Opt-in: ``"auto"`` never picks it until a GPU benchmark shows where it wins.
* ``"xla"``: dequantize with XLA, then ``dot`` (any platform; the reference).
* ``"auto"``: picked per op, platform, GPU generation and size class (:func:`resolve_backend`).

A kernel backend falls back to XLA for what it cannot take (int8 weights, K odd or not a multiple
of the block size, float32 activations, an empty batch; the rules live in :mod:`.support`), and
:func:`resolve_backend` returns the reason. ``interpret=True`` runs the kernels through their
interpreters on any platform (CPU tests): Triton's interpreter for ``"jax_triton"``, the Pallas
interpreters for the others; ``"auto"`` then means ``"jax_triton"`` (``"pallas_triton"`` where
triton is not installed).

Under sharding (``jax.jit`` over a mesh), the kernel backends run per shard
(:mod:`.partitioning`): FSDP weights are gathered per layer, tensor-parallel weights stay split.

The auto policy (constants below) is a starting point set without a GPU to measure on; the
benchmark ``experiments/bench_kernels.py`` prints the numbers to revise it with:

* not a CUDA GPU, or compute capability < 8.0 (no bf16 tensor-core ``dot``): XLA;
* matmul and input gradient: the Triton kernels while the activation rows ``M <= FUSED_MAX_M``
  (64 on Hopper and newer, 128 before), where the weight's bytes dominate and reading 4 bits
  instead of 16 is the win; XLA (dequantize + cuBLAS) above, where the GEMM is compute-bound and
  cuBLAS' ``wgmma`` beats Triton's ``mma`` (bitsandbytes draws the same line on H100);
* dequantize and quantize: the Triton kernels.

"The Triton kernels" are ``"jax_triton"``, the successor of ``"pallas_triton"`` (which ``"auto"``
picked before; it still does where triton or jax-triton is not installed).

The grouped MoE matmul, :func:`grouped_quantized_matmul` (rows sorted by expert, stacked 4-bit
experts; :func:`qlora_jax.models.moe.grouped_matmul` puts its custom VJP around both
directions), has its own switch :data:`GROUPED_BACKENDS`: ``"pallas_triton"``
(:mod:`.grouped_matmul_triton`, the only grouped kernel), ``"xla"`` (its ``reference``) and
``"auto"`` (:func:`resolve_grouped_backend`: the dense policy with the rows per expert as M; XLA
inside ``shard_map``, under a mesh, and off CUDA GPUs). It has never run on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from qlora_jax.kernels import (
    dequantize_triton,
    grouped_matmul_triton,
    matmul_triton,
    partitioning,
    quantize_triton,
    support,
)
from qlora_jax.kernels import tiles as tiles_lib
from qlora_jax.kernels.support import Op
from qlora_jax.kernels.target import Target, current_target

from qlora_jax.quant import QuantizationError, QuantizedTensor
from qlora_jax.quant import dequantize as xla_dequantize
from qlora_jax.quant import quantize as xla_quantize
from qlora_jax.quant.tensor import NESTED_BLOCKSIZE

__all__ = [
    "Backend",
    "BACKENDS",
    "FUSED_MAX_M_HOPPER",
    "FUSED_MAX_M_AMPERE",
    "Target",
    "current_target",
    "jax_triton_missing",
    "resolve_backend",
    "quantized_matmul",
    "quantized_matmul_grad",
    "dequantize_fused",
    "quantize_fused",
    "GroupedBackend",
    "GROUPED_BACKENDS",
    "resolve_grouped_backend",
    "grouped_quantized_matmul",
]

Backend = Literal["auto", "jax_triton", "pallas_triton", "mosaic", "xla"]
BACKENDS = ("auto", "jax_triton", "pallas_triton", "mosaic", "xla")

FUSED_MAX_M_HOPPER = 64
FUSED_MAX_M_AMPERE = 128

# The grouped (MoE) matmul has one kernel backend: the Pallas-Triton one.
GroupedBackend = Literal["auto", "pallas_triton", "xla"]
GROUPED_BACKENDS = ("auto", "pallas_triton", "xla")


@functools.cache
def jax_triton_missing() -> str | None:
    """Why the ``"jax_triton"`` backend cannot be used in this environment, or None.

    Imports jax_triton (and so triton) once: an installed but incompatible pair (e.g. a triton
    older than jax-triton asks for, installed without its dependencies) counts as missing.
    """
    missing = [name for name in ("triton", "jax_triton") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install 'qlora-jax[gpu]')"
    try:
        import jax_triton  # noqa: F401, PLC0415
        from qlora_jax.kernels.jax_triton import ops as jt_ops  # noqa: F401, PLC0415
    except Exception as error:  # noqa: BLE001 - any import failure makes the backend unusable
        return f"jax_triton does not import: {type(error).__name__}: {error}"
    return None


def _check_backend(backend: str) -> None:
    if backend == "triton":
        raise ValueError("backend 'triton' is now 'pallas_triton' (the Pallas kernels); 'jax_triton' runs the "
                         f"Triton-language kernels; expected one of {BACKENDS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "jax_triton" and jax_triton_missing():
        raise ImportError(f"backend 'jax_triton': {jax_triton_missing()}")


def _triton_family() -> str:
    """The Triton backend ``"auto"`` uses: jax_triton, or pallas_triton where it is missing."""
    return "pallas_triton" if jax_triton_missing() else "jax_triton"


def _auto_rejects(target: Target) -> str | None:
    """Why ``"auto"`` runs no kernel at all on ``target``, or None."""
    if target.platform != "gpu" or target.runtime != "cuda":
        return f"auto: platform {target.platform} ({target.runtime or 'no CUDA'})"
    capability = target.compute_capability or (0, 0)
    if capability < (8, 0):
        return f"auto: compute capability {capability} < 8.0"
    return None


def resolve_backend(
    op: Op,
    qt: QuantizedTensor,
    *,
    dtype: Any,
    m: int | None = None,
    backend: Backend = "auto",
    interpret: bool = False,
    target: Target | None = None,
) -> tuple[str, str]:
    """``(backend, reason)``: the backend that will run ``op`` and why.

    ``dtype`` is the activation dtype (matmul ops), the output dtype (dequantize) or the input
    weight's dtype (quantize, with ``qt`` describing the result); ``m`` the number of activation
    rows. ``target`` defaults to :func:`current_target`.

    Args:
      op: ``"matmul"``, ``"matmul_grad"``, ``"dequantize"`` or ``"quantize"``.
      qt: the weight (for ``"quantize"``, a QuantizedTensor describing the result; only its
        metadata is read).
      dtype: activation dtype (matmul ops), output dtype (dequantize) or input dtype (quantize).
      m: number of activation rows (matmul ops; the rows each device multiplies under a mesh).
      backend: the requested backend, one of ``BACKENDS``.
      interpret: whether the kernels would run through their interpreters.
      target: the device to decide for; ``None`` is :func:`current_target`.

    Returns:
      ``(backend, reason)``: the backend name that runs (never ``"auto"``) and a human-readable
      reason (``"requested"``, ``"fallback: ..."``, ``"auto: ..."``).

    Raises:
      ValueError: an unknown ``backend``.
      ImportError: ``backend="jax_triton"`` without jax-triton installed.
    """
    _check_backend(backend)
    if backend == "xla":
        return "xla", "requested"
    problem = support.Problem.of_weight(op, qt, dtype, m)
    if backend == "auto":
        why_not = support.unsupported_reason(problem, "pallas_triton")
        if why_not is not None:
            return "xla", f"fallback: {why_not}"
        if interpret:
            return _triton_family(), "interpret mode"
        target = target or current_target()
        why_not = _auto_rejects(target)
        if why_not is not None:
            return "xla", why_not
        family = _triton_family()
        if op in ("matmul", "matmul_grad"):
            capability = target.compute_capability or (0, 0)
            limit = FUSED_MAX_M_HOPPER if capability >= (9, 0) else FUSED_MAX_M_AMPERE
            if m > limit:
                return "xla", f"auto: M={m} > {limit}, compute-bound: dequantize + vendor GEMM"
            return family, f"auto: M={m} <= {limit}, memory-bound: fused 4-bit kernel"
        return family, "auto: CUDA GPU"
    why_not = support.unsupported_reason(problem, backend)
    if why_not is None:
        return backend, "requested"
    if backend == "mosaic" and support.unsupported_reason(problem, "pallas_triton") is None:
        return "pallas_triton", f"fallback: {why_not}"
    return "xla", f"fallback: {why_not}"


def _check_kernel_platform(backend: str, interpret: bool) -> None:
    if interpret or backend == "xla":
        return
    target = current_target()
    if target.platform != "gpu" or target.runtime != "cuda":
        raise RuntimeError(
            f"backend={backend!r} needs a CUDA GPU (this is {target.platform}); pass interpret=True to run "
            "the kernel through its interpreter, or use backend='auto' or 'xla'"
        )


def zero_cotangent(tree: Any) -> Any:
    """The cotangent of a frozen input (a packed weight, token ids): ``tree``'s structure with
    float0 zeros for its integer arrays and zeros of their dtype for its float ones.

    Args:
      tree: a pytree of arrays (e.g. a :class:`~qlora_jax.quant.QuantizedTensor`).

    Returns:
      The zero cotangent pytree, for a ``custom_vjp`` backward rule to return.
    """

    def zero(a):
        if jnp.issubdtype(a.dtype, jnp.floating):
            return jnp.zeros(a.shape, a.dtype)
        return np.zeros(a.shape, jax.dtypes.float0)

    return jax.tree.map(zero, tree)


@dataclasses.dataclass(frozen=True)
class _MatmulKernel:
    """One direction's kernel on a 2-D problem: ``forward`` ``x @ W.T`` or ``input_grad`` ``dy @ W``.

    Hashable (a static argument of the partitioned call); ``__call__`` runs the kernel on (local)
    arrays.
    """

    direction: Literal["forward", "input_grad"]
    backend: str
    interpret: bool
    num_sms: int

    def __call__(self, a: jax.Array, qt: QuantizedTensor) -> jax.Array:
        n, k = qt.shape
        forward = self.direction == "forward"
        if self.backend == "jax_triton":
            from qlora_jax.kernels.jax_triton import ops as jt_ops  # noqa: PLC0415 - triton is optional

            fn = jt_ops.fused_matmul if forward else jt_ops.fused_matmul_grad
            return fn(a, qt, interpret=self.interpret)
        if self.backend == "mosaic":
            from qlora_jax.kernels import matmul_mosaic  # noqa: PLC0415

            fn = matmul_mosaic.fused_matmul if forward else matmul_mosaic.fused_matmul_grad
            return fn(a, qt, interpret=self.interpret)
        if forward:
            tiles = tiles_lib.matmul_tiles(a.shape[0], n, k, self.num_sms)
            return matmul_triton.fused_matmul(a, qt, tiles=tiles, interpret=self.interpret)
        tiles = tiles_lib.matmul_grad_tiles(a.shape[0], n, k, self.num_sms)
        return matmul_triton.fused_matmul_grad(a, qt, tiles=tiles, interpret=self.interpret)


@dataclasses.dataclass(frozen=True)
class _MatmulPlan:
    forward: str
    backward: str
    interpret: bool
    num_sms: int
    tensor_parallel: str = "column"


def _forward(plan: _MatmulPlan, x: jax.Array, qt: QuantizedTensor) -> jax.Array:
    if plan.forward == "xla":
        return matmul_triton.reference(x, qt)
    kernel = _MatmulKernel("forward", plan.forward, plan.interpret, plan.num_sms)
    return partitioning.per_shard(kernel, x, qt, direction="forward", tensor_parallel=plan.tensor_parallel)


def _input_grad(plan: _MatmulPlan, dy: jax.Array, qt: QuantizedTensor) -> jax.Array:
    if plan.backward == "xla":
        return matmul_triton.reference_grad(dy, qt)
    kernel = _MatmulKernel("input_grad", plan.backward, plan.interpret, plan.num_sms)
    return partitioning.per_shard(kernel, dy, qt, direction="input_grad", tensor_parallel=plan.tensor_parallel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul_2d(plan: _MatmulPlan, x: jax.Array, qt: QuantizedTensor) -> jax.Array:
    return _forward(plan, x, qt)


def _matmul_2d_fwd(plan, x, qt):
    # Only the packed weight is kept for the backward pass: ~0.52 byte per weight, not 2.
    return _forward(plan, x, qt), qt


def _matmul_2d_bwd(plan, qt, dy):
    return _input_grad(plan, dy, qt), zero_cotangent(qt)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def _check_weight(qweight: Any) -> None:
    if not isinstance(qweight, QuantizedTensor):
        raise TypeError(f"qweight must be a qlora_jax.quant.QuantizedTensor, got {type(qweight).__name__}")
    if len(qweight.shape) != 2:
        raise ValueError(f"qweight must be a 2-D weight [out_features, in_features], got shape {list(qweight.shape)}")


def _check_matmul_args(x: Any, qweight: Any) -> None:
    _check_weight(qweight)
    if not hasattr(x, "shape") or len(x.shape) < 1:
        raise ValueError("x must be an array [..., in_features]")
    if x.shape[-1] != qweight.shape[1]:
        raise ValueError(
            f"x's last dimension ({x.shape[-1]}) != the weight's in_features K ({qweight.shape[1]}); the weight is "
            f"[out, in] = {list(qweight.shape)} and y = x @ W.T"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got {jnp.dtype(x.dtype).name}")


def quantized_matmul(
    x: jax.Array,
    qweight: QuantizedTensor,
    *,
    backend: Backend = "auto",
    interpret: bool = False,
    tensor_parallel: partitioning.TensorParallel = "column",
) -> jax.Array:
    """``y = x @ dequant(W).T`` for ``x: [..., K]`` and a quantized ``W: [N, K]`` -> ``[..., N]`` in ``x.dtype``.

    NF4, FP4 or int8 weights. Accumulates in float32. Differentiable in ``x`` (custom VJP: the
    backward computes ``dx = dy @ dequant(W)`` from the packed weight, with the backend chosen for
    the same M); the weight is frozen, its cotangent is zero (float0 for the integer arrays). See
    the module docstring for ``backend`` and ``interpret``. Under a mesh in context the kernels
    run per shard; ``tensor_parallel`` says how a ``tensor`` mesh axis splits this weight
    (:mod:`.partitioning`).

    Args:
      x: floating-point activations ``[..., K]`` (bfloat16, float16 or float32).
      qweight: a 2-D :class:`~qlora_jax.quant.QuantizedTensor` ``[N, K]`` (bitsandbytes' layout).
      backend: one of ``BACKENDS``; ``"auto"`` picks per shape and device (:func:`resolve_backend`).
      interpret: run the kernels through their interpreters (e.g. on CPU).
      tensor_parallel: ``"column"`` or ``"row"``, how a ``tensor`` mesh axis splits the weight.

    Returns:
      ``[..., N]`` in ``x.dtype``.

    Raises:
      TypeError: ``qweight`` is not a QuantizedTensor, or ``x`` is not floating point.
      ValueError: ``qweight`` is not 2-D or ``x``'s last dimension is not ``K``; or as below.
      ValueError: an unknown ``backend``.
      ImportError: ``backend="jax_triton"`` without jax-triton installed.
      RuntimeError: a GPU kernel chosen on a machine without a CUDA GPU and ``interpret=False``.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
    """
    _check_matmul_args(x, qweight)
    qweight.validate()
    k = qweight.shape[1]
    lead = x.shape[:-1]
    m = math.prod(lead)
    # The size class is that of the rows each device multiplies (all of them without a mesh).
    rows = partitioning.local_rows(m)
    forward, _ = resolve_backend("matmul", qweight, dtype=x.dtype, m=rows, backend=backend, interpret=interpret)
    backward, _ = resolve_backend("matmul_grad", qweight, dtype=x.dtype, m=rows, backend=backend, interpret=interpret)
    _check_kernel_platform(forward, interpret)
    _check_kernel_platform(backward, interpret)
    plan = _MatmulPlan(forward, backward, interpret, current_target().num_sms, tensor_parallel)
    y = _matmul_2d(plan, x.reshape(m, k), qweight)
    return y.reshape(*lead, qweight.shape[0])


def quantized_matmul_grad(
    dy: jax.Array,
    qweight: QuantizedTensor,
    *,
    backend: Backend = "auto",
    interpret: bool = False,
) -> jax.Array:
    """``dx = dy @ dequant(W)`` for ``dy: [..., N]`` and ``W: [N, K]`` -> ``[..., K]`` in ``dy.dtype``.

    The input gradient of :func:`quantized_matmul`, callable on its own (e.g. to benchmark it).

    Args:
      dy: output cotangent ``[..., N]`` (floating point).
      qweight: a 2-D :class:`~qlora_jax.quant.QuantizedTensor` ``[N, K]``.
      backend: one of ``BACKENDS``; ``"auto"`` picks per shape and device (:func:`resolve_backend`).
      interpret: run the kernels through their interpreters (e.g. on CPU).

    Returns:
      ``[..., K]`` in ``dy.dtype``.

    Raises:
      TypeError: ``qweight`` is not a QuantizedTensor.
      ValueError: ``dy``'s last dimension is not ``N``; or as below.
      ValueError: an unknown ``backend``.
      ImportError: ``backend="jax_triton"`` without jax-triton installed.
      RuntimeError: a GPU kernel chosen on a machine without a CUDA GPU and ``interpret=False``.
    """
    _check_weight(qweight)
    n, k = qweight.shape
    if dy.shape[-1] != n:
        raise ValueError(f"dy's last dimension ({dy.shape[-1]}) != the weight's out_features N ({n})")
    qweight.validate()
    lead = dy.shape[:-1]
    m = math.prod(lead)
    chosen, _ = resolve_backend("matmul_grad", qweight, dtype=dy.dtype, m=partitioning.local_rows(m),
                                backend=backend, interpret=interpret)
    _check_kernel_platform(chosen, interpret)
    plan = _MatmulPlan("xla", chosen, interpret, current_target().num_sms)
    return _input_grad(plan, dy.reshape(m, n), qweight).reshape(*lead, k)


def dequantize_fused(
    qweight: QuantizedTensor,
    dtype: Any = jnp.bfloat16,
    *,
    backend: Backend = "auto",
    interpret: bool = False,
) -> jax.Array:
    """The weight in ``dtype``, decoded by one kernel pass.

    Shape ``qweight.shape``; double-quant scales, code lookup, scaling and store are fused; the
    values of :func:`qlora_jax.quant.dequantize`. Falls back to that XLA function where no kernel
    applies (:func:`resolve_backend`).

    Args:
      qweight: the :class:`~qlora_jax.quant.QuantizedTensor`.
      dtype: output dtype (bfloat16, float16 or float32).
      backend: one of ``BACKENDS``; ``"auto"`` picks per shape and device (:func:`resolve_backend`).
      interpret: run the kernels through their interpreters (e.g. on CPU).

    Returns:
      Array of shape ``qweight.shape`` and dtype ``dtype``.

    Raises:
      TypeError: ``qweight`` is not a QuantizedTensor.
      ValueError: an unknown ``backend``.
      ImportError: ``backend="jax_triton"`` without jax-triton installed.
      RuntimeError: a GPU kernel chosen on a machine without a CUDA GPU and ``interpret=False``.
    """
    if not isinstance(qweight, QuantizedTensor):
        raise TypeError(f"qweight must be a qlora_jax.quant.QuantizedTensor, got {type(qweight).__name__}")
    qweight.validate()
    chosen, _ = resolve_backend("dequantize", qweight, dtype=dtype, backend=backend, interpret=interpret)
    _check_kernel_platform(chosen, interpret)
    if chosen == "xla":
        return xla_dequantize(qweight, dtype)
    if chosen == "jax_triton":
        from qlora_jax.kernels.jax_triton import ops as jt_ops  # noqa: PLC0415 - triton is optional

        return jt_ops.dequantize_kernel(qweight, jnp.dtype(dtype), interpret=interpret)
    return dequantize_triton.dequantize_kernel(qweight, jnp.dtype(dtype), interpret=interpret)


def _quantize_problem_weight(w: Any, quant_type: str, blocksize: int, nested_blocksize: int) -> QuantizedTensor:
    """A shape-only QuantizedTensor describing the result of quantizing ``w`` (for the rules)."""
    sds = jax.ShapeDtypeStruct
    return QuantizedTensor(codes=sds((1,), jnp.uint8), scales=sds((1,), jnp.float32), nested_scales=None,
                           offset=None, shape=tuple(w.shape), dtype="float32", quant_type=quant_type,
                           blocksize=blocksize, nested_blocksize=nested_blocksize)


def quantize_fused(
    w: jax.Array,
    quant_type: str = "nf4",
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    offset: Any = None,
    backend: Backend = "auto",
    interpret: bool = False,
    check_finite: bool = True,
) -> QuantizedTensor:
    """Quantizes ``w`` on the device with one kernel pass.

    Absmax, reciprocal, code search and packing are fused: the bytes of
    ``qlora_jax.quant.quantize(..., bnb_backend="cuda")``.

    Outside ``jit``, non-finite weights raise QuantizationError (``check_finite``; the check runs
    on the device and moves one bool to the host). Shapes no kernel takes (int8, a last dimension
    that is odd or not a multiple of ``blocksize``) go through the XLA quantizer.

    Args:
      w: the weight, float32, bfloat16 or float16, any shape (a weight is ``[out, in]``).
      quant_type: ``"nf4"``, ``"fp4"`` or ``"int8"``.
      blocksize: values per block (one absmax each).
      double_quant: quantize the scales too (QLoRA's double quantization).
      nested_blocksize: scales per double-quantization block.
      offset: float32 scalar overriding the scales' mean (double quant), or ``None``.
      backend: one of ``BACKENDS``; ``"auto"`` picks per shape and device (:func:`resolve_backend`).
      interpret: run the kernels through their interpreters (e.g. on CPU).
      check_finite: outside ``jit``, raise on NaN or Inf weights.

    Returns:
      A :class:`~qlora_jax.quant.QuantizedTensor` of ``w``'s shape and dtype.

    Raises:
      QuantizationError: non-finite weights (``check_finite``), or unsupported metadata.
      ValueError: an unknown ``backend``.
      ImportError: ``backend="jax_triton"`` without jax-triton installed.
      RuntimeError: a GPU kernel chosen on a machine without a CUDA GPU and ``interpret=False``.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
    """
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        w = jnp.asarray(w)
    if check_finite and not isinstance(w, jax.core.Tracer):
        finite = jnp.isfinite(jnp.asarray(w))
        if not bool(jnp.all(finite)):
            first = tuple(int(i) for i in np.argwhere(~np.asarray(finite))[0])
            raise QuantizationError(
                f"cannot quantize: non-finite value(s) (NaN or Inf) in the weights, first at {first}")
    _check_backend(backend)
    chosen = "xla"
    if backend != "xla":
        described = _quantize_problem_weight(w, quant_type, blocksize, nested_blocksize)
        chosen, _ = resolve_backend("quantize", described, dtype=w.dtype, backend=backend, interpret=interpret)
    if chosen == "xla":
        return xla_quantize(w, quant_type, blocksize=blocksize, double_quant=double_quant,
                            nested_blocksize=nested_blocksize, bnb_backend="cuda", offset=offset, check_finite=False)
    _check_kernel_platform(chosen, interpret)
    if chosen == "jax_triton":
        from qlora_jax.kernels.jax_triton import ops as jt_ops  # noqa: PLC0415 - triton is optional

        first_stage = jt_ops.quantize_blocks
    else:
        first_stage = quantize_triton.quantize_blocks
    codes, absmax = first_stage(w, quant_type, blocksize=blocksize, interpret=interpret)
    return quantize_triton.assemble(w, codes, absmax, quant_type, blocksize=blocksize, double_quant=double_quant,
                                    nested_blocksize=nested_blocksize, offset=offset)


# ------------------------------------------------------------------------------------------ grouped (MoE)


def resolve_grouped_backend(
    qt: QuantizedTensor,
    *,
    dtype: Any,
    rows: int,
    transpose: bool = False,
    backend: GroupedBackend = "auto",
    interpret: bool = False,
    expert_parallel: bool = False,
    target: Target | None = None,
) -> tuple[str, str]:
    """``(backend, reason)``: the backend that will run :func:`grouped_quantized_matmul` and why.

    ``"auto"`` follows the dense policy with the average rows per expert as M: the kernel where
    the experts' 4-bit bytes dominate (``ceil(rows / E) <= FUSED_MAX_M``) on a CUDA GPU of compute
    capability >= 8.0 (or with ``interpret``), XLA elsewhere. Whatever was asked, XLA runs what
    the kernel cannot take (:func:`.grouped_matmul_triton.unsupported_reason`: int8 experts,
    float32 activations, K not whole blocks, no rows...) and the expert-parallel path
    (``expert_parallel``: inside ``shard_map``, where the kernel is not wired for per-device
    varying arrays); ``"auto"`` also keeps XLA while a mesh of several devices is in context
    outside ``shard_map`` (the kernel has no per-shard wrapper: its operands would be gathered).

    Args:
      qt: the stacked experts (one ``[N, K]`` matrix's metadata, arrays ``[E, ...]``).
      dtype: the activations' dtype.
      rows: the rows of ``x`` (all experts together).
      transpose: the input gradient ``dy @ W_g`` instead of ``x @ W_g.T``.
      backend: one of :data:`GROUPED_BACKENDS`.
      interpret: whether the kernel would run through the Pallas interpreter.
      expert_parallel: the call runs inside ``shard_map`` over an expert mesh axis.
      target: the device to decide for; ``None`` is :func:`current_target`.

    Returns:
      ``(backend, reason)``: ``"pallas_triton"`` or ``"xla"``, and a human-readable reason.

    Raises:
      ValueError: an unknown ``backend``.
    """
    if backend not in GROUPED_BACKENDS:
        raise ValueError(f"unknown grouped-matmul backend {backend!r}; expected one of {GROUPED_BACKENDS} (the "
                         "grouped kernel exists for pallas_triton only)")
    if backend == "xla":
        return "xla", "requested"
    why_not = grouped_matmul_triton.unsupported_reason(qt, dtype, rows, transpose=transpose)
    if why_not is not None:
        return "xla", f"fallback: {why_not}"
    if expert_parallel:
        return "xla", "fallback: expert parallelism (inside shard_map) runs the XLA path"
    if backend == "pallas_triton":
        return "pallas_triton", "requested"
    if interpret:
        return "pallas_triton", "interpret mode"
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        return "xla", f"auto: a mesh of {mesh.size} devices in context (no per-shard grouped kernel)"
    target = target or current_target()
    why_not = _auto_rejects(target)
    if why_not is not None:
        return "xla", why_not
    capability = target.compute_capability or (0, 0)
    limit = FUSED_MAX_M_HOPPER if capability >= (9, 0) else FUSED_MAX_M_AMPERE
    per_expert = -(-rows // int(qt.codes.shape[0]))
    if per_expert > limit:
        return "xla", f"auto: {per_expert} rows per expert > {limit}, compute-bound: dequantize + XLA dot"
    return "pallas_triton", f"auto: {per_expert} rows per expert <= {limit}, memory-bound: fused 4-bit kernel"


def grouped_quantized_matmul(
    x: jax.Array,
    group_sizes: jax.Array,
    offsets: jax.Array,
    qt: QuantizedTensor,
    *,
    transpose: bool = False,
    backend: GroupedBackend = "auto",
    interpret: bool = False,
    tile_rows: int | None = None,
    tiles: tiles_lib.MatmulTiles | None = None,
    vary: str | None = None,
) -> jax.Array:
    """The grouped expert matmul: ``y[rows of g] = x[rows of g] @ dequant(W_g).T`` for every expert g.

    ``transpose=True`` gives the input gradient ``dx[rows of g] = dy[rows of g] @ dequant(W_g)``.
    Not differentiable by itself: :func:`qlora_jax.models.moe.grouped_matmul` wraps both
    directions in a custom VJP. Float32 accumulation; the output is in ``x.dtype``. Backends:
    ``"pallas_triton"`` (:mod:`.grouped_matmul_triton`: the experts dequantized tile by tile
    inside the kernel), ``"xla"`` (:func:`.grouped_matmul_triton.reference`: one expert
    dequantized at a time, then ``dot`` s), ``"auto"`` (:func:`resolve_grouped_backend`; XLA on
    CPU).

    Args:
      x: ``[R, K]`` (``[R, N]`` with ``transpose``), rows sorted by expert; floating point.
      group_sizes: int32 ``[E]``: rows per expert.
      offsets: int32 ``[E]``: each expert's first row (``cumsum(group_sizes) - group_sizes`` on
        one device; an expert-parallel shard passes its own experts' slices).
      qt: a stacked :class:`~qlora_jax.quant.QuantizedTensor`
        (:func:`qlora_jax.models.moe.quantize_experts`): one ``[N, K]`` matrix's metadata, arrays
        ``[E, ...]``.
      transpose: the input gradient (multiply by ``W_g`` instead of ``W_g.T``).
      backend: one of :data:`GROUPED_BACKENDS`.
      interpret: run the kernel through the Pallas interpreter (e.g. on CPU).
      tile_rows: the XLA path's rows per ``dot`` (static); default
        :func:`.grouped_matmul_triton.default_tile_rows`.
      tiles: the kernel's tiles (default :func:`.grouped_matmul_triton.grouped_tiles`).
      vary: inside ``shard_map``, the expert mesh axis the result varies over (then XLA runs).

    Returns:
      ``[R, N]`` (``[R, K]`` with ``transpose``) in ``x.dtype``; rows no expert owns are zeros.

    Raises:
      TypeError: ``qt`` is not a QuantizedTensor, or ``x`` is not floating point.
      ValueError: shapes that disagree (named), or an unknown ``backend``.
      RuntimeError: ``backend="pallas_triton"`` without a CUDA GPU and ``interpret=False``.
    """
    num_experts = grouped_matmul_triton.check_stacked(qt)
    n, k = qt.shape
    width = n if transpose else k
    name = "dy" if transpose else "x"
    if not hasattr(x, "shape") or len(x.shape) != 2 or x.shape[1] != width:
        raise ValueError(f"{name} must be [rows, {width}] for experts [N, K] = {list(qt.shape)} "
                         f"({'dy @ W_g' if transpose else 'x @ W_g.T'}), got {list(getattr(x, 'shape', ()))}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got {jnp.dtype(x.dtype).name}")
    for label, array in (("group_sizes", group_sizes), ("offsets", offsets)):
        if tuple(jnp.shape(array)) != (num_experts,):
            raise ValueError(f"{label} must be [{num_experts}] (one per expert), got {list(jnp.shape(array))}")
    chosen, _ = resolve_grouped_backend(qt, dtype=x.dtype, rows=x.shape[0], transpose=transpose, backend=backend,
                                        interpret=interpret, expert_parallel=vary is not None)
    _check_kernel_platform(chosen, interpret)
    group_sizes = jnp.asarray(group_sizes).astype(jnp.int32)
    offsets = jnp.asarray(offsets).astype(jnp.int32)
    if chosen == "xla":
        return grouped_matmul_triton.reference(x, group_sizes, offsets, qt, transpose=transpose, tile=tile_rows,
                                               vary=vary)
    grouped = grouped_matmul_triton
    kernel = grouped.grouped_fused_matmul_grad if transpose else grouped.grouped_fused_matmul
    return kernel(x, group_sizes, offsets, qt, tiles=tiles, interpret=interpret)
