"""The finetune recipe's steps, each usable alone over explicit pytrees (torchtune-style).

:func:`qlora_jax.finetune.run` is their sequence; a JAX user writing their own loop takes the ones
they need::

    mesh = setup_mesh(cfg)                                     # jax Mesh or None
    model, tokenizer = setup_model(cfg, mesh)                  # CausalLM: spec + (sharded) base + adapters
    data = setup_data(cfg, tokenizer, data_parallel=data_parallel_size(mesh))
    optimizer, schedule = setup_optimizer(cfg)                 # optax transform, step -> learning rate
    trainable, frozen = split_trainable(model)                 # the pytrees the train step takes
    state = restore_or_init(cfg, checkpointer, trainable, optimizer)  # TrainState
    train_step, eval_step = compile_steps(model.spec, optimizer, state.opt_state)
    # ... then train_loop(...) and write_outputs(...), or a loop of one's own.

Before any of these, :func:`check_adapter_init`, :func:`open_checkpoints` and
:func:`finished_result` refuse what cannot work (from files alone, in seconds) and
:class:`~qlora_jax.recipe.run_lock.RunLock` keeps a second run out of ``output_dir``. Messages go to
``logging`` (``qlora_jax.recipe.steps``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import assets
from qlora_jax import data as data_lib
from qlora_jax.checkpoints.load import open_checkpoint, read_config
from qlora_jax.distributed import (
    axes_across_processes,
    make_mesh,
    multiprocess,
    param_shardings,
    parse_mesh_spec,
    process_rows,
    shard_batch,
    shard_tree,
)
from qlora_jax.generate import SamplingConfig, generate_tokens
from qlora_jax.hardware import choose_compute_dtype
from qlora_jax.lora import LoraConfig
from qlora_jax.model import CausalLM, load_pretrained, load_pretrained_cached
from qlora_jax.models.layout import lora_targets
from qlora_jax.models.spec import ModelSpec
from qlora_jax.optim import jit_train_step, lr_schedule, make_optimizer
from qlora_jax.peft_io import adapter_targets, load_peft_adapter, save_peft_adapter
from qlora_jax.recipe.config import FinetuneConfig
from qlora_jax.recipe.divergence import DivergenceMonitor, Health
from qlora_jax.recipe.run_lock import RunLock
from qlora_jax.recipe.settings import ConfigError, unavailable
from qlora_jax.tokenizer import Tokenizer
from qlora_jax.train import NonFiniteLossError, make_eval_step, make_train_step
from qlora_jax.training_state import TrainCheckpointer, load_step_meta, load_trainable

__all__ = [
    "FinetuneData", "FinetuneResult", "LoopResult", "MetricsLog", "TrainState", "TrainingCollapsedError",
    "check_adapter_init", "check_resume_batch", "check_resume_settings", "checkpoint_extra", "compile_steps",
    "lock_output_dir", "training_batches", "data_parallel_size", "device_batch", "process_rows",
    "evaluate", "finished_result", "held_out_answers", "held_out_batches", "open_checkpoints", "restore_or_init",
    "samples_before_training", "setup_data",
    "setup_mesh", "setup_model", "setup_optimizer", "split_trainable", "train_loop", "tree_all_finite",
    "with_trainable", "write_outputs",
]

log = logging.getLogger(__name__)

METRICS, SAMPLES, SUMMARY, COMPLETED = "metrics.jsonl", "samples.json", "summary.json", "completed"


class TrainingCollapsedError(FloatingPointError):
    """Training went on but the model died (uniform output, no gradient); see DivergenceMonitor."""


class TrainState(NamedTuple):
    """What a step changes: the step count, the trainable pytree, the optimizer state, the RNG key
    (dropout; ``jax.random.fold_in(rng_key, step)`` per step) and the data position
    (:attr:`qlora_jax.data.BatchIterator.state`, None at the start)."""

    step: int
    trainable: Any
    opt_state: Any
    rng_key: jax.Array
    data_state: dict[str, int] | None


class FinetuneData(NamedTuple):
    """Tokenized training and held-out conversations, the held-out conversations whose first
    question is answered before and after training, and the padding buckets (tokens)."""

    train: list[data_lib.TokenizedExample]
    held_out: list[data_lib.TokenizedExample]
    sample_conversations: list[data_lib.Example]
    buckets: tuple[int, ...]


class LoopResult(NamedTuple):
    """The state after the loop, the held-out loss of that state (nats) and the training
    throughput (target and prompt tokens per second, steps that compiled excluded)."""

    state: TrainState
    eval_loss: float
    tokens_per_second: float


@dataclasses.dataclass
class FinetuneResult:
    """What a finetune produced (also written to ``summary.json``); losses in nats per target token."""

    output_dir: pathlib.Path
    final_step: int
    first_eval_loss: float | None
    final_eval_loss: float | None
    train_tokens_per_second: float
    wall_seconds: float
    peak_host_memory_bytes: int
    samples: list[dict[str, str]]


# ----------------------------------------------------------------------------- before any work
def check_adapter_init(cfg: FinetuneConfig) -> None:
    """Refuses ``adapter_init`` adapters whose rank, alpha or rsLoRA differ from the run's.

    Decided: refuse rather than adopt, so that the exported adapter's config always describes its
    tensors and the run trains exactly what its flags say. Reads the PEFT ``adapter_config.json``
    or the checkpoint's saved LoRA config; no array is loaded.
    """
    if not cfg.adapter_init:
        return
    source = pathlib.Path(cfg.adapter_init)
    if (source / "adapter_config.json").exists():
        peft_config = json.loads((source / "adapter_config.json").read_text())
    else:
        try:
            peft_config = load_step_meta(source).get("lora_config")
        except FileNotFoundError as err:
            raise ConfigError(f"adapter_init={cfg.adapter_init!r}: neither a PEFT adapter folder (no "
                              f"adapter_config.json) nor a run's checkpoints ({err})") from None
        if peft_config is None:
            raise ConfigError(f"adapter_init={cfg.adapter_init!r}: the checkpoint holds no LoRA config")
    saved = LoraConfig.from_peft_config(peft_config)
    ours = cfg.lora_config()
    differ = [f"{flag}: adapters {theirs}, run {mine}" for flag, theirs, mine in (
        ("lora_r", saved.r, ours.r), ("lora_alpha", saved.alpha, ours.alpha),
        ("use_rslora", saved.use_rslora, ours.use_rslora)) if theirs != mine]
    if differ:
        raise ConfigError(f"adapter_init={cfg.adapter_init!r}: its adapters do not match this run ("
                          + "; ".join(differ) + "). Pass the adapters' values (e.g. --lora_r="
                          f"{saved.r} --lora_alpha={saved.alpha:g}) to continue from them")


def check_resume_settings(saved_flags: dict[str, Any], cfg: FinetuneConfig, where: str) -> None:
    """Refuses to resume with settings other than the saved ones, but for those that may change
    (:meth:`FinetuneConfig.resume_may_change`). A setting the saved run did not have yet counts as
    unchanged when it has its default."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))
    allowed = set(cfg.resume_may_change())
    differ = []
    for name, value in now.items():
        if name in allowed:
            continue
        if name not in saved_flags:
            if value != json.loads(json.dumps(cfg.field_default(name))):
                differ.append(f"{name}: (not saved) -> {value!r}")
        elif saved_flags[name] != value:
            differ.append(f"{name}: {saved_flags[name]!r} -> {value!r}")
    if differ:
        raise ConfigError(
            f"resume: the checkpoint in {where} was saved with other settings: " + "; ".join(differ)
            + f". Only {', '.join(sorted(allowed))} may change on --resume. Pass the saved values, or train in "
            f"a new output_dir (e.g. with --adapter_init={where})")
    old_steps = saved_flags.get("max_steps", cfg.max_steps)
    if old_steps != cfg.max_steps and (cfg.lr_scheduler_type != "constant" or
                                       math.ceil(cfg.warmup_ratio * old_steps) !=
                                       math.ceil(cfg.warmup_ratio * cfg.max_steps)):
        log.warning("max_steps %d -> %d: the %s learning-rate schedule (and its warmup) follows max_steps, so from "
                    "the resumed step on it is that of a %d-step run", old_steps, cfg.max_steps,
                    cfg.lr_scheduler_type, cfg.max_steps)


def check_resume_batch(saved_data_state: dict[str, Any] | None, cfg: FinetuneConfig, where: str) -> None:
    """Refuses a resume whose global batch differs from the checkpoint's: the mesh and
    ``per_device_train_batch_size`` may change (another device or process count), their product
    with the data-parallel devices may not (the data order and each step's mean depend on it)."""
    if not saved_data_state or "batch_size" not in saved_data_state:
        return
    try:
        shards = 1 if not cfg.mesh else math.prod(
            n for axis, n in parse_mesh_spec(cfg.mesh, jax.device_count()).items() if axis in ("data", "fsdp"))
    except ValueError:
        return  # setup_mesh names the problem with the mesh
    saved, now = int(saved_data_state["batch_size"]), cfg.per_device_train_batch_size * shards
    if saved != now:
        raise ConfigError(
            f"per_device_train_batch_size={cfg.per_device_train_batch_size}: with mesh={cfg.mesh!r} over "
            f"{jax.device_count()} devices the global batch is {now} sequences, but the checkpoint in {where} was "
            f"trained with {saved}. A resume may change the mesh but not the global batch: pass "
            f"per_device_train_batch_size={saved // shards if saved % shards == 0 else '...'} "
            f"({shards} data-parallel devices), or another mesh")


def open_checkpoints(cfg: FinetuneConfig) -> TrainCheckpointer:
    """The run's checkpointer, after the checks that need only its files.

    A fresh run refuses a directory that holds checkpoints (it would lose them); ``resume``
    compares the saved settings (:func:`check_resume_settings`) and refuses a ``max_steps`` below
    the checkpoint's step.
    """
    checkpointer = TrainCheckpointer(pathlib.Path(cfg.output_dir) / "checkpoints", max_to_keep=cfg.save_total_limit)
    try:
        latest = checkpointer.latest_step()
        if latest is not None and not cfg.resume:
            raise FileExistsError(
                f"{checkpointer.directory} already holds checkpoints (latest step {latest}): pass resume=True "
                "(--resume) to continue that run, or choose another output_dir")
        if latest is not None:
            meta = checkpointer.read_meta(latest)
            check_resume_settings(meta.get("flags", {}), cfg, str(checkpointer.directory))
            check_resume_batch(meta.get("data_state"), cfg, str(checkpointer.directory))
            if latest > cfg.max_steps:
                raise ConfigError(f"max_steps={cfg.max_steps}: the checkpoint in {checkpointer.directory} is already "
                                  f"at step {latest}; pass max_steps >= {latest} (a larger value continues the run)")
    except BaseException:
        checkpointer.close()
        raise
    return checkpointer


def finished_result(cfg: FinetuneConfig, checkpointer: TrainCheckpointer) -> FinetuneResult | None:
    """The saved result of a run that already finished at ``max_steps`` (a ``--resume`` with nothing
    to do), else None. A run that continues loses its ``completed`` marker until it finishes again."""
    out = pathlib.Path(cfg.output_dir)

    def read() -> dict[str, Any] | None:
        done = cfg.resume and checkpointer.latest_step() == cfg.max_steps and (out / COMPLETED).exists()
        if done and (out / SUMMARY).exists():
            return json.loads((out / SUMMARY).read_text())
        (out / COMPLETED).unlink(missing_ok=True)
        return None

    # Process 0's reading, so that no process sees the marker another has just removed.
    summary = multiprocess.from_primary(read, "the finished run")
    if summary is None:
        return None
    log.info("%s already finished at step %d: nothing to do (pass a larger --max_steps to train further)", out,
             cfg.max_steps)
    return FinetuneResult(**{**summary, "output_dir": out})


def lock_output_dir(cfg: FinetuneConfig):
    """The :class:`~qlora_jax.recipe.run_lock.RunLock` of ``output_dir``, held by process 0 of a
    multi-process run; every process enters once process 0 holds it, and all raise if it cannot
    (the others :class:`~qlora_jax.distributed.PrimaryProcessError`, with process 0's message)."""
    return multiprocess.primary_context(lambda: RunLock(cfg.output_dir, force=cfg.force_unlock), "the run lock")


# ----------------------------------------------------------------------------- model, data, optimizer
def setup_mesh(cfg: FinetuneConfig) -> jax.sharding.Mesh | None:
    """The device mesh ``cfg.mesh`` names over all devices (every process's), or None for the
    default device. A run over several processes needs one."""
    if not cfg.mesh:
        if jax.process_count() > 1:
            raise ConfigError(f"mesh=None: a run over {jax.process_count()} processes needs a mesh over all their "
                              f"{jax.device_count()} devices, e.g. --mesh=fsdp=-1 or --mesh=data={jax.process_count()},"
                              "fsdp=-1")
        return None
    try:
        mesh = make_mesh(cfg.mesh)
    except ValueError as err:
        raise ConfigError(f"mesh={cfg.mesh!r}: {err}") from None
    log.info("mesh %s over %d devices; global batch %d", dict(mesh.shape), mesh.size,
             cfg.per_device_train_batch_size * data_parallel_size(mesh))
    if jax.process_count() > 1:
        spans = axes_across_processes(mesh)
        log.info("mesh over %d processes: %s", jax.process_count(), ", ".join(
            f"{axis}={mesh.shape[axis]} " + ("within each process" if n == 1 else f"across {n} processes")
            for axis, n in spans.items() if mesh.shape[axis] > 1))
        if spans["tensor"] > 1:
            log.warning("the tensor axis spans %d processes: every layer's activations cross the network; put "
                        "tensor within a host (a tensor size that divides the devices of one process)", spans["tensor"])
    return mesh


def data_parallel_size(mesh: jax.sharding.Mesh | None) -> int:
    """How many ways a batch is split: the mesh's data x fsdp axes (1 without a mesh)."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def split_trainable(model: CausalLM) -> tuple[Any, Any]:
    """``(trainable, frozen)``: the adapters and the frozen base, or for a full finetune the base and None."""
    if model.spec.full_finetune:
        return model.base_params, None
    return model.lora_params, model.base_params


def with_trainable(model: CausalLM, trainable: Any) -> CausalLM:
    """The same model (spec, frozen base) with ``trainable`` as its adapters (or as its base, when full)."""
    if model.spec.full_finetune:
        new = CausalLM(model.spec, trainable)
    else:
        new = CausalLM(model.spec, model.base_params, trainable)
    new.load_stats = model.load_stats
    return new


def _check_model_settings(cfg: FinetuneConfig) -> None:
    """What the model's config.json decides (adapter targets, context length), before loading weights."""
    _, hf_config = open_checkpoint(assets.embedded_model_path() if cfg.model == "embedded" else cfg.model)
    config = read_config(hf_config)
    if not cfg.full_finetune:
        if cfg.train_router and not config.is_moe:
            raise ConfigError(f"train_router=True: trains the routers of a mixture-of-experts model (Mixtral, "
                              f"Qwen3-MoE); {cfg.model} (model_type {config.model_type!r}) has none")
        if cfg.peft_expert_format != "per_expert" and not config.is_moe:
            raise ConfigError(f"peft_expert_format={cfg.peft_expert_format!r}: chooses how a mixture of experts' "
                              f"expert adapters are written; {cfg.model} (model_type {config.model_type!r}) has no "
                              "experts")
        try:
            lora_targets(cfg.lora_config(), config)
        except ValueError as err:
            raise ConfigError(f"lora_modules={cfg.lora_modules!r}: {err}") from None
    context = cfg.source_max_len + cfg.target_max_len
    if context > config.max_position_embeddings:
        raise ConfigError(f"source_max_len + target_max_len = {context}: longer than the model's "
                          f"max_position_embeddings ({config.max_position_embeddings})")


def setup_model(cfg: FinetuneConfig, mesh: jax.sharding.Mesh | None = None) -> tuple[CausalLM, Tokenizer]:
    """The model (frozen quantized base, fresh or ``adapter_init`` adapters) and its tokenizer.

    With a mesh, the packed base and the adapters (and so later the optimizer state) are sharded
    over it (:func:`qlora_jax.distributed.param_shardings`).
    """
    _check_model_settings(cfg)
    compute_dtype, why = choose_compute_dtype(cfg.compute_dtype)
    log.info("compute dtype %s: %s", compute_dtype, why)
    quant = cfg.quant_config()
    options = dict(lora=None if cfg.full_finetune else cfg.lora_config(), full_finetune=cfg.full_finetune,
                   compute_dtype=compute_dtype, remat=cfg.gradient_checkpointing, seed=cfg.seed, mesh=mesh)
    if quant.quantized:
        # The quantized base is written once per output directory (base/) and read back on resume:
        # no second quantization of the source checkpoint, the same bytes.
        model, tokenizer, _ = load_pretrained_cached(cfg.output_dir, cfg.model, quant, **options)
    else:
        model, tokenizer = load_pretrained(cfg.model, quant, **options)
    if tokenizer is None:
        raise ConfigError(f"model={cfg.model!r}: has no tokenizer.json; a finetune needs one")
    log.info("%s", model.load_stats.summary())
    trainable, frozen = split_trainable(model)
    if cfg.adapter_init:
        trainable = _initial_adapters(cfg.adapter_init, model)
    if mesh is not None:
        trainable = shard_tree(trainable, param_shardings(trainable, mesh))
        frozen = None if frozen is None else shard_tree(frozen, param_shardings(frozen, mesh))
    if model.spec.full_finetune:
        sharded = CausalLM(model.spec, trainable)
    else:
        sharded = CausalLM(model.spec, frozen, trainable)
    sharded.load_stats = model.load_stats
    return sharded, tokenizer


def _initial_adapters(path: str, model: CausalLM) -> Any:
    """Adapters from a PEFT folder or an earlier run's checkpoint, as the model's adapter dtypes."""
    source = pathlib.Path(path)
    fresh = model.lora_params
    if (source / "adapter_config.json").exists():
        lora, _ = load_peft_adapter(source, model.config)
        log.info("adapters initialised from the PEFT adapter %s", source)
    else:
        lora = load_trainable(source, fresh)
        log.info("adapters initialised from the checkpoint %s", source)
    if jax.tree.structure(lora) != jax.tree.structure(fresh):
        routers = ["gate" in t["layers"].get("mlp", {}) for t in (lora, fresh)]
        if routers[0] != routers[1]:
            raise ConfigError(f"adapter_init={path!r}: {'holds' if routers[0] else 'holds no'} trained MoE routers "
                              f"(modules_to_save=['gate']) but this run has train_router={routers[1]}")
        raise ConfigError(f"adapter_init={path!r}: its adapters target {list(adapter_targets(lora))}, this run "
                          f"{list(adapter_targets(fresh))} (lora_modules={model.spec.lora_config.target_modules!r})")
    return jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), lora, fresh)


def setup_data(cfg: FinetuneConfig, tokenizer: Tokenizer, *, data_parallel: int = 1) -> FinetuneData:
    """The held-out split, chat-templated and tokenized with the source masked (see :mod:`qlora_jax.data`)."""
    examples = data_lib.load_examples(cfg.dataset, cfg.dataset_format)
    try:
        train, held_out, cleaning = data_lib.train_eval_split(examples, cfg.eval_dataset_size, cfg.seed,
                                                              max_train_samples=cfg.max_train_samples,
                                                              max_eval_samples=cfg.max_eval_samples)
    except ValueError as err:  # a held-out count that leaves nothing to train on: the flag, not a traceback
        raise ConfigError(f"eval_dataset_size={cfg.eval_dataset_size!r}: {err} in {cfg.dataset}; pass a smaller "
                          "count or a fraction such as --eval_dataset_size=0.1") from None
    log.info("%s", cleaning.summary())
    global_batch = cfg.per_device_train_batch_size * data_parallel
    if len(train) < global_batch:
        raise ConfigError(f"per_device_train_batch_size={cfg.per_device_train_batch_size}: a global batch of "
                          f"{global_batch} needs at least that many training conversations; {cfg.dataset} leaves "
                          f"{len(train)} after holding out {len(held_out)}")
    workers = cfg.data_workers or os.cpu_count() or 1

    def tokenize(part):
        return data_lib.tokenize_examples(part, tokenizer, template=cfg.chat_template,
                                          source_max_len=cfg.source_max_len, target_max_len=cfg.target_max_len,
                                          train_on_source=cfg.train_on_source, num_workers=workers)

    askable = [ex for ex in held_out if any(m["role"] == "user" for m in ex.messages)
               and ex.messages[0]["role"] != "assistant"]
    data = FinetuneData(tokenize(train), tokenize(held_out), askable[: cfg.num_sample_prompts],
                        data_lib.bucket_lengths(cfg.source_max_len + cfg.target_max_len))
    log.info("data: %d training and %d held-out conversations from %s", len(data.train), len(data.held_out),
             cfg.dataset)
    return data


def _lr_schedule(cfg: FinetuneConfig) -> Callable:
    return lr_schedule(cfg.lr_scheduler_type, cfg.learning_rate, max_steps=cfg.max_steps,
                       warmup_ratio=cfg.warmup_ratio)


def training_batches(cfg: FinetuneConfig, data: FinetuneData, pad_id: int, state: TrainState,
                     data_parallel: int = 1, rows: Sequence[int] | None = None) -> data_lib.BatchIterator:
    """The endless training batches of global size ``per_device_train_batch_size * data_parallel``,
    from ``state``'s (global) data position; ``rows``: the rows of each this process reads
    (:func:`process_rows`; default all)."""
    return data_lib.BatchIterator(data.train, batch_size=cfg.per_device_train_batch_size * data_parallel,
                                  pad_id=pad_id, buckets=data.buckets, seed=cfg.seed,
                                  group_by_length=cfg.group_by_length, state=state.data_state, rows=rows)


def setup_optimizer(cfg: FinetuneConfig):
    """``(optimizer, schedule)``: the optax transform ``cfg.optim`` and its learning rate per step."""
    schedule = _lr_schedule(cfg)
    # The paged state's placement is decided from free device memory: the same on every process.
    optimizer = make_optimizer(cfg.optim, learning_rate=schedule, b1=cfg.adam_beta1, b2=cfg.adam_beta2,
                               weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                               free_device_bytes=multiprocess.agreed_free_device_bytes)
    return optimizer, schedule


def restore_or_init(cfg: FinetuneConfig, checkpointer: TrainCheckpointer, trainable: Any, optimizer) -> TrainState:
    """The latest checkpoint's state when ``cfg.resume`` (and there is one), else step 0 with
    ``trainable``, a fresh optimizer state and the seed's RNG key. ``trainable`` also gives the
    restored arrays their structure, dtypes and shardings."""
    opt_state = optimizer.init(trainable)
    fresh = TrainState(0, trainable, opt_state, jax.random.key(cfg.seed), None)
    if not cfg.resume:
        return fresh
    restored = checkpointer.restore(trainable, opt_state)
    if restored is None:
        log.info("--resume: no checkpoint in %s, starting from step 0", checkpointer.directory)
        return fresh
    log.info("resumed from step %d (%s)", restored.step, checkpointer.directory / str(restored.step))
    return TrainState(restored.step, restored.trainable, restored.opt_state, restored.rng_key, restored.data_state)


def checkpoint_extra(cfg: FinetuneConfig, model: CausalLM) -> dict[str, Any]:
    """What a checkpoint's meta says about the adapters: their PEFT config (None for a full finetune)."""
    spec = model.spec
    return {"lora_config": None if spec.lora_config is None else
            spec.lora_config.to_peft_config(spec.lora_targets, cfg.model)}


def compile_steps(spec: ModelSpec, optimizer, opt_state: Any) -> tuple[Callable, Callable]:
    """``(train_step, eval_step)`` jitted (see :func:`qlora_jax.train.make_train_step`); the train
    step donates the trainable pytree and the optimizer state, whose shardings it keeps."""
    train_step = jit_train_step(make_train_step(spec, optimizer), opt_state, donate_argnums=(0, 1))
    return train_step, jax.jit(make_eval_step(spec))


# ----------------------------------------------------------------------------- evaluation and samples
def device_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh | None = None, *,
                 rows: Sequence[int] | None = None, batch_size: int | None = None) -> dict[str, jax.Array]:
    """A host batch on the device (split over the mesh's data axes when there is one).

    ``rows``/``batch_size``: the host batch holds these rows of a global batch of ``batch_size``
    (:func:`process_rows`; default: the whole batch), and the result is the global batch.
    """
    if mesh is not None:
        return shard_batch(batch, mesh, rows=rows, batch_size=batch_size)
    return {k: jnp.asarray(v) for k, v in batch.items()}


# Longest multiple-choice prompt + choice scored (tokens); longer contexts lose their start.
MC_EVAL_MAX_LENGTH = 2048


def setup_mc_eval(cfg: FinetuneConfig, model: CausalLM, tokenizer: Tokenizer, mesh: jax.sharding.Mesh | None,
                  frozen: Any) -> Callable[[Any], dict[str, Any]] | None:
    """The multiple-choice evaluation of ``cfg.mc_eval_task`` (None when there is none):
    ``mc_eval(trainable) -> metrics`` (``mc_acc``, ``mc_acc_norm``, ``mc_answer_loss``, per subject;
    :class:`qlora_jax.eval.MultipleChoiceEvaluator`), for the frozen base ``frozen``.

    A held-out split too small for the chatterbot task: with ``mc_eval_file="auto"`` a warning and
    None (no evaluation), with an explicit ``"chatterbot"`` a :class:`ConfigError`
    (:func:`~qlora_jax.recipe.settings.unavailable`)."""
    if cfg.mc_eval_task is None:
        return None
    from qlora_jax import eval as eval_lib

    if cfg.mc_eval_task.lower().endswith((".yaml", ".yml")):
        return _setup_lm_eval_task(cfg, model, tokenizer, mesh, frozen)
    try:
        task = eval_lib.load_task(cfg.mc_eval_task, shots=cfg.mc_eval_shots, dev_file=cfg.mc_eval_dev_file,
                                  eval_dataset_size=cfg.eval_dataset_size, seed=cfg.seed,
                                  max_eval_samples=cfg.max_eval_samples)
    except eval_lib.HeldOutTooSmallError as err:
        needed = ("the dataset is too small for it" if err.needed is None else
                  f"hold out more: --eval_dataset_size={err.needed}"
                  + (f" --max_eval_samples={err.needed}" if cfg.max_eval_samples is not None
                     and cfg.max_eval_samples < err.needed else ""))
        unavailable(cfg, "mc_eval_file", str(err), needed)
        return None
    evaluator = eval_lib.MultipleChoiceEvaluator(
        model.spec, tokenizer, task, batch_size=cfg.per_device_eval_batch_size * data_parallel_size(mesh), mesh=mesh,
        template=cfg.chat_template, max_length=min(model.config.max_position_embeddings, MC_EVAL_MAX_LENGTH))
    log.info("multiple-choice evaluation: %s", task.description)
    if cfg.full_finetune:
        return lambda trainable: evaluator(trainable, None)
    return lambda trainable: evaluator(frozen, trainable)


def _setup_lm_eval_task(cfg: FinetuneConfig, model: CausalLM, tokenizer: Tokenizer, mesh: jax.sharding.Mesh | None,
                        frozen: Any) -> Callable[[Any], dict[str, Any]]:
    """``mc_eval_file`` naming an lm-eval task YAML: its metrics (``mc_task``, ``mc_acc``...;
    :class:`qlora_jax.eval.lm_eval_model.TaskEvaluator`), for the frozen base ``frozen``."""
    if cfg.mc_eval_shots or cfg.mc_eval_dev_file:
        raise ConfigError(f"mc_eval_shots={cfg.mc_eval_shots}, mc_eval_dev_file={cfg.mc_eval_dev_file!r}: an lm-eval "
                          f"task ({cfg.mc_eval_file}) sets its own few-shot examples (num_fewshot in its YAML)")
    try:
        from qlora_jax.eval.lm_eval_model import TaskEvaluator
    except ImportError as err:
        raise ConfigError(f"mc_eval_file={cfg.mc_eval_file!r}: an lm-eval task needs lm-eval ({err}); "
                          "pip install -r requirements/lm-eval.txt") from None
    try:
        evaluator = TaskEvaluator(cfg.mc_eval_file, model, tokenizer,
                                  batch_size=cfg.per_device_eval_batch_size * data_parallel_size(mesh), mesh=mesh,
                                  max_length=min(model.config.max_position_embeddings, MC_EVAL_MAX_LENGTH))
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"mc_eval_file={cfg.mc_eval_file!r}: {err}") from None
    log.info("multiple-choice evaluation: %s", evaluator.description)
    if cfg.full_finetune:
        return lambda trainable: evaluator(trainable, None)
    return lambda trainable: evaluator(frozen, trainable)


def held_out_batches(data: FinetuneData, batch_size: int, pad_id: int,
                     rows: Sequence[int] | None = None) -> list[dict[str, np.ndarray]]:
    """Every held-out conversation once, in batches ``[1, batch_size, T]`` (the eval step's layout);
    ``rows``: only these rows of each (:func:`process_rows`)."""
    return [data_lib.stack_batches([batch], pad_id) for batch in
            data_lib.eval_batches(data.held_out, batch_size=batch_size, pad_id=pad_id, buckets=data.buckets,
                                  rows=rows)]


def evaluate(eval_step: Callable, trainable: Any, frozen: Any, batches: Sequence[dict[str, np.ndarray]],
             put_batch: Callable = device_batch) -> float:
    """Mean response-token loss (nats) over held-out ``batches`` (:func:`held_out_batches`),
    weighted by their target-token counts."""
    total, count = 0.0, 0.0
    for batch in batches:
        loss_sum, tokens = eval_step(trainable, frozen, put_batch(batch))
        total, count = total + float(loss_sum), count + float(tokens)
    return total / max(count, 1.0)


def _first_question(example: data_lib.Example) -> tuple[list[dict[str, str]], str]:
    first_user = next(i for i, m in enumerate(example.messages) if m["role"] == "user")
    reference = next((m["content"] for m in example.messages[first_user + 1:] if m["role"] == "assistant"), "")
    return list(example.messages[: first_user + 1]), reference


def held_out_answers(model: CausalLM, tokenizer: Tokenizer, examples: Sequence[data_lib.Example], *,
                     max_new_tokens: int, template: str | None = None) -> list[dict[str, str]]:
    """``model``'s greedy answers to the first user turn of each conversation:
    ``[{"question", "reference", "answer"}]``."""
    if not examples:
        return []
    questions = [_first_question(ex) for ex in examples]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                              template=template)) for messages, _ in questions]
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    sampling = SamplingConfig(max_new_tokens=max_new_tokens,
                              stop_token_ids=tuple(sorted({*model.config.stop_token_ids, *eos})))
    replies = generate_tokens(model.spec, model.base_params, model.lora_params, prompts, sampling,
                              pad_id=tokenizer.pad_id)
    return [{"question": messages[-1]["content"], "reference": reference, "answer": tokenizer.decode(reply)}
            for (messages, reference), reply in zip(questions, replies, strict=True)]


# ----------------------------------------------------------------------------- the loop
class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step or evaluation; a context manager.

    ``keep_through_step``: on resume, the rows up to the restored step are kept and the rest (from
    steps after the checkpoint, which will run again) dropped; None starts an empty file. Only
    process 0 of a multi-process run writes it (the values are global, the same on every process).
    """

    def __init__(self, path: str | pathlib.Path, *, keep_through_step: int | None = None):
        self.path = pathlib.Path(path)
        self.keep_through_step = keep_through_step
        self._file = None

    def __enter__(self) -> MetricsLog:
        multiprocess.on_primary(self._open, "opening metrics.jsonl")
        return self

    def _open(self) -> None:
        kept = [] if self.keep_through_step is None else [
            row for row in self.read(self.path) if row["step"] <= self.keep_through_step]
        self._file = self.path.open("w")
        for row in kept:
            self.write(row)

    def __exit__(self, *exc_info) -> None:
        if self._file is not None:
            self._file.close()

    def write(self, row: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    @staticmethod
    def read(path: str | pathlib.Path) -> list[dict[str, Any]]:
        """The rows of a metrics file (none if it does not exist)."""
        path = pathlib.Path(path)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tree_all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of ``tree`` is finite.

    Device arrays are reduced on the device (sharded ones too); host-memory arrays (offloaded
    optimizer state) are checked shard by shard on the host, each process its own shards, and the
    processes agree on the answer.
    """
    device, host = [], []
    for x in jax.tree.leaves(tree):
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            continue
        kind = getattr(getattr(x, "sharding", None), "memory_kind", None)
        (host if kind in ("pinned_host", "unpinned_host") else device).append(x)
    if device and not bool(_all_finite(device)):
        return False
    if not host:
        return True
    return multiprocess.all_processes_agree(
        all(np.isfinite(np.asarray(shard.data)).all() for x in host for shard in x.addressable_shards))


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


@jax.jit
def _total(x: jax.Array) -> jax.Array:
    # Over the global batch: a process holds only its rows.
    return jnp.sum(x)


def _stop(health: Health, checkpointer: TrainCheckpointer, monitor: DivergenceMonitor) -> None:
    """Removes the checkpoints after the last good state and raises, naming the last good checkpoint."""
    removed = checkpointer.discard_after(monitor.last_good_state)
    good = checkpointer.latest_step()
    where = (f"the last good checkpoint is step {good} in {checkpointer.directory}" if good is not None else
             f"no good checkpoint was saved in {checkpointer.directory}")
    note = f" (removed the checkpoints of steps {removed}, whose states led here)" if removed else ""
    advice = (f"; continue from it with a lower learning_rate in a new output_dir: "
              f"--adapter_init={checkpointer.directory / str(good)}" if good is not None else "")
    cls = TrainingCollapsedError if "non-finite" not in health.reason else NonFiniteLossError
    raise cls(f"training diverged at step {health.step}: {health.reason}. Stopped without saving{note}; "
              f"{where}{advice}")


def _due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


class _Throughput:
    """Training throughput over the steps that ran compiled: the first step of each batch shape
    compiles (said in the log, and left out of the rate)."""

    def __init__(self):
        self.compiled: set[tuple[int, ...]] = set()
        self.tokens, self.seconds = 0.0, 0.0

    def before(self, shape: tuple[int, ...]) -> None:
        """Says, before a step of a new batch shape, that it compiles first."""
        if shape not in self.compiled:
            log.info("compiling the training step for batches of shape %s (minutes for a large model; the "
                     "progress bar's time estimate means nothing until it is done)...", shape)

    def after(self, shape: tuple[int, ...], tokens: float, seconds: float) -> None:
        """Counts a step of ``tokens`` (prompt and target) that took ``seconds``, unless it compiled."""
        if shape in self.compiled:
            self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        else:
            self.compiled.add(shape)
            log.info("compiled and ran the first step of shape %s in %.1f s", shape, seconds)

    @property
    def tokens_per_second(self) -> float:
        """Tokens per second of the compiled steps (0 without one)."""
        return self.tokens / self.seconds if self.seconds else 0.0


def _multiple_choice(mc_eval_fn: Callable[[Any], dict[str, Any]] | None, trainable: Any, metrics: MetricsLog,
                     at_step: int) -> None:
    """Runs and logs the multiple-choice evaluation, if there is one."""
    if mc_eval_fn is None:
        return
    result = mc_eval_fn(trainable)
    metrics.write({"kind": "mc_eval", "step": at_step, **result})
    if "mc_task" in result:  # an lm-eval task: whatever metrics it defines
        log.info("step %d: lm-eval task %s over %d documents: %s", at_step, result["mc_task"],
                 result["mc_count"], ", ".join(f"{k.removeprefix('mc_')} {v:.4g}" for k, v in result.items()
                                               if k not in ("mc_task", "mc_count")))
    else:
        log.info("step %d: multiple-choice accuracy %.3f (acc_norm %.3f) over %d questions", at_step,
                 result["mc_acc"], result["mc_acc_norm"], result["mc_count"])


def _held_out(step: int, trainable: Any, evaluate_fn: Callable[[Any], float], metrics: MetricsLog,
              monitor: DivergenceMonitor, checkpointer: TrainCheckpointer) -> float:
    """The held-out loss after ``step``, logged and shown to ``monitor`` (which may stop the run)."""
    eval_loss = evaluate_fn(trainable)
    metrics.write({"kind": "eval", "step": step, "eval_loss": eval_loss, "eval_perplexity": _perplexity(eval_loss)})
    log.info("step %d: held-out loss %.3f nats (perplexity %.1f)", step, eval_loss, _perplexity(eval_loss))
    verdict = monitor.check_eval(step, eval_loss)
    if verdict.diverged:
        _stop(verdict, checkpointer, monitor)
    return eval_loss


def _before_training(trainable: Any, evaluate_fn: Callable[[Any], float],
                     mc_eval_fn: Callable[[Any], dict[str, Any]] | None, metrics: MetricsLog) -> None:
    """The held-out loss (and multiple-choice metrics) of the state before any step, logged."""
    first = evaluate_fn(trainable)
    metrics.write({"kind": "eval", "step": 0, "eval_loss": first, "eval_perplexity": _perplexity(first)})
    log.info("held-out loss before training: %.3f nats (perplexity %.1f)", first, _perplexity(first))
    _multiple_choice(mc_eval_fn, trainable, metrics, 0)


class _StepFigures(NamedTuple):
    """What one training step reports: its loss (nats per target token), gradient norm, target
    tokens, prompt and target tokens (the throughput's count), wall-clock seconds and, for an MoE
    model, the routers' load-balancing loss (its weighted part is in ``loss``; None otherwise)."""

    loss: float
    grad_norm: float
    tokens: float
    sequence_tokens: float
    seconds: float
    aux_loss: float | None = None


def _timed_step(train_step: Callable, trainable: Any, opt_state: Any, frozen: Any, batch: dict[str, Any],
                key: jax.Array | None, throughput: _Throughput) -> tuple[Any, Any, _StepFigures]:
    """One training step, timed (until its metrics are on the host) and counted in ``throughput``."""
    shape = tuple(batch["input_ids"].shape)
    throughput.before(shape)
    tick = time.perf_counter()
    trainable, opt_state, out = train_step(trainable, opt_state, frozen, batch, key)
    loss, grad_norm, tokens = float(out["loss"]), float(out["grad_norm"]), float(out["tokens"])
    seconds = time.perf_counter() - tick
    sequence_tokens = float(_total(batch["attention_mask"]))
    throughput.after(shape, sequence_tokens, seconds)
    aux_loss = float(out["aux_loss"]) if "aux_loss" in out else None
    return trainable, opt_state, _StepFigures(loss, grad_norm, tokens, sequence_tokens, seconds, aux_loss)


def _save_if_good(step: int, health: Health, trainable: Any, opt_state: Any, *, checkpointer: TrainCheckpointer,
                  monitor: DivergenceMonitor, save: Callable[[], None]) -> None:
    """The save decision: only a healthy, finite state is saved (``save()``); a non-finite one stops the run."""
    if not health.healthy:
        log.warning("not saving step %d: %s (since step %s)", step, health.reason, health.since_step)
    elif not tree_all_finite((trainable, opt_state)):
        _stop(Health(step, "diverged", "the state after the update is non-finite (NaN/Inf)"), checkpointer, monitor)
    else:
        save()


def _train_row(step: int, lr: float, epoch: int, figures: _StepFigures) -> dict[str, Any]:
    """The ``metrics.jsonl`` row of one training step."""
    row = {"kind": "train", "step": step, "loss": figures.loss, "learning_rate": lr, "grad_norm": figures.grad_norm,
           "tokens": figures.sequence_tokens, "seconds": figures.seconds, "epoch": epoch}
    if figures.aux_loss is not None:  # MoE: the routers' load-balancing loss (its weighted part is in loss)
        row["aux_loss"] = figures.aux_loss
    return row


def train_loop(
    cfg: FinetuneConfig,
    state: TrainState,
    *,
    train_step: Callable,
    frozen: Any,
    batches: data_lib.BatchIterator,
    evaluate_fn: Callable[[Any], float],
    schedule: Callable[[int], Any],
    checkpointer: TrainCheckpointer,
    metrics: MetricsLog,
    monitor: DivergenceMonitor,
    put_batch: Callable = device_batch,
    checkpoint_extra: dict[str, Any] | None = None,
    mc_eval_fn: Callable[[Any], dict[str, Any]] | None = None,
    progress: bool = True,
) -> LoopResult:
    """Steps from ``state.step`` to ``cfg.max_steps``: the held-out loss first (from step 0),
    metrics every ``logging_steps``, the held-out loss every ``eval_steps`` and checkpoints every
    ``save_steps`` (and at the end).

    ``train_step(trainable, opt_state, frozen, batch, key) -> (trainable, opt_state, metrics)``
    (metrics: loss, grad_norm, tokens); ``batches``: ``next_batches(k)`` and ``state``;
    ``evaluate_fn(trainable)`` -> held-out loss; ``mc_eval_fn(trainable)`` -> multiple-choice
    metrics (:func:`setup_mc_eval`), logged as ``"mc_eval"`` rows at step 0, every
    ``mc_eval_steps`` (default ``eval_steps``) and at the end. ``monitor`` sees every step: the loop stops with
    :class:`~qlora_jax.train.NonFiniteLossError` or :class:`TrainingCollapsedError` when it says
    diverged, saves only while it says healthy and the state is finite, and keeps the checkpoints
    it has proven good (see :class:`~qlora_jax.training_state.TrainCheckpointer`).
    """
    from tqdm.auto import tqdm

    trainable, opt_state, step = state.trainable, state.opt_state, state.step
    flags = dataclasses.asdict(cfg)
    throughput, eval_loss = _Throughput(), None
    mc_every = cfg.mc_eval_steps or cfg.eval_steps
    if step == 0:
        _before_training(trainable, evaluate_fn, mc_eval_fn, metrics)
    with tqdm(total=cfg.max_steps, initial=step, disable=not progress or not multiprocess.is_primary(),
              dynamic_ncols=True, desc="finetune") as bar:
        while step < cfg.max_steps:
            batch = put_batch(batches.next_batches(cfg.gradient_accumulation_steps))
            key = jax.random.fold_in(state.rng_key, step) if cfg.lora_dropout > 0 else None
            trainable, opt_state, figures = _timed_step(train_step, trainable, opt_state, frozen, batch, key,
                                                        throughput)
            loss, grad_norm, tokens, sequence_tokens, seconds, _ = figures
            step += 1
            lr = float(schedule(step - 1))
            health = monitor.update(step, loss=loss, grad_norm=grad_norm, tokens=tokens)
            if _due(step, cfg.logging_steps, cfg.max_steps) or health.diverged:
                metrics.write(_train_row(step, lr, batches.epoch, figures))
            if health.diverged:
                _stop(health, checkpointer, monitor)
            if health.healthy:
                checkpointer.confirm(monitor.last_good_state)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{sequence_tokens / seconds:.0f}")
            bar.update(1)
            if _due(step, cfg.eval_steps, cfg.max_steps):
                eval_loss = _held_out(step, trainable, evaluate_fn, metrics, monitor, checkpointer)
            if _due(step, mc_every, cfg.max_steps):
                _multiple_choice(mc_eval_fn, trainable, metrics, step)
            if _due(step, cfg.save_steps, cfg.max_steps):
                extra = {**(checkpoint_extra or {}), "health": {"loss": loss, "grad_norm": grad_norm}}
                _save_if_good(step, health, trainable, opt_state, checkpointer=checkpointer, monitor=monitor,
                              save=functools.partial(checkpointer.save, step, trainable, opt_state,
                                                     data_state=batches.state, rng_key=state.rng_key, flags=flags,
                                                     extra=extra))
    if eval_loss is None:  # nothing left to train (a resume at max_steps whose outputs were not written)
        eval_loss = evaluate_fn(trainable)
    monitor.confirm_final(step, eval_loss)
    checkpointer.confirm(monitor.last_good_state)
    final = TrainState(step, trainable, opt_state, state.rng_key, batches.state)
    return LoopResult(final, eval_loss, throughput.tokens_per_second)


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0)) if math.isfinite(loss) else math.nan


# ----------------------------------------------------------------------------- outputs
def _plot_losses(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if any(r["kind"] == "mc_eval" for r in rows):
        from qlora_jax.eval import plot_accuracy

        plot_accuracy(ax, rows)  # accuracy on a 0-1 axis at the right
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, alpha=0.35, label="train loss (per step)")
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label=f"train loss ({window}-step mean)")
    if evals:
        steps, losses = zip(*evals, strict=True)
        ax.plot(steps, losses, "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response-token loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _adapter_rank(lora: Any) -> int:
    ranks = {pair["lora_A"].shape[-2] for group in lora["layers"].values() for pair in group.values()
             if "lora_A" in pair}  # (a trained MoE router is a full matrix, not an adapter pair)
    if len(ranks) != 1:
        raise ValueError(f"adapters of several ranks {sorted(ranks)}")
    return ranks.pop()


def write_outputs(cfg: FinetuneConfig, model: CausalLM, loop: LoopResult, *, tokenizer: Tokenizer,
                  data: FinetuneData, samples_before: list[dict[str, str]], started: float) -> FinetuneResult:
    """The PEFT adapter, held-out answers after training, the loss plot, ``summary.json`` and the
    ``completed`` marker; returns the :class:`FinetuneResult`. Refuses to export a non-finite state.

    Every process of a multi-process run takes part (the answers and the gathering of the sharded
    adapters are collectives); process 0 alone writes, and every process returns its result.
    """
    out = pathlib.Path(cfg.output_dir)
    trainable = loop.state.trainable
    if not tree_all_finite(trainable):
        raise NonFiniteLossError(f"the final state of {out} is non-finite: nothing exported")
    trained = with_trainable(model, trainable)
    after = held_out_answers(trained, tokenizer, data.sample_conversations, max_new_tokens=cfg.sample_max_new_tokens,
                             template=cfg.chat_template)
    samples = [{**before, "after": answer["answer"]} for before, answer in zip(samples_before, after, strict=True)]
    adapters = None if cfg.full_finetune else multiprocess.gather_to_host(trainable)

    def write() -> dict[str, Any]:
        if adapters is not None:
            lora_config = model.spec.lora_config
            if _adapter_rank(adapters) != lora_config.r:
                raise ValueError(f"adapters of rank {_adapter_rank(adapters)} under a config of r={lora_config.r}")
            save_peft_adapter(out / "adapter", adapters, lora_config, model.config, base_model_name_or_path=cfg.model,
                              expert_format=cfg.peft_expert_format)
        (out / SAMPLES).write_text(json.dumps(samples, indent=2))
        rows = MetricsLog.read(out / METRICS)
        _plot_losses(rows, out / "loss_curve.png")
        result = FinetuneResult(
            output_dir=out, final_step=loop.state.step,
            first_eval_loss=next((r["eval_loss"] for r in rows if r["kind"] == "eval" and r["step"] == 0), None),
            final_eval_loss=loop.eval_loss, train_tokens_per_second=loop.tokens_per_second,
            wall_seconds=time.perf_counter() - started,
            peak_host_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, samples=samples)
        summary = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in dataclasses.asdict(result).items()}
        (out / SUMMARY).write_text(json.dumps(summary, indent=2))
        (out / COMPLETED).write_text(f"step {loop.state.step}\n")
        return summary

    # The others wait for process 0's files and return its summary (the run's).
    summary = multiprocess.from_primary(write, "writing the outputs")
    return FinetuneResult(**{**summary, "output_dir": out})


def samples_before_training(cfg: FinetuneConfig, model: CausalLM, tokenizer: Tokenizer,
                            data: FinetuneData) -> list[dict[str, str]]:
    """Held-out answers of the model as loaded (``samples.json`` of an earlier start of this run, if
    any), written to ``samples.json`` at once so that a resumed run compares with the same answers.
    Process 0 reads and writes the file; every process returns the same answers."""
    path = pathlib.Path(cfg.output_dir) / SAMPLES

    def read() -> list[dict[str, str]] | None:
        if not (cfg.resume and path.exists()):
            return None
        return [{k: s[k] for k in ("question", "reference", "before")} for s in json.loads(path.read_text())]

    saved = multiprocess.from_primary(read, "the saved samples")
    if saved is not None:
        return saved
    answers = held_out_answers(model, tokenizer, data.sample_conversations, max_new_tokens=cfg.sample_max_new_tokens,
                               template=cfg.chat_template)
    samples = [{"question": a["question"], "reference": a["reference"], "before": a["answer"]} for a in answers]
    multiprocess.on_primary(lambda: path.write_text(json.dumps(samples, indent=2)), "writing samples.json")
    return samples
