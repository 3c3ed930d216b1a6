"""Lowering the kernels for CUDA on a machine without a GPU (tests, CI, ahead-of-time checks).

``jax.export(..., platforms=["cuda"])`` under an abstract GPU device runs every Pallas lowering
rule: jaxpr -> Triton IR for the Triton backend, jaxpr -> Mosaic GPU MLIR for the Mosaic one.
It catches "not supported in lowering" errors and shape/layout mistakes without a GPU; PTX
compilation (and so register or shared-memory limits) still only happens on a real device.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable

import jax
from jax import export

__all__ = ["H100", "A100", "export_for_cuda", "custom_call_targets", "TRITON_TARGET", "MOSAIC_GPU_TARGET"]

H100 = dict(device_kind="NVIDIA H100 80GB HBM3", num_cores=132)
A100 = dict(device_kind="NVIDIA A100-SXM4-80GB", num_cores=108)

TRITON_TARGET = "__gpu$xla.gpu.triton"
MOSAIC_GPU_TARGET = "mosaic_gpu_v2"


def _register_mosaic_gpu_lowering() -> None:
    # The CUDA plugin normally imports this; without a GPU plugin it must be imported by hand.
    import jax._src.pallas.mosaic_gpu.pallas_call_registration  # noqa: F401


def export_for_cuda(fn: Callable[..., Any], *args: Any, device: dict | None = None) -> export.Exported:
    """Exports ``jax.jit(fn)(*args)`` for CUDA under an abstract GPU (default: H100).

    ``args`` are arrays or ``jax.ShapeDtypeStruct`` pytrees. Returns the ``Exported``; its
    ``mlir_module()`` holds the kernels' custom calls (see :func:`custom_call_targets`).
    """
    _register_mosaic_gpu_lowering()
    device = device or H100
    abstract = jax.sharding.AbstractDevice(platform="gpu", **device)
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=abstract)
    disabled = [export.DisabledSafetyCheck.custom_call(t) for t in (TRITON_TARGET, MOSAIC_GPU_TARGET)]
    with jax.sharding.use_abstract_mesh(mesh), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
        return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=disabled)(*args)


def custom_call_targets(exported: export.Exported) -> set[str]:
    """Names of the custom calls in an exported module (e.g. the Triton or Mosaic GPU kernels)."""
    text = exported.mlir_module()
    return set(re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)) | set(
        re.findall(r'call_target_name = "([^"]+)"', text)
    )
