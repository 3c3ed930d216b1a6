r"""Data-type report: quantization error and storage of NF4, NF4+DQ, FP4 and Int8.

    python -m experiments.datatypes                       # N(0, 1) weights and the embedded model
    python -m experiments.datatypes --model=/path/to/hf_folder_or.gguf --perplexity

For N(0, 1) weights and for the linear weights of a real checkpoint it prints, at block 64, the
mean squared error and the bits per parameter of each data type, says whether NF4's error is
below FP4's (the paper's finding, Figure 3, in weight space), and writes a PNG of the error
histograms. With ``--perplexity`` it also measures the model's perplexity on held-out English
chat (chitchat-dataset) with each data type as the frozen base.
"""

from __future__ import annotations

import pathlib

from absl import flags

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


def main(argv: list[str]) -> None:
    del argv
    import numpy as np

    from qlora_jax.reports import datatypes as report

    shape = tuple(int(d) for d in FLAGS.shape.split(","))
    output_dir = pathlib.Path(FLAGS.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(FLAGS.seed)
    gaussian = {"N(0,1)": rng.standard_normal(shape, dtype=np.float32)}
    sets = {f"N(0, 1) weights {list(shape)}": gaussian}
    if FLAGS.model != "none":
        name, tensors = report.model_linear_weights(FLAGS.model, FLAGS.max_tensors)
        sets[f"{name}: {len(tensors)} linear weights"] = tensors

    for title, tensors in sets.items():
        rows = report.error_table(tensors, FLAGS.blocksize)
        print(f"\n== {title}, block {FLAGS.blocksize} ==")
        print(report.format_error_table(rows))
        print(report.nf4_vs_fp4_verdict(rows))
        png = output_dir / f"error_histograms_{report.slug(title)}.png"
        report.plot_error_histograms(tensors, FLAGS.blocksize, png, title)
        print(f"histograms: {png}")

    if FLAGS.perplexity and FLAGS.model != "none":
        print("\n== held-out perplexity (chitchat-dataset), each data type as the frozen base ==")
        table = report.perplexity_table(FLAGS.model, FLAGS.perplexity_conversations)
        print(report.format_perplexity_table(table))


def entry_point() -> None:
    """The ``qlora-jax-datatypes`` console script."""
    cli.run(main, __name__)


if __name__ == "__main__":
    entry_point()
