r"""The paper's data-type comparison after finetuning (its Table 4 setting), on the embedded model.

    python -m experiments.datatype_finetune                                  # bf16, NF4+DQ, NF4, FP4, Int8
    python -m experiments.datatype_finetune --bases=nf4dq,fp4 --max_steps=20

For each frozen base (same seed, data, adapters' initialisation and steps) it runs the finetuning
recipe, ``qlora_jax.finetune.run(FinetuneConfig(bits=..., quant_type=..., double_quant=...))``, in
a fresh subprocess, and reports:

* held-out response loss (nats) and perplexity before and after (the recipe's own evaluation);
* multiple-choice accuracy before and after on the held-out chatterbot reply-retrieval task
  (:mod:`qlora_jax.eval.chatterbot`: the recipe's held-out split, never trained on; a sanity
  task, not MMLU): ``acc`` (summed log-likelihood) and ``acc_norm`` (per character), with
  standard errors; "before" is the base with the recipe's fresh adapters (B = 0, exactly the base);
* bits per parameter of the linear weights, from the arrays the base holds (codes, scales, nested
  scales, offsets; embeddings and the head stay 16-bit in every case and are not counted);
* peak host memory: the finetune process's resident-set high-water mark (``ru_maxrss`` of the
  fresh subprocess when the recipe returns), and of the whole subprocess including this
  evaluation (from ``wait4``).

Writes ``results.json`` and ``table.md`` in ``--output_dir`` and prints the table.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from absl import app, flags

from . import cli

FLAGS = flags.FLAGS

# name -> (label, FinetuneConfig fields)
BASES = {
    "bf16": ("bf16", {"bits": 16, "double_quant": False}),
    "nf4dq": ("NF4+DQ", {"bits": 4, "quant_type": "nf4", "double_quant": True}),
    "nf4": ("NF4", {"bits": 4, "quant_type": "nf4", "double_quant": False}),
    "fp4": ("FP4", {"bits": 4, "quant_type": "fp4", "double_quant": False}),
    "int8": ("Int8", {"bits": 8, "double_quant": False}),
}

flags.DEFINE_list("bases", list(BASES), f"Frozen bases to compare, in order: {', '.join(BASES)}.")
flags.DEFINE_string("model", "embedded", "Hugging Face folder, .gguf file, or 'embedded' (SmolLM2-135M-Instruct).")
flags.DEFINE_integer("max_steps", 40, "Optimizer steps per base (the recipe's default is 100).")
flags.DEFINE_integer("seed", 0, "Seed of the adapters, the data split and order (the same for every base).")
flags.DEFINE_integer("eval_dataset_size", 96, "Held-out conversations (the recipe's default).")
flags.DEFINE_integer("mc_batch_size", 8, "Rows per compiled evaluation batch (held-out loss and multiple choice).")
flags.DEFINE_string("output_dir", "outputs/datatype_finetune", "Where each base's run and the table go.")
flags.DEFINE_string("worker", None, "Internal: run one base in this process and write its result.")


def _finetune_config(name: str, output_dir: pathlib.Path):
    from qlora_jax.finetune import FinetuneConfig

    _, fields = BASES[name]
    return FinetuneConfig(model=FLAGS.model, max_steps=FLAGS.max_steps, eval_steps=FLAGS.max_steps,
                          save_steps=FLAGS.max_steps, seed=FLAGS.seed, eval_dataset_size=FLAGS.eval_dataset_size,
                          per_device_eval_batch_size=FLAGS.mc_batch_size, mc_eval_file="chatterbot",
                          num_sample_prompts=0, output_dir=str(output_dir), **fields)


def _linear_bits_per_param(output_dir: pathlib.Path, cfg) -> float:
    """Stored bits per element of the linear weights, from the arrays of the run's saved base
    (``base/``: codes, scales, nested scales, offsets); 8 x the element size for a 16/32-bit base."""
    import math

    from qlora_jax.checkpoints.orbax_format import load_quantized
    from qlora_jax.models.layout import linear_entries
    from qlora_jax.quant import QuantConfig

    if not QuantConfig(cfg.quant).quantized:
        return {"bf16": 16.0, "float16": 16.0, "float32": 32.0}[cfg.quant]
    base = load_quantized(output_dir / "base").base
    bits, elements = 0, 0
    for params in linear_entries(base).values():
        weight = params["weight"]
        arrays = [a for a in (weight.codes, weight.scales, weight.nested_scales, weight.offset) if a is not None]
        per_layer = math.prod(weight.shape)
        layers = weight.scales.size // (-(-per_layer // weight.blocksize))
        bits += sum(8 * a.size * a.dtype.itemsize for a in arrays)
        elements += per_layer * layers
    return bits / elements


def run_worker(name: str) -> None:
    """One base: the recipe (which evaluates the multiple-choice task at step 0, with its fresh
    adapters, B = 0, and at the end), its figures written to result.json."""
    import math
    import resource

    from qlora_jax import finetune
    from qlora_jax.recipe.steps import METRICS, MetricsLog

    out = pathlib.Path(FLAGS.output_dir) / name
    cfg = _finetune_config(name, out)
    started = time.perf_counter()
    result = finetune.run(cfg, progress=False)
    finetune_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mc_rows = [r for r in MetricsLog.read(out / METRICS) if r["kind"] == "mc_eval"]
    before = next(r for r in mc_rows if r["step"] == 0)
    after = next(r for r in mc_rows if r["step"] == cfg.max_steps)
    summary = {
        "base": BASES[name][0],
        "config": {k: getattr(cfg, k) for k in ("bits", "quant_type", "double_quant", "blocksize", "compute_dtype",
                                                "max_steps", "seed", "eval_dataset_size", "lora_r", "lora_alpha",
                                                "per_device_train_batch_size", "learning_rate")},
        "eval_loss_before": result.first_eval_loss, "eval_loss_after": result.final_eval_loss,
        "perplexity_before": math.exp(result.first_eval_loss), "perplexity_after": math.exp(result.final_eval_loss),
        "mc_before": before, "mc_after": after, "mc_task": "the held-out chatterbot reply-retrieval task",
        "linear_bits_per_param": _linear_bits_per_param(out, cfg),
        "finetune_peak_rss_bytes": finetune_peak, "recipe_peak_rss_bytes": result.peak_host_memory_bytes,
        "train_tokens_per_second": result.train_tokens_per_second, "finetune_seconds": result.wall_seconds,
        "worker_seconds": time.perf_counter() - started,
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))


def _run_base(name: str) -> dict:
    """``name``'s worker in a fresh subprocess; its result with the subprocess's peak RSS added."""
    out = pathlib.Path(FLAGS.output_dir) / name
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already holds a run: remove it or choose another --output_dir")
    argv = [sys.executable, "-m", "experiments.datatype_finetune", f"--worker={name}", f"--model={FLAGS.model}",
            f"--max_steps={FLAGS.max_steps}", f"--seed={FLAGS.seed}", f"--eval_dataset_size={FLAGS.eval_dataset_size}",
            f"--mc_batch_size={FLAGS.mc_batch_size}", f"--output_dir={FLAGS.output_dir}"]
    started = time.perf_counter()
    process = subprocess.Popen(argv)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"the {name} run failed (exit status {process.returncode}); see its output above")
    result = json.loads((out / "result.json").read_text())
    result["subprocess_peak_rss_bytes"] = usage.ru_maxrss * 1024
    result["subprocess_seconds"] = time.perf_counter() - started
    return result


def _acc(mc: dict, metric: str) -> str:
    error = mc[f"mc_{metric}_stderr"]
    return f"{mc[f'mc_{metric}']:.3f}" + (f" ± {error:.3f}" if error is not None else "")


def format_table(results: list[dict]) -> str:
    """The markdown table of the README."""
    mc = results[0]["mc_after"]["mc_count"]
    lines = [
        f"| base | bits/param (linear) | held-out loss before -> after (perplexity) | reply retrieval acc before -> "
        f"after ({mc} questions) | acc_norm before -> after | true-reply loss before -> after | peak RSS (finetune) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['base']} | {r['linear_bits_per_param']:.3f} | {r['eval_loss_before']:.3f} -> "
            f"{r['eval_loss_after']:.3f} ({r['perplexity_before']:.1f} -> {r['perplexity_after']:.2f}) | "
            f"{_acc(r['mc_before'], 'acc')} -> {_acc(r['mc_after'], 'acc')} | "
            f"{_acc(r['mc_before'], 'acc_norm')} -> {_acc(r['mc_after'], 'acc_norm')} | "
            f"{r['mc_before']['mc_answer_loss']:.2f} -> {r['mc_after']['mc_answer_loss']:.2f} | "
            f"{r['finetune_peak_rss_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    unknown = [b for b in FLAGS.bases if b not in BASES]
    if unknown:
        raise app.UsageError(f"unknown --bases {unknown}; expected some of {', '.join(BASES)}")
    if FLAGS.worker is not None:
        run_worker(FLAGS.worker)
        return
    output_dir = pathlib.Path(FLAGS.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in FLAGS.bases:
        print(f"== {BASES[name][0]}: finetuning {FLAGS.max_steps} steps in a fresh process ==", flush=True)
        results.append(_run_base(name))
        r = results[-1]
        print(f"   held-out loss {r['eval_loss_before']:.3f} -> {r['eval_loss_after']:.3f}; reply retrieval acc "
              f"{r['mc_before']['mc_acc']:.3f} -> {r['mc_after']['mc_acc']:.3f}; {r['subprocess_seconds']:.0f} s",
              flush=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    table = format_table(results)
    (output_dir / "table.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\n{results[0]['mc_task']}; acc: summed log-likelihood of the reply, acc_norm: per character; "
          f"± one standard error. Runs, metrics and adapters: {output_dir}/<base>/")


if __name__ == "__main__":
    cli.run(main, __name__)
