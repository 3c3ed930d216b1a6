r"""MoE expert-matmul benchmark: the grouped 4-bit matmul against a per-expert loop and dequantize-all.

    python -m experiments.bench_moe --json=outputs/bench_moe.json   # Mixtral-like shapes / 8, CPU
    python -m experiments.bench_moe --smoke                         # tiny shapes, seconds
    python -m experiments.bench_moe --backend=pallas_triton         # on a CUDA GPU: the grouped kernel

One expert projection of a layer (Mixtral's ``w1``: ``[E, I, H]``, NF4 + double quant, every
expert quantized on its own as bitsandbytes does), applied to T tokens routed top-k (T*k rows
sorted by expert, random routing), forward only. Variants:

* ``grouped_4bit``: :func:`qlora_jax.models.moe.grouped_matmul`, one compiled program that
  dequantizes one expert at a time (tile by tile over its rows), or with ``--backend=pallas_triton``
  (a CUDA GPU) the fused grouped kernel (:mod:`qlora_jax.kernels.grouped_matmul_triton`); the
  report's ``grouped_backend`` says which ran and why;
* ``per_expert_loop``: a Python loop over experts, one ``quantized_matmul`` call per expert on its
  rows (what bitsandbytes' one-``Linear4bit``-per-expert does), group sizes read on the host;
* ``dequantize_all``: every expert dequantized into one ``[E, I, H]`` array, then
  ``jax.lax.ragged_dot``.

Reported per variant: the median wall time over ``--repeats`` runs (after a warm-up), the
compiled programs' memory (``memory_analysis()``: arguments + outputs + temporaries, the largest
program for the loop; None where the backend gives none), and the largest difference from the
grouped result against a tolerance of ``H * 2^-24`` times the absolute-value product (float32
accumulation of the same values in another order).
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from qlora_jax.kernels import GROUPED_BACKENDS, quantized_matmul, resolve_grouped_backend

from qlora_jax.models import moe
from qlora_jax.quant import dequantize

SMOKE = flags.DEFINE_bool("smoke", False, "tiny shapes (a structure check, seconds on a CPU)")
JSON = flags.DEFINE_string("json", None, "write the report to this file")
REPEATS = flags.DEFINE_integer("repeats", 5, "timed runs per variant (median reported)")
SCALE = flags.DEFINE_integer("scale", 8, "Mixtral-8x7B's hidden and intermediate sizes divided by this")
TOKENS = flags.DEFINE_integer("tokens", 512, "tokens routed (T); rows = T * top_k")
BACKEND = flags.DEFINE_enum("backend", "auto", list(GROUPED_BACKENDS),
                            "grouped_4bit's backend (qlora_jax.kernels.grouped_quantized_matmul)")
FAIL_ON_DIFFERENCE = flags.DEFINE_bool("fail_on_difference", False,
                                       "exit with status 1 when a variant differs from grouped_4bit beyond the "
                                       "tolerance (make bench-gpu's correctness gate)")

MIXTRAL = dict(hidden=4096, intermediate=14336, num_experts=8, top_k=2)


def _shapes() -> dict:
    if SMOKE.value:
        return dict(hidden=64, intermediate=128, num_experts=4, top_k=2, tokens=32)
    return dict(hidden=MIXTRAL["hidden"] // SCALE.value, intermediate=MIXTRAL["intermediate"] // SCALE.value,
                num_experts=MIXTRAL["num_experts"], top_k=MIXTRAL["top_k"], tokens=TOKENS.value)


def _memory(compiled) -> int | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes)


def _time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(shapes: dict, repeats: int, backend: str = "auto") -> dict:
    """Times the three variants on ``shapes`` (``backend``: grouped_4bit's); returns the report
    (see the module docstring)."""
    rng = np.random.default_rng(0)
    h, i, e, k, t = (shapes[key] for key in ("hidden", "intermediate", "num_experts", "top_k", "tokens"))
    w = (rng.standard_normal((e, i, h)) / math.sqrt(h)).astype(np.float32)
    qt = moe.quantize_experts(w, "nf4", double_quant=True)
    choice = np.stack([rng.choice(e, size=k, replace=False) for _ in range(t)]).reshape(-1)
    sizes_host = np.bincount(choice, minlength=e).astype(np.int32)
    rows = t * k
    x = jnp.asarray(rng.standard_normal((rows, h)), jnp.bfloat16)
    sizes = jnp.asarray(sizes_host)

    grouped_backend = resolve_grouped_backend(qt, dtype=x.dtype, rows=rows, backend=backend)
    grouped = jax.jit(lambda x, s, q: moe.grouped_matmul(x, s, q, backend=backend))
    grouped_c = grouped.lower(x, sizes, qt).compile()

    def dequantize_all(x, s, q):
        full = jax.vmap(lambda one: dequantize(one, x.dtype))(q)
        return jax.lax.ragged_dot(x, jnp.swapaxes(full, 1, 2), s, preferred_element_type=jnp.float32).astype(x.dtype)

    deq_c = jax.jit(dequantize_all).lower(x, sizes, qt).compile()

    one = jax.jit(lambda rows, q: quantized_matmul(rows, q, backend="xla"))
    starts = np.concatenate([[0], np.cumsum(sizes_host)[:-1]])
    experts = [moe.expert_slice(qt, j) for j in range(e)]
    loop_memory = [_memory(one.lower(x[:max(int(n), 1)], experts[j]).compile()) for j, n in enumerate(sizes_host)]

    def per_expert_loop():
        parts = [one(x[s:s + n], experts[j]) for j, (s, n) in enumerate(zip(starts, sizes_host, strict=True)) if n]
        return jnp.concatenate(parts)

    results = {
        "grouped_4bit": (lambda: grouped_c(x, sizes, qt), _memory(grouped_c)),
        "per_expert_loop": (per_expert_loop, None if None in loop_memory else max(loop_memory)),
        "dequantize_all": (lambda: deq_c(x, sizes, qt), _memory(deq_c)),
    }
    reference = np.asarray(results["grouped_4bit"][0](), np.float32)
    deq = np.stack([np.asarray(dequantize(experts[j], jnp.float32)) for j in range(e)])
    xf = np.abs(np.asarray(x, np.float32))
    bound = max((xf[s:s + n] @ np.abs(deq[j]).T).max(initial=0.0)
                for j, (s, n) in enumerate(zip(starts, sizes_host, strict=True)))
    # bf16 outputs: one rounding (2^-8 relative) on each side, plus the float32 accumulation.
    tolerance = float((2 * 2.0 ** -8 + h * 2.0 ** -24) * bound)
    rows_out = []
    for name, (fn, memory) in results.items():
        seconds = _time(fn, repeats)
        diff = float(np.abs(np.asarray(fn(), np.float32) - reference).max())
        rows_out.append(dict(variant=name, seconds=seconds, peak_bytes=memory, max_abs_diff_vs_grouped=diff,
                             tolerance=tolerance))
    base = rows_out[0]["seconds"]
    for row in rows_out:
        row["time_vs_grouped"] = row["seconds"] / base
    return dict(shapes=shapes, routed_rows=rows, platform=jax.devices()[0].platform,
                grouped_backend=list(grouped_backend), rows=rows_out)


def main(argv):
    del argv
    report = run(_shapes(), 1 if SMOKE.value else REPEATS.value, BACKEND.value)
    print(f"shapes: {report['shapes']}  ({report['routed_rows']} routed rows, {report['platform']}; grouped_4bit: "
          f"{report['grouped_backend'][0]}, {report['grouped_backend'][1]})")
    print(f"{'variant':<18}{'seconds':>12}{'x grouped':>11}{'memory MiB':>12}{'max diff':>12}")
    for row in report["rows"]:
        mem = "n/a" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:.2f}"
        print(f"{row['variant']:<18}{row['seconds']:>12.5f}{row['time_vs_grouped']:>11.2f}{mem:>12}"
              f"{row['max_abs_diff_vs_grouped']:>12.3g}")
    if JSON.value:
        path = pathlib.Path(JSON.value)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    beyond = [row["variant"] for row in report["rows"] if not row["max_abs_diff_vs_grouped"] <= row["tolerance"]]
    if beyond:
        print(f"differ from grouped_4bit beyond the tolerance: {beyond}")
        if FAIL_ON_DIFFERENCE.value:
            raise SystemExit(1)


def entry_point():
    app.run(main)


if __name__ == "__main__":
    entry_point()
