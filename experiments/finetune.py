r"""QLoRA finetuning: `python -m experiments.finetune [--flags]` (or `--flagfile=run.flags`).

With no flags: SmolLM2-135M-Instruct (embedded, 4-bit NF4 + double quantization) gets LoRA
adapters (r=64, alpha=16) on every linear layer and trains on chatterbot-corpus question/answer
pairs for a few minutes on a CPU, with a held-out split, checkpoints and a PEFT adapter at the end.

Flag names follow artidoro/qlora's qlora.py. Where our default differs (so that the default run
fits in minutes on a laptop-class CPU), the help says qlora.py's value.

    python -m experiments.finetune --max_steps=300 --output_dir=outputs/run1
    python -m experiments.finetune --output_dir=outputs/run1 --resume          # continue a run
    python -m experiments.finetune --model=/models/llama-2-7b-hf --dataset=data/alpaca.json \
        --per_device_train_batch_size=1 --gradient_accumulation_steps=16 --max_steps=1875
"""

from __future__ import annotations

from absl import app, flags, logging

FLAGS = flags.FLAGS

# model and quantization
flags.DEFINE_string("model", "embedded", "Hugging Face folder, .gguf file, or 'embedded' (SmolLM2-135M-Instruct).")
flags.DEFINE_integer("bits", 4, "Base weight precision: 4 (NF4/FP4), 8 (Int8), 16 (bf16) or 32.")
flags.DEFINE_enum("quant_type", "nf4", ["nf4", "fp4"], "4-bit data type.")
flags.DEFINE_bool("double_quant", True, "Double-quantize the quantization constants (4.127 instead of 4.5 bits).")
flags.DEFINE_integer("blocksize", 64, "Quantization block size.")
flags.DEFINE_enum("compute_dtype", "bfloat16", ["bfloat16", "float32"], "Activation/matmul dtype.")
# LoRA
flags.DEFINE_integer("lora_r", 64, "LoRA rank.")
flags.DEFINE_float("lora_alpha", 16.0, "LoRA alpha (scaling alpha / r).")
flags.DEFINE_float("lora_dropout", 0.0, "Dropout on the LoRA input (qlora.py scripts: 0.1 for 7B, 0.05 for 13B+).")
flags.DEFINE_string("lora_modules", "all-linear",
                    "'all-linear' or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj.")
flags.DEFINE_bool("use_rslora", False, "rsLoRA scaling alpha / sqrt(r).")
flags.DEFINE_enum("lora_dtype", "auto", ["auto", "float32", "bfloat16"],
                  "Storage dtype of LoRA A and B. auto: the compute dtype (bfloat16 adapters on a bfloat16 model, "
                  "as qlora.py with --bf16; half the adapter and gradient memory); float32 (PEFT's default) keeps "
                  "updates smaller than a bfloat16 step. Adam's moments are float32 either way.")
flags.DEFINE_bool("full_finetune", False, "Train every weight (needs --bits=16 or 32; no adapters).")
flags.DEFINE_string("adapter_init", None, "Start from these adapters: a PEFT folder or an earlier run's checkpoints.")
# data
flags.DEFINE_string("dataset", "chatterbot", "chatterbot | chitchat | path to a .json/.jsonl file (qlora.py: alpaca).")
flags.DEFINE_enum("dataset_format", "auto", ["auto", "alpaca", "input-output", "messages", "oasst"],
                  "Format of a local dataset file.")
flags.DEFINE_string("chat_template", None, "The model's own template (default), or chatml, llama2, llama3.")
flags.DEFINE_integer("source_max_len", 1024, "Maximum source (prompt) tokens; the end is kept.")
flags.DEFINE_integer("target_max_len", 256, "Maximum target (response) tokens; the start is kept.")
flags.DEFINE_bool("train_on_source", False, "Also train on the prompt tokens.")
flags.DEFINE_bool("group_by_length", True, "Batch conversations of similar length (Hugging Face's policy).")
flags.DEFINE_float("eval_dataset_size", 96, "Held-out conversations: a count, or a fraction if < 1 (qlora.py: 1024).")
flags.DEFINE_integer("max_train_samples", None, "Use at most this many training conversations.")
flags.DEFINE_integer("max_eval_samples", None, "Use at most this many held-out conversations.")
# optimisation
flags.DEFINE_integer("per_device_train_batch_size", 8, "Micro-batch size (qlora.py: 1).")
flags.DEFINE_integer("per_device_eval_batch_size", 16, "Evaluation batch size.")
flags.DEFINE_integer("gradient_accumulation_steps", 1, "Micro-batches per optimizer step (qlora.py: 16).")
flags.DEFINE_integer("max_steps", 100, "Optimizer steps (qlora.py: 10000).")
flags.DEFINE_float("learning_rate", 2e-4, "Peak learning rate.")
flags.DEFINE_enum("lr_scheduler_type", "constant", ["constant", "linear", "cosine"], "Schedule after warmup.")
flags.DEFINE_float("warmup_ratio", 0.03, "Fraction of max_steps spent warming up linearly.")
flags.DEFINE_float("adam_beta1", 0.9, "AdamW beta1.")
flags.DEFINE_float("adam_beta2", 0.999, "AdamW beta2.")
flags.DEFINE_float("max_grad_norm", 0.3, "Gradient clipping by global norm.")
flags.DEFINE_enum("optim", "paged_adamw_32bit",
                  ["adamw", "adamw_32bit", "paged_adamw", "paged_adamw_32bit", "adamw_8bit", "paged_adamw_8bit"],
                  "Optimizer; 'paged' keeps its state in pinned host memory between steps.")
flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay.")
flags.DEFINE_bool("gradient_checkpointing", True, "Recompute each layer's activations in the backward pass.")
# schedule and output
flags.DEFINE_integer("logging_steps", 1, "Write training metrics every N steps.")
flags.DEFINE_integer("eval_steps", 25, "Evaluate the held-out loss every N steps.")
flags.DEFINE_integer("save_steps", 50, "Checkpoint every N steps (qlora.py: 250).")
flags.DEFINE_integer("save_total_limit", 2, "Checkpoints to keep (qlora.py: 40).")
flags.DEFINE_string("output_dir", "outputs/finetune", "Where checkpoints, metrics, plots and the adapter go.")
flags.DEFINE_integer("seed", 0, "Seed of the adapters, the data split and order, and dropout.")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in output_dir.")
flags.DEFINE_integer("num_sample_prompts", 4, "Held-out questions answered before and after training.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
# devices and hosts
flags.DEFINE_string("mesh", None, "Device mesh, e.g. 'fsdp=8' or 'data=2,fsdp=4' (axes data, fsdp, tensor; -1 = rest).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def config_from_flags():
    """The :class:`~qlora_jax.finetune.FinetuneConfig` the flags describe."""
    from qlora_jax.finetune import FinetuneConfig

    if FLAGS.bits not in (4, 8, 16, 32):
        raise app.UsageError(f"--bits must be 4, 8, 16 or 32, got {FLAGS.bits}")
    if FLAGS.full_finetune and FLAGS.bits < 16:
        raise app.UsageError("--full_finetune needs an unquantized base: --bits=16 (or 32)")
    eval_size = FLAGS.eval_dataset_size
    return FinetuneConfig(
        model=FLAGS.model, bits=FLAGS.bits, quant_type=FLAGS.quant_type, double_quant=FLAGS.double_quant,
        blocksize=FLAGS.blocksize, compute_dtype=FLAGS.compute_dtype, lora_r=FLAGS.lora_r,
        lora_alpha=FLAGS.lora_alpha, lora_dropout=FLAGS.lora_dropout, lora_modules=FLAGS.lora_modules,
        use_rslora=FLAGS.use_rslora, lora_dtype=None if FLAGS.lora_dtype == "auto" else FLAGS.lora_dtype,
        full_finetune=FLAGS.full_finetune,
        adapter_init=FLAGS.adapter_init,
        dataset=FLAGS.dataset, dataset_format=FLAGS.dataset_format, chat_template=FLAGS.chat_template,
        source_max_len=FLAGS.source_max_len, target_max_len=FLAGS.target_max_len,
        train_on_source=FLAGS.train_on_source, group_by_length=FLAGS.group_by_length,
        eval_dataset_size=int(eval_size) if eval_size >= 1 else eval_size,
        max_train_samples=FLAGS.max_train_samples, max_eval_samples=FLAGS.max_eval_samples,
        per_device_train_batch_size=FLAGS.per_device_train_batch_size,
        per_device_eval_batch_size=FLAGS.per_device_eval_batch_size,
        gradient_accumulation_steps=FLAGS.gradient_accumulation_steps, max_steps=FLAGS.max_steps,
        learning_rate=FLAGS.learning_rate, lr_scheduler_type=FLAGS.lr_scheduler_type,
        warmup_ratio=FLAGS.warmup_ratio, adam_beta1=FLAGS.adam_beta1, adam_beta2=FLAGS.adam_beta2,
        max_grad_norm=FLAGS.max_grad_norm, optim=FLAGS.optim, weight_decay=FLAGS.weight_decay,
        gradient_checkpointing=FLAGS.gradient_checkpointing, logging_steps=FLAGS.logging_steps,
        eval_steps=FLAGS.eval_steps, save_steps=FLAGS.save_steps, save_total_limit=FLAGS.save_total_limit,
        output_dir=FLAGS.output_dir, seed=FLAGS.seed, resume=FLAGS.resume,
        num_sample_prompts=FLAGS.num_sample_prompts, mesh=FLAGS.mesh,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    from qlora_jax import finetune
    from qlora_jax.distributed import initialize_distributed

    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

    cfg = config_from_flags()
    result = finetune.run(cfg, progress=FLAGS.progress)

    print("\n== held-out questions, before and after finetuning ==")
    for sample in result.samples:
        print(f"\nQ: {sample['question']}\n   reference: {sample['reference']}\n   before:    {sample['before']}"
              f"\n   after:     {sample.get('after', '')}")
    print("\n== summary ==")
    if result.first_eval_loss is not None:
        print(f"held-out loss: {result.first_eval_loss:.3f} -> {result.final_eval_loss:.3f} nats")
    else:
        print(f"held-out loss at the end: {result.final_eval_loss:.3f} nats")
    print(f"steps: {result.final_step}   training throughput: {result.train_tokens_per_second:.0f} tokens/s   "
          f"wall time: {result.wall_seconds:.0f} s   peak host memory: {result.peak_host_memory_bytes / 2**30:.2f} GiB")
    print(f"outputs: {result.output_dir}/ (adapter/, checkpoints/, metrics.jsonl, loss_curve.png, samples.json)")


if __name__ == "__main__":
    app.run(main)
