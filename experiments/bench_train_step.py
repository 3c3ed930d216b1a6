r"""QLoRA training-step benchmark: peak device memory and tokens/s of 7B/65B-shaped steps, the
memory planner's prediction beside the measurement, and (optionally) the same 7B-shaped step in
PyTorch with transformers + peft + bitsandbytes in the same run.

    python -m experiments.bench_train_step --model=llama-65b --seq_len=512 --batch=1
    python -m experiments.bench_train_step --model=llama-7b --seq_len=512 --batch=4 --torch_baseline
    python -m experiments.bench_train_step --smoke            # tiny shapes on a CPU (what the tests run)

The frozen base is random packed NF4+DQ built directly on the device (qlora_jax.synthetic): no
checkpoint is needed and nothing of model size passes through host memory. Each step is a real
QLoRA step: forward and backward through the 4-bit base with LoRA r on every linear layer,
per-layer rematerialisation, and the optimizer update with its state offloaded to pinned host
memory (--optim). Peak memory is the device allocator's ``peak_bytes_in_use`` (CPU backends have
no allocator statistics: the output says so rather than printing a number).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import time

from absl import flags

from qlora_jax.optim.factory import OPTIMIZER_NAMES

from . import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-7b", "A known model shape (qlora_jax.memory.KNOWN_MODELS) or a config.json.")
flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
flags.DEFINE_integer("batch", 1, "Sequences per step.")
flags.DEFINE_integer("lora_r", 64, "LoRA rank on every linear layer.")
flags.DEFINE_enum("lora_dtype", "float32", ["float32", "bfloat16"],
                  "Storage dtype of the LoRA matrices (bfloat16: the paper's setting).")
flags.DEFINE_enum("optim", "paged_adamw_32bit", OPTIMIZER_NAMES, "Optimizer (qlora_jax.optim.make_optimizer).")
flags.DEFINE_bool("remat", True, "Per-layer rematerialisation.")
flags.DEFINE_integer("steps", 5, "Timed steps, after 2 warm-up steps.")
flags.DEFINE_string("mesh", None, "Shard over devices, e.g. 'fsdp=8' (default: one device).")
flags.DEFINE_bool("torch_baseline", False, "Also time the step with transformers + peft + bitsandbytes (CUDA).")
flags.DEFINE_bool("smoke", False, "A 2-layer, 256-wide model and 2 steps: a CPU check of the harness.")
flags.DEFINE_string("json_out", None, "Also write the results as JSON here.")


def peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def run_ours(config, seq_len: int, batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qlora_jax.distributed import make_mesh, param_shardings, shard_batch, shard_tree
    from qlora_jax.lora import LoraConfig
    from qlora_jax.memory import plan_memory
    from qlora_jax.model import init_lora_params
    from qlora_jax.models.spec import ModelSpec
    from qlora_jax.optim import jit_train_step, make_optimizer
    from qlora_jax.synthetic import abstract_base, random_base
    from qlora_jax.train import make_train_step

    mesh = make_mesh(FLAGS.mesh) if FLAGS.mesh else None
    shardings = param_shardings(abstract_base(config), mesh) if mesh is not None else None
    started = time.perf_counter()
    base = random_base(config, jax.random.key(0), shardings=shardings)
    jax.block_until_ready(base)
    build_seconds = time.perf_counter() - started
    lora_config = LoraConfig(r=FLAGS.lora_r, dtype=FLAGS.lora_dtype)
    spec = ModelSpec(config, lora_config, compute_dtype="bfloat16", remat=FLAGS.remat)
    lora = init_lora_params(jax.random.key(1), spec)
    if mesh is not None:
        lora = shard_tree(lora, param_shardings(lora, mesh))
    optimizer = make_optimizer(FLAGS.optim, learning_rate=1e-4)
    opt_state = optimizer.init(lora)
    step = jit_train_step(make_train_step(spec, optimizer), opt_state, donate_argnums=(0, 1))
    rng = np.random.default_rng(0)
    host_batch = {"input_ids": rng.integers(0, config.vocab_size, (1, batch, seq_len)).astype(np.int32),
                  "attention_mask": np.ones((1, batch, seq_len), np.int32),
                  "loss_mask": np.ones((1, batch, seq_len), np.int32)}
    device_batch = shard_batch(host_batch, mesh) if mesh is not None else {k: jnp.asarray(v)
                                                                           for k, v in host_batch.items()}
    times = []
    for i in range(2 + FLAGS.steps):
        tick = time.perf_counter()
        lora, opt_state, metrics = step(lora, opt_state, base, device_batch, None)
        float(metrics["loss"])
        if i >= 2:
            times.append(time.perf_counter() - tick)
    median = statistics.median(times)
    plan = plan_memory(config, seq_len=seq_len, batch=batch, lora_r=FLAGS.lora_r, optim=FLAGS.optim,
                       remat=FLAGS.remat, lora_dtype=FLAGS.lora_dtype)
    measured = peak_bytes()
    return {
        "impl": "qlora-jax",
        "base_build_seconds": build_seconds,
        "step_seconds_median": median,
        "tokens_per_second": batch * seq_len / median,
        "peak_device_bytes": measured,
        "planned_device_bytes": plan.device_peak_bytes,
        "planned_over_measured": None if not measured else plan.device_peak_bytes / measured,
        "host_optimizer_bytes": plan.optimizer_host,
        "final_loss": float(metrics["loss"]),
    }


TORCH_BASELINE = r'''
import json, sys, time, statistics, torch
from transformers import LlamaConfig, LlamaForCausalLM, BitsAndBytesConfig
from transformers.integrations import replace_with_bnb_linear
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
import bitsandbytes as bnb
cfg, seq_len, batch, r, steps = json.loads(sys.argv[1])
config = LlamaConfig(**cfg)
torch.manual_seed(0)
with torch.device("meta"):
    model = LlamaForCausalLM(config)
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
model = replace_with_bnb_linear(model, quantization_config=quant)
model = model.to_empty(device="cuda")
for module in model.modules():  # random weights, quantized by bitsandbytes on the GPU
    if isinstance(module, bnb.nn.Linear4bit):
        w = torch.randn(module.out_features, module.in_features, device="cuda", dtype=torch.bfloat16) * 0.02
        module.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4",
                                          compress_statistics=True).cuda()
    elif isinstance(module, torch.nn.Embedding):
        torch.nn.init.normal_(module.weight, std=0.02)
    elif hasattr(module, "weight") and module.weight is not None and module.weight.ndim == 1:
        torch.nn.init.ones_(module.weight)
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
opt = bnb.optim.PagedAdamW32bit(model.parameters(), lr=1e-4, betas=(0.9, 0.999))
ids = torch.randint(0, config.vocab_size, (batch, seq_len), device="cuda")
torch.cuda.reset_peak_memory_stats()
times = []
for i in range(2 + steps):
    torch.cuda.synchronize(); tick = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3); opt.step(); opt.zero_grad()
    torch.cuda.synchronize()
    if i >= 2: times.append(time.perf_counter() - tick)
median = statistics.median(times)
print(json.dumps({"impl": "transformers+peft+bitsandbytes", "step_seconds_median": median,
                  "tokens_per_second": batch * seq_len / median,
                  "peak_device_bytes": torch.cuda.max_memory_allocated(), "final_loss": float(loss)}))
'''


def run_torch(config, seq_len: int, batch: int) -> dict:
    """The same step in PyTorch, in a subprocess (its own CUDA context and peak counter)."""
    hf = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    args = json.dumps([hf, seq_len, batch, FLAGS.lora_r, FLAGS.steps])
    proc = subprocess.run([sys.executable, "-c", TORCH_BASELINE, args], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"impl": "transformers+peft+bitsandbytes", "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    del argv
    import jax

    from qlora_jax.memory import model_config

    if FLAGS.smoke:
        from qlora_jax.models.config import LlamaConfig

        config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64)
        FLAGS.steps = 2
        seq_len, batch = 64, 8
    else:
        config = model_config(FLAGS.model)
        seq_len, batch = FLAGS.seq_len, FLAGS.batch
    device = jax.devices()[0]
    print(f"device: {device.device_kind} x{jax.device_count()}; model {FLAGS.model if not FLAGS.smoke else 'smoke'} "
          f"({config.num_parameters() / 1e9:.2f} B params), seq_len {seq_len}, batch {batch}, r={FLAGS.lora_r}, "
          f"{FLAGS.optim}, remat {'on' if FLAGS.remat else 'off'}")

    def save(results):
        if FLAGS.json_out:
            with open(FLAGS.json_out, "w") as f:
                record = {"device": device.device_kind, "config": dataclasses.asdict(config), "results": results}
                json.dump(record, f, indent=2, default=str)

    results = [run_ours(config, seq_len, batch)]
    save(results)  # before the baseline: a run stopped by a time limit keeps our row
    if FLAGS.torch_baseline:
        results.append(run_torch(config, seq_len, batch))
    gib = 2**30
    for r in results:
        if "error" in r:
            print(f"{r['impl']:<32} failed: {r['error']}")
            continue
        peak = "n/a (no allocator stats on this backend)" if not r.get("peak_device_bytes") else \
            f"{r['peak_device_bytes'] / gib:.2f} GiB"
        print(f"{r['impl']:<32} {r['tokens_per_second']:10.1f} tokens/s   step {r['step_seconds_median'] * 1e3:8.1f} ms"
              f"   peak device memory {peak}")
        if "planned_device_bytes" in r:
            ratio = ("" if r["planned_over_measured"] is None else
                     f" (planned/measured {r['planned_over_measured']:.3f})")
            print(f"{'':<32} planner: {r['planned_device_bytes'] / gib:.2f} GiB{ratio}; optimizer state on host "
                  f"{r['host_optimizer_bytes'] / gib:.2f} GiB")
    if len(results) == 2 and "error" not in results[1]:
        print(f"tokens/s ratio qlora-jax / transformers+peft+bitsandbytes: "
              f"{results[0]['tokens_per_second'] / results[1]['tokens_per_second']:.2f}")
    save(results)


def entry_point() -> None:
    """The ``qlora-jax-bench-train-step`` console script."""
    cli.run(main, __name__)


if __name__ == "__main__":
    entry_point()
