r"""Time to a ready model, and peak host memory: from the source checkpoint vs from save_quantized.

    python -m experiments.bench_load [--model=embedded] [--repeats=3]

Saves the model's quantized base once (``save_quantized``), then loads it ``--repeats`` times each
way, alternating, each load in a fresh subprocess so that its peak host memory (the process
high-water mark, ``ru_maxrss``) is its own:

* ``source``: ``load_pretrained(model)``: read the checkpoint (GGUF for "embedded": dequantize its
  Q4_1 tensors) and quantize every linear weight to NF4 + double quantization;
* ``saved``: ``load_pretrained(<saved dir>)``: restore the packed arrays with Orbax.

Printed per way (median over repeats): the load call, the process from start to a ready model
(interpreter and imports included), the peak RSS; and whether both gave the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags, logging

from . import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_string("model", "embedded", "A Hugging Face folder, a .gguf file, or 'embedded' (SmolLM2-135M).")
flags.DEFINE_enum("quant", "nf4", ["nf4", "fp4", "int8"], "How the base is quantized.")
flags.DEFINE_integer("repeats", 3, "Loads per way (alternating).")
flags.DEFINE_string("workdir", None, "Where to save the quantized base (default: a temporary directory).")
flags.DEFINE_enum("child", None, ["save", "source", "saved"], "Internal: run one step in this process.")
flags.DEFINE_string("saved", None, "Internal: the saved directory.")
flags.DEFINE_float("spawned_at", None, "Internal: time.time() when the parent started this process.")


def _child() -> None:
    import jax
    import numpy as np

    from qlora_jax.checkpoints.orbax_format import save_quantized
    from qlora_jax.model import load_pretrained
    from qlora_jax.quant import QuantConfig

    started = time.perf_counter()
    path = FLAGS.saved if FLAGS.child == "saved" else FLAGS.model
    model, tokenizer = load_pretrained(path, QuantConfig(FLAGS.quant, double_quant=True), lora=None)
    jax.block_until_ready(model.base_params)
    load_seconds = time.perf_counter() - started
    ready = time.time() - FLAGS.spawned_at
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if FLAGS.child == "save":
        save_quantized(FLAGS.saved, model, tokenizer=tokenizer, source=FLAGS.model)
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(model.base_params):
        digest.update(np.asarray(leaf).tobytes())
    print(json.dumps({"load_seconds": load_seconds, "ready_seconds": ready, "peak_rss_bytes": peak,
                      "requantized": model.load_stats.requantized, "base_bytes": model.load_stats.base_bytes,
                      "sha256": digest.hexdigest()}))


def _run(way: str, saved: pathlib.Path) -> dict:
    command = [sys.executable, "-m", "experiments.bench_load", f"--child={way}", f"--saved={saved}",
               f"--model={FLAGS.model}", f"--quant={FLAGS.quant}", f"--spawned_at={time.time()!r}"]
    proc = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{way} load failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.child:
        _child()
        return
    workdir = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="bench_load_"))
    saved = workdir / "saved"
    if not saved.exists():
        _run("save", saved)
    size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    results: dict[str, list[dict]] = {"source": [], "saved": []}
    for repeat in range(FLAGS.repeats):
        for way in ("source", "saved"):
            results[way].append(_run(way, saved))
            logging.info("repeat %d %s: %s", repeat, way, results[way][-1])
    median = {way: {k: statistics.median(r[k] for r in runs) for k in ("load_seconds", "ready_seconds",
                                                                       "peak_rss_bytes")}
              for way, runs in results.items()}
    same = len({r["sha256"] for runs in results.values() for r in runs}) == 1
    mib = 2**20
    print(f"model {FLAGS.model}, {FLAGS.quant} + double quantization; saved checkpoint {size / mib:.1f} MiB on disk; "
          f"{FLAGS.repeats} loads per way, alternating, each in its own process; {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'way':<40} {'load call (s)':>14} {'process to ready (s)':>21} {'peak RSS (MiB)':>15}")
    labels = {"source": f"source: read + quantize ({results['source'][0]['requantized']} weights)",
              "saved": f"saved: Orbax restore ({results['saved'][0]['requantized']} quantized)"}
    for way, m in median.items():
        print(f"{labels[way]:<40} {m['load_seconds']:>14.2f} {m['ready_seconds']:>21.2f} "
              f"{m['peak_rss_bytes'] / mib:>15.0f}")
    print(f"ratio source/saved: load call {median['source']['load_seconds'] / median['saved']['load_seconds']:.1f}x, "
          f"process to ready {median['source']['ready_seconds'] / median['saved']['ready_seconds']:.1f}x, "
          f"peak RSS {median['source']['peak_rss_bytes'] / median['saved']['peak_rss_bytes']:.2f}x")
    print(f"identical base bytes from both ways: {same}")
    if not same:
        raise SystemExit("the two ways gave different bases")


if __name__ == "__main__":
    cli.run(main, __name__)
