"""Lowering the kernels for CUDA on a machine without a GPU (tests, CI, ahead-of-time checks).

``jax.export(..., platforms=["cuda"])`` under an abstract GPU device runs every Pallas lowering
rule: jaxpr -> Triton IR for the Triton backend, jaxpr -> Mosaic GPU MLIR for the Mosaic one.
It catches "not supported in lowering" errors and shape/layout mistakes without a GPU; PTX
compilation (and so register or shared-memory limits) still only happens on a real device.
"""

from __future__ import annotations

import re
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import jax
from jax import export

__all__ = [
    "H100",
    "A100",
    "export_for_cuda",
    "custom_call_targets",
    "jax_triton_ptx",
    "abstract_mesh",
    "TRITON_TARGET",
    "JAX_TRITON_TARGET",
    "MOSAIC_GPU_TARGET",
]

H100 = dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=132)
A100 = dict(device_kind="NVIDIA A100-SXM4-80GB", num_cores=108)

TRITON_TARGET = "__gpu$xla.gpu.triton"  # Pallas-Triton kernels (Triton IR, compiled by XLA)
JAX_TRITON_TARGET = "triton_kernel_call_ffi"  # jax_triton kernels (PTX compiled at lowering)
MOSAIC_GPU_TARGET = "mosaic_gpu_v2"


def _register_mosaic_gpu_lowering() -> None:
    # The CUDA plugin normally imports this; without a GPU plugin it must be imported by hand.
    import jax._src.pallas.mosaic_gpu.pallas_call_registration  # noqa: F401


def export_for_cuda(fn: Callable[..., Any], *args: Any, device: dict | None = None,
                    mesh_shape: dict[str, int] | None = None) -> export.Exported:
    """Exports ``jax.jit(fn)(*args)`` for CUDA under an abstract GPU (default: H100).

    ``args`` are arrays or ``jax.ShapeDtypeStruct`` pytrees (with shardings on
    ``abstract_mesh(mesh_shape)`` for a sharded export). ``mesh_shape`` (axis name -> size) makes
    the abstract mesh in scope a mesh of that many abstract GPUs, so that the kernels run per shard
    (:mod:`.partitioning`). Returns the ``Exported``; its ``mlir_module()`` holds the kernels'
    custom calls (see :func:`custom_call_targets`).
    """
    _register_mosaic_gpu_lowering()
    mesh = abstract_mesh(mesh_shape or {}, device)
    targets = (TRITON_TARGET, JAX_TRITON_TARGET, MOSAIC_GPU_TARGET)
    disabled = [export.DisabledSafetyCheck.custom_call(t) for t in targets]
    with jax.sharding.use_abstract_mesh(mesh), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*",
                                category=DeprecationWarning)
        return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=disabled)(*args)


def custom_call_targets(exported: export.Exported) -> set[str]:
    """Names of the custom calls in an exported module (e.g. the Triton or Mosaic GPU kernels)."""
    text = exported.mlir_module()
    return set(re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)) | set(
        re.findall(r'call_target_name = "([^"]+)"', text)
    )


def abstract_mesh(mesh_shape: dict[str, int], device: dict | None = None) -> jax.sharding.AbstractMesh:
    """The abstract mesh :func:`export_for_cuda` puts in scope for ``mesh_shape`` (for shardings)."""
    abstract = jax.sharding.AbstractDevice(platform="gpu", **(device or H100))
    # Auto axes, as qlora_jax.distributed.make_mesh: shardings propagate from the inputs.
    axis_types = (jax.sharding.AxisType.Auto,) * len(mesh_shape)
    return jax.sharding.AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape), axis_types=axis_types,
                                     abstract_device=abstract)


def jax_triton_ptx(exported: export.Exported) -> list[bytes]:
    """The serialized kernel calls of every jax_triton custom call in ``exported`` (decompressed),
    each holding the PTX Triton compiled (one per autotuning configuration)."""
    text = exported.mlir_module()
    calls = re.findall(rf"custom_call @{JAX_TRITON_TARGET}\(.*?opaque = \"((?:[^\"\\]|\\.)*)\"", text)

    def unescape(value: str) -> bytes:
        out, i = bytearray(), 0
        while i < len(value):
            if value[i] == "\\" and value[i + 1] == "\\":
                out.append(0x5C)
                i += 2
            elif value[i] == "\\":
                out.append(int(value[i + 1:i + 3], 16))
                i += 3
            else:
                out.append(ord(value[i]))
                i += 1
        return bytes(out)

    return [zlib.decompress(unescape(call)) for call in calls]
