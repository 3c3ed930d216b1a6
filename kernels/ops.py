"""Entry points: the 4-bit matmul (with its custom VJP), dequantize and quantize, behind one backend switch.

Backends:

* ``"triton"``: the Pallas-Triton kernels (CUDA, compute capability >= 8.0: Ampere, Ada, Hopper).
* ``"mosaic"``: the Pallas Mosaic-GPU kernels (Hopper ``wgmma``): the matmul and its input
  gradient, for the shapes :mod:`.matmul_mosaic` / :mod:`.matmul_grad_mosaic` accept (Triton
  otherwise); dequantize and quantize run the Triton kernels under it. Opt-in: ``"auto"``
  never picks it until a GPU benchmark shows where it wins.
* ``"xla"``: dequantize with XLA, then ``dot`` (any platform; the reference).
* ``"auto"``: picked per op, platform, GPU generation and size class (:func:`resolve_backend`).

A kernel backend silently falls back to XLA for what it cannot take (int8 weights, K odd or not
a multiple of the block size, float32 activations, an empty batch): :func:`resolve_backend`
returns the reason. ``interpret=True`` runs the Pallas kernels through the interpreter on any
platform (CPU tests); ``"auto"`` then means the Triton kernels.

The auto policy (constants below) is a starting point set without a GPU to measure on; the
benchmark ``experiments/bench_kernels.py`` prints the numbers to revise it with:

* not a CUDA GPU, or compute capability < 8.0 (no bf16 tensor-core ``dot``): XLA;
* matmul and input gradient: Triton while the activation rows ``M <= FUSED_MAX_M`` (64 on
  Hopper and newer, 128 before), where the weight's bytes dominate and reading 4 bits instead of
  16 is the win; XLA (dequantize + cuBLAS) above, where the GEMM is compute-bound and cuBLAS'
  ``wgmma`` beats Triton's ``mma`` (bitsandbytes draws the same line on H100);
* dequantize and quantize: Triton.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.kernels import common, dequantize_triton, matmul_grad_triton, matmul_triton, quantize_triton
from qlora_jax.kernels import tiles as tiles_lib
from qlora_jax.quant import SUPPORTED_BLOCKSIZES, QuantizationError, QuantizedTensor
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
    "resolve_backend",
    "quantized_matmul",
    "nf4_matmul",
    "quantized_matmul_grad",
    "dequantize",
    "quantize",
]

Backend = Literal["auto", "triton", "mosaic", "xla"]
BACKENDS = ("auto", "triton", "mosaic", "xla")
Op = Literal["matmul", "matmul_grad", "dequantize", "quantize"]

FUSED_MAX_M_HOPPER = 64
FUSED_MAX_M_AMPERE = 128
_INT32_LIMIT = 2**31


@dataclasses.dataclass(frozen=True)
class Target:
    """What the computation will run on: ``platform`` ("cpu", "gpu", "tpu"), the GPU vendor runtime
    ("cuda"/"rocm"/None), its compute capability as ``(major, minor)`` (None when unknown), and
    the GPU's SM count."""

    platform: str
    runtime: str | None = None
    compute_capability: tuple[int, int] | None = None
    num_sms: int = tiles_lib.DEFAULT_NUM_SMS


# Device kinds -> compute capability, for abstract devices (export without a GPU), which carry
# only a name. Checked in order; the first substring found wins.
_KIND_CAPABILITY = (
    ("GB200", (10, 0)), ("B200", (10, 0)), ("B100", (10, 0)),
    ("GH200", (9, 0)), ("H200", (9, 0)), ("H100", (9, 0)), ("H800", (9, 0)), ("H20", (9, 0)),
    ("L40", (8, 9)), ("L4", (8, 9)), ("RTX 40", (8, 9)), ("RTX 6000 Ada", (8, 9)),
    ("A100", (8, 0)), ("A800", (8, 0)), ("A30", (8, 0)),
    ("A10", (8, 6)), ("A40", (8, 6)), ("RTX 30", (8, 6)), ("RTX A", (8, 6)),
    ("V100", (7, 0)), ("T4", (7, 5)),
)


def _capability_from_kind(kind: str) -> tuple[int, int] | None:
    for name, capability in _KIND_CAPABILITY:
        if name in kind:
            return capability
    return None


def current_target() -> Target:
    """The target of the code being traced: the abstract device of an abstract mesh in scope
    (``jax.sharding.use_abstract_mesh``, as when exporting for CUDA without a GPU), else the
    default device."""
    abstract = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if abstract is not None:
        platform = abstract.platform
        runtime = "cuda" if platform == "gpu" and "AMD" not in abstract.device_kind else None
        return Target(platform, runtime, _capability_from_kind(abstract.device_kind),
                      abstract.num_cores or tiles_lib.DEFAULT_NUM_SMS)
    device = jax.devices()[0]
    if device.platform != "gpu":
        return Target(device.platform)
    runtime = "rocm" if "rocm" in str(getattr(device.client, "platform_version", "")).lower() else "cuda"
    capability = None
    raw = getattr(device, "compute_capability", None)
    if raw:
        major, _, minor = str(raw).partition(".")
        capability = (int(major), int(minor or 0))
    else:
        capability = _capability_from_kind(device.device_kind)
    return Target("gpu", runtime, capability, getattr(device, "core_count", None) or tiles_lib.DEFAULT_NUM_SMS)


def _kernel_unsupported(op: Op, qt: QuantizedTensor, dtype: Any, m: int | None) -> str | None:
    """Why the Pallas kernels cannot take this problem, or None when they can."""
    if qt.quant_type not in common.KERNEL_QUANT_TYPES:
        return f"{qt.quant_type} weights have no kernel"
    k = qt.shape[-1]
    if k % 2 or k % qt.blocksize:
        return f"K={k} is odd or not a multiple of blocksize={qt.blocksize}"
    # The Triton kernels index with int32 offsets.
    if qt.numel >= _INT32_LIMIT or (m and m * max(qt.shape[0], k) >= _INT32_LIMIT):
        return "an operand has 2^31 or more elements (the kernels index in int32)"
    if op in ("matmul", "matmul_grad"):
        if len(qt.shape) != 2:
            return f"the matmul kernels take 2-D weights, not {list(qt.shape)}"
        if jnp.dtype(dtype).name not in common.KERNEL_DTYPES:
            return f"{jnp.dtype(dtype).name} activations (the kernels' dot takes {common.KERNEL_DTYPES})"
        if not m:
            return "empty batch"
        if common.largest_pow2_divisor(k, 16) < 16:
            return f"K={k} has no power-of-two factor >= 16"
    elif op == "dequantize" and jnp.dtype(dtype).name not in dequantize_triton.OUTPUT_DTYPES:
        return f"{jnp.dtype(dtype).name} output"
    return None


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

    ``dtype`` is the activation dtype (matmul ops) or the output dtype (dequantize); ``m`` the
    number of activation rows. ``target`` defaults to :func:`current_target`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "xla":
        return "xla", "requested"
    why_not = _kernel_unsupported(op, qt, dtype, m)
    if why_not is not None:
        return "xla", f"fallback: {why_not}"
    if backend == "mosaic":
        if op == "matmul":
            from qlora_jax.kernels.matmul_mosaic import unsupported_reason
        elif op == "matmul_grad":
            from qlora_jax.kernels.matmul_grad_mosaic import unsupported_reason
        else:
            return "triton", f"the Mosaic GPU backend has no {op} kernel"
        why_not = unsupported_reason(m, qt, dtype)
        if why_not is not None:
            return "triton", f"fallback: {why_not}"
        return "mosaic", "requested"
    if backend == "triton":
        return "triton", "requested"
    if interpret:
        return "triton", "interpret mode"
    target = target or current_target()
    why_not = _auto_rejects(target)
    if why_not is not None:
        return "xla", why_not
    capability = target.compute_capability or (0, 0)
    if op in ("matmul", "matmul_grad"):
        limit = FUSED_MAX_M_HOPPER if capability >= (9, 0) else FUSED_MAX_M_AMPERE
        if m > limit:
            return "xla", f"auto: M={m} > {limit}, compute-bound: dequantize + vendor GEMM"
        return "triton", f"auto: M={m} <= {limit}, memory-bound: fused 4-bit kernel"
    return "triton", "auto: CUDA GPU"


def _check_kernel_platform(backend: str, interpret: bool) -> None:
    if interpret or backend == "xla":
        return
    target = current_target()
    if target.platform != "gpu" or target.runtime != "cuda":
        raise RuntimeError(
            f"backend={backend!r} needs a CUDA GPU (this is {target.platform}); pass interpret=True to run "
            "the kernel through the Pallas interpreter, or use backend='auto' or 'xla'"
        )


def _zero_cotangent(qt: QuantizedTensor) -> QuantizedTensor:
    """The frozen weight's cotangent: float0 zeros for integer arrays, zeros for float ones."""

    def zero(a):
        if jnp.issubdtype(a.dtype, jnp.floating):
            return jnp.zeros(a.shape, a.dtype)
        return np.zeros(a.shape, jax.dtypes.float0)

    return jax.tree.map(zero, qt)


@dataclasses.dataclass(frozen=True)
class _MatmulPlan:
    forward: str
    backward: str
    interpret: bool
    num_sms: int


def _forward(plan: _MatmulPlan, x: jax.Array, qt: QuantizedTensor) -> jax.Array:
    if plan.forward == "xla":
        return matmul_triton.reference(x, qt)
    if plan.forward == "mosaic":
        from qlora_jax.kernels import matmul_mosaic

        return matmul_mosaic.fused_matmul(x, qt, interpret=plan.interpret)
    m, k = x.shape
    tiles = tiles_lib.matmul_tiles(m, qt.shape[0], k, plan.num_sms)
    return matmul_triton.fused_matmul(x, qt, tiles=tiles, interpret=plan.interpret)


def _input_grad(plan: _MatmulPlan, dy: jax.Array, qt: QuantizedTensor) -> jax.Array:
    if plan.backward == "xla":
        return matmul_grad_triton.reference(dy, qt)
    if plan.backward == "mosaic":
        from qlora_jax.kernels import matmul_grad_mosaic

        return matmul_grad_mosaic.fused_matmul_grad(dy, qt, interpret=plan.interpret)
    n, k = qt.shape
    tiles = tiles_lib.matmul_grad_tiles(dy.shape[0], n, k, plan.num_sms)
    return matmul_grad_triton.fused_matmul_grad(dy, qt, tiles=tiles, interpret=plan.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul_2d(plan: _MatmulPlan, x: jax.Array, qt: QuantizedTensor) -> jax.Array:
    return _forward(plan, x, qt)


def _matmul_2d_fwd(plan, x, qt):
    # Only the packed weight is kept for the backward pass: ~0.52 byte per weight, not 2.
    return _forward(plan, x, qt), qt


def _matmul_2d_bwd(plan, qt, dy):
    return _input_grad(plan, dy, qt), _zero_cotangent(qt)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def _check_matmul_args(x: Any, qweight: Any) -> None:
    if not isinstance(qweight, QuantizedTensor):
        raise TypeError(f"qweight must be a qlora_jax.quant.QuantizedTensor, got {type(qweight).__name__}")
    if len(qweight.shape) != 2:
        raise ValueError(f"qweight must be a 2-D weight [out_features, in_features], got shape {list(qweight.shape)}")
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
) -> jax.Array:
    """``y = x @ dequant(W).T`` for ``x: [..., K]`` and a quantized ``W: [N, K]`` -> ``[..., N]`` in ``x.dtype``.

    Accumulates in float32. Differentiable in ``x`` (custom VJP: the backward computes
    ``dx = dy @ dequant(W)`` from the packed weight, with the backend chosen for the same M);
    the weight is frozen, its cotangent is zero (float0 for the integer arrays). See the module
    docstring for ``backend`` and ``interpret``.
    """
    _check_matmul_args(x, qweight)
    qweight.validate()
    k = qweight.shape[1]
    lead = x.shape[:-1]
    m = math.prod(lead)
    forward, _ = resolve_backend("matmul", qweight, dtype=x.dtype, m=m, backend=backend, interpret=interpret)
    backward, _ = resolve_backend("matmul_grad", qweight, dtype=x.dtype, m=m, backend=backend, interpret=interpret)
    _check_kernel_platform(forward, interpret)
    _check_kernel_platform(backward, interpret)
    plan = _MatmulPlan(forward, backward, interpret, current_target().num_sms)
    y = _matmul_2d(plan, x.reshape(m, k), qweight)
    return y.reshape(*lead, qweight.shape[0])


nf4_matmul = quantized_matmul


def quantized_matmul_grad(
    dy: jax.Array,
    qweight: QuantizedTensor,
    *,
    backend: Backend = "auto",
    interpret: bool = False,
) -> jax.Array:
    """``dx = dy @ dequant(W)`` for ``dy: [..., N]`` and ``W: [N, K]`` -> ``[..., K]`` in ``dy.dtype``.

    The input gradient of :func:`quantized_matmul`, callable on its own (e.g. to benchmark it).
    """
    if not isinstance(qweight, QuantizedTensor):
        raise TypeError(f"qweight must be a qlora_jax.quant.QuantizedTensor, got {type(qweight).__name__}")
    if len(qweight.shape) != 2:
        raise ValueError(f"qweight must be 2-D [out_features, in_features], got shape {list(qweight.shape)}")
    n, k = qweight.shape
    if dy.shape[-1] != n:
        raise ValueError(f"dy's last dimension ({dy.shape[-1]}) != the weight's out_features N ({n})")
    qweight.validate()
    lead = dy.shape[:-1]
    m = math.prod(lead)
    chosen, _ = resolve_backend("matmul_grad", qweight, dtype=dy.dtype, m=m, backend=backend, interpret=interpret)
    _check_kernel_platform(chosen, interpret)
    plan = _MatmulPlan("xla", chosen, interpret, current_target().num_sms)
    return _input_grad(plan, dy.reshape(m, n), qweight).reshape(*lead, k)


def dequantize(
    qweight: QuantizedTensor,
    dtype: Any = jnp.bfloat16,
    *,
    backend: Backend = "auto",
    interpret: bool = False,
) -> jax.Array:
    """The tensor in ``dtype``, shape ``qweight.shape``: the values of :func:`qlora_jax.quant.dequantize`."""
    if not isinstance(qweight, QuantizedTensor):
        raise TypeError(f"qweight must be a qlora_jax.quant.QuantizedTensor, got {type(qweight).__name__}")
    qweight.validate()
    chosen, _ = resolve_backend("dequantize", qweight, dtype=dtype, backend=backend, interpret=interpret)
    if chosen == "mosaic":
        chosen = "triton"
    _check_kernel_platform(chosen, interpret)
    if chosen == "xla":
        return xla_dequantize(qweight, dtype)
    return dequantize_triton.dequantize_kernel(qweight, jnp.dtype(dtype), interpret=interpret)


def quantize(
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
    """Quantizes ``w`` on the device: the bytes of ``qlora_jax.quant.quantize(..., bnb_backend="cuda")``.

    Outside ``jit``, non-finite weights raise QuantizationError (``check_finite``; the check runs
    on the device and moves one bool to the host). Shapes the kernel cannot take (int8, a last
    dimension that is odd or not a multiple of ``blocksize``) go through the XLA quantizer.
    """
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        w = jnp.asarray(w)
    if check_finite and not isinstance(w, jax.core.Tracer):
        finite = jnp.isfinite(jnp.asarray(w))
        if not bool(jnp.all(finite)):
            first = tuple(int(i) for i in np.argwhere(~np.asarray(finite))[0])
            raise QuantizationError(f"cannot quantize: non-finite value(s) (NaN or Inf) in the weights, first at {first}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    use_kernel = (
        backend != "xla"
        and blocksize in SUPPORTED_BLOCKSIZES
        and nested_blocksize in SUPPORTED_BLOCKSIZES
        and (backend in ("triton", "mosaic") or interpret or _auto_rejects(current_target()) is None)
    )
    if use_kernel:
        try:
            quantize_triton.check_supported(w, quant_type, blocksize)
        except ValueError:  # int8, odd or ragged last dimension, unsupported dtype: XLA decides
            use_kernel = False
    if not use_kernel:
        return xla_quantize(w, quant_type, blocksize=blocksize, double_quant=double_quant,
                            nested_blocksize=nested_blocksize, bnb_backend="cuda", offset=offset, check_finite=False)
    _check_kernel_platform("triton", interpret)
    return quantize_triton.quantize_kernel(w, quant_type, blocksize=blocksize, double_quant=double_quant,
                                           nested_blocksize=nested_blocksize, offset=offset, interpret=interpret)
