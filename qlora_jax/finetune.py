"""The QLoRA finetuning recipe: :func:`run` is the sequence of the steps in :mod:`qlora_jax.recipe.steps`.

``run(FinetuneConfig(...))`` loads a model with a 4-bit base and LoRA adapters, tokenizes a chat
dataset with the source masked out, trains with a (host-offloaded) AdamW under a divergence
monitor, evaluates the held-out loss, checkpoints everything needed to resume exactly, and writes
the adapter in PEFT's format. ``experiments/finetune.py`` generates its flags from
:class:`FinetuneConfig`; its defaults run a real finetune of the embedded SmolLM2-135M-Instruct on
``chatterbot-corpus`` in minutes on a CPU.

Outputs in ``output_dir``: ``metrics.jsonl`` (one JSON object per logged step or evaluation),
``loss_curve.png``, ``samples.json`` (held-out answers before and after), ``summary.json``,
``completed``, ``checkpoints/<step>/`` (Orbax: adapters, optimizer state, data position, RNG,
settings), ``base/`` (the quantized base, :func:`~qlora_jax.checkpoints.orbax_format.save_quantized`,
read back on resume instead of re-quantizing) and ``adapter/`` (``adapter_model.safetensors`` +
``adapter_config.json``); ``.lock`` while the run is alive. A write that fails for lack of
space or permission raises :class:`~qlora_jax.recipe.io_errors.OutputDirError` (one line).
"""

from __future__ import annotations

import functools
import pathlib
import time

from qlora_jax.recipe import io_errors, steps
from qlora_jax.recipe.config import FinetuneConfig
from qlora_jax.recipe.divergence import DivergenceMonitor
from qlora_jax.recipe.steps import FinetuneResult, MetricsLog

__all__ = ["FinetuneConfig", "FinetuneResult", "run"]


def run(cfg: FinetuneConfig, *, progress: bool = True) -> FinetuneResult:
    """Runs (or, with ``cfg.resume``, continues) a finetune; see the module docstring."""
    started, out = time.perf_counter(), pathlib.Path(cfg.output_dir)
    # A full disk or a folder we may not write ends the run with one line (OutputDirError),
    # whether our code or Orbax's writer threads saw it.
    with (io_errors.naming_output_errors(out), steps.lock_output_dir(cfg),
          steps.open_checkpoints(cfg) as checkpointer):
        if (done := steps.finished_result(cfg, checkpointer)) is not None:
            return done
        steps.check_adapter_init(cfg)
        mesh = steps.setup_mesh(cfg)
        shards = steps.data_parallel_size(mesh)
        model, tokenizer = steps.setup_model(cfg, mesh)
        data = steps.setup_data(cfg, tokenizer, data_parallel=shards)
        trainable, frozen = steps.split_trainable(model)
        # Before any answer is generated: an explicit evaluation that cannot run fails early.
        mc_eval = steps.setup_mc_eval(cfg, model, tokenizer, mesh, frozen)
        samples_before = steps.samples_before_training(cfg, model, tokenizer, data)
        optimizer, schedule = steps.setup_optimizer(cfg)
        state = steps.restore_or_init(cfg, checkpointer, trainable, optimizer)
        train_step, eval_step = steps.compile_steps(model.spec, optimizer, state.opt_state)
        # Each process reads only the rows of every global batch that its devices hold.
        train_size, eval_size = cfg.per_device_train_batch_size * shards, cfg.per_device_eval_batch_size * shards
        train_rows, eval_rows = steps.process_rows(mesh, train_size), steps.process_rows(mesh, eval_size)
        held_out = steps.held_out_batches(data, eval_size, tokenizer.pad_id, rows=eval_rows)
        with MetricsLog(out / steps.METRICS, keep_through_step=state.step or None) as metrics:
            loop = steps.train_loop(
                cfg, state, train_step=train_step, frozen=frozen, schedule=schedule, checkpointer=checkpointer,
                batches=steps.training_batches(cfg, data, tokenizer.pad_id, state, shards, rows=train_rows),
                evaluate_fn=functools.partial(steps.evaluate, eval_step, frozen=frozen, batches=held_out,
                                              put_batch=functools.partial(steps.device_batch, mesh=mesh,
                                                                          rows=eval_rows, batch_size=eval_size)),
                metrics=metrics, monitor=DivergenceMonitor(model.config.vocab_size, start_step=state.step),
                put_batch=functools.partial(steps.device_batch, mesh=mesh, rows=train_rows, batch_size=train_size),
                checkpoint_extra=steps.checkpoint_extra(cfg, model), mc_eval_fn=mc_eval, progress=progress)
        return steps.write_outputs(cfg, model, loop, tokenizer=tokenizer, data=data, samples_before=samples_before,
                                   started=started)
