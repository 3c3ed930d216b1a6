"""Every launcher of experiments/ runs a smoke configuration, and the installed qlora-jax-* commands run.

Each launcher runs as a user would start it (``python -m experiments.<name>``, a subprocess) on
the tiny random Llama (conftest's ``tiny_model``) or on synthetic data; what it prints is checked
against arithmetic or against the library called in this process on the same inputs.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float = 900) -> str:
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_datatypes_prints_the_bit_budgets_and_a_histogram(tmp_path):
    out = _run("experiments.datatypes", "--model=none", "--shape=128,256", f"--output_dir={tmp_path}")
    rows = {m.group(1): (float(m.group(2)), float(m.group(4))) for m in
            re.finditer(r"^(NF4\+DQ|NF4|FP4\+DQ|FP4|Int8)\s+(\S+)\s+(\S+)\s+(\S+)$", out, re.M)}
    # bits/param from the formats: 4-bit codes + a float32 absmax per 64 (4.5); with double quantization an
    # 8-bit code per 64 plus a float32 per 256 blocks of 64 and one float32 offset (128*256 weights here).
    n = 128 * 256
    assert rows["NF4"][1] == pytest.approx(4 + 32 / 64, abs=1e-3)
    assert rows["NF4+DQ"][1] == pytest.approx(4 + 8 / 64 + (32 * (n // 64 + 255) // 256 + 32) / n, abs=1e-3)
    assert rows["Int8"][1] == pytest.approx(8 + 32 / 64, abs=1e-3)
    assert rows["NF4"][0] < rows["FP4"][0]  # the paper's finding on N(0, 1) weights
    assert list(tmp_path.glob("error_histograms_*.png"))


def test_generate_replies_as_the_library_does(tiny_model):
    out = _run("experiments.generate", f"--model={tiny_model}", "--prompt=Hello there", "--max_new_tokens=6",
               "--quant=nf4")
    from qlora_jax.generate import chat
    from qlora_jax.model import load_pretrained

    model, tokenizer = load_pretrained(str(tiny_model), quant="nf4")
    expected = chat(model, tokenizer, "Hello there", max_new_tokens=6)
    # The launcher prints "\n>>> <prompt>\n<reply>\n": the reply, exactly as the library generates it.
    assert out.endswith(f"\n>>> Hello there\n{expected}\n"), (out[-300:], expected)


@pytest.mark.slow
def test_bench_load_times_both_ways(tiny_model, tmp_path):
    out = _run("experiments.bench_load", f"--model={tiny_model}", "--repeats=1", f"--workdir={tmp_path}")
    # Both ways (quantize the source checkpoint, read the save_quantized one) give the same packed bytes.
    assert "identical base bytes from both ways: True" in out
    assert re.search(r"ratio source/saved: load call \d", out)


@pytest.mark.slow
def test_bench_decoder_runs_the_tiny_shape():
    out = _run("experiments.bench_decoder", "--configs=tiny", "--steps=1", "--compile_rounds=1", "--seq_len=16")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^tiny\s+(\w+)\s+.*\s(\S+)$", out, re.M)}
    assert set(rows) == {"scanned", "nnx_unrolled", "nnx_scanned"}
    # The NNX decoders (QLoRALinear layers) compute the same logits as the built-in scanned one: the
    # same float32 operations on the same packed weights, so the difference is rounding at most.
    assert all(float(rows[k]) < 1e-3 for k in ("nnx_unrolled", "nnx_scanned"))


@pytest.mark.slow
def test_installed_commands_run_from_a_fresh_venv(tmp_path):
    """`pip install .` into a new venv (no network: --no-deps, --no-build-isolation with this venv's
    setuptools; the dependencies are this environment's, seen through a .pth file), then each command."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                                "--no-build-isolation", str(ROOT), "--target", str(site)], env=env, cwd=tmp_path,
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    for command in ("qlora-jax-finetune", "qlora-jax-generate", "qlora-jax-datatypes", "qlora-jax-memory",
                    "qlora-jax-eval"):
        script = site / "bin" / command
        assert script.exists(), f"{command} was not installed"
        done = subprocess.run([str(venv / "bin" / "python"), str(script), "--help"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "--" in done.stdout
    # The installed package (not this checkout) is the one the commands import.
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import qlora_jax, qlora_jax.kernels; "
                            "print(qlora_jax.__file__)"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    assert str(site) in where.stdout
    memory = subprocess.run([str(venv / "bin" / "python"), str(site / "bin" / "qlora-jax-memory"),
                             "--model=llama-7b", "--seq_len=512"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert memory.returncode == 0 and "GiB" in memory.stdout, memory.stderr[-2000:]
