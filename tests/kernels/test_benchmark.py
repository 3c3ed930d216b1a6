"""The kernel benchmark runs end to end in smoke mode (tiny shapes, interpreters, CPU)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_bench_kernels_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_kernels", "--smoke", f"--json_out={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    seen = {(r["op"], r["impl"]) for r in records}
    for op in ("forward", "input_grad"):
        for impl in ("jnp.dot bf16", "xla dequant+dot", "ours jax_triton", "ours pallas_triton",
                     "ours auto->jax_triton"):
            assert (op, impl) in seen, (op, impl)
    assert ("forward", "ours mosaic") in seen
    for op in ("quantize", "dequantize"):
        assert {(op, "ours jax_triton"), (op, "ours pallas_triton"), (op, "xla")} <= seen, op
    assert all(r["time_us"] and r["time_us"] > 0 for r in records)
    # Every kernel row was checked against XLA in the same run.
    for r in records:
        if r["impl"].startswith("ours"):
            expected = "bytes identical to xla" if r["op"] == "quantize" else "max rel diff vs xla"
            assert r["note"].startswith(expected), r
    assert "vs bf16" in proc.stdout and "MISMATCH" not in proc.stdout
