"""The QLoRA finetuning recipe: one readable loop over the library's components.

``run(FinetuneConfig(...))`` loads a model with a 4-bit base and LoRA adapters, tokenizes a chat
dataset with the source masked out, trains with a (host-offloaded) AdamW, evaluates the held-out
loss, checkpoints everything needed to resume exactly, and writes the adapter in PEFT's format.
``experiments/finetune.py`` maps absl flags onto :class:`FinetuneConfig`; its defaults run a real
finetune of the embedded SmolLM2-135M-Instruct on ``chatterbot-corpus`` in minutes on a CPU.

Outputs in ``output_dir``: ``metrics.jsonl`` (one JSON object per logged step or evaluation),
``loss_curve.png``, ``samples.json`` (held-out answers before and after), ``summary.json``,
``checkpoints/<step>/`` (Orbax: adapters, optimizer state, data position, RNG, config) and
``adapter/`` (``adapter_model.safetensors`` + ``adapter_config.json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import resource
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import data as data_lib
from qlora_jax.checkpointing import TrainCheckpointer, load_trainable
from qlora_jax.distributed import make_mesh, param_shardings, shard_batch, shard_tree
from qlora_jax.generate import SamplingConfig, generate_tokens
from qlora_jax.lora import LoraConfig
from qlora_jax.model import load_pretrained
from qlora_jax.optim import jit_train_step, lr_schedule, make_optimizer
from qlora_jax.peft_io import adapter_targets, load_peft_adapter, save_peft_adapter
from qlora_jax.train import NonFiniteLossError, make_eval_step, make_train_step

__all__ = ["FinetuneConfig", "FinetuneResult", "run"]

QUANT_FOR_BITS = {4: None, 8: "int8", 16: "bf16", 32: "float32"}


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything a finetune depends on. Field names follow artidoro/qlora's qlora.py."""

    # model and quantization
    model: str = "embedded"
    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "bfloat16"
    # LoRA
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_modules: str = "all-linear"
    use_rslora: bool = False
    lora_dtype: str | None = None  # None: the compute dtype
    full_finetune: bool = False
    adapter_init: str | None = None
    # data
    dataset: str = "chatterbot"
    dataset_format: str = "auto"
    chat_template: str | None = None
    source_max_len: int = 1024
    target_max_len: int = 256
    train_on_source: bool = False
    group_by_length: bool = True
    eval_dataset_size: float = 96
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # optimisation
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.03
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 0.3
    optim: str = "paged_adamw_32bit"
    weight_decay: float = 0.0
    gradient_checkpointing: bool = True
    # schedule and output
    logging_steps: int = 1
    eval_steps: int = 25
    save_steps: int = 50
    save_total_limit: int | None = 2
    output_dir: str = "outputs/finetune"
    seed: int = 0
    resume: bool = False
    num_sample_prompts: int = 4
    sample_max_new_tokens: int = 48
    data_workers: int = 0  # 0: one per CPU core
    # devices: a mesh spec such as "fsdp=8" or "data=2,fsdp=4" (None: the default device only)
    mesh: str | None = None

    @property
    def quant(self) -> str:
        if self.bits == 4:
            if self.quant_type not in ("nf4", "fp4"):
                raise ValueError(f"bits=4 needs quant_type nf4 or fp4, got {self.quant_type!r}")
            return self.quant_type
        if self.bits not in QUANT_FOR_BITS:
            raise ValueError(f"bits must be 4, 8, 16 or 32, got {self.bits}")
        return QUANT_FOR_BITS[self.bits]


@dataclasses.dataclass
class FinetuneResult:
    output_dir: pathlib.Path
    final_step: int
    first_eval_loss: float | None
    final_eval_loss: float | None
    train_tokens_per_second: float
    wall_seconds: float
    peak_host_memory_bytes: int
    samples: list[dict[str, str]]


def _lr_schedule(cfg: FinetuneConfig) -> Callable:
    return lr_schedule(cfg.lr_scheduler_type, cfg.learning_rate, max_steps=cfg.max_steps,
                       warmup_ratio=cfg.warmup_ratio)


def _peak_host_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _as_step_batch(batch: dict[str, np.ndarray], mesh=None) -> dict[str, jax.Array]:
    if mesh is not None:
        return shard_batch(batch, mesh)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _plot_losses(history: list[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if h["kind"] == "train"]
    evals = [(h["step"], h["eval_loss"]) for h in history if h["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, alpha=0.35, label="train loss (per step)")
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label=f"train loss ({window}-step mean)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response-token loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: FinetuneConfig, *, log: Callable[[str], None] = print, progress: bool = True) -> FinetuneResult:
    """Runs (or, with ``cfg.resume``, continues) a finetune; see the module docstring."""
    started = time.perf_counter()
    out = pathlib.Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    flags_dict = dataclasses.asdict(cfg)

    # --- model: frozen quantized base + fresh adapters -------------------------------------
    lora_config = LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             target_modules=cfg.lora_modules, use_rslora=cfg.use_rslora,
                             dtype=cfg.lora_dtype)
    model, tokenizer = load_pretrained(cfg.model, quant=cfg.quant, double_quant=cfg.double_quant,
                                       blocksize=cfg.blocksize, lora=lora_config, full_finetune=cfg.full_finetune,
                                       compute_dtype=cfg.compute_dtype, remat=cfg.gradient_checkpointing,
                                       seed=cfg.seed)
    if tokenizer is None:
        raise ValueError(f"{cfg.model} has no tokenizer.json; a finetune needs one")
    config, spec = model.config, model.spec
    log(model.load_stats.summary())
    frozen = None if cfg.full_finetune else model.base_params
    trainable = model.base_params if cfg.full_finetune else model.lora_params
    if cfg.adapter_init:
        trainable = _initial_adapters(cfg.adapter_init, config, trainable, log)
    mesh, data_parallel = None, 1
    if cfg.mesh:
        # Shard the packed base, the adapters (and so the optimizer state) and the batches.
        mesh = make_mesh(cfg.mesh)
        data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
        trainable = shard_tree(trainable, param_shardings(trainable, mesh))
        if frozen is not None:
            frozen = shard_tree(frozen, param_shardings(frozen, mesh))
        log(f"mesh {dict(mesh.shape)} over {mesh.size} devices; global batch "
            f"{cfg.per_device_train_batch_size * data_parallel}")

    # --- data: held-out split, chat template, source masked ---------------------------------
    examples = data_lib.load_examples(cfg.dataset, cfg.dataset_format)
    train_examples, eval_examples, cleaning = data_lib.train_eval_split(
        examples, cfg.eval_dataset_size, cfg.seed, max_train_samples=cfg.max_train_samples,
        max_eval_samples=cfg.max_eval_samples)
    log(cleaning.summary())
    workers = cfg.data_workers or os.cpu_count() or 1
    tokenize = lambda ex: data_lib.tokenize_examples(  # noqa: E731
        ex, tokenizer, template=cfg.chat_template, source_max_len=cfg.source_max_len,
        target_max_len=cfg.target_max_len, train_on_source=cfg.train_on_source, num_workers=workers)
    train_tokens, eval_tokens = tokenize(train_examples), tokenize(eval_examples)
    buckets = data_lib.bucket_lengths(cfg.source_max_len + cfg.target_max_len)
    log(f"data: {len(train_tokens)} training and {len(eval_tokens)} held-out conversations from {cfg.dataset}")

    # --- optimizer and compiled steps -------------------------------------------------------
    schedule = _lr_schedule(cfg)
    optimizer = make_optimizer(cfg.optim, learning_rate=schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2,
                               weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)
    opt_state = optimizer.init(trainable)
    # Explicit shardings (memory kinds included) so that host-offloaded state can be donated.
    train_step = jit_train_step(make_train_step(spec, optimizer), opt_state, donate_argnums=(0, 1))
    eval_step = jax.jit(make_eval_step(spec))

    def evaluate(params) -> float:
        total, count = 0.0, 0.0
        for batch in data_lib.eval_batches(eval_tokens, batch_size=cfg.per_device_eval_batch_size * data_parallel,
                                           pad_id=tokenizer.pad_id, buckets=buckets):
            stacked = data_lib.stack_batches([batch], tokenizer.pad_id)
            loss_sum, tokens = eval_step(params, frozen, _as_step_batch(stacked, mesh))
            total, count = total + float(loss_sum), count + float(tokens)
        return total / max(count, 1.0)

    # --- resume -----------------------------------------------------------------------------
    checkpointer = TrainCheckpointer(out / "checkpoints", max_to_keep=cfg.save_total_limit)
    if not cfg.resume and checkpointer.latest_step() is not None:
        # A fresh run must not overwrite (and so lose) an earlier run's checkpoints.
        raise FileExistsError(
            f"{checkpointer.directory} already holds checkpoints (latest step {checkpointer.latest_step()}): "
            "pass resume=True (--resume) to continue that run, or choose another output_dir")
    rng = jax.random.key(cfg.seed)
    step, data_state = 0, None
    if cfg.resume:
        restored = checkpointer.restore(trainable, opt_state)
        if restored is None:
            log(f"--resume: no checkpoint in {checkpointer.directory}, starting from step 0")
        else:
            step, trainable, opt_state = restored.step, restored.trainable, restored.opt_state
            data_state, rng = restored.data_state, restored.rng_key
            log(f"resumed from step {step} ({checkpointer.directory / str(step)})")
    batches = data_lib.BatchIterator(train_tokens, batch_size=cfg.per_device_train_batch_size * data_parallel,
                                     pad_id=tokenizer.pad_id, buckets=buckets, seed=cfg.seed,
                                     group_by_length=cfg.group_by_length, state=data_state)

    # --- held-out answers before training ---------------------------------------------------
    sample_prompts = [ex for ex in eval_examples if ex.messages[0]["role"] != "assistant"][: cfg.num_sample_prompts]
    samples_file = out / "samples.json"
    samples = json.loads(samples_file.read_text()) if (cfg.resume and samples_file.exists()) else \
        _held_out_samples(sample_prompts, model, tokenizer, spec, frozen, trainable, cfg)

    metrics_file = (out / "metrics.jsonl").open("a" if cfg.resume else "w")
    history: list[dict[str, Any]] = []

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        metrics_file.write(json.dumps(entry) + "\n")
        metrics_file.flush()

    first_eval = None
    if step == 0:
        first_eval = evaluate(trainable)
        record({"kind": "eval", "step": 0, "eval_loss": first_eval, "eval_perplexity": math.exp(first_eval)})
        log(f"held-out loss before training: {first_eval:.3f} nats (perplexity {math.exp(first_eval):.1f})")

    # --- the loop ---------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not progress, dynamic_ncols=True, desc="finetune")
    train_tokens_seen, train_seconds = 0.0, 0.0
    eval_loss = first_eval
    while step < cfg.max_steps:
        batch = _as_step_batch(batches.next_batches(cfg.gradient_accumulation_steps), mesh)
        key = jax.random.fold_in(rng, step) if cfg.lora_dropout > 0 else None
        tick = time.perf_counter()
        trainable, opt_state, metrics = train_step(trainable, opt_state, frozen, batch, key)
        loss, finite = float(metrics["loss"]), bool(metrics["finite"])
        seconds = time.perf_counter() - tick
        step += 1
        if not finite:
            checkpointer.wait()
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (loss={loss}, grad_norm={float(metrics['grad_norm'])}): stopped "
                f"without saving; the last good checkpoint is step {checkpointer.latest_step()} in "
                f"{checkpointer.directory} (resume from it with a lower learning_rate)")
        tokens = float(jnp.sum(batch["attention_mask"]))
        if step > 1:  # the first step includes compilation
            train_tokens_seen, train_seconds = train_tokens_seen + tokens, train_seconds + seconds
        lr = float(schedule(step - 1))
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            record({"kind": "train", "step": step, "loss": loss, "learning_rate": lr,
                    "grad_norm": float(metrics["grad_norm"]), "tokens": tokens, "seconds": seconds,
                    "epoch": batches.epoch})
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
        bar.update(1)
        if step % cfg.eval_steps == 0 or step == cfg.max_steps:
            eval_loss = evaluate(trainable)
            record({"kind": "eval", "step": step, "eval_loss": eval_loss, "eval_perplexity": math.exp(eval_loss)})
            bar.write(f"step {step}: held-out loss {eval_loss:.3f} nats (perplexity {math.exp(eval_loss):.1f})")
        if step % cfg.save_steps == 0 or step == cfg.max_steps:
            checkpointer.save(step, trainable, opt_state, data_state=batches.state, rng_key=rng, flags=flags_dict,
                              extra={"lora_config": lora_config.to_peft_config(spec.lora_targets, cfg.model)})
    bar.close()
    checkpointer.close()
    metrics_file.close()

    # --- outputs ----------------------------------------------------------------------------
    if not cfg.full_finetune:
        save_peft_adapter(out / "adapter", trainable, lora_config, config, base_model_name_or_path=cfg.model)
    after = _held_out_samples(sample_prompts, model, tokenizer, spec, frozen, trainable, cfg)
    for sample, answer in zip(samples, after):
        sample["after"] = answer["before"]
    samples_file.write_text(json.dumps(samples, indent=2))
    all_history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    _plot_losses(all_history, out / "loss_curve.png")
    result = FinetuneResult(
        output_dir=out, final_step=step, first_eval_loss=next((h["eval_loss"] for h in all_history
                                                               if h["kind"] == "eval" and h["step"] == 0), None),
        final_eval_loss=eval_loss, train_tokens_per_second=train_tokens_seen / max(train_seconds, 1e-9),
        wall_seconds=time.perf_counter() - started, peak_host_memory_bytes=_peak_host_bytes(), samples=samples)
    summary = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in dataclasses.asdict(result).items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "completed").write_text(f"step {step}\n")
    return result


def _initial_adapters(path: str, config, trainable, log) -> Any:
    """Adapters from a PEFT folder or from an Orbax checkpoint directory of an earlier run."""
    source = pathlib.Path(path)
    if (source / "adapter_config.json").exists():
        lora, _ = load_peft_adapter(source, config)
        log(f"adapters initialised from the PEFT adapter {source}")
    else:
        lora = load_trainable(source, trainable)
        log(f"adapters initialised from the checkpoint {source}")
    if jax.tree.structure(lora) != jax.tree.structure(trainable):
        raise ValueError(f"adapters in {source} target other modules than this run ({list(adapter_targets(trainable))})")
    return jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), lora, trainable)


def _held_out_samples(examples, model, tokenizer, spec, frozen, trainable, cfg) -> list[dict[str, str]]:
    """Greedy answers to the first user turn of held-out conversations."""
    if not examples:
        return []
    prompts, records = [], []
    for example in examples:
        first_user = next(i for i, m in enumerate(example.messages) if m["role"] == "user")
        messages = list(example.messages[: first_user + 1])
        reference = next((m["content"] for m in example.messages[first_user + 1:] if m["role"] == "assistant"), "")
        prompts.append(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                      template=cfg.chat_template)))
        records.append({"question": messages[-1]["content"], "reference": reference})
    stops = tuple(sorted({*spec.config.stop_token_ids, *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])}))
    sampling = SamplingConfig(max_new_tokens=cfg.sample_max_new_tokens, stop_token_ids=stops)
    base, lora = (trainable, None) if spec.full_finetune else (frozen, trainable)
    replies = generate_tokens(spec, base, lora, prompts, sampling, pad_id=tokenizer.pad_id)
    for record_, reply in zip(records, replies):
        record_["before"] = tokenizer.decode(reply)
    return records
