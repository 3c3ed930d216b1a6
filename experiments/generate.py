r"""Chat with a model: load it (4-bit by default), optionally with adapters, and generate.

    python -m experiments.generate --prompt="What is the capital of France?"
    python -m experiments.generate --adapter=outputs/finetune --prompt="Tell me a joke."
    python -m experiments.generate --model=/path/to/hf_folder --adapter=/path/to/peft_adapter \
        --temperature=0.7 --top_p=0.9 --prompt="Tell me a joke."

``--adapter`` takes a PEFT adapter folder or a finetune's output directory. When the run saved its
quantized base (``<output_dir>/base/``), the model starts from that, as stored, without reading
or re-quantizing the source checkpoint; ``--model``/``--quant``/... then only need to agree with it.
"""

from __future__ import annotations

import dataclasses

from absl import flags, logging

from qlora_jax.quant import QUANT_MODES, QuantConfig

from . import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "embedded", "A Hugging Face folder, a .gguf file, or 'embedded' (SmolLM2-135M).")
flags.DEFINE_multi_string("prompt", ["What is the capital of France?"], "User message(s); one reply each.")
flags.DEFINE_string("system", None, "An optional system message.")
flags.DEFINE_enum("quant", "nf4", QUANT_MODES, "How the base weights are stored.")
flags.DEFINE_bool("double_quant", True, "Double-quantize the 4-bit scales.")
flags.DEFINE_string("adapter", None, "A PEFT adapter folder, or a finetune's output_dir (uses its adapter/ and base/).")
flags.DEFINE_string("template", None, "Chat template: the model's own (default), chatml, llama2 or llama3.")
flags.DEFINE_integer("max_new_tokens", 128, "Generation budget per reply, in tokens.")
flags.DEFINE_float("temperature", 0.0, "0 for greedy decoding.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with temperature > 0).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv: list[str]) -> None:
    del argv
    import jax

    from qlora_jax.generate import chat
    from qlora_jax.model import load_pretrained

    model_path, quant, adapter = FLAGS.model, QuantConfig(FLAGS.quant, double_quant=FLAGS.double_quant), None
    if FLAGS.adapter:
        from qlora_jax.checkpoints.base_cache import find_run_adapter, source_name
        from qlora_jax.checkpoints.orbax_format import check_saved_base, read_manifest, read_saved_quantization

        adapter, saved_base = find_run_adapter(FLAGS.adapter)
        if saved_base is not None:
            # The run's base as it was saved; flags given explicitly must agree with it (checked on load).
            if FLAGS["model"].present:
                check_saved_base(saved_base, source=source_name(FLAGS.model))
            stored = read_saved_quantization(saved_base)
            model_path = saved_base
            quant = dataclasses.replace(
                stored, quant=FLAGS.quant if FLAGS["quant"].present else stored.quant,
                double_quant=FLAGS.double_quant if FLAGS["double_quant"].present else stored.double_quant)
            logging.info("starting from the run's saved base %s (saved from %s)", saved_base,
                            read_manifest(saved_base)["source"])
    model, tokenizer = load_pretrained(model_path, quant, lora=None, adapter=adapter, verbose=True)
    if tokenizer is None:
        raise SystemExit(f"{model_path} has no tokenizer: cannot turn prompts into tokens")
    key = jax.random.key(FLAGS.seed)
    for i, prompt in enumerate(FLAGS.prompt):
        messages = ([{"role": "system", "content": FLAGS.system}] if FLAGS.system else []) + [
            {"role": "user", "content": prompt}
        ]
        reply = chat(model, tokenizer, messages, max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                     top_p=FLAGS.top_p, key=jax.random.fold_in(key, i), template=FLAGS.template)
        print(f"\n>>> {prompt}\n{reply}")


def entry_point() -> None:
    """The ``qlora-jax-generate`` console script."""
    cli.run(main, __name__)


if __name__ == "__main__":
    entry_point()
