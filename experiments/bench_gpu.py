r"""Everything a GPU run must record, in one command of at most 8 minutes on one H100/H200.

    make bench-gpu                                          # = python -m experiments.bench_gpu
    python -m experiments.bench_gpu --out_dir=outputs/bench_gpu --budget_s=480
    python -m experiments.bench_gpu --smoke --out_dir=/tmp/bench_gpu   # the whole harness, CPU, tiny shapes

Parts, each in its own subprocess with its own timeout (a slow or crashing part loses only its
own rows), in this order:

1. ``correctness``: every kernel backend (jax_triton autotuned, pallas_triton, mosaic on Hopper)
   compiled for the GPU against the XLA reference: matmul and input gradient within rounding,
   dequantize and quantize byte for byte (``--part=correctness`` of this script);
2. ``kernels``: ``experiments.bench_kernels`` over every backend and bitsandbytes, LLaMA-7B shapes,
   M in {1, 16, 256, 4096};
3. ``train_7b``: ``experiments.bench_train_step`` at LLaMA-7B shapes with the transformers + peft +
   bitsandbytes step timed in the same process (``--torch_baseline``);
4. ``train_65b``: the LLaMA-65B-shaped step's measured peak device memory against the planner
   (``qlora_jax.memory``);
5. ``moe``: ``experiments.bench_moe`` at Mixtral-8x7B's full expert shapes (``[8, 14336, 4096]``,
   NF4 + DQ), 256 tokens routed top-2 (64 rows per expert, where ``"auto"`` picks the fused
   grouped kernel), with ``--backend=pallas_triton``: the grouped kernel against a per-expert loop
   and dequantize-everything, time and compiled memory, and each against the grouped result
   within the float32-accumulation bound (a larger difference fails the part);
6. ``optimizer``: ``experiments.bench_optimizer`` (run through its command line only).

It writes ``bench_gpu.json`` (environment: device, driver, CUDA, versions; every part's command,
exit status, time, output tail and JSON) and ``bench_gpu.md`` (the tables BENCHMARKS.md takes)
to ``--out_dir``. The exit status is 0 when every part passed.

It runs with the GPU machine's own Python (jax with CUDA, torch, transformers, peft; no package
index reachable). bitsandbytes, jax-triton and gguf are not installed there: fetch their wheels
(about 42 MB) beforehand on a machine with a package index; ``.whl/`` is git-ignored, so it travels
as a carried path, and ``make bench-gpu`` installs them and this checkout offline first
(``scripts/prepare_gpu_run.sh``, which prints the download command)::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      -d .whl bitsandbytes==0.50.2 jax-triton==0.4.1 gguf==0.19.0

The script also installs ``.whl/bitsandbytes-*.whl`` itself (``pip --no-deps``) when bitsandbytes
does not import; without it the bitsandbytes rows say why not. The machine's triton (3.6 there) is
older than jax-triton asks for (>= 3.7); the correctness part shows whether the jax_triton kernels
run with it.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging

from . import cli

FLAGS = flags.FLAGS
flags.DEFINE_bool("smoke", False, "Every part with tiny shapes on CPU (kernels through their interpreters).")
flags.DEFINE_string("out_dir", "outputs/bench_gpu", "Where bench_gpu.json and bench_gpu.md go.")
flags.DEFINE_integer("budget_s", 480, "Wall-clock budget for all parts together (seconds).")
flags.DEFINE_list("parts", ["correctness", "kernels", "train_7b", "train_65b", "moe", "optimizer"],
                  "Parts to run, in order.")
flags.DEFINE_string("wheel_dir", ".whl", "Where a bitsandbytes wheel may wait to be installed.")
flags.DEFINE_list("tolerate", ["optimizer"], "Parts whose failure is recorded but does not fail the run.")
flags.DEFINE_string("part", None, "Internal: run this part in this process (only 'correctness').")
flags.DEFINE_string("json_out", None, "Internal: the part's JSON output.")

# Seconds per part on a GPU (the sum stays under the 8-minute budget with start-up and install).
# The optimizer part runs last and is tolerated: when the budget runs short, it is the one cut.
PART_TIMEOUTS = {"correctness": 45, "kernels": 150, "train_7b": 125, "train_65b": 80, "moe": 45, "optimizer": 50}
SMOKE_TIMEOUT = 240
VERSIONED = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "triton", "jax-triton", "torch",
             "bitsandbytes", "transformers", "peft", "qlora-jax")


def part_command(name: str, json_path: str, smoke: bool) -> list[str]:
    """The launcher command line of one part."""
    py = [sys.executable, "-m"]
    if name == "correctness":
        return py + ["experiments.bench_gpu", "--part=correctness", f"--json_out={json_path}"] + (
            ["--smoke"] if smoke else [])
    if name == "kernels":
        if smoke:  # every backend's smoke run is tests/kernels/test_benchmark.py's; here the harness
            return py + ["experiments.bench_kernels", "--smoke", "--backends=auto,jax_triton", "--quantize=false",
                         f"--json_out={json_path}"]
        return py + ["experiments.bench_kernels", "--m=1,16,256,4096", "--iters=10",
                     "--backends=auto,jax_triton,pallas_triton,mosaic", f"--json_out={json_path}"]
    if name in ("train_7b", "train_65b"):
        cmd = py + ["experiments.bench_train_step", f"--json_out={json_path}"]
        if smoke:
            return cmd + ["--smoke", "--steps=2"]
        model = "llama-7b" if name == "train_7b" else "llama-65b"
        batch = "4" if name == "train_7b" else "1"
        cmd += [f"--model={model}", "--seq_len=512", f"--batch={batch}", "--steps=3"]
        return cmd + (["--torch_baseline"] if name == "train_7b" else [])
    if name == "moe":
        cmd = py + ["experiments.bench_moe", f"--json={json_path}", "--fail_on_difference"]
        if smoke:
            return cmd + ["--smoke"]
        return cmd + ["--scale=1", "--tokens=256", "--repeats=5", "--backend=pallas_triton"]
    if name == "optimizer":
        return py + ["experiments.bench_optimizer", f"--json_out={json_path}"] + (["--smoke"] if smoke else [])
    raise ValueError(f"unknown part {name!r}; expected one of {sorted(PART_TIMEOUTS)}")


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        code, out, timed_out = proc.returncode, proc.stdout + proc.stderr, False
    except subprocess.TimeoutExpired as error:
        code, timed_out = None, True
        out = "".join(s.decode(errors="replace") if isinstance(s, bytes) else s
                      for s in (error.stdout or "", error.stderr or ""))
    return {"argv": cmd, "returncode": code, "timed_out": timed_out, "seconds": round(time.monotonic() - start, 1),
            "output_tail": out[-4000:]}


def environment() -> dict[str, Any]:
    """Device, driver, CUDA and package versions of this run."""
    import jax

    device = jax.devices()[0]
    env: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(), "machine": platform.machine(),
        "platform": device.platform, "device_kind": device.device_kind, "device_count": jax.device_count(),
        "compute_capability": getattr(device, "compute_capability", None),
        "versions": {},
    }
    for name in VERSIONED:
        try:
            env["versions"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        cuda = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
        env["cuda_version"] = next((line.split("CUDA Version:")[1].split("|")[0].strip()
                                    for line in cuda.splitlines() if "CUDA Version:" in line), None)
    except (OSError, subprocess.TimeoutExpired) as error:
        env["nvidia_smi"] = f"not available: {error}"
    return env


def install_bitsandbytes(wheel_dir: str) -> str:
    """Installs a carried bitsandbytes wheel if bitsandbytes does not import; says what happened."""
    probe = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, timeout=120)
    if probe.returncode == 0:
        return "bitsandbytes imports"
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "bitsandbytes-*.whl")))
    if not wheels:
        return (f"bitsandbytes does not import and no wheel in {wheel_dir}/ (pip download bitsandbytes==0.50.2 "
                f"--no-deps -d {wheel_dir}/ beforehand); its rows are skipped")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", wheels[-1]],
                          capture_output=True, text=True, timeout=180)
    if proc.returncode:
        return f"installing {wheels[-1]} failed: {proc.stderr[-500:]}"
    return f"installed {wheels[-1]}"


# ------------------------------------------------------------------ part: correctness (in-process)


def _check_matmuls(record: Callable[..., None], backends: list[str], x, dy, qt, *, smoke: bool) -> None:
    """Forward and input gradient of each backend against float32 products of the dequantized weight."""
    import jax
    import jax.numpy as jnp

    from qlora_jax import kernels
    from qlora_jax.quant import dequantize

    (m, k), n = x.shape, qt.shape[0]
    interpret = smoke
    w32 = dequantize(qt, jnp.bfloat16).astype(jnp.float32)
    highest = jax.lax.Precision.HIGHEST
    exact_y = jnp.dot(x.astype(jnp.float32), w32.T, precision=highest)
    exact_dx = jnp.dot(dy.astype(jnp.float32), w32, precision=highest)
    bound_y = jnp.dot(jnp.abs(x.astype(jnp.float32)), jnp.abs(w32).T, precision=highest)
    bound_dx = jnp.dot(jnp.abs(dy.astype(jnp.float32)), jnp.abs(w32), precision=highest)
    for backend in backends:
        if backend == "mosaic" and smoke and m > 8:
            continue  # the Mosaic GPU interpreter is slow
        for op, fn, args, exact, bound, red in (
            ("forward", kernels.quantized_matmul, (x, qt), exact_y, bound_y, k),
            ("input_grad", kernels.quantized_matmul_grad, (dy, qt), exact_dx, bound_dx, n),
        ):
            chosen, _ = kernels.resolve_backend("matmul" if op == "forward" else "matmul_grad", qt,
                                                dtype=jnp.bfloat16, m=m, backend=backend, interpret=interpret)
            try:
                got = jax.jit(lambda *a, f=fn, b=backend: f(*a, backend=b, interpret=interpret))(*args)
                got = got.astype(jnp.float32)
                # bf16 rounding of the result plus float32 accumulation in any order.
                tol = 2.0**-8 * jnp.abs(exact) + 4 * red * 2.0**-24 * bound + 1e-30
                worst = float(jnp.max(jnp.abs(got - exact) / tol))
                finite = bool(jnp.all(jnp.isfinite(got)))
                record(check=op, backend=backend, ran=chosen, shape=f"{m}x{n}x{k}", worst_error_over_bound=worst,
                       passed=finite and worst <= 1.0)
            except Exception as error:  # noqa: BLE001 - a failing kernel fails its row, not the part
                record(check=op, backend=backend, ran=chosen, shape=f"{m}x{n}x{k}", passed=False,
                       error=f"{type(error).__name__}: {str(error)[:300]}")


def _check_quantize_kernels(record: Callable[..., None], w, qt, *, interpret: bool) -> None:
    """The fused dequantize and quantize kernels against the library's, bit for bit."""
    import jax
    import jax.numpy as jnp

    from qlora_jax import kernels
    from qlora_jax.quant import dequantize, quantize

    n, k = w.shape
    for backend in ("jax_triton", "pallas_triton"):
        try:
            deq = jax.jit(lambda q, b=backend: kernels.dequantize_fused(q, jnp.bfloat16, backend=b,
                                                                        interpret=interpret))(qt)
            same = bool(jnp.all(deq == dequantize(qt, jnp.bfloat16)))
            record(check="dequantize", backend=backend, ran=backend, shape=f"{n}x{k}", passed=same)
            ours = jax.jit(lambda a, b=backend: kernels.quantize_fused(a, backend=b, interpret=interpret))(w)
            ref = quantize(w, "nf4", blocksize=64, double_quant=True, bnb_backend="cuda")
            same = all(bool(jnp.array_equal(getattr(ours, f), getattr(ref, f)))
                       for f in ("codes", "scales", "nested_scales", "offset"))
            record(check="quantize", backend=backend, ran=backend, shape=f"{n}x{k}", passed=same)
        except Exception as error:  # noqa: BLE001
            record(check="dequantize/quantize", backend=backend, ran=backend, shape=f"{n}x{k}", passed=False,
                   error=f"{type(error).__name__}: {str(error)[:300]}")


def correctness(smoke: bool) -> list[dict[str, Any]]:
    """Each kernel backend, compiled for this device (interpreters with ``smoke``), against XLA."""
    import jax.numpy as jnp
    import numpy as np

    from qlora_jax import kernels
    from qlora_jax.quant import quantize

    target = kernels.current_target()
    backends = ["jax_triton", "pallas_triton"]
    if smoke or (target.compute_capability or (0, 0)) >= (9, 0):
        backends.append("mosaic")
    if smoke:
        shapes = [(3, 64, 128)]
    else:
        shapes = [(1, 4096, 4096), (16, 11008, 4096), (256, 4096, 11008), (4096, 4096, 4096)]
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []

    def record(**row):
        logging.info("%s", row)
        rows.append(row)

    for m, n, k in shapes:
        w = jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.bfloat16)
        qt = quantize(w, "nf4", blocksize=64, double_quant=True)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
        _check_matmuls(record, backends, x, dy, qt, smoke=smoke)
        _check_quantize_kernels(record, w, qt, interpret=smoke)
    return rows


# ------------------------------------------------------------------ tables


def _md(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "-" if v is None else str(v).replace("|", "/").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _train_table(data: dict[str, Any]) -> str:
    gib = 2**30
    rows = []
    for r in data.get("results", []):
        if "error" in r:
            rows.append([r.get("impl"), None, None, None, None, None, f"failed: {r['error']}"])
            continue
        peak = r.get("peak_device_bytes")
        planned = r.get("planned_device_bytes")
        rows.append([r.get("impl"), r.get("tokens_per_second"), (r.get("step_seconds_median") or 0) * 1e3,
                     peak / gib if peak else None, planned / gib if planned else None, r.get("planned_over_measured"),
                     ""])
    return _md(["impl", "tokens/s", "step ms (median)", "peak device GiB", "planned GiB", "planned/measured", "note"],
               rows)


def _generic_table(records: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in records:
        keys += [k for k, v in r.items() if k not in keys and not isinstance(v, (dict, list))]
    return _md(keys, [[r.get(k) for k in keys] for r in records])


def markdown(report: dict[str, Any]) -> str:
    """The Markdown tables of a run (what BENCHMARKS.md takes)."""
    from qlora_jax.kernels import benchmark

    env = report["environment"]
    smoke = " (SMOKE: tiny shapes on CPU, not figures)" if report["smoke"] else ""
    device = f"{env.get('device_kind')} x{env.get('device_count')} ({env.get('platform')})"
    out = [f"# GPU evidence run, {env.get('date_utc')}{smoke}",
           "", _md(["", ""], [["device", device],
                              ["nvidia-smi", env.get("nvidia_smi")], ["CUDA", env.get("cuda_version")],
                              ["compute capability", env.get("compute_capability")],
                              ["python", env.get("python")], ["bitsandbytes", report.get("bitsandbytes")],
                              *[[k, v] for k, v in env.get("versions", {}).items()]]),
           "", "## Parts", "",
           _md(["part", "status", "seconds", "command"],
               [[name, "timed out" if p["timed_out"] else ("ok" if p["returncode"] == 0 else f"exit {p['returncode']}"),
                 p["seconds"], " ".join(p["argv"][1:])] for name, p in report["parts"].items()])]
    parts = report["parts"]
    if parts.get("correctness", {}).get("json"):
        rows = parts["correctness"]["json"]["rows"]
        out += ["", "## Kernel correctness (compiled for this device, against XLA)", "",
                _md(["check", "backend", "ran", "shape", "worst error / bound", "passed", "error"],
                    [[r["check"], r["backend"], r["ran"], r["shape"], r.get("worst_error_over_bound"), r["passed"],
                      r.get("error", "")] for r in rows])]
    if parts.get("kernels", {}).get("json"):
        records = benchmark.records_from_json(parts["kernels"]["json"]["records"])
        out += ["", "## Kernels (bench_kernels)", "", benchmark.format_markdown(records)]
    for name, title in (("train_7b", "Train step, LLaMA-7B shapes, with transformers + peft + bitsandbytes"),
                        ("train_65b", "Train step, LLaMA-65B shapes: peak device memory vs the planner")):
        if parts.get(name, {}).get("json"):
            out += ["", f"## {title}", "", _train_table(parts[name]["json"])]
    moe = parts.get("moe", {}).get("json")
    if moe:
        out += ["", f"## MoE expert matmul (bench_moe): {moe['shapes']}, {moe['routed_rows']} routed rows, "
                f"grouped backend {moe['grouped_backend'][0]} ({moe['grouped_backend'][1]})", "",
                _generic_table(moe["rows"])]
    optimizer = parts.get("optimizer", {}).get("json")
    if optimizer:
        records = optimizer.get("records", optimizer) if isinstance(optimizer, dict) else optimizer
        if isinstance(records, list) and records and all(isinstance(r, dict) for r in records):
            out += ["", "## Optimizer (bench_optimizer)", "", _generic_table(records)]
        else:
            out += ["", "## Optimizer (bench_optimizer)", "", "```", json.dumps(optimizer, indent=1)[:3000], "```"]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ main


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.part is not None:
        if FLAGS.part != "correctness" or not FLAGS.json_out:
            raise app.UsageError("--part=correctness needs --json_out")
        rows = correctness(FLAGS.smoke)
        pathlib.Path(FLAGS.json_out).write_text(json.dumps({"rows": rows}, indent=1))
        if not all(r["passed"] for r in rows):
            raise SystemExit(1)
        return
    unknown = [p for p in FLAGS.parts if p not in PART_TIMEOUTS]
    if unknown:
        raise app.UsageError(f"--parts: unknown {unknown}; expected some of {list(PART_TIMEOUTS)}")
    started = time.monotonic()
    out_dir = pathlib.Path(FLAGS.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ}
    if FLAGS.smoke:
        env["JAX_PLATFORMS"] = "cpu"
        os.environ["JAX_PLATFORMS"] = "cpu"
    report: dict[str, Any] = {"smoke": FLAGS.smoke, "environment": environment(), "parts": {}}
    report["bitsandbytes"] = "not used (smoke)" if FLAGS.smoke else install_bitsandbytes(FLAGS.wheel_dir)
    logging.info("environment: %s", report["environment"])
    for name in FLAGS.parts:
        left = FLAGS.budget_s - (time.monotonic() - started)
        timeout = SMOKE_TIMEOUT if FLAGS.smoke else min(PART_TIMEOUTS[name], left)
        json_path = out_dir / f"{name}.json"
        json_path.unlink(missing_ok=True)
        if timeout < 10:
            report["parts"][name] = {"argv": [], "returncode": None, "timed_out": True, "seconds": 0,
                                     "output_tail": "skipped: the budget was spent", "json": None}
            continue
        logging.info("part %s (timeout %d s)", name, timeout)
        result = _run(part_command(name, str(json_path), FLAGS.smoke), timeout, env)
        result["json"] = json.loads(json_path.read_text()) if json_path.exists() else None
        report["parts"][name] = result
        logging.info("part %s: exit %s in %.1f s", name, result["returncode"], result["seconds"])
    report["seconds"] = round(time.monotonic() - started, 1)
    (out_dir / "bench_gpu.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "bench_gpu.md").write_text(markdown(report))
    logging.info("wrote %s and %s in %.0f s", out_dir / "bench_gpu.json", out_dir / "bench_gpu.md", report["seconds"])
    failed = [n for n, p in report["parts"].items() if p["returncode"] != 0 and n not in FLAGS.tolerate]
    if failed:
        logging.error("parts that did not pass: %s", failed)
        raise SystemExit(1)


if __name__ == "__main__":
    cli.run(main, __name__)
