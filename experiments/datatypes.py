r"""Data-type report: quantization error and storage of NF4, NF4+DQ, FP4 and Int8.

    python -m experiments.datatypes                       # N(0, 1) weights and the embedded model
    python -m experiments.datatypes --model=/path/to/hf_folder_or.gguf --perplexity

For N(0, 1) weights and for the linear weights of a real checkpoint it prints, at block 64, the
mean squared error and the bits per parameter of each data type, says whether NF4's error is
below FP4's (the paper's finding, Figure 3, in weight space), and writes a PNG of the error
histograms. With ``--perplexity`` it also measures the model's perplexity on held-out English
chat (chitchat-dataset) with each data type as the frozen base. The tables are computed by
plain functions (``error_table``, ``perplexity_table``, ...) that return data, so that a test can
check the numbers without parsing the printout.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from qlora_jax.quant import QuantConfig, dequantize, quantize
from qlora_jax.quant.report import storage_report

from . import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("shape", "4096,4096", "Shape of the N(0, 1) weight matrix, comma separated.")
flags.DEFINE_integer("blocksize", 64, "Quantization block size.")
flags.DEFINE_integer("seed", 0, "Seed of the N(0, 1) weights.")
flags.DEFINE_string(
    "model", "embedded", "A Hugging Face folder, a .gguf file, 'embedded' (SmolLM2-135M-Instruct) or 'none'."
)
flags.DEFINE_integer("max_tensors", 0, "Use only the first N linear weights of the model (0: all).")
flags.DEFINE_bool("perplexity", False, "Also measure held-out perplexity with each data type as the base.")
flags.DEFINE_integer("perplexity_conversations", 64, "Held-out conversations for --perplexity.")
flags.DEFINE_string("output_dir", "outputs/datatypes", "Where to write the histogram PNG.")


# label -> (quant_type, double_quant)
DATA_TYPES = {
    "NF4": ("nf4", False),
    "NF4+DQ": ("nf4", True),
    "FP4": ("fp4", False),
    "FP4+DQ": ("fp4", True),
    "Int8": ("int8", False),
}


@dataclasses.dataclass(frozen=True)
class ErrorRow:
    label: str
    mse: float
    relative_mse: float  # MSE / mean square of the weights
    bits_per_param: float


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60]


def _errors(w: np.ndarray, quant_type: str, double_quant: bool, blocksize: int):
    qt = quantize(w, quant_type, blocksize=blocksize, double_quant=double_quant)
    err = np.asarray(dequantize(qt, jnp.float32)) - np.asarray(w, np.float32)
    return err, storage_report(qt)


def error_table(tensors: Mapping[str, np.ndarray], blocksize: int = 64) -> list[ErrorRow]:
    """MSE and bits/param of each data type over all ``tensors`` (element-weighted)."""
    rows = []
    total_sq = sum(float(np.sum(np.square(w, dtype=np.float64))) for w in tensors.values())
    numel = sum(w.size for w in tensors.values())
    for label, (quant_type, double_quant) in DATA_TYPES.items():
        sq, report = 0.0, None
        for w in tensors.values():
            err, rep = _errors(w, quant_type, double_quant, blocksize)
            sq += float(np.sum(np.square(err, dtype=np.float64)))
            report = rep if report is None else report + rep
        rows.append(ErrorRow(label, sq / numel, sq / total_sq, report.bits_per_param))
    return rows


def format_error_table(rows: list[ErrorRow]) -> str:
    lines = [f"{'data type':<10} {'MSE':>12} {'MSE / E[w^2]':>13} {'bits/param':>11}"]
    for r in rows:
        lines.append(f"{r.label:<10} {r.mse:>12.4e} {r.relative_mse:>13.5f} {r.bits_per_param:>11.3f}")
    return "\n".join(lines)


def nf4_vs_fp4_verdict(rows: list[ErrorRow]) -> str:
    by = {r.label: r for r in rows}
    nf4, fp4 = by["NF4"].mse, by["FP4"].mse
    verdict = "yes" if nf4 < fp4 else "NO"
    return f"NF4 error below FP4's (the paper's finding): {verdict} (NF4/FP4 MSE ratio {nf4 / fp4:.3f})"


def plot_error_histograms(tensors: Mapping[str, np.ndarray], blocksize: int, path: pathlib.Path, title: str) -> None:
    """Histogram of quantization errors per data type (log counts), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sample = {k: v for k, v in list(tensors.items())[:8]}
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, (quant_type, double_quant) in DATA_TYPES.items():
        errs = np.concatenate([_errors(w, quant_type, double_quant, blocksize)[0].reshape(-1) for w in sample.values()])
        scale = np.sqrt(np.mean(np.concatenate([np.square(w.reshape(-1)) for w in sample.values()])))
        ax.hist(errs / scale, bins=201, histtype="step", log=True, label=label)
    ax.set_xlabel("quantization error / RMS(weight)")
    ax.set_ylabel("count")
    ax.set_title(f"{title}, block {blocksize}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_linear_weights(model: str, max_tensors: int = 0) -> tuple[str, dict[str, np.ndarray]]:
    """The linear-layer weights (float32) of a checkpoint ("embedded" for SmolLM2-135M)."""
    from qlora_jax import assets
    from qlora_jax.checkpoints.load import open_checkpoint, read_config
    from qlora_jax.models import layout

    path = assets.embedded_model_path() if model == "embedded" else pathlib.Path(model)
    source, cfg = open_checkpoint(path)
    config = read_config(cfg)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name in layout.linear_layers(config):
            key = layout.hf_key(layer, name)
            tensors[key] = np.asarray(source.get(key), np.float32)
            if max_tensors and len(tensors) >= max_tensors:
                return path.name, tensors
    return path.name, tensors


def _heldout_conversations(tokenizer, count: int, max_tokens: int) -> list[list[int]]:
    """The last ``count`` multi-turn chitchat conversations, chat-formatted and tokenized."""
    from qlora_jax import assets

    data = json.loads(assets.chitchat_dataset_file().read_text())
    out = []
    for key in sorted(data)[::-1]:
        turns = data[key]["messages"]
        if len(turns) < 2:
            continue
        messages = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(m["text"] for m in turn)}
            for i, turn in enumerate(turns)
        ]
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages))[:max_tokens]
        out.append(ids)
        if len(out) == count:
            break
    return out


def perplexity_table(model: str, conversations: int = 64, max_tokens: int = 256, batch: int = 8) -> dict[str, float]:
    """Held-out perplexity (chitchat, all tokens) of ``model`` with each data type as its base."""
    from qlora_jax.model import load_pretrained
    from qlora_jax.models.spec import ModelSpec
    from qlora_jax.train import loss_and_count

    results: dict[str, float] = {}
    for label, (quant, double_quant) in {"bf16": ("bf16", False), **DATA_TYPES}.items():
        lm, tokenizer = load_pretrained(model, QuantConfig(quant, double_quant=double_quant), lora=None)
        sequences = _heldout_conversations(tokenizer, conversations, max_tokens)
        spec = ModelSpec(lm.config, None, compute_dtype="bfloat16")
        step = jax.jit(lambda frozen, b, spec=spec: loss_and_count(spec, None, frozen, b, None))
        total, count = 0.0, 0.0
        for start in range(0, len(sequences), batch):
            chunk = sequences[start:start + batch]
            ids = np.full((len(chunk), max_tokens), tokenizer.pad_id, np.int32)
            mask = np.zeros_like(ids)
            for i, seq in enumerate(chunk):
                ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
            b = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(mask)}
            loss_sum, n = step(lm.base_params, b)
            total, count = total + float(loss_sum), count + float(n)
        results[label] = float(np.exp(total / count))
    return results


def format_perplexity_table(table: dict[str, float]) -> str:
    lines = [f"{'base':<10} {'perplexity':>11}"]
    lines += [f"{label:<10} {ppl:>11.3f}" for label, ppl in table.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    shape = tuple(int(d) for d in FLAGS.shape.split(","))
    output_dir = pathlib.Path(FLAGS.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(FLAGS.seed)
    gaussian = {"N(0,1)": rng.standard_normal(shape, dtype=np.float32)}
    sets = {f"N(0, 1) weights {list(shape)}": gaussian}
    if FLAGS.model != "none":
        name, tensors = model_linear_weights(FLAGS.model, FLAGS.max_tensors)
        sets[f"{name}: {len(tensors)} linear weights"] = tensors

    for title, tensors in sets.items():
        rows = error_table(tensors, FLAGS.blocksize)
        print(f"\n== {title}, block {FLAGS.blocksize} ==")
        print(format_error_table(rows))
        print(nf4_vs_fp4_verdict(rows))
        png = output_dir / f"error_histograms_{slug(title)}.png"
        plot_error_histograms(tensors, FLAGS.blocksize, png, title)
        print(f"histograms: {png}")

    if FLAGS.perplexity and FLAGS.model != "none":
        print("\n== held-out perplexity (chitchat-dataset), each data type as the frozen base ==")
        table = perplexity_table(FLAGS.model, FLAGS.perplexity_conversations)
        print(format_perplexity_table(table))


def entry_point() -> None:
    """The ``qlora-jax-datatypes`` console script."""
    cli.run(main, __name__)


if __name__ == "__main__":
    entry_point()
