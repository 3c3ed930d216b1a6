"""What the hardware computes natively, and the compute dtype that follows from it.

bfloat16 halves the bytes every matmul reads, but only pays where the hardware has bfloat16 dot
products: GPUs and TPUs (the QLoRA paper's setting), and CPUs with AVX-512-BF16 or AMX-BF16. On
other CPUs (AVX2-only, most AVX-512 ones before Cooper Lake / Sapphire Rapids / Zen 4) XLA and
oneDNN emulate bfloat16 dots by converting to float32, and bfloat16 is the slower dtype there.
"""

from __future__ import annotations

import pathlib

__all__ = ["BF16_CPU_FLAGS", "cpu_flags", "native_bf16_dot", "choose_compute_dtype"]

#: /proc/cpuinfo flags that mean a native bfloat16 dot product on x86 (AVX-512-BF16's VDPBF16PS;
#: AMX's TDPBF16PS).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")

#: Where :func:`cpu_flags` reads the CPU's flags (tests point it at a fake file).
CPUINFO = pathlib.Path("/proc/cpuinfo")


def cpu_flags(cpuinfo_text: str | None = None) -> frozenset[str]:
    """The ISA flags of the first CPU listed in ``/proc/cpuinfo``.

    Args:
      cpuinfo_text: the file's text (None: read :data:`CPUINFO`; no such file gives no flags).
    Returns:
      The flags (x86 ``flags`` line, or the ARM ``Features`` line), empty when none is listed.
    """
    if cpuinfo_text is None:
        try:
            cpuinfo_text = CPUINFO.read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16_dot(cpuinfo_text: str | None = None) -> tuple[bool, str]:
    """Whether this CPU has native bfloat16 dot products, and the evidence.

    Args:
      cpuinfo_text: the text of ``/proc/cpuinfo`` (None: read it).
    Returns:
      ``(native, reason)``; ``reason`` names the flags found, or says that none of
      :data:`BF16_CPU_FLAGS` is listed (or that the CPU lists no flags at all).
    """
    flags = cpu_flags(cpuinfo_text)
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    if found:
        return True, f"the CPU has native bfloat16 dot products ({', '.join(found)} in /proc/cpuinfo)"
    if not flags:
        return False, ("the CPU's ISA flags are unknown (no flags in /proc/cpuinfo), so no native bfloat16 dot "
                       "is assumed")
    return False, (f"the CPU has no native bfloat16 dot products (neither {' nor '.join(BF16_CPU_FLAGS)} in "
                   "/proc/cpuinfo): bfloat16 matmuls would be emulated in float32")


def choose_compute_dtype(requested: str = "auto", backend: str | None = None,
                         cpuinfo_text: str | None = None) -> tuple[str, str]:
    """The compute dtype to run in, and why.

    Args:
      requested: ``"auto"``, or a dtype name the user set (returned as it is).
      backend: the JAX backend ("cpu", "gpu", "cuda", "rocm", "tpu"; None: ``jax.default_backend()``).
      cpuinfo_text: the text of ``/proc/cpuinfo`` for a CPU backend (None: read it).
    Returns:
      ``(dtype, reason)``: bfloat16 on GPU/TPU and on CPUs with native bfloat16 dot products,
      float32 on other CPUs; ``reason`` is one sentence for the log.
    """
    if requested != "auto":
        return requested, f"--compute_dtype={requested} was set"
    if backend is None:
        import jax

        backend = jax.default_backend()
    if backend != "cpu":
        return "bfloat16", f"auto: the {backend} backend computes in bfloat16 natively (the QLoRA paper's setting)"
    native, why = native_bf16_dot(cpuinfo_text)
    return ("bfloat16" if native else "float32"), f"auto: {why}"
