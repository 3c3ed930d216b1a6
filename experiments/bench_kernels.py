r"""Kernel benchmark: 4-bit fused matmul, input gradient, quantize and dequantize vs bf16, XLA and bitsandbytes.

    python -m experiments.bench_kernels                      # LLaMA-7B shapes, M = 1 ... 16384 (GPU)
    python -m experiments.bench_kernels --json_out=bench.json
    python -m experiments.bench_kernels --smoke              # tiny shapes, interpreters: runs on CPU

Prints one table: per weight shape [N, K] and token count M, the time, GB/s and TFLOP/s of ours
(each backend; ``auto`` shows what it resolved to), of ``jnp.dot`` on a bf16 weight, of XLA's
dequantize-then-dot, and of bitsandbytes (dequantize + matmul, ``gemv_4bit`` at M = 1) when torch
and bitsandbytes import in this process; then the speedup of every row over each baseline, all
measured side by side in the same run. The harness is :mod:`qlora_jax.kernels.benchmark`.
"""

from __future__ import annotations

import json
import pathlib
import platform

from absl import flags

from . import cli

FLAGS = flags.FLAGS
flags.DEFINE_bool("smoke", False, "Tiny shapes, Pallas interpreters, 1 iteration: a CPU check of the harness.")
flags.DEFINE_list("shapes", ["4096x4096", "11008x4096", "4096x11008"], "Weight shapes NxK ([out, in]).")
flags.DEFINE_list("m", ["1", "16", "256", "4096", "16384"], "Token counts M (rows of x).")
flags.DEFINE_list("directions", ["forward", "input_grad"], "forward (x @ W.T) and/or input_grad (dy @ W).")
flags.DEFINE_list("backends", ["auto", "jax_triton", "pallas_triton", "mosaic"], "Our backends to time.")
flags.DEFINE_integer("blocksize", 64, "Quantization block size.")
flags.DEFINE_bool("double_quant", True, "Double-quantized scales (QLoRA).")
flags.DEFINE_integer("warmup", 3, "Untimed calls before measuring.")
flags.DEFINE_integer("iters", 20, "Measurements; the median is reported.")
flags.DEFINE_enum("timer", "cupti", ["cupti", "wall"], "JAX timer on GPU: CUPTI kernel time or wall clock.")
flags.DEFINE_bool("bnb", True, "Also time bitsandbytes through torch when importable.")
flags.DEFINE_bool("quantize", True, "Also time the quantize and dequantize kernels.")
flags.DEFINE_string("json_out", "", "Write every record (and the environment) to this JSON file.")


def main(argv: list[str]) -> None:
    del argv
    import warnings

    import jax
    from qlora_jax.kernels import benchmark

    warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*", category=DeprecationWarning)
    if FLAGS.smoke:
        shapes, ms = [(64, 128)], [1, 16]
        options = dict(warmup=1, iters=1, timer="wall", interpret=True, include_bnb=False)
    else:
        shapes = [tuple(int(d) for d in s.lower().split("x")) for s in FLAGS.shapes]
        ms = [int(m) for m in FLAGS.m]
        options = dict(warmup=FLAGS.warmup, iters=FLAGS.iters, timer=FLAGS.timer, interpret=False,
                       include_bnb=FLAGS.bnb)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
          f"python {platform.python_version()}")
    backends = FLAGS.backends
    if device.platform != "gpu" and not FLAGS.smoke:
        backends = [b for b in backends if b in ("auto", "xla")]
        print(f"no GPU: the Pallas kernels need one (or --smoke for their interpreters); timing backends {backends}")
    environment = {"device_kind": device.device_kind, "platform": device.platform, "jax": jax.__version__,
                   "python": platform.python_version()}

    def save(records):
        if FLAGS.json_out:
            path = pathlib.Path(FLAGS.json_out)
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = [{**r.__dict__, "gbps": r.gbps, "tflops": r.tflops} for r in records]
            path.write_text(json.dumps({"environment": environment, "records": rows}, indent=1))

    # Saved after every record: a run stopped by a time limit keeps what it measured.
    records = benchmark.run(shapes, ms, directions=FLAGS.directions, backends=backends,
                            blocksize=FLAGS.blocksize, double_quant=FLAGS.double_quant,
                            include_quantize=FLAGS.quantize, on_record=save, **options)
    print("\n" + benchmark.format_table(records))
    # Our rows must run and agree with XLA; a baseline that fails (e.g. a bitsandbytes API change)
    # is reported in the table but does not fail the run.
    failures = [r for r in records if r.impl.startswith("ours") and (r.time_us is None or "MISMATCH" in r.note)]
    save(records)
    if FLAGS.json_out:
        print(f"records: {FLAGS.json_out}")
    if failures:
        print(f"\n{len(failures)} row(s) failed or disagree with XLA:")
        print(benchmark.format_table(failures, ratios=False))
        raise SystemExit(1)


if __name__ == "__main__":
    cli.run(main, __name__)
