"""qlora_jax.hardware: native bfloat16 dots from /proc/cpuinfo, and the recipe's --compute_dtype=auto."""

from __future__ import annotations

import logging

import pytest
from helpers import small_finetune_config

from qlora_jax import hardware
from qlora_jax.recipe.settings import ConfigError

# Abridged /proc/cpuinfo texts of real CPU families (first processor only; flags trimmed).
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
ZEN4 = """processor\t: 0
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni
"""
AMX_ONLY = """processor\t: 0
flags\t\t: fpu avx2 amx_bf16 amx_tile
"""
SKYLAKE_AVX512 = """processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni
"""
HASWELL_AVX2 = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU E5-2673 v3 @ 2.40GHz
flags\t\t: fpu sse2 avx avx2 fma
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid bf16 i8mm
"""
NO_FLAGS = "processor\t: 0\nmodel name\t: some emulated CPU\n"


@pytest.mark.parametrize("text,native,found", [
    (SAPPHIRE_RAPIDS, True, "avx512_bf16, amx_bf16"),
    (ZEN4, True, "avx512_bf16"),
    (AMX_ONLY, True, "amx_bf16"),
    (SKYLAKE_AVX512, False, None),
    (HASWELL_AVX2, False, None),
    (ARM, False, None),  # ARM's bf16 is not one of the x86 flags XLA's CPU dots use
])
def test_native_bf16_dot_from_cpuinfo(text, native, found):
    got, reason = hardware.native_bf16_dot(text)
    assert got is native
    if native:
        assert f"({found} in /proc/cpuinfo)" in reason
    else:
        assert "no native bfloat16 dot" in reason and "avx512_bf16 nor amx_bf16" in reason


def test_cpu_flags_reads_the_first_flags_line_and_arm_features():
    assert "amx_bf16" in hardware.cpu_flags(SAPPHIRE_RAPIDS)
    assert hardware.cpu_flags(HASWELL_AVX2) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert "asimd" in hardware.cpu_flags(ARM)
    assert hardware.cpu_flags(NO_FLAGS) == frozenset()


def test_no_flags_means_no_native_bf16(tmp_path, monkeypatch):
    native, reason = hardware.native_bf16_dot(NO_FLAGS)
    assert not native and "flags are unknown" in reason
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "absent")  # no /proc/cpuinfo at all
    assert hardware.cpu_flags() == frozenset() and hardware.native_bf16_dot()[0] is False


@pytest.mark.parametrize("backend", ["gpu", "cuda", "rocm", "tpu"])
def test_accelerators_choose_bfloat16_whatever_the_host_cpu(backend):
    dtype, reason = hardware.choose_compute_dtype("auto", backend, HASWELL_AVX2)
    assert dtype == "bfloat16" and f"the {backend} backend" in reason


@pytest.mark.parametrize("text,expected", [(SAPPHIRE_RAPIDS, "bfloat16"), (ZEN4, "bfloat16"),
                                           (SKYLAKE_AVX512, "float32"), (HASWELL_AVX2, "float32"),
                                           (NO_FLAGS, "float32")])
def test_cpu_auto_follows_the_flags(text, expected):
    dtype, reason = hardware.choose_compute_dtype("auto", "cpu", text)
    assert dtype == expected and reason.startswith("auto: the CPU")


@pytest.mark.parametrize("requested", ["float32", "bfloat16", "float16"])
def test_a_set_dtype_is_kept_on_any_hardware(requested):
    for backend, text in (("cpu", HASWELL_AVX2), ("cpu", SAPPHIRE_RAPIDS), ("tpu", None)):
        dtype, reason = hardware.choose_compute_dtype(requested, backend, text)
        assert dtype == requested and reason == f"--compute_dtype={requested} was set"


def test_auto_is_the_default_and_other_values_are_refused(tmp_path):
    from qlora_jax.finetune import FinetuneConfig

    assert FinetuneConfig().compute_dtype == "auto"
    with pytest.raises(ConfigError, match="compute_dtype"):
        FinetuneConfig(output_dir=str(tmp_path), compute_dtype="int8")


@pytest.mark.parametrize("text,expected", [(HASWELL_AVX2, "float32"), (ZEN4, "bfloat16")])
def test_the_recipe_resolves_auto_and_logs_why(tiny_model, tmp_path, monkeypatch, caplog, text, expected):
    from qlora_jax.recipe import steps

    fake = tmp_path / "cpuinfo"
    fake.write_text(text)
    monkeypatch.setattr(hardware, "CPUINFO", fake)
    cfg = small_finetune_config(tiny_model, tmp_path / "run", compute_dtype="auto")
    with caplog.at_level(logging.INFO, logger="qlora_jax.recipe.steps"):
        model, _ = steps.setup_model(cfg)
    assert model.spec.compute_dtype == expected
    assert f"compute dtype {expected}: auto: the CPU" in caplog.text


def test_the_recipe_keeps_a_set_dtype(tiny_model, tmp_path, monkeypatch, caplog):
    from qlora_jax.recipe import steps

    fake = tmp_path / "cpuinfo"
    fake.write_text(ZEN4)
    monkeypatch.setattr(hardware, "CPUINFO", fake)
    cfg = small_finetune_config(tiny_model, tmp_path / "run", compute_dtype="float32")
    with caplog.at_level(logging.INFO, logger="qlora_jax.recipe.steps"):
        model, _ = steps.setup_model(cfg)
    assert model.spec.compute_dtype == "float32"
    assert "compute dtype float32: --compute_dtype=float32 was set" in caplog.text
