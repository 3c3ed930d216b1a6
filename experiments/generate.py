r"""Chat with a model: load it (4-bit by default), optionally with adapters, and generate.

    python -m experiments.generate --prompt="What is the capital of France?"
    python -m experiments.generate --model=/path/to/hf_folder --adapter=outputs/finetune/adapter \
        --temperature=0.7 --top_p=0.9 --prompt="Tell me a joke."
"""

from __future__ import annotations

from absl import flags

from qlora_jax.checkpoints.load import QUANT_MODES

from . import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "embedded", "A Hugging Face folder, a .gguf file, or 'embedded' (SmolLM2-135M).")
flags.DEFINE_multi_string("prompt", ["What is the capital of France?"], "User message(s); one reply each.")
flags.DEFINE_string("system", None, "An optional system message.")
flags.DEFINE_enum("quant", "nf4", QUANT_MODES, "How the base weights are stored.")
flags.DEFINE_bool("double_quant", True, "Double-quantize the 4-bit scales.")
flags.DEFINE_string("adapter", None, "A PEFT adapter folder (e.g. a finetune's output_dir/adapter).")
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

    model, tokenizer = load_pretrained(FLAGS.model, quant=FLAGS.quant, double_quant=FLAGS.double_quant,
                                       lora=None, adapter=FLAGS.adapter, verbose=True)
    if tokenizer is None:
        raise SystemExit(f"{FLAGS.model} has no tokenizer.json: cannot turn prompts into tokens")
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
