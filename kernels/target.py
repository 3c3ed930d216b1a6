"""What the kernels are compiled for: the platform, GPU runtime, compute capability and SM count.

:func:`current_target` reads the abstract device of an abstract mesh in scope (as when exporting
for CUDA without a GPU, :mod:`.lowering`), else the default device.
"""

from __future__ import annotations

import dataclasses

import jax
from qlora_jax.kernels import tiles as tiles_lib

__all__ = ["Target", "current_target", "triton_compute_capability"]


@dataclasses.dataclass(frozen=True)
class Target:
    """What the computation will run on.

    ``platform`` ("cpu", "gpu", "tpu"), the GPU vendor runtime ("cuda"/"rocm"/None), its compute
    capability as ``(major, minor)`` (None when unknown), and the GPU's SM count.

    Attributes:
      platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``.
      runtime: ``"cuda"``, ``"rocm"`` or ``None`` (not a GPU).
      compute_capability: ``(major, minor)``, e.g. ``(9, 0)`` for H100; ``None`` when unknown.
      num_sms: the GPU's streaming multiprocessor count (a default when unknown).
    """

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
    """The target of the code being traced.

    The abstract device of an abstract mesh in scope (``jax.sharding.use_abstract_mesh``, as when
    exporting for CUDA without a GPU), else the default device.

    Returns:
      A :class:`Target`.
    """
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


def triton_compute_capability(target: Target) -> int:
    """The compute capability as Triton writes it (``major * 10 + minor``, e.g. 90 for Hopper).

    Raises RuntimeError when ``target`` is not a CUDA GPU of known capability.
    """
    if target.platform != "gpu" or target.runtime != "cuda" or target.compute_capability is None:
        raise RuntimeError(
            f"the Triton kernels compile for a CUDA GPU of known compute capability, not {target}; pass "
            "interpret=True to run them through Triton's interpreter, or lower under an abstract GPU "
            "(qlora_jax.kernels.lowering.export_for_cuda)"
        )
    major, minor = target.compute_capability
    return major * 10 + minor
