"""Benchmark harness for the kernels (used by ``experiments/bench_kernels.py``).

For each weight shape ``[N, K]`` and token count ``M`` it times, in one process and one run:

* ours (``quantized_matmul`` / ``quantized_matmul_grad`` with each requested backend, the
  backend ``"auto"`` resolved to shown in the label; ``jax_triton`` autotuned on the first call,
  during the warm-up),
* ``jnp.dot`` on a bf16 weight (what the 4-bit weight replaces),
* XLA dequantize-then-dot (``backend="xla"``),
* bitsandbytes through torch when both import in this process with CUDA: dequantize + matmul,
  and ``gemv_4bit`` at M = 1,

and per shape the quantize and dequantize kernels (``quantize_backends``) against XLA (and bitsandbytes). Times are
medians over ``iters`` measurements after ``warmup`` calls. On a GPU, JAX functions are timed with
CUPTI (summed kernel time per call, no launch overhead; ``timer="cupti"``) and torch functions
with CUDA events around a CUDA-graph replay; elsewhere (``timer="wall"``) by wall clock around
``block_until_ready``. Every row of ours also records its largest difference to the XLA result, so
a kernel that is fast but wrong shows up in the same table.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from qlora_jax.kernels import matmul_triton, ops
from qlora_jax.kernels import tiles as tiles_lib

from qlora_jax.quant import QuantizedTensor

__all__ = [
    "LLAMA_7B_SHAPES",
    "DEFAULT_MS",
    "BenchRecord",
    "time_jax",
    "run",
    "format_table",
    "format_markdown",
    "records_from_json",
    "nf4_weight_bytes",
]

logger = logging.getLogger(__name__)

LLAMA_7B_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # [N, K] = [out, in]: q/k/v/o, gate/up, down
DEFAULT_MS = (1, 16, 256, 4096, 16384)


@dataclasses.dataclass
class BenchRecord:
    """One timed implementation of one problem. ``time_us`` is None when it could not run."""

    op: str  # "forward", "input_grad", "quantize", "dequantize"
    n: int
    k: int
    m: int | None
    impl: str
    time_us: float | None
    timer: str
    bytes_moved: float
    flops: float
    note: str = ""

    @property
    def gbps(self) -> float | None:
        return None if not self.time_us else self.bytes_moved / (self.time_us * 1e-6) / 1e9

    @property
    def tflops(self) -> float | None:
        return None if not self.time_us or not self.flops else self.flops / (self.time_us * 1e-6) / 1e12


def nf4_weight_bytes(n: int, k: int, blocksize: int, double_quant: bool) -> float:
    """Bytes of a packed 4-bit weight: codes, scales (1 or 4 bytes per block) and nested scales."""
    blocks = n * k / blocksize
    return n * k / 2 + blocks * (1 if double_quant else 4) + (math.ceil(blocks / 256) * 4 + 4 if double_quant else 0)


def _on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def time_jax(fn: Callable[..., Any], *args: Any, warmup: int, iters: int, timer: str) -> tuple[float, str]:
    """Median seconds per call of the jitted ``fn(*args)``, and the timer actually used."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    if timer == "cupti":
        try:
            from jax.experimental.mosaic.gpu import profiler

            _, times_ms = profiler.measure(fn, iterations=iters)(*args)
            if times_ms:
                times_ms = times_ms if isinstance(times_ms, list) else [times_ms]
                return statistics.median(times_ms) * 1e-3, "cupti"
        except Exception:  # noqa: BLE001 - CUPTI may be unavailable; fall back to the wall clock.
            pass
    samples = []
    reps = 10 if _on_gpu() else 1
    for _ in range(iters):
        start = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples), "wall"


def _time_torch(fn: Callable[[], Any], *, warmup: int, iters: int) -> tuple[float, str]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    reps = 10
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    method = "cuda-graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        run_once = graph.replay
    except Exception:  # noqa: BLE001 - not every op can be captured; time the eager loop instead.
        method = "cuda-events"
        torch.cuda.synchronize()

        def run_once():
            for _ in range(reps):
                fn()

    samples = []
    for _ in range(iters):
        start.record()
        run_once()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3 / reps)
    return statistics.median(samples), method


class _Bnb:
    """bitsandbytes on the same weight, when torch and bitsandbytes import with a CUDA device."""

    def __init__(self, w_bf16: jax.Array, blocksize: int, double_quant: bool):
        import bitsandbytes.functional as F
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        self.torch, self.F = torch, F
        w = torch.from_numpy(np.asarray(w_bf16.astype(jnp.float32))).to("cuda", torch.bfloat16)
        self.w = w
        self.packed, self.state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                                  quant_type="nf4")
        self.blocksize, self.double_quant = blocksize, double_quant

    def tensor(self, a: jax.Array):
        return self.torch.from_numpy(np.asarray(a.astype(jnp.float32))).to("cuda", self.torch.bfloat16)

    def forward(self, x):
        return lambda: self.torch.matmul(x, self.F.dequantize_4bit(self.packed, self.state).t())

    def gemv(self, x):
        # bnb.matmul_4bit(x, W.t()) calls F.gemv_4bit(x, W, state=...) for a single token; call it
        # directly so that no dispatch rule picks another path.
        gemv = getattr(self.F, "gemv_4bit", None)
        if gemv is not None:
            return lambda: gemv(x, self.packed, state=self.state)
        import bitsandbytes as bnb

        return lambda: bnb.matmul_4bit(x, self.packed.t(), quant_state=self.state)

    def input_grad(self, dy):
        return lambda: self.torch.matmul(dy, self.F.dequantize_4bit(self.packed, self.state))

    def quantize(self):
        return lambda: self.F.quantize_4bit(self.w, blocksize=self.blocksize, compress_statistics=self.double_quant,
                                            quant_type="nf4")

    def dequantize(self):
        return lambda: self.F.dequantize_4bit(self.packed, self.state)


def _close_to(reference: jax.Array) -> Callable[[jax.Array], str]:
    """A check: the largest difference to the XLA result, relative to its largest magnitude."""
    expected = np.asarray(reference.astype(jnp.float32))

    def check(result: jax.Array) -> str:
        got = np.asarray(result.astype(jnp.float32))
        diff = float(np.max(np.abs(got - expected)) / max(float(np.max(np.abs(expected))), 1e-30))
        return f"max rel diff vs xla {diff:.1e}" + ("  MISMATCH" if not diff <= 2**-6 else "")

    return check


def _same_bytes(reference: QuantizedTensor) -> Callable[[QuantizedTensor], str]:
    """A check: every array of the quantized tensor equals XLA's, byte for byte."""

    def check(result: QuantizedTensor) -> str:
        same = all(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
                   for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(reference), strict=True))
        return "bytes identical to xla" if same else "bytes differ from xla  MISMATCH"

    return check


def _triton_with_lookup(direction: str, m: int, n: int, k: int, lookup: str, interpret: bool) -> Callable[..., Any]:
    """The Triton kernel with the size class's tiles but another code ``lookup``, jitted."""
    num_sms = ops.current_target().num_sms
    if direction == "forward":
        tiles = dataclasses.replace(tiles_lib.matmul_tiles(m, n, k, num_sms), lookup=lookup)
        return jax.jit(lambda a, q: matmul_triton.fused_matmul(a, q, tiles=tiles, interpret=interpret))
    tiles = dataclasses.replace(tiles_lib.matmul_grad_tiles(m, n, k, num_sms), lookup=lookup)
    return jax.jit(lambda a, q: matmul_triton.fused_matmul_grad(a, q, tiles=tiles, interpret=interpret))


@dataclasses.dataclass
class _Recorder:
    """Times one implementation per :meth:`add` and keeps its record (the body of every row)."""

    warmup: int
    iters: int
    timer: str
    log: Callable[[str], None]
    on_record: Callable[[list[BenchRecord]], None] | None
    records: list[BenchRecord] = dataclasses.field(default_factory=list)

    def add(self, op: str, shape: tuple[int, int], m: int | None, impl: str, fn: Callable[..., Any] | None,
            args: tuple[Any, ...], bytes_moved: float, flops: float, check: Callable[[Any], str] | None = None,
            torch_fn: Callable[[], Any] | None = None) -> None:
        """Times ``fn(*args)`` (or ``torch_fn()``), checks its result, records and logs the row.

        A failure is recorded in the row's note and does not stop the benchmark.
        """
        note = ""
        try:
            if torch_fn is not None:
                seconds, method = _time_torch(torch_fn, warmup=self.warmup, iters=self.iters)
            else:
                seconds, method = time_jax(fn, *args, warmup=self.warmup, iters=self.iters, timer=self.timer)
                if check is not None:
                    note = check(fn(*args))
            time_us = seconds * 1e6
        except Exception as error:  # noqa: BLE001 - record the failure, keep benchmarking
            time_us, method, note = None, self.timer, f"failed: {type(error).__name__}: {str(error)[:120]}"
        record = BenchRecord(op, *shape, m, impl, time_us, method, bytes_moved, flops, note)
        self.records.append(record)
        self.log(format_table([record], header=False, ratios=False))
        if self.on_record is not None:
            self.on_record(self.records)


@dataclasses.dataclass(frozen=True)
class _Weight:
    """One benchmarked weight ``[N, K]``: bf16, its NF4 form (reference quantizer) and that dequantized."""

    w: jax.Array
    qt: QuantizedTensor
    w_deq: jax.Array
    q_bytes: float
    bnb: _Bnb | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)


def _make_weight(key: jax.Array, n: int, k: int, blocksize: int, double_quant: bool, include_bnb: bool,
                 log: Callable[[str], None]) -> _Weight:
    """A random bf16 weight ``[N, K]`` drawn from ``key``, quantized to NF4, with bitsandbytes' if asked."""
    w = (jax.random.normal(key, (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
    # The benchmark's weight comes from the reference quantizer: a failing kernel must only fail
    # its own row, not the set-up.
    qt = ops.quantize_fused(w, "nf4", blocksize=blocksize, double_quant=double_quant, backend="xla")
    w_deq = ops.dequantize_fused(qt, jnp.bfloat16, backend="xla")
    bnb = None
    if include_bnb:
        try:
            bnb = _Bnb(w, blocksize, double_quant)
        except Exception as error:  # noqa: BLE001 - bitsandbytes is optional
            log(f"[{n}x{k}] bitsandbytes not benchmarked: {type(error).__name__}: {error}")
    return _Weight(w, qt, w_deq, nf4_weight_bytes(n, k, blocksize, double_quant), bnb)


def _bench_quantize(rec: _Recorder, weight: _Weight, backends: Sequence[str], *, blocksize: int,
                    double_quant: bool, interpret: bool) -> None:
    """Rows of the quantize and dequantize kernels per backend, XLA and bitsandbytes on ``weight``."""
    n, k = weight.shape

    def quantizer(backend: str) -> Callable[[jax.Array], QuantizedTensor]:
        return jax.jit(lambda w: ops.quantize_fused(w, "nf4", blocksize=blocksize, double_quant=double_quant,
                                                    backend=backend, interpret=interpret, check_finite=False))

    def dequantizer(backend: str) -> Callable[[QuantizedTensor], jax.Array]:
        return jax.jit(lambda q: ops.dequantize_fused(q, jnp.bfloat16, backend=backend, interpret=interpret))

    quant_xla, deq_xla = quantizer("xla"), dequantizer("xla")
    bytes_q = n * k * 2 + weight.q_bytes
    for backend in backends:
        rec.add("quantize", (n, k), None, f"ours {backend}", quantizer(backend), (weight.w,), bytes_q, 0,
                check=_same_bytes(quant_xla(weight.w)))
        rec.add("dequantize", (n, k), None, f"ours {backend}", dequantizer(backend), (weight.qt,), bytes_q, 0,
                check=_close_to(weight.w_deq))
    rec.add("quantize", (n, k), None, "xla", quant_xla, (weight.w,), bytes_q, 0)
    rec.add("dequantize", (n, k), None, "xla", deq_xla, (weight.qt,), bytes_q, 0)
    if weight.bnb is not None:
        rec.add("quantize", (n, k), None, "bitsandbytes", None, (), bytes_q, 0, torch_fn=weight.bnb.quantize())
        rec.add("dequantize", (n, k), None, "bitsandbytes", None, (), bytes_q, 0, torch_fn=weight.bnb.dequantize())


def _entry_point(direction: str, backend: str, interpret: bool) -> Callable[[jax.Array, QuantizedTensor], jax.Array]:
    """``quantized_matmul`` (forward) or ``quantized_matmul_grad`` (input gradient) with ``backend``, jitted."""
    fn = ops.quantized_matmul if direction == "forward" else ops.quantized_matmul_grad
    return jax.jit(lambda a, q: fn(a, q, backend=backend, interpret=interpret))


def _bench_matmul(rec: _Recorder, weight: _Weight, direction: str, m: int, a: jax.Array,
                  backends: Sequence[str], interpret: bool) -> None:
    """Rows of one direction at M rows: bf16 dot, XLA, each backend of ours, bitsandbytes."""
    n, k = weight.shape
    out = n if direction == "forward" else k
    flops = 2.0 * m * n * k
    act_bytes = a.size * 2 + m * out * 2
    dot_bf16 = jax.jit((lambda a, w: a @ w.T) if direction == "forward" else (lambda a, w: a @ w))
    xla = _entry_point(direction, "xla", False)
    reference = xla(a, weight.qt)
    rec.add(direction, (n, k), m, "jnp.dot bf16", dot_bf16, (a, weight.w_deq), act_bytes + n * k * 2, flops)
    rec.add(direction, (n, k), m, "xla dequant+dot", xla, (a, weight.qt), act_bytes + weight.q_bytes, flops)
    for backend in backends:
        if backend == "mosaic" and interpret and m > 64:
            continue  # the Mosaic GPU interpreter is too slow for big tiles on CPU
        op_name = "matmul" if direction == "forward" else "matmul_grad"
        chosen, _ = ops.resolve_backend(op_name, weight.qt, dtype=a.dtype, m=m, backend=backend, interpret=interpret)
        label = f"ours {backend}" + (f"->{chosen}" if chosen != backend else "")
        rec.add(direction, (n, k), m, label, _entry_point(direction, backend, interpret), (a, weight.qt),
                act_bytes + weight.q_bytes, flops, check=_close_to(reference))
        if backend == "pallas_triton" and chosen == "pallas_triton":
            # The other code lookup (select tree instead of a table gather), same tiles.
            ours = _triton_with_lookup(direction, m, n, k, "select", interpret)
            rec.add(direction, (n, k), m, "ours pallas_triton lut=select", ours, (a, weight.qt),
                    act_bytes + weight.q_bytes, flops, check=_close_to(reference))
    if weight.bnb is not None:
        ta = weight.bnb.tensor(a)
        fn = weight.bnb.forward(ta) if direction == "forward" else weight.bnb.input_grad(ta)
        rec.add(direction, (n, k), m, "bnb dequant+matmul", None, (), act_bytes + weight.q_bytes, flops, torch_fn=fn)
        if direction == "forward" and m == 1:
            rec.add(direction, (n, k), m, "bnb gemv_4bit", None, (), act_bytes + weight.q_bytes, flops,
                    torch_fn=weight.bnb.gemv(ta))


def run(
    shapes: Sequence[tuple[int, int]] = LLAMA_7B_SHAPES,
    ms: Sequence[int] = DEFAULT_MS,
    *,
    directions: Sequence[str] = ("forward", "input_grad"),
    backends: Sequence[str] = ("auto", "jax_triton", "pallas_triton", "mosaic"),
    blocksize: int = 64,
    double_quant: bool = True,
    warmup: int = 3,
    iters: int = 20,
    timer: str = "cupti",
    interpret: bool = False,
    include_bnb: bool = True,
    include_quantize: bool = True,
    quantize_backends: Sequence[str] = ("jax_triton", "pallas_triton"),
    seed: int = 0,
    log: Callable[[str], None] = logger.info,
    on_record: Callable[[list[BenchRecord]], None] | None = None,
) -> list[BenchRecord]:
    """Times every implementation for every shape and M; see the module docstring.

    ``on_record`` is called with all records so far after each one (e.g. to save them, so that a
    run stopped by a time limit keeps what it measured).
    """
    if timer == "cupti" and not _on_gpu():
        timer = "wall"
    rec = _Recorder(warmup, iters, timer, log, on_record)
    key = jax.random.key(seed)
    for n, k in shapes:
        key, wkey = jax.random.split(key)
        weight = _make_weight(wkey, n, k, blocksize, double_quant, include_bnb, log)
        if include_quantize and (interpret or _on_gpu()):
            _bench_quantize(rec, weight, quantize_backends, blocksize=blocksize, double_quant=double_quant,
                            interpret=interpret)
        for m in ms:
            key, xkey = jax.random.split(key)
            for direction in directions:
                red = k if direction == "forward" else n
                a = jax.random.normal(xkey, (m, red), jnp.float32).astype(jnp.bfloat16)
                _bench_matmul(rec, weight, direction, m, a, backends, interpret)
    return rec.records


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


_BASELINES = {"jnp.dot bf16": "bf16", "xla dequant+dot": "xla", "xla": "xla", "bnb dequant+matmul": "bnb",
              "bitsandbytes": "bnb"}


def _speedups(records: Sequence[BenchRecord]) -> list[dict[str, float | None]]:
    """Per record, its speedup over the bf16 dot, XLA and bitsandbytes on the same problem
    (baseline time / this time: above 1 means faster than the baseline)."""
    baselines: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r.time_us and r.impl in _BASELINES:
            baselines.setdefault((r.op, r.n, r.k, r.m), {})[_BASELINES[r.impl]] = r.time_us
    out = []
    for r in records:
        base = baselines.get((r.op, r.n, r.k, r.m), {})
        out.append({kind: (base[kind] / r.time_us if kind in base and r.time_us else None)
                    for kind in ("bf16", "xla", "bnb")})
    return out


def format_table(records: Sequence[BenchRecord], *, header: bool = True, ratios: bool = True) -> str:
    """A plain-text table; with ``ratios``, each row's speedup over the bf16 dot, XLA and bitsandbytes
    on the same problem (baseline time / this time: above 1 means faster than the baseline)."""
    lines = []
    if header:
        lines.append(
            f"{'op':<11} {'N x K':>12} {'M':>6} {'impl':<26} {'time us':>10} {'GB/s':>8} {'TFLOP/s':>8} "
            + (f"{'vs bf16':>8} {'vs xla':>8} {'vs bnb':>8} " if ratios else "")
            + f"{'timer':<11} note"
        )
    for r, speedup in zip(records, _speedups(records), strict=True):
        line = (
            f"{r.op:<11} {f'{r.n}x{r.k}':>12} {('-' if r.m is None else r.m):>6} {r.impl:<26} "
            f"{_fmt(r.time_us, '10.1f'):>10} {_fmt(r.gbps, '8.1f'):>8} {_fmt(r.tflops, '8.1f'):>8} "
        )
        if ratios:
            line += "".join(f"{_fmt(speedup[kind], '8.2f'):>8} " for kind in ("bf16", "xla", "bnb"))
        lines.append(line + f"{r.timer:<11} {r.note}")
    return "\n".join(lines)


def format_markdown(records: Sequence[BenchRecord]) -> str:
    """The same table as :func:`format_table` (with speedups) in Markdown, for BENCHMARKS.md."""
    lines = ["| op | N x K | M | impl | time us | GB/s | TFLOP/s | vs bf16 | vs xla | vs bnb | timer | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, speedup in zip(records, _speedups(records), strict=True):
        cells = [r.op, f"{r.n}x{r.k}", "-" if r.m is None else str(r.m), r.impl, _fmt(r.time_us, ".1f"),
                 _fmt(r.gbps, ".1f"), _fmt(r.tflops, ".1f"), *(_fmt(speedup[k], ".2f") for k in ("bf16", "xla", "bnb")),
                 r.timer, r.note.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def records_from_json(rows: Sequence[dict[str, Any]]) -> list[BenchRecord]:
    """BenchRecords back from the ``records`` of ``bench_kernels --json_out``."""
    names = [f.name for f in dataclasses.fields(BenchRecord)]
    return [BenchRecord(**{k: row[k] for k in names if k in row}) for row in rows]
