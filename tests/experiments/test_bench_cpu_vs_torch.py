"""experiments.bench_cpu_vs_torch runs end to end in smoke mode: a check of the harness, not a timing.

Both resident workers (ours in this environment, transformers + PEFT + bitsandbytes in the oracle
one) load the same tiny random model, quantize it to the same NF4 + double-quant codes
(``bnb_backend="cpu"``) and train on the same batch. At step 1 the LoRA B matrices are zero on
both sides (PEFT's initialisation), so the loss is the quantized base model's on that batch, and
the two losses must agree to the rounding of the dtype they compute in.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments.step_profile import CATEGORIES

REPO = pathlib.Path(__file__).resolve().parents[2]
SIDE_KEYS = {"dtype", "load_seconds", "first_step_seconds", "loss_step1", "gemm_flops_per_second",
             "step_seconds_median", "tokens_per_second", "model_flops_per_second", "ceiling_fraction",
             "peak_rss_bytes", "profile"}


def _loss_tolerance(dtype: str, loss: float, config: dict) -> float:
    """How far two correct implementations' step-1 losses may lie apart, from the arithmetic.

    float32: each matmul's result carries a relative rounding error of about eps * sqrt(K) (K terms
    summed in different orders by XLA and oneDNN), and a token's loss passes through 7 matmuls per
    layer and the head; the bound is that error compounded along the chain, times 4 for the
    softmax/logsumexp and norm reductions, relative to the loss. bfloat16: both sides round
    activations to bfloat16 (relative 2**-8) but at different places (norms, residual adds,
    rotary embeddings); the per-token errors have either sign and the loss averages them over the
    batch's targets, which keeps the mean within one bfloat16 rounding of the loss itself.
    """
    if dtype == "float32":
        k = max(config["hidden_size"], config["intermediate_size"])
        chain = 7 * config["num_hidden_layers"] + 1
        return 4 * np.finfo(np.float32).eps * math.sqrt(k) * chain * abs(loss)
    return 2.0**-8 * abs(loss)


@pytest.mark.slow
def test_bench_cpu_smoke_structure_and_step1_losses_agree(oracle, tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_cpu_vs_torch", "--smoke", "--profile", f"--json_out={out_json}",
         f"--oracle_python={oracle.python}"],
        cwd=REPO, capture_output=True, text=True, timeout=1500, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    report = json.loads(out_json.read_text())
    assert report["smoke"] and report["cpu"]["model"] and set(report["cpu"]["isa"]) == {
        "avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert out.startswith("CPU: ") and "ISA: avx2 " in out and "GEMM ceilings (256^3" in out
    assert set(report["pairs"]) == {"float32", "bfloat16", "best"}
    assert "one profiled step by category" in out
    # Read in a child process: importing the launcher here would define its absl flags in this
    # test process, where another launcher's flags of the same name (--smoke) may follow.
    SMOKE_CONFIG = json.loads(subprocess.run(  # noqa: N806
        [sys.executable, "-c", "import json; from experiments.bench_cpu_vs_torch import SMOKE_CONFIG; "
         "print(json.dumps(SMOKE_CONFIG))"], cwd=REPO, capture_output=True, text=True, check=True).stdout)

    tokens = report["batch"] * report["seq_len"]
    for key, pair in report["pairs"].items():
        assert set(pair["ours"]) == SIDE_KEYS and set(pair["torch"]) == SIDE_KEYS, key
        if key != "best":
            assert pair["ours"]["dtype"] == pair["torch"]["dtype"] == key
        rounds = pair["rounds"]
        assert len(rounds) == 2 and [r["order"] for r in rounds] == [["ours", "torch"], ["torch", "ours"]]
        counted = [r for r in rounds if r["quiet"]] or rounds
        ratios = [r["torch_seconds"] / r["ours_seconds"] for r in counted]
        assert pair["ratio"]["n"] == len(counted) and pair["quiet_rounds"] == sum(r["quiet"] for r in rounds)
        assert pair["ratio"]["min"] == min(ratios) and pair["ratio"]["max"] == max(ratios)
        assert pair["ratio"]["median"] == pytest.approx(float(np.median(ratios)), rel=1e-12)
        for side in ("ours", "torch"):
            s = pair[side]
            assert s["tokens_per_second"] == pytest.approx(tokens / s["step_seconds_median"], rel=1e-12)
            assert s["ceiling_fraction"] == pytest.approx(
                report["model_flops_per_step"] / s["step_seconds_median"] / s["gemm_flops_per_second"], rel=1e-12)
            assert s["peak_rss_bytes"] > 0 and s["load_seconds"] > 0
            # --profile: every category present, the parts sum to the profiled step's wall time,
            # and gradient checkpointing shows as recomputation on both sides.
            prof = s["profile"]
            assert set(prof["seconds"]) == set(prof["recomputed_seconds"]) == set(CATEGORIES)
            assert min(prof["seconds"].values()) >= 0 and prof["wall_seconds"] > 0
            assert sum(prof["seconds"].values()) == pytest.approx(prof["wall_seconds"], rel=1e-9), (key, side)
            assert prof["seconds"]["recomputation"] > 0
            assert sum(prof["recomputed_seconds"].values()) == pytest.approx(prof["seconds"]["recomputation"])
            matmuls = ("base matmul", "LoRA matmul", "head + cross-entropy", "attention")
            assert all(prof["seconds"][c] > 0 for c in matmuls), (key, side, prof["seconds"])
        if not pair["quiet_rounds"]:
            assert "NO ROUND WAS QUIET" in out
        ours, theirs = pair["ours"]["loss_step1"], pair["torch"]["loss_step1"]
        if pair["ours"]["dtype"] == pair["torch"]["dtype"]:
            # A random model's loss is near log V; then the two sides agree to the dtype's rounding.
            assert abs(ours - math.log(SMOKE_CONFIG["vocab_size"])) < 2.0
            tol = _loss_tolerance(key if key != "best" else pair["ours"]["dtype"], ours, SMOKE_CONFIG)
            assert abs(ours - theirs) <= tol, (key, ours, theirs, tol)
