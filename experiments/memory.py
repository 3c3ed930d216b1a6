r"""Memory planner: will this QLoRA configuration fit on that GPU?

    python -m experiments.memory --model=llama-65b --seq_len=512 --batch=1 --gpu=48GB
    python -m experiments.memory --model=/models/llama-3-8b/config.json --seq_len=2048 --batch=4 \
        --lora_r=16 --optim=paged_adamw_8bit --gpu=24

Prints the predicted peak device memory of one training step, broken down (base weights,
quantization constants, embeddings, adapters and gradients, optimizer state on device and on host,
activations with or without rematerialisation), and whether it fits. Known models: llama-7b,
llama-13b, llama-33b, llama-65b, llama2-70b, llama3-8b, llama3-70b, smollm2-135m, gemma-2-9b, qwen3-8b,
phi-3-mini, the mixtures of experts mixtral-8x7b and qwen3-30b-a3b, or any config.json.
"""

from __future__ import annotations

from absl import flags

from qlora_jax.optim.factory import OPTIMIZER_NAMES

from . import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-7b", "A known model name or a config.json path (or its folder).")
flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
flags.DEFINE_integer("batch", 1, "Sequences per micro-batch (per device).")
flags.DEFINE_integer("lora_r", 64, "LoRA rank.")
flags.DEFINE_string("lora_modules", "all-linear", "'all-linear' or a comma list of linear layer names.")
flags.DEFINE_enum("lora_dtype", "bfloat16", ["float32", "bfloat16"],
                  "Storage dtype of the LoRA matrices (the finetune's default: bfloat16, its compute dtype).")
flags.DEFINE_enum("quant", "nf4", ["nf4", "fp4", "int8", "bf16"], "Base weight storage.")
flags.DEFINE_bool("double_quant", True, "Double-quantized scales.")
flags.DEFINE_enum("optim", "paged_adamw_32bit", OPTIMIZER_NAMES,
                  "Optimizer (paged: state in pinned host memory between steps).")
flags.DEFINE_bool("remat", True, "Per-layer rematerialisation (gradient checkpointing).")
flags.DEFINE_integer("gradient_accumulation_steps", 1, "Micro-batches per optimizer step.")
flags.DEFINE_bool("train_router", False, "Mixtures of experts: also train the routers in full (as the finetune's "
                  "--train_router does).")
flags.DEFINE_string("gpu", "80GB", "GPU memory: a name (24GB, 40GB, 48GB, 80GB, H100, H200, RTX4090, ...) or GiB.")


def main(argv: list[str]) -> None:
    del argv
    from qlora_jax.lora import LoraConfig
    from qlora_jax.memory import GPUS, format_plan, model_config, plan_memory
    from qlora_jax.models.layout import lora_targets

    config = model_config(FLAGS.model)
    targets = lora_targets(LoraConfig(target_modules=FLAGS.lora_modules), config)
    plan = plan_memory(config, seq_len=FLAGS.seq_len, batch=FLAGS.batch, lora_r=FLAGS.lora_r, lora_targets=targets,
                       quant=FLAGS.quant, double_quant=FLAGS.double_quant, optim=FLAGS.optim, remat=FLAGS.remat,
                       gradient_accumulation_steps=FLAGS.gradient_accumulation_steps, lora_dtype=FLAGS.lora_dtype,
                       train_router=FLAGS.train_router)
    gpu_bytes = GPUS.get(FLAGS.gpu) or int(float(FLAGS.gpu.removesuffix("GB").removesuffix("GiB")) * 2**30)
    print(f"{FLAGS.model}: {config.num_parameters() / 1e9:.2f} B parameters; QLoRA step with seq_len "
          f"{FLAGS.seq_len}, batch {FLAGS.batch}, r={FLAGS.lora_r} ({FLAGS.lora_dtype}), "
          f"{FLAGS.quant}{'+DQ' if FLAGS.double_quant else ''}, "
          f"{FLAGS.optim}, remat {'on' if FLAGS.remat else 'off'}"
          f"{', routers trained' if FLAGS.train_router else ''}")
    print(format_plan(plan, gpu_bytes, FLAGS.gpu))


def entry_point() -> None:
    """The ``qlora-jax-memory`` console script."""
    cli.run(main, __name__)


if __name__ == "__main__":
    entry_point()
